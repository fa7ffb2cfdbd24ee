//! Receipts, typing notifications and presence.
//!
//! Every change takes its position from the same `events_stream` counter as events, taken
//! first in the writing transaction: the counter row stays locked until commit, so positions
//! commit in order, and two writers of the same row never meet (no lock cycle with event
//! persistence either, which takes the room lock before the counter and never touches these
//! tables).

use async_trait::async_trait;
use futures::future::try_join_all;

use super::{
    ROOMS_PER_UNION, SqlStore, per_room_union, placeholders,
    rooms::{EVENT_COLUMNS, ThreadEventRow, next_counter},
};
use crate::{
    db::Text,
    error::{Result, StorageError},
    model::{
        DeviceKeyCounts, EventRecord, PositionAsk, PresenceRecord, ReadPosition, ReceiptRecord,
        SIGNED_CURVE25519, StreamHeads, SyncPosition, TypingRecord,
    },
    on_pool, on_tx,
    repo::EphemeralRepo,
};

/// The stream counter every change takes a position from.
const STREAM: &str = "events_stream";

/// Rooms per query: bounded IN lists keep every backend within its parameter limits.
const CHUNK: usize = 200;

const RECEIPT_COLUMNS: &str =
    "room_id, receipt_type, user_id, thread_id, event_id, ts, stream_position";

#[derive(sqlx::FromRow)]
struct ReceiptRow {
    room_id: Text,
    receipt_type: Text,
    user_id: Text,
    thread_id: Text,
    event_id: Text,
    ts: i64,
    stream_position: i64,
}

impl From<ReceiptRow> for ReceiptRecord {
    fn from(r: ReceiptRow) -> Self {
        let thread_id = String::from(r.thread_id);
        ReceiptRecord {
            room_id: r.room_id.into(),
            receipt_type: r.receipt_type.into(),
            user_id: r.user_id.into(),
            thread_id: (!thread_id.is_empty()).then_some(thread_id),
            event_id: r.event_id.into(),
            ts: r.ts,
            stream_position: r.stream_position,
        }
    }
}

const TYPING_COLUMNS: &str = "room_id, user_id, expires_at, stream_position";

#[derive(sqlx::FromRow)]
struct TypingRow {
    room_id: Text,
    user_id: Text,
    expires_at: i64,
    stream_position: i64,
}

impl From<TypingRow> for TypingRecord {
    fn from(r: TypingRow) -> Self {
        TypingRecord {
            room_id: r.room_id.into(),
            user_id: r.user_id.into(),
            expires_at: r.expires_at,
            stream_position: r.stream_position,
        }
    }
}

/// The presence states presence expiry moves between.
const ONLINE: &str = "online";
const UNAVAILABLE: &str = "unavailable";

const PRESENCE_COLUMNS: &str = "user_id, state, status_msg, last_active_ts, stream_position";

#[derive(sqlx::FromRow)]
struct PresenceRow {
    user_id: Text,
    state: Text,
    status_msg: Option<Text>,
    last_active_ts: i64,
    stream_position: i64,
}

impl From<PresenceRow> for PresenceRecord {
    fn from(r: PresenceRow) -> Self {
        PresenceRecord {
            user_id: r.user_id.into(),
            state: r.state.into(),
            status_msg: r.status_msg.map(Into::into),
            last_active_ts: r.last_active_ts,
            stream_position: r.stream_position,
        }
    }
}

/// Syncs asking at once per position read: each is a row of the statement, which
/// PostgreSQL starts (and SQLite prepares) once for all of them. The statement's text
/// changes with the count, so a few texts cover every batch.
const ASKS_PER_READ: usize = 8;

