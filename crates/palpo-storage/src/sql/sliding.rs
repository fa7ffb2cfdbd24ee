//! Simplified sliding sync connections (MSC4186), and the per-room facts its list filters read.
//!
//! Every write to a connection's rows happens in a transaction that first updates the
//! connection's row, so the writes of one connection take turns, on every backend and across
//! processes; those of different connections never touch the same rows.

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use rand::Rng;

use super::{SqlStore, placeholders};
use crate::{
    db::{Db, Text, Tx},
    error::{Result, StorageError},
    model::{
        AccountDataRecord, NewSlidingPosition, SlidingPositionRecord, SlidingRoomRecord,
        SlidingRoomSet,
    },
    on_pool, on_tx,
    repo::SlidingSyncRepo,
};

/// Rows or ids per statement: keeps every backend within its parameter limits.
const CHUNK: usize = 100;
/// Positions kept per connection besides the acknowledged one: a client retrying the same
/// `pos` again and again does not pile them up.
const KEPT_POSITIONS: i64 = 8;
/// Distinct `required_state` configurations a connection keeps before those no room uses any
/// more are deleted.
const KEPT_CONFIGURATIONS: usize = 16;
/// How often `start_sliding_connection` tries again when a concurrent start of the same
/// connection (or, never in practice, a key collision) got in first, or a deadlock struck.
const START_ATTEMPTS: usize = 4;
/// How often a transaction a deadlock rolled back is tried again.
const TRANSIENT_ATTEMPTS: usize = 4;

/// A fresh connection key: random, positive.
fn new_key() -> i64 {
    rand::thread_rng().gen_range(1..i64::MAX)
}

#[derive(sqlx::FromRow)]
struct RoomRow {
    room_id: Text,
    membership: Text,
    sent_upto: Option<i64>,
    required_state: Text,
}

/// Deletes connections and everything they hold: the connection's row first, the lock order
/// of every write to a connection.
async fn delete_connections(tx: &mut Tx, keys: &[i64]) -> Result<()> {
    for chunk in keys.chunks(CHUNK) {
        for table in [
            "sliding_sync_connections",
            "sliding_sync_positions",
            "sliding_sync_rooms",
            "sliding_sync_required_state",
        ] {
            let query = format!(
                "DELETE FROM {table} WHERE connection_key IN ({})",
                placeholders(chunk.len())
            );
            on_tx!(tx, &query, |c, sql| {
                let mut q = sqlx::query(sql);
                for key in chunk {
                    q = q.bind(key);
                }
                q.execute(&mut *c).await?.rows_affected()
            });
        }
    }
    Ok(())
}

/// Writes room set `room_set` of the connection with these rooms, storing each
/// `required_state` configuration once per connection.
async fn write_room_set(
    tx: &mut Tx,
    key: i64,
    room_set: i64,
    rooms: &[SlidingRoomRecord],
) -> Result<()> {
    let known: Vec<(i64, Text)> = on_tx!(
        tx,
        "SELECT required_state_id, required_state FROM sliding_sync_required_state WHERE connection_key = ?",
        |c, sql| { sqlx::query_as(sql).bind(key).fetch_all(&mut *c).await? }
    );
    let mut next_id = known.iter().map(|(id, _)| *id).max().unwrap_or(0) + 1;
    let mut ids: HashMap<String, i64> = known.into_iter().map(|(id, t)| (t.0, id)).collect();
    for room in rooms {
        if ids.contains_key(&room.required_state) {
            continue;
        }
        on_tx!(
            tx,
            "INSERT INTO sliding_sync_required_state (connection_key, required_state_id, required_state) VALUES (?, ?, ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(key)
                    .bind(next_id)
                    .bind(&room.required_state)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        ids.insert(room.required_state.clone(), next_id);
        next_id += 1;
    }
    for chunk in rooms.chunks(CHUNK) {
        let query = format!(
            "INSERT INTO sliding_sync_rooms (connection_key, room_set, room_id, membership, sent_upto, required_state_id) VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        on_tx!(tx, &query, |c, sql| {
            let mut q = sqlx::query(sql);
            for room in chunk {
                let config = ids.get(&room.required_state).copied().unwrap_or_default();
                q = q
                    .bind(key)
                    .bind(room_set)
                    .bind(&room.room_id)
                    .bind(&room.membership)
                    .bind(room.sent_upto)
                    .bind(config);
            }
            q.execute(&mut *c)
                .await
                .map_err(|e| StorageError::conflict_or(e, "sliding sync room"))?
                .rows_affected()
        });
    }
    Ok(())
}

