-- End-to-end encryption: device identity keys, one-time and fallback keys, the device-list
-- change stream, and the to-device inbox.
--
-- Device-list changes and to-device messages take their position from the shared
-- `events_stream` counter (like account data, receipts and presence), so one /sync token orders
-- them with everything else. Key uploads take `e2e_keys` first in their transaction: it orders
-- one-time keys by upload (claims hand them out oldest first) and serializes key writes, so
-- their delete-then-insert upserts never meet.
INSERT INTO id_counters (name, counter_value) VALUES ('e2e_keys', 0);

-- The identity keys of each device (`device_keys` of /keys/upload, as uploaded, without
-- `unsigned`).
CREATE TABLE e2e_device_keys (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Unclaimed one-time keys. A claim deletes the key it hands out. `upload_seq` is the
-- `e2e_keys` position of the upload that brought the key (claims take the oldest first).
CREATE TABLE e2e_one_time_keys (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    algorithm VARCHAR(64) NOT NULL,
    key_id VARCHAR(128) NOT NULL,
    key_json TEXT NOT NULL,
    upload_seq BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);
CREATE INDEX e2e_one_time_keys_order ON e2e_one_time_keys (user_id, device_id, algorithm, upload_seq);

-- The fallback key of each device and algorithm: handed out when no one-time key is left,
-- and kept (marked `used`) until the device uploads another.
CREATE TABLE e2e_fallback_keys (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    algorithm VARCHAR(64) NOT NULL,
    key_id VARCHAR(128) NOT NULL,
    key_json TEXT NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Cross-signing keys of each user: `master`, `self_signing`, `user_signing`, as uploaded.
CREATE TABLE e2e_cross_signing_keys (
    user_id VARCHAR(255) NOT NULL,
    key_type VARCHAR(32) NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures uploaded through /keys/signatures/upload, added to the signed key when it is
-- read: of a device (`target_key_id` the device id) or a master key (its public key) of
-- `target_user_id`, by `signer_key_id` (`ed25519:...`) of `signer_user_id`. A signature by
-- another user is shown to that user only.
CREATE TABLE e2e_key_signatures (
    target_user_id VARCHAR(255) NOT NULL,
    target_key_id VARCHAR(128) NOT NULL,
    signer_user_id VARCHAR(255) NOT NULL,
    signer_key_id VARCHAR(128) NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user_id, target_key_id, signer_user_id, signer_key_id)
);

-- The latest change of each user's device list (identity keys uploaded or changed, a device
-- deleted, cross-signing keys or signatures uploaded), at an `events_stream` position: /sync and /keys/changes report the users whose
-- latest change is after the client's token. One row per user, so it does not grow.
CREATE TABLE device_list_changes (
    user_id VARCHAR(255) NOT NULL PRIMARY KEY,
    stream_position BIGINT NOT NULL
);
CREATE INDEX device_list_changes_stream ON device_list_changes (stream_position);
-- Memberships that changed in a range of the stream: who started or stopped sharing a room
-- with a user since a sync token, without reading every member of the user's rooms.
CREATE INDEX room_memberships_stream ON room_memberships (stream_ordering);

-- To-device messages waiting for their device. All the messages of one /sendToDevice share
-- its `events_stream` position; `seq` orders them within it (a `*` and an explicit device of
-- the same user both reach that device). A device's sync deletes what its token acknowledged.
CREATE TABLE to_device_messages (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    stream_position BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    sender VARCHAR(255) NOT NULL,
    event_type VARCHAR(255) NOT NULL,
    -- The content, a JSON object.
    content TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, stream_position, seq)
);

-- Transaction ids of /sendToDevice per sending device, for idempotent retries.
CREATE TABLE to_device_txns (
    user_id VARCHAR(255) NOT NULL,
    device_id VARCHAR(255) NOT NULL,
    txn_id VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);