/// One row per ask: `n` (its index), the user, the device (`''`: none), the token to
/// check (`''`s: none). The first row names the columns.
fn asks_union(asks: usize) -> String {
    (0..asks)
        .map(|n| {
            if n == 0 {
                "SELECT ? AS n, ? AS user_id, ? AS device_id, ? AS token_hash, \
                 ? AS token_user, ? AS token_device"
            } else {
                "SELECT ?, ?, ?, ?, ?, ?"
            }
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

impl SqlStore {
    /// [`EphemeralRepo::sync_positions`] for at most [`ASKS_PER_READ`] asks.
    async fn sync_positions_chunk(
        &self,
        now: i64,
        asks: &[PositionAsk<'_>],
    ) -> Result<Vec<Result<SyncPosition>>> {
        // Each head is the end of an index (`MAX` of its leading column, or of the last one
        // after equalities), so this stays a handful of index lookups however large the
        // tables grow. Every writer takes its position from the counter in its transaction,
        // so a counter value read here comes with every change up to it. The heads of the
        // whole stream are subqueries of their own, run once for the statement; those of a
        // user or device are run per ask.
        type Row = (
            i64,
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let query = format!(
            "SELECT counter_value, asks.n, \
             (SELECT COUNT(*) FROM typing WHERE expires_at > 0 AND expires_at <= ?), \
             (SELECT MAX(stream_position) FROM typing), \
             (SELECT MAX(stream_position) FROM receipts), \
             (SELECT MAX(stream_position) FROM presence), \
             (SELECT MAX(stream_position) FROM device_list_changes), \
             (SELECT MAX(stream_ordering) FROM room_memberships), \
             (SELECT MIN(expires_at) FROM typing WHERE expires_at > ?), \
             (SELECT MAX(a.stream_position) FROM account_data a WHERE a.user_id = asks.user_id), \
             (SELECT MAX(m.stream_position) FROM to_device_messages m \
              WHERE m.user_id = asks.user_id AND m.device_id = asks.device_id), \
             (SELECT COUNT(*) FROM access_tokens t WHERE t.token_hash = asks.token_hash \
              AND t.user_id = asks.token_user AND t.device_id = asks.token_device), \
             (SELECT COUNT(*) FROM e2e_one_time_keys k \
              WHERE k.user_id = asks.user_id AND k.device_id = asks.device_id), \
             (SELECT COUNT(*) FROM e2e_one_time_keys k \
              WHERE k.user_id = asks.user_id AND k.device_id = asks.device_id \
              AND k.algorithm = ?), \
             (SELECT COUNT(*) FROM e2e_fallback_keys f \
              WHERE f.user_id = asks.user_id AND f.device_id = asks.device_id AND f.used = ?), \
             (SELECT COUNT(*) FROM e2e_fallback_keys f \
              WHERE f.user_id = asks.user_id AND f.device_id = asks.device_id AND f.used = ? \
              AND f.algorithm = ?) \
             FROM id_counters c CROSS JOIN ({}) asks WHERE c.name = ?",
            asks_union(asks.len())
        );
        let rows: Vec<Row> = on_pool!(self.db.fresh(), &query, |p, sql| {
            let mut q = sqlx::query_as(sql)
                .bind(now)
                .bind(now)
                .bind(SIGNED_CURVE25519)
                .bind(false)
                .bind(false)
                .bind(SIGNED_CURVE25519);
            for (n, ask) in asks.iter().enumerate() {
                q = q
                    .bind(n as i64)
                    .bind(ask.user_id)
                    .bind(ask.device_id.unwrap_or_default())
                    .bind(ask.token.map_or("", |t| t.token_hash.as_str()))
                    .bind(ask.token.map_or("", |t| t.user_id.as_str()))
                    .bind(ask.token.map_or("", |t| t.device_id.as_str()));
            }
            q.bind(STREAM).fetch_all(p).await?
        });
        let mut answers: Vec<Option<Result<SyncPosition>>> = asks.iter().map(|_| None).collect();
        for row in rows {
            let (
                position,
                n,
                due,
                typing,
                receipts,
                presence,
                lists,
                members,
                next_typing_expiry,
                account_data,
                to_device,
                token_found,
                one_time_keys,
                signed_one_time_keys,
                fallback_keys,
                signed_fallback_keys,
            ) = row;
            let index = usize::try_from(n)
                .ok()
                .filter(|&index| index < asks.len())
                .ok_or_else(|| StorageError::Corrupt(format!("no ask {n} in a position read")))?;
            let (ask, slot) = (&asks[index], &mut answers[index]);
            if ask.token.is_some() && token_found == 0 {
                *slot = Some(Err(StorageError::UnknownToken));
                continue;
            }
            // The device's keys as counted per algorithm by `key_counts`, when they are all
            // of the algorithm clients use: the total and that algorithm's share of each kind.
            let key_counts = (ask.device_id.is_some()
                && one_time_keys == signed_one_time_keys
                && fallback_keys == signed_fallback_keys)
                .then(|| DeviceKeyCounts {
                    one_time_keys: (one_time_keys > 0)
                        .then(|| (SIGNED_CURVE25519.to_owned(), one_time_keys))
                        .into_iter()
                        .collect(),
                    unused_fallback_key_types: (fallback_keys > 0)
                        .then(|| SIGNED_CURVE25519.to_owned())
                        .into_iter()
                        .collect(),
                });
            *slot = Some(Ok(SyncPosition {
                position,
                typing_due: due > 0,
                next_typing_expiry,
                heads: StreamHeads {
                    typing,
                    receipts,
                    presence,
                    account_data,
                    to_device,
                    device_lists: lists,
                    memberships: members,
                },
                key_counts,
            }));
        }
        answers
            .into_iter()
            .map(|answer| {
                // No row at all: the counter is missing.
                answer.ok_or_else(|| StorageError::Corrupt(format!("no counter {STREAM}")))
            })
            .collect()
    }
}

#[async_trait]
impl EphemeralRepo for SqlStore {
    async fn put_receipt(&self, receipt: &ReceiptRecord) -> Result<i64> {
        let thread_id = receipt.thread_id.as_deref().unwrap_or_default();
        let mut tx = self.db.begin().await?;
        let position = next_counter(&mut tx, STREAM).await?;
        on_tx!(
            &mut tx,
            "DELETE FROM receipts WHERE room_id = ? AND receipt_type = ? AND user_id = ? AND thread_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(&receipt.room_id)
                    .bind(&receipt.receipt_type)
                    .bind(&receipt.user_id)
                    .bind(thread_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        let insert =
            format!("INSERT INTO receipts ({RECEIPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)");
        on_tx!(&mut tx, &insert, |c, sql| {
            sqlx::query(sql)
                .bind(&receipt.room_id)
                .bind(&receipt.receipt_type)
                .bind(&receipt.user_id)
                .bind(thread_id)
                .bind(&receipt.event_id)
                .bind(receipt.ts)
                .bind(position)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        tx.commit().await?;
        Ok(position)
    }

    async fn get_receipt(
        &self,
        room_id: &str,
        receipt_type: &str,
        user_id: &str,
        thread_id: Option<&str>,
    ) -> Result<Option<ReceiptRecord>> {
        let query = format!(
            "SELECT {RECEIPT_COLUMNS} FROM receipts \
             WHERE room_id = ? AND receipt_type = ? AND user_id = ? AND thread_id = ?"
        );
        let row: Option<ReceiptRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(room_id)
                .bind(receipt_type)
                .bind(user_id)
                .bind(thread_id.unwrap_or_default())
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(Into::into))
    }

    async fn receipts_of_user(&self, room_id: &str, user_id: &str) -> Result<Vec<ReceiptRecord>> {
        let query =
            format!("SELECT {RECEIPT_COLUMNS} FROM receipts WHERE room_id = ? AND user_id = ?");
        let rows: Vec<ReceiptRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(room_id)
                .bind(user_id)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn receipts_changed(
        &self,
        room_ids: &[String],
        after: i64,
        up_to: i64,
    ) -> Result<Vec<ReceiptRecord>> {
        let mut out = Vec::new();
        for chunk in room_ids.chunks(CHUNK) {
            let query = format!(
                "SELECT {RECEIPT_COLUMNS} FROM receipts WHERE room_id IN ({}) \
                 AND stream_position > ? AND stream_position <= ?",
                placeholders(chunk.len())
            );
            let rows: Vec<ReceiptRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql);
                for id in chunk {
                    q = q.bind(id);
                }
                q.bind(after).bind(up_to).fetch_all(p).await?
            });
            out.extend(rows.into_iter().map(ReceiptRecord::from));
        }
        out.sort_by_key(|r| r.stream_position);
        Ok(out)
    }

    async fn set_typing(&self, room_id: &str, user_id: &str, expires_at: i64) -> Result<i64> {
        let mut tx = self.db.begin().await?;
        let position = next_counter(&mut tx, STREAM).await?;
        on_tx!(
            &mut tx,
            "DELETE FROM typing WHERE room_id = ? AND user_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(room_id)
                    .bind(user_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        let insert = format!("INSERT INTO typing ({TYPING_COLUMNS}) VALUES (?, ?, ?, ?)");
        on_tx!(&mut tx, &insert, |c, sql| {
            sqlx::query(sql)
                .bind(room_id)
                .bind(user_id)
                .bind(expires_at)
                .bind(position)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        tx.commit().await?;
        Ok(position)
    }

    async fn extend_typing(
        &self,
        room_id: &str,
        user_id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool> {
        let affected = on_pool!(
            self.db.primary(),
            "UPDATE typing SET expires_at = ? WHERE room_id = ? AND user_id = ? AND expires_at > ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(expires_at)
                    .bind(room_id)
                    .bind(user_id)
                    .bind(now)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(affected > 0)
    }

    async fn typing_changed(
        &self,
        room_ids: &[String],
        after: i64,
        up_to: i64,
        now: i64,
    ) -> Result<Vec<TypingRecord>> {
        let mut out = Vec::new();
        for chunk in room_ids.chunks(CHUNK) {
            let query = format!(
                "SELECT {TYPING_COLUMNS} FROM typing WHERE room_id IN ({}) \
                 AND (expires_at > ? OR (stream_position > ? AND stream_position <= ?))",
                placeholders(chunk.len())
            );
            let rows: Vec<TypingRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql);
                for id in chunk {
                    q = q.bind(id);
                }
                q.bind(now).bind(after).bind(up_to).fetch_all(p).await?
            });
            out.extend(rows.into_iter().map(TypingRecord::from));
        }
        out.sort_by(|a, b| (&a.room_id, &a.user_id).cmp(&(&b.room_id, &b.user_id)));
        Ok(out)
    }

    async fn expire_typing(&self, now: i64) -> Result<Option<i64>> {
        // A cheap look first: most of the time nothing ran out, and no counter is taken.
        let due: i64 = on_pool!(
            self.db.fresh(),
            "SELECT COUNT(*) FROM typing WHERE expires_at > 0 AND expires_at <= ?",
            |p, sql| { sqlx::query_scalar(sql).bind(now).fetch_one(p).await? }
        );
        if due == 0 {
            return Ok(None);
        }
        let mut tx = self.db.begin().await?;
        let position = next_counter(&mut tx, STREAM).await?;
        let expired = on_tx!(
            &mut tx,
            "UPDATE typing SET expires_at = 0, stream_position = ? WHERE expires_at > 0 AND expires_at <= ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(position)
                    .bind(now)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        if expired == 0 {
            // Another process announced them meanwhile; dropping the transaction rolls the
            // counter back.
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(position))
    }

    async fn next_typing_expiry(&self) -> Result<Option<i64>> {
        let next: Option<i64> = on_pool!(
            self.db.fresh(),
            "SELECT MIN(expires_at) FROM typing WHERE expires_at > 0",
            |p, sql| { sqlx::query_scalar(sql).fetch_one(p).await? }
        );
        Ok(next)
    }

    async fn sync_positions(
        &self,
        now: i64,
        asks: &[PositionAsk<'_>],
    ) -> Result<Vec<Result<SyncPosition>>> {
        // The statements of a long list at once, each on a connection of its own.
        let chunks = try_join_all(
            asks.chunks(ASKS_PER_READ)
                .map(|chunk| self.sync_positions_chunk(now, chunk)),
        )
        .await?;
        Ok(chunks.into_iter().flatten().collect())
    }

    async fn get_presence(&self, user_id: &str) -> Result<Option<PresenceRecord>> {
        let query = format!("SELECT {PRESENCE_COLUMNS} FROM presence WHERE user_id = ?");
        let row: Option<PresenceRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql).bind(user_id).fetch_optional(p).await?
        });
        Ok(row.map(Into::into))
    }

    async fn set_presence(&self, presence: &PresenceRecord) -> Result<i64> {
        let mut tx = self.db.begin().await?;
        let position = next_counter(&mut tx, STREAM).await?;
        on_tx!(
            &mut tx,
            "DELETE FROM presence WHERE user_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(&presence.user_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        let insert = format!("INSERT INTO presence ({PRESENCE_COLUMNS}) VALUES (?, ?, ?, ?, ?)");
        on_tx!(&mut tx, &insert, |c, sql| {
            sqlx::query(sql)
                .bind(&presence.user_id)
                .bind(&presence.state)
                .bind(&presence.status_msg)
                .bind(presence.last_active_ts)
                .bind(position)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        tx.commit().await?;
        Ok(position)
    }

    async fn touch_presence(&self, user_id: &str, last_active_ts: i64) -> Result<bool> {
        let affected = on_pool!(
            self.db.primary(),
            "UPDATE presence SET last_active_ts = ? WHERE user_id = ? AND last_active_ts < ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(last_active_ts)
                    .bind(user_id)
                    .bind(last_active_ts)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(affected > 0)
    }

    async fn presence_changed(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<PresenceRecord>> {
        let query = format!(
            "SELECT {PRESENCE_COLUMNS} FROM presence p \
             WHERE p.stream_position > ? AND p.stream_position <= ? AND (p.user_id = ? OR EXISTS ( \
               SELECT 1 FROM room_memberships mine \
               JOIN room_memberships theirs ON theirs.room_id = mine.room_id \
               WHERE mine.user_id = ? AND mine.membership = 'join' \
                 AND theirs.user_id = p.user_id AND theirs.membership = 'join'))"
        );
        let rows: Vec<PresenceRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(after)
                .bind(up_to)
                .bind(user_id)
                .bind(user_id)
                .fetch_all(p)
                .await?
        });
        let mut out: Vec<PresenceRecord> = rows.into_iter().map(Into::into).collect();
        out.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(out)
    }

    async fn unread_candidates(
        &self,
        ranges: &[(String, i64)],
        user_id: &str,
        event_types: &[&str],
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<(EventRecord, Option<String>)>> {
        if event_types.is_empty() {
            return Ok(Vec::new());
        }
        let per_room = format!(
            "SELECT {EVENT_COLUMNS}, thread_id FROM events WHERE room_id = ? \
             AND stream_ordering > ? AND stream_ordering <= ? AND sender <> ? \
             AND event_type IN ({}) AND outlier = ? AND soft_failed = ? \
             AND rejected_reason IS NULL ORDER BY stream_ordering ASC LIMIT ?",
            placeholders(event_types.len())
        );
        let per_room = &per_room;
        let chunks: Vec<_> = ranges.chunks(ROOMS_PER_UNION).collect();
        let mut parts = Vec::with_capacity(chunks.len());
        // A few parts at a time, so one large read leaves the pool to other requests.
        for wave in chunks.chunks(super::PARTS_AT_ONCE) {
            parts.extend(
                try_join_all(wave.iter().map(|&chunk| async move {
                    let query = per_room_union(chunk.len(), per_room);
                    let rows: Vec<ThreadEventRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                        let mut q = sqlx::query_as(sql);
                        for (room_id, after) in chunk {
                            q = q.bind(room_id).bind(*after).bind(up_to).bind(user_id);
                            for kind in event_types {
                                q = q.bind(*kind);
                            }
                            q = q.bind(false).bind(false).bind(limit);
                        }
                        q.fetch_all(p).await?
                    });
                    Ok::<_, StorageError>(rows)
                }))
                .await?,
            );
        }
        let mut out: Vec<(EventRecord, Option<String>)> = parts
            .into_iter()
            .flatten()
            .map(ThreadEventRow::into_pair)
            .collect();
        // A union promises no order.
        out.sort_by_key(|(event, _)| event.stream_ordering);
        Ok(out)
    }

    async fn read_positions(
        &self,
        user_id: &str,
        room_ids: &[String],
        receipt_types: &[&str],
    ) -> Result<Vec<ReadPosition>> {
        if receipt_types.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for chunk in room_ids.chunks(CHUNK) {
            let query = format!(
                "SELECT r.room_id, r.thread_id, e.stream_ordering FROM receipts r \
                 JOIN events e ON e.event_id = r.event_id \
                 WHERE r.user_id = ? AND r.receipt_type IN ({}) AND r.room_id IN ({}) \
                 AND e.stream_ordering IS NOT NULL",
                placeholders(receipt_types.len()),
                placeholders(chunk.len())
            );
            let rows: Vec<(Text, Text, i64)> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql).bind(user_id);
                for kind in receipt_types {
                    q = q.bind(*kind);
                }
                for id in chunk {
                    q = q.bind(id);
                }
                q.fetch_all(p).await?
            });
            out.extend(
                rows.into_iter()
                    .map(|(room, thread, position)| ReadPosition {
                        room_id: room.0,
                        // Unthreaded receipts are stored with an empty thread id.
                        thread_id: Some(thread.0).filter(|t| !t.is_empty()),
                        stream_ordering: position,
                    }),
            );
        }
        out.sort();
        Ok(out)
    }

    async fn expire_presence(&self, idle_before: i64) -> Result<Option<i64>> {
        // A cheap look first: most of the time nobody went idle, and no counter is taken.
        let due: i64 = on_pool!(
            self.db.fresh(),
            "SELECT COUNT(*) FROM presence WHERE state = ? AND last_active_ts < ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(ONLINE)
                    .bind(idle_before)
                    .fetch_one(p)
                    .await?
            }
        );
        if due == 0 {
            return Ok(None);
        }
        let mut tx = self.db.begin().await?;
        let position = next_counter(&mut tx, STREAM).await?;
        let expired = on_tx!(
            &mut tx,
            "UPDATE presence SET state = ?, stream_position = ? WHERE state = ? AND last_active_ts < ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(UNAVAILABLE)
                    .bind(position)
                    .bind(ONLINE)
                    .bind(idle_before)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        if expired == 0 {
            // Another process did it meanwhile (or they became active again); dropping the
            // transaction rolls the counter back.
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(position))
    }

    async fn oldest_online_activity(&self) -> Result<Option<i64>> {
        let oldest: Option<i64> = on_pool!(
            self.db.fresh(),
            "SELECT MIN(last_active_ts) FROM presence WHERE state = ?",
            |p, sql| { sqlx::query_scalar(sql).bind(ONLINE).fetch_one(p).await? }
        );
        Ok(oldest)
    }
}
