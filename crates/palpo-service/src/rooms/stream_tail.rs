//! The stream's tail: the newest timeline events of every room, read once and shared by the
//! syncs of this process.
//!
//! Syncs woken by a new event all ask at once for the events since their token, which is
//! where the stream stood a moment before. Read per sync, every event is read once per
//! listener. Here the first sync that needs events past the tail's end reads the new range
//! for every room; the syncs woken with it wait for that read and take their rooms' events
//! from memory.
//!
//! What the tail holds is exactly what the database holds, because:
//! - positions commit in order: once a sync has read stream position `P`, every event at or
//!   before `P` is committed, so a range read up to `P` is final;
//! - an event's row does not change once written, except its `redacted_by`, which a
//!   redaction sets in its own transaction. A range with a redaction in it empties the tail,
//!   which starts again after that range.
//!
//! A sync whose token is older than the tail's start, or a range too long to keep, reads
//! its rooms from the database as before ([`StreamTail::events`] answers `None`).

use std::{
    collections::{HashSet, VecDeque},
    sync::{Mutex, PoisonError},
};

use palpo_storage::{Result, RoomRepo, model::EventRecord};

/// Most events the tail keeps; beyond, the oldest go.
const MAX_EVENTS: usize = 1024;
/// Most bytes of PDUs the tail keeps (events may be up to 64 KiB each); beyond, the oldest go.
const MAX_PDU_BYTES: usize = 1 << 20;
/// Most events one read past the tail's end may bring: a longer range (a burst, or a tail
/// left unread for long) empties the tail, which starts again after it.
const MAX_READ: usize = 512;

const REDACTION: &str = "m.room.redaction";

type Threaded = (EventRecord, Option<String>);

#[derive(Default)]
pub struct StreamTail {
    held: Mutex<Held>,
    /// Taken to read past the end: one sync reads, the others find the range read.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Held {
    /// The positions `(start, end]` held; `None` until a sync first asks.
    span: Option<(i64, i64)>,
    /// Every timeline event of the span, in stream order.
    events: VecDeque<Threaded>,
    pdu_bytes: usize,
}

enum Cover {
    /// The tail holds `(after, upto]`.
    Held,
    /// The tail starts after `after`: it cannot answer.
    TooOld,
    /// The tail holds up to `end` < `upto`; the rest must be read.
    Ends(i64),
}

impl Held {
    fn cover(&self, after: i64, upto: i64) -> Cover {
        match self.span {
            None => Cover::Ends(after),
            Some((start, _)) if after < start => Cover::TooOld,
            Some((_, end)) if upto > end => Cover::Ends(end),
            Some(_) => Cover::Held,
        }
    }

    /// The events of `rooms` in `(after, upto]` when held, `None` when the tail starts
    /// after `after`; `Err(end)` when it must first read past its end.
    fn answer(
        &self,
        rooms: &HashSet<&str>,
        after: i64,
        upto: i64,
    ) -> std::result::Result<Option<Vec<Threaded>>, i64> {
        match self.cover(after, upto) {
            Cover::Held => Ok(Some(self.take(rooms, after, upto))),
            Cover::TooOld => Ok(None),
            Cover::Ends(end) => Err(end),
        }
    }

    /// The events of `rooms` in `(after, upto]`, which the tail holds.
    fn take(&self, rooms: &HashSet<&str>, after: i64, upto: i64) -> Vec<Threaded> {
        let first = self
            .events
            .partition_point(|(e, _)| e.stream_ordering.unwrap_or(i64::MIN) <= after);
        self.events
            .range(first..)
            .take_while(|(e, _)| e.stream_ordering.is_some_and(|p| p <= upto))
            .filter(|(e, _)| rooms.contains(e.room_id.as_str()))
            .cloned()
            .collect()
    }

    /// Holds nothing, from `position` on.
    fn restart_at(&mut self, position: i64) {
        self.span = Some((position, position));
        self.events.clear();
        self.pdu_bytes = 0;
    }

    /// Adds `read`, every event in `(end, upto]`, then lets the oldest go past the limits.
    fn extend(&mut self, end: i64, upto: i64, read: Vec<Threaded>) {
        let start = self.span.map_or(end, |(start, _)| start);
        self.span = Some((start, upto));
        for event in read {
            self.pdu_bytes += event.0.pdu_json.len();
            self.events.push_back(event);
        }
        while self.events.len() > MAX_EVENTS || self.pdu_bytes > MAX_PDU_BYTES {
            let Some((oldest, _)) = self.events.pop_front() else {
                break;
            };
            self.pdu_bytes -= oldest.pdu_json.len();
            // The span now starts at the oldest event let go (exclusive).
            if let (Some((_, end)), Some(position)) = (self.span, oldest.stream_ordering) {
                self.span = Some((position, end));
            }
        }
    }
}

