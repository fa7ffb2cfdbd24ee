//! Lazy-loaded members already sent: per sync "connection" (user, device, filter), which
//! member event of each room member it was sent, and in which response.
//!
//! A member event counts as known to the client only once the client used a `since` at or
//! past the response that carried it, so a response that got lost costs a resend, never a
//! missing member. Kept in memory, per process: another process simply sends the members
//! again, which is redundant but right.

use std::{collections::HashMap, sync::Mutex};

/// Members remembered per room; past this the room starts over (members are sent again).
const MAX_MEMBERS_PER_ROOM: usize = 5_000;
/// Rooms remembered; past this everything starts over.
const MAX_ROOMS: usize = 2_000;

/// member → (member event id, stream position of the response that carried it).
type SentMembers = HashMap<String, (String, i64)>;

/// Per room, the members sent.
#[derive(Debug, Default)]
pub struct LazyMembers {
    rooms: Mutex<HashMap<String, SentMembers>>,
}

impl LazyMembers {
    pub fn new() -> Self {
        Self::default()
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, SentMembers>> {
        match self.rooms.lock() {
            Ok(rooms) => rooms,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the client has `event_id` as `member`'s event: it was sent in a response up to
    /// `since`, which the client acknowledged by syncing from there.
    pub fn known(&self, room_id: &str, member: &str, event_id: &str, since: i64) -> bool {
        self.rooms()
            .get(room_id)
            .and_then(|members| members.get(member))
            .is_some_and(|(sent, at)| sent == event_id && *at <= since)
    }

    /// Records member events (`(member, event id)`) sent in the response at `position`.
    pub fn record(&self, room_id: &str, sent: &[(String, String)], position: i64) {
        if sent.is_empty() {
            return;
        }
        let mut rooms = self.rooms();
        if rooms.len() >= MAX_ROOMS && !rooms.contains_key(room_id) {
            rooms.clear();
        }
        let members = rooms.entry(room_id.to_owned()).or_default();
        if members.len() + sent.len() > MAX_MEMBERS_PER_ROOM {
            members.clear();
        }
        for (member, event_id) in sent {
            match members.get_mut(member) {
                // Sent before: the earlier response is the one that counts.
                Some((known, _)) if known == event_id => {}
                Some(entry) => *entry = (event_id.clone(), position),
                None => {
                    members.insert(member.clone(), (event_id.clone(), position));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_known_once_acknowledged() {
        let lazy = LazyMembers::new();
        lazy.record("!r", &[("@a".into(), "$1".into())], 10);
        assert!(
            !lazy.known("!r", "@a", "$1", 9),
            "the response at 10 may be lost"
        );
        assert!(lazy.known("!r", "@a", "$1", 10));
        assert!(!lazy.known("!r", "@a", "$2", 10), "another event of theirs");
        assert!(!lazy.known("!other", "@a", "$1", 10));
        lazy.record("!r", &[("@a".into(), "$1".into())], 20);
        assert!(
            lazy.known("!r", "@a", "$1", 15),
            "the first response counts"
        );
        lazy.record("!r", &[("@a".into(), "$2".into())], 30);
        assert!(!lazy.known("!r", "@a", "$1", 40));
        assert!(lazy.known("!r", "@a", "$2", 30));
    }
}
