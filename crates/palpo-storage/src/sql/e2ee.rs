//! End-to-end encryption: device keys, one-time and fallback keys, device-list changes and
//! to-device messages.
//!
//! Key uploads take the `e2e_keys` counter first in their transaction, which orders one-time
//! keys by upload and serializes key writes (so the delete-then-insert upserts below never
//! meet, and MySQL's gap locks cannot deadlock them). A device-list change and a to-device
//! send take the next `events_stream` position (after `e2e_keys` when both are taken; nothing
//! takes them the other way round), so one sync token orders them with events. Claims need no
//! counter: each deletes one row by its key, and only the claim whose delete removed the row
//! hands the key out.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;

use super::{SqlStore, placeholders, rooms::next_counter};
use crate::{
    db::{Text, Tx},
    error::{Result, StorageError},
    model::{
        ClaimedKey, CrossSigningKeyRecord, DeviceKeyCounts, DeviceKeysRecord, DeviceListUpdates,
        DeviceTarget, KeySignatureRecord, KeyUpload, KeyUploadOutcome, OneTimeKeyRecord,
        ToDeviceBatch, ToDeviceRecord,
    },
    on_pool, on_tx,
    repo::E2eeRepo,
};

/// The counter that orders one-time keys by upload and serializes key writes.
const KEYS_COUNTER: &str = "e2e_keys";
/// The global stream.
const STREAM: &str = "events_stream";
/// Keys or devices per query: bounded IN lists keep every backend within its parameter limits.
const CHUNK: usize = 100;
/// One-time keys a claim tries to take per read; more than one, so that a claim racing others
/// for the same device rarely has to read again.
const CLAIM_CANDIDATES: i64 = 8;
/// Reads a claim makes before giving up on a device whose keys other claims keep taking.
const CLAIM_ROUNDS: usize = 64;

/// Users sharing a joined room with the user bound to the first `?`: `<column> IN` this.
/// Whether `theirs` (a membership row of the outer query) is in a room the user bound to `?`
/// has joined: looked up by primary key.
const IN_MY_ROOM: &str = "EXISTS (SELECT 1 FROM room_memberships mine \
     WHERE mine.room_id = theirs.room_id AND mine.user_id = ? AND mine.membership = 'join')";

/// Whether the user in column `{user}` shares a joined room with the user bound to `?`. A
/// correlated `EXISTS`, so that the outer query drives from its (short) stream range and this
/// looks up that user's rooms by index; an `IN (every member of every room of mine)` list
/// costs the user's whole room list on every sync.
fn shares_a_room(user: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM room_memberships o \
         JOIN room_memberships m ON m.room_id = o.room_id \
         WHERE o.user_id = {user} AND o.membership = 'join' \
           AND m.user_id = ? AND m.membership = 'join')"
    )
}

#[derive(sqlx::FromRow)]
struct DeviceKeysRow {
    user_id: Text,
    device_id: Text,
    key_json: Text,
    display_name: Option<Text>,
}

#[derive(sqlx::FromRow)]
struct ToDeviceRow {
    stream_position: i64,
    sender: Text,
    event_type: Text,
    content: Text,
}

/// Records that the user's device list changed, at `position`.
async fn record_change(tx: &mut Tx, user_id: &str, position: i64) -> Result<()> {
    on_tx!(
        tx,
        "DELETE FROM device_list_changes WHERE user_id = ?",
        |c, sql| {
            sqlx::query(sql)
                .bind(user_id)
                .execute(&mut *c)
                .await?
                .rows_affected()
        }
    );
    on_tx!(
        tx,
        "INSERT INTO device_list_changes (user_id, stream_position) VALUES (?, ?)",
        |c, sql| {
            sqlx::query(sql)
                .bind(user_id)
                .bind(position)
                .execute(&mut *c)
                .await?
                .rows_affected()
        }
    );
    Ok(())
}

