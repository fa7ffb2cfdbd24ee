//! Threads: which thread an event belongs to, recorded when it is persisted so that
//! per-thread unread counts can be read by thread.
//!
//! An event with an `m.thread` relation is in the thread of its root. An event with any other
//! relation (a reaction, an edit, a reference) is in the thread of the event it relates to, so
//! a reaction to a thread message is in that thread, and one to the root is in the main
//! timeline (the root itself is).

use palpo_storage::StorageError;
use serde_json::Value;

use super::RoomService;

/// `rel_type` of a thread relation.
pub const THREAD_RELATION: &str = "m.thread";

/// The `(rel_type, event_id)` of the content's `m.relates_to`, when it has both.
pub fn relation(content: &Value) -> Option<(&str, &str)> {
    let relates_to = content.get("m.relates_to")?;
    Some((
        relates_to.get("rel_type")?.as_str()?,
        relates_to.get("event_id")?.as_str()?,
    ))
}

impl RoomService {
    /// The thread (root event id) an event with this content belongs to; `None` for the main
    /// timeline.
    pub(super) async fn thread_of(&self, content: &Value) -> Result<Option<String>, StorageError> {
        match relation(content) {
            None => Ok(None),
            Some((THREAD_RELATION, root)) => Ok(Some(root.to_owned())),
            Some((_, target)) => self.storage.rooms.thread_of_event(target).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn relations_are_read_from_the_content() {
        let content = json!({"m.relates_to": {"rel_type": "m.thread", "event_id": "$root"}});
        assert_eq!(relation(&content), Some(("m.thread", "$root")));
        assert_eq!(relation(&json!({"body": "hi"})), None);
        let reply = json!({"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}});
        assert_eq!(relation(&reply), None, "a reply is not a relation");
    }
}
