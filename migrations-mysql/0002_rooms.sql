-- Rooms as signed event graphs: events, their edges, incremental state snapshots (state
-- groups), current state and membership, transaction ids, aliases, profiles, signing keys.

-- Signing keys: the server's own (with the private key) and, later, remote servers' keys.
CREATE TABLE server_signing_keys (
    server_name VARCHAR(255) NOT NULL,
    key_id VARCHAR(255) NOT NULL,
    public_key TEXT NOT NULL,
    private_key TEXT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts BIGINT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Counters shared by every server process. `events_stream` numbers the global event stream
-- (sync positions; also the id of the state group an event creates). It is bumped inside the
-- writing transaction, so its row lock makes positions commit in order: a reader never sees
-- position N before every position below N is committed (or rolled back).
CREATE TABLE id_counters (
    name VARCHAR(64) NOT NULL PRIMARY KEY,
    counter_value BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
INSERT INTO id_counters (name, counter_value) VALUES ('events_stream', 0);

CREATE TABLE rooms (
    room_id VARCHAR(255) NOT NULL PRIMARY KEY,
    room_version VARCHAR(32) NOT NULL,
    creator VARCHAR(255) NOT NULL,
    is_public BOOLEAN NOT NULL DEFAULT FALSE,
    -- State after the latest event (the room's current state snapshot).
    state_group BIGINT NULL,
    max_depth BIGINT NOT NULL,
    -- Bumped by every persisted event: the optimistic-concurrency check of event creation.
    write_version BIGINT NOT NULL,
    created_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE events (
    event_id VARCHAR(255) NOT NULL PRIMARY KEY,
    room_id VARCHAR(255) NOT NULL,
    -- Position in the global event stream; NULL for outliers (no place in the timeline).
    stream_ordering BIGINT NULL,
    depth BIGINT NOT NULL,
    event_type VARCHAR(255) NOT NULL,
    state_key VARCHAR(255) NULL,
    sender VARCHAR(255) NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    -- The room state after this event (equal to the state before it for non-state events).
    state_group BIGINT NULL,
    outlier BOOLEAN NOT NULL,
    soft_failed BOOLEAN NOT NULL,
    rejected_reason TEXT NULL,
    redacted_by VARCHAR(255) NULL,
    -- The full PDU, canonical JSON.
    pdu_json MEDIUMTEXT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE UNIQUE INDEX events_stream ON events (stream_ordering);
CREATE INDEX events_room_stream ON events (room_id, stream_ordering);
CREATE INDEX events_room_ts ON events (room_id, origin_server_ts);

CREATE TABLE event_edges (
    event_id VARCHAR(255) NOT NULL,
    prev_event_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (event_id, prev_event_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX event_edges_prev ON event_edges (prev_event_id);

CREATE TABLE room_forward_extremities (
    room_id VARCHAR(255) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (room_id, event_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- A state group is its parent plus a delta; one with no parent holds the whole state.
CREATE TABLE state_groups (
    state_group BIGINT NOT NULL PRIMARY KEY,
    room_id VARCHAR(255) NOT NULL,
    prev_group BIGINT NULL,
    -- Deltas since the last full snapshot, to bound lookups.
    chain_length BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE state_group_entries (
    state_group BIGINT NOT NULL,
    event_type VARCHAR(255) NOT NULL,
    state_key VARCHAR(255) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (state_group, event_type, state_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE room_current_state (
    room_id VARCHAR(255) NOT NULL,
    event_type VARCHAR(255) NOT NULL,
    state_key VARCHAR(255) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Current membership of each user in each room, with the stream position it changed at.
CREATE TABLE room_memberships (
    room_id VARCHAR(255) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    membership VARCHAR(32) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    sender VARCHAR(255) NOT NULL,
    stream_ordering BIGINT NOT NULL,
    forgotten BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (room_id, user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX room_memberships_user ON room_memberships (user_id, membership);

-- Client transaction ids, for idempotent retries of PUT /send and /redact.
CREATE TABLE event_transactions (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    txn_id VARCHAR(255) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE room_aliases (
    room_alias VARCHAR(255) NOT NULL PRIMARY KEY,
    room_id VARCHAR(255) NOT NULL,
    creator VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX room_aliases_room ON room_aliases (room_id);

CREATE TABLE profiles (
    user_id VARCHAR(255) NOT NULL PRIMARY KEY,
    displayname TEXT NULL,
    avatar_url TEXT NULL,
    -- Custom profile fields, a JSON object.
    fields TEXT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
