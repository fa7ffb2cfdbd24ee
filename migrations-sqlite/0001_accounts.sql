-- Local accounts, their devices, access tokens (hashed) and user-interactive auth sessions.
CREATE TABLE users (
    user_id VARCHAR(255) NOT NULL PRIMARY KEY,
    password_hash TEXT NULL,
    is_admin BOOLEAN NOT NULL DEFAULT 0,
    is_deactivated BOOLEAN NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    display_name TEXT NULL,
    last_seen_ip VARCHAR(64) NULL,
    last_seen_ts BIGINT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE access_tokens (
    token_hash VARCHAR(64) NOT NULL PRIMARY KEY,
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);

CREATE TABLE uia_sessions (
    session_id VARCHAR(64) NOT NULL PRIMARY KEY,
    user_id VARCHAR(255) NULL,
    purpose VARCHAR(64) NOT NULL,
    completed TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX uia_sessions_created ON uia_sessions (created_at);
