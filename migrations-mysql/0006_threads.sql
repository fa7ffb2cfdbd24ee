-- Threads: the thread (root event id) each timeline event belongs to, NULL for the main
-- timeline. An event is in a thread when it has an `m.thread` relation to the root, or any
-- other relation to an event in that thread. Per-thread unread counts read it.
ALTER TABLE events ADD COLUMN thread_id VARCHAR(255) NULL;
CREATE INDEX events_room_thread ON events (room_id, thread_id, stream_ordering);

-- Events stored before this column existed: their direct `m.thread` relations.
UPDATE events
SET thread_id = JSON_UNQUOTE(JSON_EXTRACT(pdu_json, '$.content."m.relates_to".event_id'))
WHERE pdu_json LIKE '%"m.thread"%'
  AND JSON_VALID(pdu_json)
  AND JSON_UNQUOTE(JSON_EXTRACT(pdu_json, '$.content."m.relates_to".rel_type')) = 'm.thread';