/// One attempt of [`SlidingSyncRepo::start_sliding_connection`].
async fn start_connection(
    db: &Db,
    user_id: &str,
    device_id: &str,
    conn_id: &str,
    now: i64,
    max_per_device: usize,
) -> Result<i64> {
    let mut tx = db.begin().await?;
    let earlier: Vec<i64> = on_tx!(
        &mut tx,
        "SELECT connection_key FROM sliding_sync_connections WHERE user_id = ? AND device_id = ? AND conn_id = ?",
        |c, sql| {
            sqlx::query_scalar(sql)
                .bind(user_id)
                .bind(device_id)
                .bind(conn_id)
                .fetch_all(&mut *c)
                .await?
        }
    );
    delete_connections(&mut tx, &earlier).await?;
    let key = new_key();
    let inserted = on_tx!(
        &mut tx,
        "INSERT INTO sliding_sync_connections (connection_key, user_id, device_id, conn_id, next_position, created_ts, last_used_ts) VALUES (?, ?, ?, ?, 0, ?, ?)",
        |c, sql| {
            sqlx::query(sql)
                .bind(key)
                .bind(user_id)
                .bind(device_id)
                .bind(conn_id)
                .bind(now)
                .bind(now)
                .execute(&mut *c)
                .await
                .map(|done| done.rows_affected())
                .map_err(|e| StorageError::conflict_or(e, "sliding sync connection"))
        }
    );
    inserted?;
    // Bound what one device may hold: its least recently used connections go.
    let others: Vec<i64> = on_tx!(
        &mut tx,
        "SELECT connection_key FROM sliding_sync_connections WHERE user_id = ? AND device_id = ? AND connection_key <> ? ORDER BY last_used_ts DESC",
        |c, sql| {
            sqlx::query_scalar(sql)
                .bind(user_id)
                .bind(device_id)
                .bind(key)
                .fetch_all(&mut *c)
                .await?
        }
    );
    let keep = max_per_device.saturating_sub(1);
    if others.len() > keep {
        delete_connections(&mut tx, &others[keep..]).await?;
    }
    tx.commit().await?;
    Ok(key)
}

/// One attempt of [`SlidingSyncRepo::add_sliding_position`].
async fn add_position(db: &Db, new: &NewSlidingPosition) -> Result<Option<SlidingPositionRecord>> {
    let key = new.connection_key;
    let mut tx = db.begin().await?;
    // First, so that the writes of one connection take turns.
    let updated = on_tx!(
        &mut tx,
        "UPDATE sliding_sync_connections SET next_position = next_position + 1, last_used_ts = ? WHERE connection_key = ?",
        |c, sql| {
            sqlx::query(sql)
                .bind(new.now)
                .bind(key)
                .execute(&mut *c)
                .await?
                .rows_affected()
        }
    );
    if updated == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    let position_id: i64 = on_tx!(
        &mut tx,
        "SELECT next_position FROM sliding_sync_connections WHERE connection_key = ?",
        |c, sql| { sqlx::query_scalar(sql).bind(key).fetch_one(&mut *c).await? }
    );
    // The position continued from must still be there (a request continuing from a newer
    // one may have deleted it): its room set is what the new one builds on.
    if let Some(acknowledged) = new.acknowledged {
        let base: Option<i64> = on_tx!(
            &mut tx,
            "SELECT room_set FROM sliding_sync_positions WHERE connection_key = ? AND position_id = ?",
            |c, sql| {
                sqlx::query_scalar(sql)
                    .bind(key)
                    .bind(acknowledged)
                    .fetch_optional(&mut *c)
                    .await?
            }
        );
        let Some(base) = base else {
            tx.rollback().await?;
            return Ok(None);
        };
        if let SlidingRoomSet::Same(set) = new.rooms
            && set != base
        {
            tx.rollback().await?;
            return Ok(None);
        }
    }
    let room_set = match &new.rooms {
        SlidingRoomSet::Same(set) => *set,
        SlidingRoomSet::New(rooms) => {
            write_room_set(&mut tx, key, position_id, rooms).await?;
            position_id
        }
    };
    on_tx!(
        &mut tx,
        "INSERT INTO sliding_sync_positions (connection_key, position_id, stream_position, room_set, created_ts) VALUES (?, ?, ?, ?, ?)",
        |c, sql| {
            sqlx::query(sql)
                .bind(key)
                .bind(position_id)
                .bind(new.stream_position)
                .bind(room_set)
                .bind(new.now)
                .execute(&mut *c)
                .await?
                .rows_affected()
        }
    );
    // Older than the acknowledged position: the client will not use them again. And all but
    // the last few, the acknowledged one kept.
    let acknowledged = new.acknowledged.unwrap_or(position_id);
    let deleted = on_tx!(
        &mut tx,
        "DELETE FROM sliding_sync_positions WHERE connection_key = ? AND position_id <> ? \
         AND (position_id < ? OR position_id <= ?)",
        |c, sql| {
            sqlx::query(sql)
                .bind(key)
                .bind(acknowledged)
                .bind(acknowledged)
                .bind(position_id - KEPT_POSITIONS)
                .execute(&mut *c)
                .await?
                .rows_affected()
        }
    );
    if deleted > 0 {
        on_tx!(
            &mut tx,
            "DELETE FROM sliding_sync_rooms WHERE connection_key = ? AND room_set NOT IN \
             (SELECT room_set FROM sliding_sync_positions WHERE connection_key = ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(key)
                    .bind(key)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        let configurations: i64 = on_tx!(
            &mut tx,
            "SELECT COUNT(*) FROM sliding_sync_required_state WHERE connection_key = ?",
            |c, sql| { sqlx::query_scalar(sql).bind(key).fetch_one(&mut *c).await? }
        );
        if configurations > KEPT_CONFIGURATIONS as i64 {
            on_tx!(
                &mut tx,
                "DELETE FROM sliding_sync_required_state WHERE connection_key = ? \
                 AND required_state_id NOT IN \
                 (SELECT required_state_id FROM sliding_sync_rooms WHERE connection_key = ?)",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(key)
                        .bind(key)
                        .execute(&mut *c)
                        .await?
                        .rows_affected()
                }
            );
        }
    }
    tx.commit().await?;
    Ok(Some(SlidingPositionRecord {
        connection_key: key,
        position_id,
        stream_position: new.stream_position,
        room_set,
        last_used_ts: new.now,
    }))
}

