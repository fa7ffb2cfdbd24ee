-- User data: sync filters and account data (global and per room, tags included).

-- Filters a user uploaded (`POST /user/{userId}/filter`). Ids are per user: "0", "1", ...
CREATE TABLE user_filters (
    user_id VARCHAR(255) NOT NULL,
    filter_id VARCHAR(255) NOT NULL,
    -- The filter as uploaded, a JSON object.
    filter_json TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

-- Account data: one row per (user, room, type); `room_id` is '' for global account data, so
-- that it can be part of the primary key. `stream_position` is taken from the shared
-- `events_stream` counter when the row is written, so one position orders events and account
-- data, and an incremental sync reads what changed in (since, now] through the index.
CREATE TABLE account_data (
    user_id VARCHAR(255) NOT NULL,
    room_id VARCHAR(255) NOT NULL,
    data_type VARCHAR(255) NOT NULL,
    -- The content, a JSON object.
    content TEXT NOT NULL,
    stream_position BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_user_stream ON account_data (user_id, stream_position);
