-- Simplified sliding sync (MSC4186) connections. They live in the database, not in a process,
-- so a client can continue a connection on any server process sharing the database.
--
-- A connection is (user, device, conn_id). `connection_key` is a random number chosen each
-- time the connection (re)starts, so the `pos` values of an earlier connection with the same
-- ids are unknown to the new one. Every answer hands out a position (`pos` is the key and the
-- position id), numbered per connection from `next_position`. A connection unused for a while
-- is deleted with everything it holds.
CREATE TABLE sliding_sync_connections (
    connection_key BIGINT NOT NULL PRIMARY KEY,
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    conn_id VARCHAR(200) NOT NULL,
    next_position BIGINT NOT NULL,
    created_ts BIGINT NOT NULL,
    last_used_ts BIGINT NOT NULL
);
CREATE UNIQUE INDEX sliding_sync_connections_ids ON sliding_sync_connections (user_id, device_id, conn_id);
CREATE INDEX sliding_sync_connections_used ON sliding_sync_connections (last_used_ts);

-- The positions a connection handed out and may still be asked to continue from: the one the
-- client used last and those answered after it (older ones are deleted once a newer one is
-- used, and only the last few are kept).
CREATE TABLE sliding_sync_positions (
    connection_key BIGINT NOT NULL,
    position_id BIGINT NOT NULL,
    -- The global stream position the answer was complete up to.
    stream_position BIGINT NOT NULL,
    -- The rooms the client had been sent as of this position (`sliding_sync_rooms.room_set`).
    -- Positions whose answer changed no room share their predecessor's set.
    room_set BIGINT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (connection_key, position_id)
);

-- What a connection has sent of each room, per room set (a set is never changed once written;
-- one no position refers to is deleted).
CREATE TABLE sliding_sync_rooms (
    connection_key BIGINT NOT NULL,
    room_set BIGINT NOT NULL,
    room_id VARCHAR(255) NOT NULL,
    -- The user's membership when the room was last sent: `join`, or `invite`/`knock` (only
    -- stripped state was sent).
    membership VARCHAR(32) NOT NULL,
    -- NULL: the client is up to date with the room as of the position's stream position.
    -- Otherwise the stream position the client has the room up to: it changed after that
    -- while in none of the client's lists.
    sent_upto BIGINT NULL,
    -- The `required_state` the room was last sent with (`sliding_sync_required_state`).
    required_state_id BIGINT NOT NULL,
    PRIMARY KEY (connection_key, room_set, room_id)
);

-- The distinct `required_state` configurations of a connection: a JSON array of sorted
-- `[type, state_key]` pairs.
CREATE TABLE sliding_sync_required_state (
    connection_key BIGINT NOT NULL,
    required_state_id BIGINT NOT NULL,
    required_state TEXT NOT NULL,
    PRIMARY KEY (connection_key, required_state_id)
);
