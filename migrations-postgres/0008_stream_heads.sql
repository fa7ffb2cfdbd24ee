-- Every /sync reads the newest position of each kind of change with the stream's position
-- (`EphemeralRepo::sync_position`) and skips the sections with nothing newer than its token.
-- These two heads had no index led by their position; the others do (presence,
-- device_list_changes, room_memberships) or are read per user (account_data, to-device).
CREATE INDEX typing_stream ON typing (stream_position);
CREATE INDEX receipts_stream ON receipts (stream_position);