impl StreamTail {
    /// The timeline events of `rooms` in `(after, upto]`, in stream order with their threads,
    /// from the tail (reading past its end first when needed): `None` when the tail cannot
    /// answer, and the caller reads the database itself. `upto` must be a stream position
    /// read from the database (everything up to it is committed).
    pub async fn events(
        &self,
        storage: &dyn RoomRepo,
        rooms: &[String],
        after: i64,
        upto: i64,
    ) -> Result<Option<Vec<Threaded>>> {
        let wanted: HashSet<&str> = rooms.iter().map(String::as_str).collect();
        // Checked and taken under one lock: a read past the end may let the oldest go.
        if let Ok(answer) = self.held().answer(&wanted, after, upto) {
            return Ok(answer);
        }
        let _reading = self.reading.lock().await;
        // Another sync may have read it meanwhile.
        let end = match self.held().answer(&wanted, after, upto) {
            Ok(answer) => return Ok(answer),
            Err(end) => end,
        };
        let read = storage.stream_range(end, upto, MAX_READ as i64 + 1).await?;
        let mut held = self.held();
        if read.len() > MAX_READ || read.iter().any(|(e, _)| e.event_type == REDACTION) {
            // Too long to keep, or it changed events held (or about to be read): start over
            // after it.
            held.restart_at(upto);
            return Ok(None);
        }
        held.extend(end, upto, read);
        // Large events may have pushed part of the range out already: then `None`.
        Ok(held.answer(&wanted, after, upto).unwrap_or(None))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64, room: &str, pdu_bytes: usize) -> Threaded {
        let record = EventRecord {
            event_id: format!("${position}"),
            room_id: room.to_owned(),
            stream_ordering: Some(position),
            depth: position,
            event_type: "m.room.message".to_owned(),
            state_key: None,
            sender: "@a:test".to_owned(),
            origin_server_ts: 0,
            state_group: None,
            outlier: false,
            soft_failed: false,
            rejected_reason: None,
            redacted_by: None,
            pdu_json: "x".repeat(pdu_bytes),
        };
        (record, None)
    }

    fn positions(events: &[Threaded]) -> Vec<i64> {
        events
            .iter()
            .filter_map(|(e, _)| e.stream_ordering)
            .collect()
    }

    #[test]
    fn answers_only_the_ranges_it_holds() {
        let mut held = Held::default();
        assert!(matches!(held.cover(10, 20), Cover::Ends(10)));
        // Positions 11..=20 of two rooms (positions without events are fine: other streams).
        let read = (11..=20)
            .filter(|p| p % 3 != 0)
            .map(|p| event(p, if p % 2 == 0 { "!a" } else { "!b" }, 10))
            .collect();
        held.extend(10, 20, read);
        assert!(matches!(held.cover(10, 20), Cover::Held));
        assert!(matches!(held.cover(14, 17), Cover::Held));
        assert!(matches!(held.cover(9, 20), Cover::TooOld));
        assert!(matches!(held.cover(15, 21), Cover::Ends(20)));
        let a = HashSet::from(["!a"]);
        assert_eq!(positions(&held.take(&a, 10, 20)), [14, 16, 20]);
        assert_eq!(positions(&held.take(&a, 14, 19)), [16]);
        let both = HashSet::from(["!a", "!b"]);
        assert_eq!(positions(&held.take(&both, 11, 14)), [13, 14]);
        assert!(held.take(&HashSet::from(["!c"]), 10, 20).is_empty());
        held.restart_at(30);
        assert!(matches!(held.cover(20, 30), Cover::TooOld));
        assert!(matches!(held.cover(30, 31), Cover::Ends(30)));
    }

    #[test]
    fn lets_the_oldest_go_past_its_limits() {
        let mut held = Held::default();
        held.extend(0, 2000, (1..=2000).map(|p| event(p, "!a", 1)).collect());
        assert_eq!(held.events.len(), MAX_EVENTS);
        let start = 2000 - MAX_EVENTS as i64;
        assert!(matches!(held.cover(start - 1, 2000), Cover::TooOld));
        assert!(matches!(held.cover(start, 2000), Cover::Held));
        let all = held.take(&HashSet::from(["!a"]), start, 2000);
        assert_eq!(all.len(), MAX_EVENTS);
        // Large PDUs: the byte budget.
        let big = MAX_PDU_BYTES / 4 + 1;
        held.extend(
            2000,
            2010,
            (2001..=2010).map(|p| event(p, "!a", big)).collect(),
        );
        assert_eq!(
            positions(&held.take(&HashSet::from(["!a"]), 2007, 2010)),
            [2008, 2009, 2010]
        );
        assert!(matches!(held.cover(2006, 2010), Cover::TooOld));
        assert!(held.pdu_bytes <= MAX_PDU_BYTES);
        // A sync that asked for (2000, 2010] before that read gets no partial answer.
        assert_eq!(
            held.answer(&HashSet::from(["!a"]), 2000, 2010).ok(),
            Some(None)
        );
    }
}
