//! Sync filters and account data.
//!
//! Account data takes its stream position from the same `events_stream` counter as events, so
//! one number orders everything a sync sends and sync tokens stay one number. The counter row
//! stays locked until the write commits, so positions commit in order (see `id_counters`).

use async_trait::async_trait;

use super::{SqlStore, rooms::next_counter};
use crate::{
    db::Text,
    error::{Result, StorageError},
    model::AccountDataRecord,
    on_pool, on_tx,
    repo::AccountDataRepo,
};

/// How often `create_filter` tries again when a concurrent upload took the same id.
const FILTER_ID_ATTEMPTS: usize = 16;

/// `room_id` as stored: global account data has the empty room id.
fn stored_room(room_id: Option<&str>) -> &str {
    room_id.unwrap_or_default()
}

#[derive(sqlx::FromRow)]
struct AccountDataRow {
    user_id: Text,
    room_id: Text,
    data_type: Text,
    content: Text,
    stream_position: i64,
}

impl From<AccountDataRow> for AccountDataRecord {
    fn from(r: AccountDataRow) -> Self {
        let room_id = String::from(r.room_id);
        AccountDataRecord {
            user_id: r.user_id.into(),
            room_id: (!room_id.is_empty()).then_some(room_id),
            data_type: r.data_type.into(),
            content: r.content.into(),
            stream_position: r.stream_position,
        }
    }
}

const ACCOUNT_DATA_COLUMNS: &str = "user_id, room_id, data_type, content, stream_position";

/// Which stored piece of account data a write may replace.
#[derive(Clone, Copy)]
enum Overwrite {
    /// Whatever is stored.
    Always,
    /// Only the piece written at this position (`None`: only when there is none).
    IfReadAt(Option<i64>),
}

impl SqlStore {
    /// Writes one piece of account data at the next stream position, which it answers;
    /// `None`, writing nothing, when `overwrite` refuses what is stored.
    async fn write_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
        overwrite: Overwrite,
    ) -> Result<Option<i64>> {
        let room_id = stored_room(room_id);
        let mut tx = self.db.begin().await?;
        // Taken first: the counter row lock then serializes account data writes, so the
        // delete-and-insert below cannot deadlock on MySQL's gap locks (a delete of a missing
        // row locks the gap the insert goes into), and what the check below reads cannot
        // change before this transaction commits, in any process. Events take the counter
        // after their room lock and never touch these rows, so the lock order has no cycle.
        let position = next_counter(&mut tx, "events_stream").await?;
        if let Overwrite::IfReadAt(read_at) = overwrite {
            let stored: Option<i64> = on_tx!(
                &mut tx,
                "SELECT stream_position FROM account_data WHERE user_id = ? AND room_id = ? AND data_type = ?",
                |c, sql| {
                    sqlx::query_scalar(sql)
                        .bind(user_id)
                        .bind(room_id)
                        .bind(data_type)
                        .fetch_optional(&mut *c)
                        .await?
                }
            );
            if stored != read_at {
                tx.rollback().await?;
                return Ok(None);
            }
        }
        on_tx!(
            &mut tx,
            "DELETE FROM account_data WHERE user_id = ? AND room_id = ? AND data_type = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .bind(room_id)
                    .bind(data_type)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        on_tx!(
            &mut tx,
            "INSERT INTO account_data (user_id, room_id, data_type, content, stream_position) VALUES (?, ?, ?, ?, ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .bind(room_id)
                    .bind(data_type)
                    .bind(content)
                    .bind(position)
                    .execute(&mut *c)
                    .await
                    .map_err(|e| StorageError::conflict_or(e, "account data"))?
                    .rows_affected()
            }
        );
        tx.commit().await?;
        Ok(Some(position))
    }
}

#[async_trait]
impl AccountDataRepo for SqlStore {
    async fn create_filter(&self, user_id: &str, filter_json: &str, now: i64) -> Result<String> {
        // Filters are never deleted, so the count is the next id. Two uploads at once may
        // pick the same id: the primary key refuses the second, which counts again.
        for _ in 0..FILTER_ID_ATTEMPTS {
            let count: i64 = on_pool!(
                self.db.fresh(),
                "SELECT COUNT(*) FROM user_filters WHERE user_id = ?",
                |p, sql| { sqlx::query_scalar(sql).bind(user_id).fetch_one(p).await? }
            );
            let filter_id = count.to_string();
            let inserted = on_pool!(
                self.db.primary(),
                "INSERT INTO user_filters (user_id, filter_id, filter_json, created_at) VALUES (?, ?, ?, ?)",
                |p, sql| {
                    sqlx::query(sql)
                        .bind(user_id)
                        .bind(&filter_id)
                        .bind(filter_json)
                        .bind(now)
                        .execute(p)
                        .await
                        .map(|done| done.rows_affected())
                        .map_err(|e| StorageError::conflict_or(e, "filter id"))
                }
            );
            match inserted {
                Ok(_) => return Ok(filter_id),
                Err(StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::Conflict(format!(
            "no free filter id for {user_id} after {FILTER_ID_ATTEMPTS} attempts"
        )))
    }

    async fn get_filter(&self, user_id: &str, filter_id: &str) -> Result<Option<String>> {
        let json: Option<Text> = on_pool!(
            self.db.fresh(),
            "SELECT filter_json FROM user_filters WHERE user_id = ? AND filter_id = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .bind(filter_id)
                    .fetch_optional(p)
                    .await?
            }
        );
        Ok(json.map(String::from))
    }

    async fn put_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
    ) -> Result<i64> {
        self.write_account_data(user_id, room_id, data_type, content, Overwrite::Always)
            .await?
            .ok_or_else(|| StorageError::Corrupt("an unconditional write was refused".into()))
    }

    async fn replace_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
        read_at: Option<i64>,
    ) -> Result<Option<i64>> {
        let overwrite = Overwrite::IfReadAt(read_at);
        self.write_account_data(user_id, room_id, data_type, content, overwrite)
            .await
    }

    async fn get_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
    ) -> Result<Option<AccountDataRecord>> {
        let query = format!(
            "SELECT {ACCOUNT_DATA_COLUMNS} FROM account_data WHERE user_id = ? AND room_id = ? AND data_type = ?"
        );
        let row: Option<AccountDataRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(user_id)
                .bind(stored_room(room_id))
                .bind(data_type)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(Into::into))
    }

    async fn account_data_since(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<AccountDataRecord>> {
        let query = format!(
            "SELECT {ACCOUNT_DATA_COLUMNS} FROM account_data \
             WHERE user_id = ? AND stream_position > ? AND stream_position <= ? \
             ORDER BY stream_position"
        );
        let rows: Vec<AccountDataRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(user_id)
                .bind(after)
                .bind(up_to)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }
}
