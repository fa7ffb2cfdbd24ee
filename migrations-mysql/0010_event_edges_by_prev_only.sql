-- The graph's edges are written for the walk from an event to those citing it (federation:
-- is an event arriving late already cited, so no forward extremity?), through
-- `event_edges_prev`. The other way, an event's prev events, is in its PDU. The primary key
-- on (event_id, prev_event_id) served no read, and event ids are hashes: InnoDB clustered
-- the rows by it, so every edge landed on a random page. The key is now a counter, so rows
-- are appended (a table keeps a primary key: `sql_require_primary_key` and group
-- replication refuse a table without one).
ALTER TABLE event_edges
    DROP PRIMARY KEY,
    ADD COLUMN edge_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY FIRST;