/// Stores the identity keys unless the same are stored; returns whether they changed.
async fn put_device_keys(tx: &mut Tx, user_id: &str, device_id: &str, json: &str) -> Result<bool> {
    let stored: Option<Text> = on_tx!(
        tx,
        "SELECT key_json FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
        |c, sql| {
            sqlx::query_scalar(sql)
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(&mut *c)
                .await?
        }
    );
    match stored {
        Some(stored) if same_json(&stored.0, json) => return Ok(false),
        Some(_) => {
            on_tx!(
                tx,
                "UPDATE e2e_device_keys SET key_json = ? WHERE user_id = ? AND device_id = ?",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(json)
                        .bind(user_id)
                        .bind(device_id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected()
                }
            );
        }
        None => {
            on_tx!(
                tx,
                "INSERT INTO e2e_device_keys (user_id, device_id, key_json) VALUES (?, ?, ?)",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(user_id)
                        .bind(device_id)
                        .bind(json)
                        .execute(&mut *c)
                        .await?
                        .rows_affected()
                }
            );
        }
    }
    Ok(true)
}

/// Whether two JSON texts hold the same value (key order and spacing aside).
fn same_json(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Adds the one-time keys that are not stored yet; Conflict when an id is stored with other
/// content.
async fn add_one_time_keys(
    tx: &mut Tx,
    user_id: &str,
    device_id: &str,
    keys: &[OneTimeKeyRecord],
    upload_seq: i64,
) -> Result<()> {
    let mut fresh: Vec<&OneTimeKeyRecord> = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK) {
        let query = format!(
            "SELECT algorithm, key_id, key_json FROM e2e_one_time_keys \
             WHERE user_id = ? AND device_id = ? AND key_id IN ({})",
            placeholders(chunk.len())
        );
        let stored: Vec<(Text, Text, Text)> = on_tx!(tx, &query, |c, sql| {
            let mut q = sqlx::query_as(sql).bind(user_id).bind(device_id);
            for key in chunk {
                q = q.bind(&key.key_id);
            }
            q.fetch_all(&mut *c).await?
        });
        let stored: BTreeMap<(String, String), String> = stored
            .into_iter()
            .map(|(algorithm, key_id, json)| ((algorithm.0, key_id.0), json.0))
            .collect();
        for key in chunk {
            match stored.get(&(key.algorithm.clone(), key.key_id.clone())) {
                Some(json) if same_json(json, &key.key_json) => {}
                Some(_) => {
                    return Err(StorageError::Conflict(format!(
                        "one-time key {}:{}",
                        key.algorithm, key.key_id
                    )));
                }
                None => fresh.push(key),
            }
        }
    }
    for chunk in fresh.chunks(CHUNK) {
        let query = format!(
            "INSERT INTO e2e_one_time_keys \
             (user_id, device_id, algorithm, key_id, key_json, upload_seq) VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        on_tx!(tx, &query, |c, sql| {
            let mut q = sqlx::query(sql);
            for key in chunk {
                q = q
                    .bind(user_id)
                    .bind(device_id)
                    .bind(&key.algorithm)
                    .bind(&key.key_id)
                    .bind(&key.key_json)
                    .bind(upload_seq);
            }
            q.execute(&mut *c)
                .await
                .map_err(|e| StorageError::conflict_or(e, "one-time key"))?
                .rows_affected()
        });
    }
    Ok(())
}

/// Replaces the device's fallback key of the key's algorithm, unless it is the same key.
async fn put_fallback_key(
    tx: &mut Tx,
    user_id: &str,
    device_id: &str,
    key: &OneTimeKeyRecord,
) -> Result<()> {
    let stored: Option<(Text, Text)> = on_tx!(
        tx,
        "SELECT key_id, key_json FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?",
        |c, sql| {
            sqlx::query_as(sql)
                .bind(user_id)
                .bind(device_id)
                .bind(&key.algorithm)
                .fetch_optional(&mut *c)
                .await?
        }
    );
    if let Some((key_id, json)) = &stored
        && key_id.0 == key.key_id
        && same_json(&json.0, &key.key_json)
    {
        // The same key again: it keeps its `used` mark.
        return Ok(());
    }
    on_tx!(
        tx,
        "DELETE FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?",
        |c, sql| {
            sqlx::query(sql)
                .bind(user_id)
                .bind(device_id)
                .bind(&key.algorithm)
                .execute(&mut *c)
                .await?
                .rows_affected()
        }
    );
    on_tx!(
        tx,
        "INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, key_json, used) VALUES (?, ?, ?, ?, ?, ?)",
        |c, sql| {
            sqlx::query(sql)
                .bind(user_id)
                .bind(device_id)
                .bind(&key.algorithm)
                .bind(&key.key_id)
                .bind(&key.key_json)
                .bind(false)
                .execute(&mut *c)
                .await
                .map_err(|e| StorageError::conflict_or(e, "fallback key"))?
                .rows_affected()
        }
    );
    Ok(())
}

