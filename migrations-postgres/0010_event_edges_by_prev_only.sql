-- The graph's edges are written for the walk from an event to those citing it (federation:
-- is an event arriving late already cited, so no forward extremity?), through
-- `event_edges_prev`. The other way, an event's prev events, is in its PDU. The primary key
-- on (event_id, prev_event_id) served no read, and event ids are hashes: every edge landed on
-- a random page of its index, a page more written per event and batch.
ALTER TABLE event_edges DROP CONSTRAINT event_edges_pkey;
