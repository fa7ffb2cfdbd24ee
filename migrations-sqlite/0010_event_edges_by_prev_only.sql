-- The graph's edges are written for the walk from an event to those citing it (federation:
-- is an event arriving late already cited, so no forward extremity?), through
-- `event_edges_prev`. The other way, an event's prev events, is in its PDU. The primary key
-- on (event_id, prev_event_id) served no read, and event ids are hashes: every edge landed on
-- a random page of it, a page more written per event and batch. The key is now a counter
-- (here the rowid itself), so edges are appended. SQLite cannot change a primary key: the
-- table is rebuilt.
CREATE TABLE event_edges_new (
    edge_id INTEGER NOT NULL PRIMARY KEY,
    event_id VARCHAR(255) NOT NULL,
    prev_event_id VARCHAR(255) NOT NULL
);
INSERT INTO event_edges_new (event_id, prev_event_id)
SELECT event_id, prev_event_id FROM event_edges;
DROP TABLE event_edges;
ALTER TABLE event_edges_new RENAME TO event_edges;
CREATE INDEX event_edges_prev ON event_edges (prev_event_id);