/// Deletes the rows of `table` of the user's devices.
async fn delete_of_devices(
    tx: &mut Tx,
    table: &str,
    user_id: &str,
    device_ids: &[String],
) -> Result<()> {
    for chunk in device_ids.chunks(CHUNK) {
        let query = format!(
            "DELETE FROM {table} WHERE user_id = ? AND device_id IN ({})",
            placeholders(chunk.len())
        );
        on_tx!(tx, &query, |c, sql| {
            let mut q = sqlx::query(sql).bind(user_id);
            for device_id in chunk {
                q = q.bind(device_id);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(())
}

#[async_trait]
impl E2eeRepo for SqlStore {
    #[tracing::instrument(skip_all, fields(user_id = %upload.user_id, device_id = %upload.device_id))]
    async fn upload_keys(&self, upload: &KeyUpload) -> Result<KeyUploadOutcome> {
        if upload.device_keys.is_none()
            && upload.one_time_keys.is_empty()
            && upload.fallback_keys.is_empty()
        {
            return Ok(KeyUploadOutcome::default());
        }
        let (user_id, device_id) = (upload.user_id.as_str(), upload.device_id.as_str());
        let mut tx = self.db.begin().await?;
        let upload_seq = next_counter(&mut tx, KEYS_COUNTER).await?;
        let mut outcome = KeyUploadOutcome::default();
        if let Some(json) = &upload.device_keys
            && put_device_keys(&mut tx, user_id, device_id, json).await?
        {
            let position = next_counter(&mut tx, STREAM).await?;
            record_change(&mut tx, user_id, position).await?;
            outcome.device_list_position = Some(position);
        }
        add_one_time_keys(
            &mut tx,
            user_id,
            device_id,
            &upload.one_time_keys,
            upload_seq,
        )
        .await?;
        for key in &upload.fallback_keys {
            put_fallback_key(&mut tx, user_id, device_id, key).await?;
        }
        tx.commit().await?;
        self.db.wrote(user_id).await;
        Ok(outcome)
    }

    async fn device_keys(
        &self,
        user_id: &str,
        device_ids: &[String],
    ) -> Result<Vec<DeviceKeysRecord>> {
        // Joined with `devices`, so the keys of a device being deleted are never handed out.
        let base = "SELECT k.user_id, k.device_id, k.key_json, d.display_name \
             FROM e2e_device_keys k \
             JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id \
             WHERE k.user_id = ?";
        let mut rows: Vec<DeviceKeysRow> = Vec::new();
        if device_ids.is_empty() {
            rows = on_pool!(self.db.fresh(), base, |p, sql| {
                sqlx::query_as(sql).bind(user_id).fetch_all(p).await?
            });
        } else {
            for chunk in device_ids.chunks(CHUNK) {
                let query = format!("{base} AND k.device_id IN ({})", placeholders(chunk.len()));
                let found: Vec<DeviceKeysRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                    let mut q = sqlx::query_as(sql).bind(user_id);
                    for device_id in chunk {
                        q = q.bind(device_id);
                    }
                    q.fetch_all(p).await?
                });
                rows.extend(found);
            }
        }
        let mut out: Vec<DeviceKeysRecord> = rows
            .into_iter()
            .map(|r| DeviceKeysRecord {
                user_id: r.user_id.into(),
                device_id: r.device_id.into(),
                key_json: r.key_json.into(),
                display_name: r.display_name.map(Into::into),
            })
            .collect();
        // Bytewise, whatever the backend's collation.
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out.dedup_by(|a, b| a.device_id == b.device_id);
        Ok(out)
    }

    async fn one_time_key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Vec<(String, i64)>> {
        let rows: Vec<(Text, i64)> = on_pool!(
            self.db.fresh(),
            "SELECT algorithm, COUNT(*) FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? GROUP BY algorithm",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .fetch_all(p)
                    .await?
            }
        );
        let mut out: Vec<(String, i64)> = rows.into_iter().map(|(a, n)| (a.0, n)).collect();
        out.sort();
        Ok(out)
    }

    async fn claim_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
    ) -> Result<Option<ClaimedKey>> {
        for _ in 0..CLAIM_ROUNDS {
            let candidates: Vec<(Text, Text)> = on_pool!(
                self.db.fresh(),
                "SELECT key_id, key_json FROM e2e_one_time_keys \
                 WHERE user_id = ? AND device_id = ? AND algorithm = ? \
                 ORDER BY upload_seq, key_id LIMIT ?",
                |p, sql| {
                    sqlx::query_as(sql)
                        .bind(user_id)
                        .bind(device_id)
                        .bind(algorithm)
                        .bind(CLAIM_CANDIDATES)
                        .fetch_all(p)
                        .await?
                }
            );
            if candidates.is_empty() {
                break;
            }
            for (key_id, key_json) in candidates {
                // Only the claim whose delete removes the row gets the key.
                let deleted = on_pool!(
                    self.db.primary(),
                    "DELETE FROM e2e_one_time_keys \
                     WHERE user_id = ? AND device_id = ? AND algorithm = ? AND key_id = ?",
                    |p, sql| {
                        sqlx::query(sql)
                            .bind(user_id)
                            .bind(device_id)
                            .bind(algorithm)
                            .bind(&key_id.0)
                            .execute(p)
                            .await?
                            .rows_affected()
                    }
                );
                if deleted == 1 {
                    self.db.wrote(user_id).await;
                    return Ok(Some(ClaimedKey {
                        key: OneTimeKeyRecord {
                            algorithm: algorithm.to_owned(),
                            key_id: key_id.0,
                            key_json: key_json.0,
                        },
                        fallback: false,
                    }));
                }
            }
        }
        let fallback: Option<(Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT key_id, key_json FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(algorithm)
                    .fetch_optional(p)
                    .await?
            }
        );
        let Some((key_id, key_json)) = fallback else {
            return Ok(None);
        };
        on_pool!(
            self.db.primary(),
            "UPDATE e2e_fallback_keys SET used = ? WHERE user_id = ? AND device_id = ? AND algorithm = ? AND key_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(true)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(algorithm)
                    .bind(&key_id.0)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        self.db.wrote(user_id).await;
        Ok(Some(ClaimedKey {
            key: OneTimeKeyRecord {
                algorithm: algorithm.to_owned(),
                key_id: key_id.0,
                key_json: key_json.0,
            },
            fallback: true,
        }))
    }

    async fn unused_fallback_key_types(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Vec<String>> {
        let rows: Vec<Text> = on_pool!(
            self.db.fresh(),
            "SELECT algorithm FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND used = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(false)
                    .fetch_all(p)
                    .await?
            }
        );
        let mut out: Vec<String> = rows.into_iter().map(String::from).collect();
        out.sort();
        Ok(out)
    }

    async fn key_counts(&self, user_id: &str, device_id: &str) -> Result<DeviceKeyCounts> {
        // One statement for both, rows tagged with their kind (`o`: one-time keys counted
        // per algorithm, `f`: an unused fallback key): every sync asks for both.
        let rows: Vec<(Text, Text, i64)> = on_pool!(
            self.db.fresh(),
            "SELECT 'o' AS kind, algorithm, COUNT(*) AS n FROM e2e_one_time_keys \
             WHERE user_id = ? AND device_id = ? GROUP BY algorithm \
             UNION ALL \
             SELECT 'f', algorithm, COUNT(*) FROM e2e_fallback_keys \
             WHERE user_id = ? AND device_id = ? AND used = ? GROUP BY algorithm",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(false)
                    .fetch_all(p)
                    .await?
            }
        );
        let mut out = DeviceKeyCounts::default();
        for (kind, algorithm, count) in rows {
            if kind.0 == "f" {
                out.unused_fallback_key_types.push(algorithm.0);
            } else {
                out.one_time_keys.push((algorithm.0, count));
            }
        }
        out.one_time_keys.sort();
        out.unused_fallback_key_types.sort();
        Ok(out)
    }

    async fn delete_device_keys(
        &self,
        user_id: &str,
        device_ids: &[String],
    ) -> Result<Option<i64>> {
        if device_ids.is_empty() {
            return Ok(None);
        }
        let mut tx = self.db.begin().await?;
        // The same order as uploads: `e2e_keys`, then (last, as it serializes every stream
        // writer until commit) the stream.
        next_counter(&mut tx, KEYS_COUNTER).await?;
        for chunk in device_ids.chunks(CHUNK) {
            let query = format!(
                "DELETE FROM e2e_key_signatures WHERE target_user_id = ? AND target_key_id IN ({})",
                placeholders(chunk.len())
            );
            on_tx!(&mut tx, &query, |c, sql| {
                let mut q = sqlx::query(sql).bind(user_id);
                for device_id in chunk {
                    q = q.bind(device_id);
                }
                q.execute(&mut *c).await?.rows_affected()
            });
        }
        for table in [
            "e2e_device_keys",
            "e2e_one_time_keys",
            "e2e_fallback_keys",
            "to_device_messages",
            "to_device_txns",
        ] {
            delete_of_devices(&mut tx, table, user_id, device_ids).await?;
        }
        let position = next_counter(&mut tx, STREAM).await?;
        record_change(&mut tx, user_id, position).await?;
        tx.commit().await?;
        self.db.wrote(user_id).await;
        Ok(Some(position))
    }

    async fn device_list_updates(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<DeviceListUpdates> {
        // One statement, each row tagged with the list it belongs to (`c`: changed, `l`:
        // left); a sync reads both on every pass, and each statement is a round trip.
        //
        // Changed: whose keys changed (the user, and those sharing a joined room with them),
        // and who started sharing a joined room: they joined one of the user's rooms (read
        // from the memberships that changed in the range), or the user joined theirs (every
        // member of the rooms the user joined in the range). A join that only changed a
        // profile counts too: reporting a user whose keys did not change costs the client one
        // key query, missing one costs it the ability to encrypt for them.
        //
        // Left: they left one of the user's rooms (from the memberships that changed in the
        // range), or the user left theirs (the members of the rooms the user left in the
        // range); either way only those sharing no joined room with the user any more.
        let query = format!(
            "SELECT 'c' AS kind, c.user_id FROM device_list_changes c \
             WHERE c.stream_position > ? AND c.stream_position <= ? \
               AND (c.user_id = ? OR {shares_c}) \
             UNION \
             SELECT 'c', theirs.user_id FROM room_memberships theirs \
             WHERE theirs.stream_ordering > ? AND theirs.stream_ordering <= ? \
               AND theirs.membership = 'join' AND theirs.user_id <> ? \
               AND {IN_MY_ROOM} \
             UNION \
             SELECT 'c', theirs.user_id FROM room_memberships mine \
             JOIN room_memberships theirs ON theirs.room_id = mine.room_id \
             WHERE mine.user_id = ? AND mine.membership = 'join' \
               AND mine.stream_ordering > ? AND mine.stream_ordering <= ? \
               AND theirs.membership = 'join' AND theirs.user_id <> ? \
             UNION \
             SELECT 'l', theirs.user_id FROM room_memberships theirs \
             WHERE theirs.stream_ordering > ? AND theirs.stream_ordering <= ? \
               AND theirs.membership IN ('leave', 'ban') AND theirs.user_id <> ? \
               AND {IN_MY_ROOM} \
               AND NOT {shares_theirs} \
             UNION \
             SELECT 'l', theirs.user_id FROM room_memberships mine \
             JOIN room_memberships theirs ON theirs.room_id = mine.room_id \
             WHERE mine.user_id = ? AND mine.membership IN ('leave', 'ban') \
               AND mine.stream_ordering > ? AND mine.stream_ordering <= ? \
               AND theirs.membership = 'join' AND theirs.user_id <> ? \
               AND NOT {shares_theirs}",
            shares_c = shares_a_room("c.user_id"),
            shares_theirs = shares_a_room("theirs.user_id"),
        );
        let rows: Vec<(Text, Text)> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                // changed
                .bind(after)
                .bind(up_to)
                .bind(user_id)
                .bind(user_id)
                .bind(after)
                .bind(up_to)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(after)
                .bind(up_to)
                .bind(user_id)
                // left
                .bind(after)
                .bind(up_to)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(after)
                .bind(up_to)
                .bind(user_id)
                .bind(user_id)
                .fetch_all(p)
                .await?
        });
        let mut changed = BTreeSet::new();
        let mut left = BTreeSet::new();
        for (kind, user) in rows {
            if kind.0 == "l" {
                left.insert(user.0);
            } else {
                changed.insert(user.0);
            }
        }
        Ok(DeviceListUpdates {
            changed: changed.into_iter().collect(),
            left: left.into_iter().collect(),
        })
    }

    #[tracing::instrument(skip_all, fields(sender = %batch.sender, txn_id = %batch.txn_id))]
    async fn send_to_device(&self, batch: &ToDeviceBatch) -> Result<Option<i64>> {
        let mut tx = self.db.begin().await?;
        // The counter first, as every stream writer does: it also makes a retry of the same
        // transaction wait for the first to commit, and then find its id.
        let position = next_counter(&mut tx, STREAM).await?;
        let seen: Option<i64> = on_tx!(
            &mut tx,
            "SELECT created_at FROM to_device_txns WHERE user_id = ? AND device_id = ? AND txn_id = ?",
            |c, sql| {
                sqlx::query_scalar(sql)
                    .bind(&batch.sender)
                    .bind(&batch.sender_device)
                    .bind(&batch.txn_id)
                    .fetch_optional(&mut *c)
                    .await?
            }
        );
        if seen.is_some() {
            // Dropping the transaction rolls the counter back.
            return Ok(None);
        }
        let recorded = on_tx!(
            &mut tx,
            "INSERT INTO to_device_txns (user_id, device_id, txn_id, created_at) VALUES (?, ?, ?, ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(&batch.sender)
                    .bind(&batch.sender_device)
                    .bind(&batch.txn_id)
                    .bind(batch.now)
                    .execute(&mut *c)
                    .await
                    .map(|done| done.rows_affected())
                    .map_err(|e| StorageError::conflict_or(e, "to-device transaction id"))
            }
        );
        match recorded {
            Ok(_) => {}
            Err(StorageError::Conflict(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
        for (seq, message) in batch.messages.iter().enumerate() {
            let seq = seq as i64;
            // Only to devices that exist: the select finds them.
            let device_filter = match message.target {
                DeviceTarget::All => "",
                DeviceTarget::Device(_) => " AND device_id = ?",
            };
            let query = format!(
                "INSERT INTO to_device_messages \
                 (user_id, device_id, stream_position, seq, sender, event_type, content) \
                 SELECT user_id, device_id, ?, ?, ?, ?, ? FROM devices WHERE user_id = ?{device_filter}"
            );
            on_tx!(&mut tx, &query, |c, sql| {
                let mut q = sqlx::query(sql)
                    .bind(position)
                    .bind(seq)
                    .bind(&batch.sender)
                    .bind(&batch.event_type)
                    .bind(&message.content)
                    .bind(&message.user_id);
                if let DeviceTarget::Device(device_id) = &message.target {
                    q = q.bind(device_id);
                }
                q.execute(&mut *c).await?.rows_affected()
            });
        }
        tx.commit().await?;
        self.db.wrote(&batch.sender).await;
        Ok(Some(position))
    }

    async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<ToDeviceRecord>> {
        let rows: Vec<ToDeviceRow> = on_pool!(
            self.db.fresh(),
            "SELECT stream_position, sender, event_type, content FROM to_device_messages \
             WHERE user_id = ? AND device_id = ? AND stream_position > ? AND stream_position <= ? \
             ORDER BY stream_position, seq LIMIT ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(after)
                    .bind(up_to)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
        );
        Ok(rows
            .into_iter()
            .map(|r| ToDeviceRecord {
                stream_position: r.stream_position,
                sender: r.sender.into(),
                event_type: r.event_type.into(),
                content: r.content.into(),
            })
            .collect())
    }

    async fn to_device_inbox(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<ToDeviceRecord>> {
        // The new messages, and one the client has already (if any is left), in one read:
        // most syncs have nothing to delete, and a delete is a write (SQLite's single writer,
        // MySQL's gap locks) even when it matches nothing.
        let rows: Vec<(i64, i64, Text, Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT stream_position, seq, sender, event_type, content FROM ( \
               SELECT stream_position, seq, sender, event_type, content FROM to_device_messages \
               WHERE user_id = ? AND device_id = ? AND stream_position > ? AND stream_position <= ? \
               ORDER BY stream_position, seq LIMIT ?) AS fresh \
             UNION ALL \
             SELECT stream_position, seq, sender, event_type, content FROM ( \
               SELECT stream_position, seq, sender, event_type, content FROM to_device_messages \
               WHERE user_id = ? AND device_id = ? AND stream_position <= ? LIMIT 1) AS delivered",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(after)
                    .bind(up_to)
                    .bind(limit)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(after)
                    .fetch_all(p)
                    .await?
            }
        );
        let (delivered, mut fresh): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|row| row.0 <= after);
        if !delivered.is_empty() {
            on_pool!(
                self.db.primary(),
                "DELETE FROM to_device_messages WHERE user_id = ? AND device_id = ? AND stream_position <= ?",
                |p, sql| {
                    sqlx::query(sql)
                        .bind(user_id)
                        .bind(device_id)
                        .bind(after)
                        .execute(p)
                        .await?
                        .rows_affected()
                }
            );
        }
        fresh.sort_by_key(|row| (row.0, row.1));
        Ok(fresh
            .into_iter()
            .map(
                |(stream_position, _, sender, event_type, content)| ToDeviceRecord {
                    stream_position,
                    sender: sender.0,
                    event_type: event_type.0,
                    content: content.0,
                },
            )
            .collect())
    }

    async fn cross_signing_keys(&self, user_id: &str) -> Result<Vec<CrossSigningKeyRecord>> {
        let rows: Vec<(Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT key_type, key_json FROM e2e_cross_signing_keys WHERE user_id = ?",
            |p, sql| { sqlx::query_as(sql).bind(user_id).fetch_all(p).await? }
        );
        let mut out: Vec<CrossSigningKeyRecord> = rows
            .into_iter()
            .map(|(key_type, key_json)| CrossSigningKeyRecord {
                key_type: key_type.0,
                key_json: key_json.0,
            })
            .collect();
        out.sort_by(|a, b| a.key_type.cmp(&b.key_type));
        Ok(out)
    }

    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    async fn put_cross_signing_keys(
        &self,
        user_id: &str,
        keys: &[CrossSigningKeyRecord],
    ) -> Result<Option<i64>> {
        if keys.is_empty() {
            return Ok(None);
        }
        let mut tx = self.db.begin().await?;
        next_counter(&mut tx, KEYS_COUNTER).await?;
        for key in keys {
            on_tx!(
                &mut tx,
                "DELETE FROM e2e_cross_signing_keys WHERE user_id = ? AND key_type = ?",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(user_id)
                        .bind(&key.key_type)
                        .execute(&mut *c)
                        .await?
                        .rows_affected()
                }
            );
            on_tx!(
                &mut tx,
                "INSERT INTO e2e_cross_signing_keys (user_id, key_type, key_json) VALUES (?, ?, ?)",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(user_id)
                        .bind(&key.key_type)
                        .bind(&key.key_json)
                        .execute(&mut *c)
                        .await
                        .map_err(|e| StorageError::conflict_or(e, "cross-signing key"))?
                        .rows_affected()
                }
            );
        }
        let position = next_counter(&mut tx, STREAM).await?;
        record_change(&mut tx, user_id, position).await?;
        tx.commit().await?;
        self.db.wrote(user_id).await;
        Ok(Some(position))
    }

    async fn add_key_signatures(&self, signatures: &[KeySignatureRecord]) -> Result<Option<i64>> {
        if signatures.is_empty() {
            return Ok(None);
        }
        let mut tx = self.db.begin().await?;
        next_counter(&mut tx, KEYS_COUNTER).await?;
        for sig in signatures {
            on_tx!(
                &mut tx,
                "DELETE FROM e2e_key_signatures WHERE target_user_id = ? AND target_key_id = ? \
                 AND signer_user_id = ? AND signer_key_id = ?",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(&sig.target_user_id)
                        .bind(&sig.target_key_id)
                        .bind(&sig.signer_user_id)
                        .bind(&sig.signer_key_id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected()
                }
            );
            on_tx!(
                &mut tx,
                "INSERT INTO e2e_key_signatures \
                 (target_user_id, target_key_id, signer_user_id, signer_key_id, signature) \
                 VALUES (?, ?, ?, ?, ?)",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(&sig.target_user_id)
                        .bind(&sig.target_key_id)
                        .bind(&sig.signer_user_id)
                        .bind(&sig.signer_key_id)
                        .bind(&sig.signature)
                        .execute(&mut *c)
                        .await
                        .map_err(|e| StorageError::conflict_or(e, "key signature"))?
                        .rows_affected()
                }
            );
        }
        let targets: BTreeSet<&str> = signatures
            .iter()
            .map(|s| s.target_user_id.as_str())
            .collect();
        let position = next_counter(&mut tx, STREAM).await?;
        for user_id in &targets {
            record_change(&mut tx, user_id, position).await?;
        }
        tx.commit().await?;
        for user_id in targets {
            self.db.wrote(user_id).await;
        }
        Ok(Some(position))
    }

    async fn key_signatures(&self, user_id: &str, viewer: &str) -> Result<Vec<KeySignatureRecord>> {
        let rows: Vec<(Text, Text, Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT target_key_id, signer_user_id, signer_key_id, signature FROM e2e_key_signatures \
             WHERE target_user_id = ? AND (signer_user_id = ? OR signer_user_id = ?)",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(user_id)
                    .bind(user_id)
                    .bind(viewer)
                    .fetch_all(p)
                    .await?
            }
        );
        let mut out: Vec<KeySignatureRecord> = rows
            .into_iter()
            .map(
                |(target_key_id, signer_user_id, signer_key_id, signature)| KeySignatureRecord {
                    target_user_id: user_id.to_owned(),
                    target_key_id: target_key_id.0,
                    signer_user_id: signer_user_id.0,
                    signer_key_id: signer_key_id.0,
                    signature: signature.0,
                },
            )
            .collect();
        out.sort_by(|a, b| {
            (&a.target_key_id, &a.signer_user_id, &a.signer_key_id).cmp(&(
                &b.target_key_id,
                &b.signer_user_id,
                &b.signer_key_id,
            ))
        });
        Ok(out)
    }

    async fn delete_to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        up_to: i64,
    ) -> Result<u64> {
        // A look first: most syncs have nothing to delete, and a delete is a write (SQLite's
        // single writer, MySQL's gap locks) even when it matches nothing.
        let any: Option<i64> = on_pool!(
            self.db.fresh(),
            "SELECT stream_position FROM to_device_messages \
             WHERE user_id = ? AND device_id = ? AND stream_position <= ? LIMIT 1",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(up_to)
                    .fetch_optional(p)
                    .await?
            }
        );
        if any.is_none() {
            return Ok(0);
        }
        let deleted = on_pool!(
            self.db.primary(),
            "DELETE FROM to_device_messages WHERE user_id = ? AND device_id = ? AND stream_position <= ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(up_to)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(deleted)
    }
}