/// A deadlock or serialization failure: the transaction was rolled back and may be run again.
fn is_transient(err: &StorageError) -> bool {
    match err {
        StorageError::Database(sqlx::Error::Database(db)) => {
            db.code().is_some_and(|code| code.starts_with("40"))
        }
        _ => false,
    }
}

#[async_trait]
impl SlidingSyncRepo for SqlStore {
    async fn start_sliding_connection(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        now: i64,
        max_per_device: usize,
    ) -> Result<i64> {
        // A concurrent start of the same connection (or, never in practice, a key collision)
        // got in first, or a deadlock rolled the transaction back: again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match start_connection(&self.db, user_id, device_id, conn_id, now, max_per_device).await
            {
                Err(e)
                    if attempt < START_ATTEMPTS
                        && (matches!(e, StorageError::Conflict(_)) || is_transient(&e)) =>
                {
                    continue;
                }
                result => return result,
            }
        }
    }

    async fn sliding_position(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        connection_key: i64,
        position_id: i64,
        used_since: i64,
    ) -> Result<Option<SlidingPositionRecord>> {
        // From the primary: the position may have been written by another process a moment ago.
        let row: Option<(i64, i64, i64)> = on_pool!(
            self.db.fresh(),
            "SELECT p.stream_position, p.room_set, c.last_used_ts FROM sliding_sync_positions p \
             JOIN sliding_sync_connections c ON c.connection_key = p.connection_key \
             WHERE p.connection_key = ? AND p.position_id = ? AND c.user_id = ? \
             AND c.device_id = ? AND c.conn_id = ? AND c.last_used_ts >= ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(connection_key)
                    .bind(position_id)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(conn_id)
                    .bind(used_since)
                    .fetch_optional(p)
                    .await?
            }
        );
        Ok(row.map(
            |(stream_position, room_set, last_used_ts)| SlidingPositionRecord {
                connection_key,
                position_id,
                stream_position,
                room_set,
                last_used_ts,
            },
        ))
    }

    async fn sliding_rooms(
        &self,
        connection_key: i64,
        room_set: i64,
    ) -> Result<Vec<SlidingRoomRecord>> {
        let rows: Vec<RoomRow> = on_pool!(
            self.db.fresh(),
            "SELECT r.room_id, r.membership, r.sent_upto, q.required_state FROM sliding_sync_rooms r \
             JOIN sliding_sync_required_state q ON q.connection_key = r.connection_key \
             AND q.required_state_id = r.required_state_id \
             WHERE r.connection_key = ? AND r.room_set = ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(connection_key)
                    .bind(room_set)
                    .fetch_all(p)
                    .await?
            }
        );
        Ok(rows
            .into_iter()
            .map(|r| SlidingRoomRecord {
                room_id: r.room_id.0,
                membership: r.membership.0,
                sent_upto: r.sent_upto,
                required_state: r.required_state.0,
            })
            .collect())
    }

    async fn add_sliding_position(
        &self,
        new: &NewSlidingPosition,
    ) -> Result<Option<SlidingPositionRecord>> {
        // MySQL's gap locks can make two connections' transactions deadlock (a connection
        // without rows locks the gap up to its neighbour's): the loser is rolled back, and
        // tried again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match add_position(&self.db, new).await {
                Err(e) if attempt < TRANSIENT_ATTEMPTS && is_transient(&e) => continue,
                result => return result,
            }
        }
    }

    async fn touch_sliding_connection(&self, connection_key: i64, now: i64) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "UPDATE sliding_sync_connections SET last_used_ts = ? WHERE connection_key = ? AND last_used_ts < ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(now)
                    .bind(connection_key)
                    .bind(now)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn delete_idle_sliding_connections(&self, before: i64, limit: i64) -> Result<u64> {
        let idle: Vec<i64> = on_pool!(
            self.db.fresh(),
            "SELECT connection_key FROM sliding_sync_connections WHERE last_used_ts < ? \
             ORDER BY last_used_ts LIMIT ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(before)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
        );
        let mut gone = 0;
        for chunk in idle.chunks(CHUNK) {
            // Each connection goes in its own transaction's lock order: its row first (still
            // idle: one used meanwhile stays), then what it holds.
            let mut tx = self.db.begin().await?;
            let query = format!(
                "DELETE FROM sliding_sync_connections WHERE last_used_ts < ? AND connection_key IN ({})",
                placeholders(chunk.len())
            );
            gone += on_tx!(&mut tx, &query, |c, sql| {
                let mut q = sqlx::query(sql).bind(before);
                for key in chunk {
                    q = q.bind(key);
                }
                q.execute(&mut *c).await?.rows_affected()
            });
            let query = format!(
                "SELECT connection_key FROM sliding_sync_connections WHERE connection_key IN ({})",
                placeholders(chunk.len())
            );
            let kept: Vec<i64> = on_tx!(&mut tx, &query, |c, sql| {
                let mut q = sqlx::query_scalar(sql);
                for key in chunk {
                    q = q.bind(key);
                }
                q.fetch_all(&mut *c).await?
            });
            let kept: HashSet<i64> = kept.into_iter().collect();
            let deleted: Vec<i64> = chunk
                .iter()
                .copied()
                .filter(|k| !kept.contains(k))
                .collect();
            delete_connections(&mut tx, &deleted).await?;
            tx.commit().await?;
        }
        Ok(gone)
    }

    async fn current_state_ids(
        &self,
        room_ids: &[String],
        event_type: &str,
        state_key: &str,
    ) -> Result<Vec<(String, String)>> {
        let unique: BTreeSet<&String> = room_ids.iter().collect();
        let unique: Vec<&String> = unique.into_iter().collect();
        let mut out = Vec::new();
        for chunk in unique.chunks(CHUNK) {
            let query = format!(
                "SELECT room_id, event_id FROM room_current_state \
                 WHERE event_type = ? AND state_key = ? AND room_id IN ({})",
                placeholders(chunk.len())
            );
            let rows: Vec<(Text, Text)> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql).bind(event_type).bind(state_key);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.fetch_all(p).await?
            });
            out.extend(rows.into_iter().map(|(room, event)| (room.0, event.0)));
        }
        Ok(out)
    }

    async fn room_account_data_of_type(
        &self,
        user_id: &str,
        data_type: &str,
    ) -> Result<Vec<AccountDataRecord>> {
        let rows: Vec<(Text, Text, i64)> = on_pool!(
            self.db.fresh(),
            "SELECT room_id, content, stream_position FROM account_data \
             WHERE user_id = ? AND data_type = ? AND room_id <> ''",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(data_type)
                    .fetch_all(p)
                    .await?
            }
        );
        Ok(rows
            .into_iter()
            .map(|(room_id, content, stream_position)| AccountDataRecord {
                user_id: user_id.to_owned(),
                room_id: Some(room_id.0),
                data_type: data_type.to_owned(),
                content: content.0,
                stream_position,
            })
            .collect())
    }
}
