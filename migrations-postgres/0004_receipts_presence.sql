-- Receipts, typing notifications and presence. Each change takes the next position of the
-- global stream (`id_counters.events_stream`), like events, so /sync tokens stay one number
-- and every server process sharing the database sees every change.

-- The latest receipt of each type of a user in a room, per thread ('' when unthreaded, so
-- that it fits the primary key). `thread_id` is shorter than other ids so that the key stays
-- within MySQL's index size limit.
CREATE TABLE receipts (
    room_id VARCHAR(255) NOT NULL,
    receipt_type VARCHAR(32) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    thread_id VARCHAR(200) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    ts BIGINT NOT NULL,
    stream_position BIGINT NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_room_stream ON receipts (room_id, stream_position);

-- Presence of local users. `last_active_ts` moves without a stream position (syncs keep it
-- fresh); a change of state or status message takes one.
CREATE TABLE presence (
    user_id VARCHAR(255) NOT NULL PRIMARY KEY,
    state VARCHAR(32) NOT NULL,
    status_msg TEXT NULL,
    last_active_ts BIGINT NOT NULL,
    stream_position BIGINT NOT NULL
);
CREATE INDEX presence_stream ON presence (stream_position);

-- Who is typing where. Kept in the database (tiny, short-lived rows) so that every server
-- process sees it. `expires_at` is 0 once the user stopped typing (or their timeout ran out
-- and that was announced); the row stays, with the position of that change.
CREATE TABLE typing (
    room_id VARCHAR(255) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    expires_at BIGINT NOT NULL,
    stream_position BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX typing_expiry ON typing (expires_at);
