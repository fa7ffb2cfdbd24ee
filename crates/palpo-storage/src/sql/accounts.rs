//! Users, devices, access tokens and user-interactive auth sessions.

use async_trait::async_trait;

use super::SqlStore;
use crate::{
    db::Text,
    error::{Result, StorageError},
    model::{DeviceLogin, DeviceRecord, NewUser, Removed, TokenOwner, UiaSession, UserRecord},
    on_pool, on_tx,
    repo::{DeviceRepo, UiaRepo, UserRepo},
};

#[derive(sqlx::FromRow)]
struct UserRow {
    user_id: Text,
    password_hash: Option<Text>,
    is_admin: bool,
    is_deactivated: bool,
    created_at: i64,
}

impl From<UserRow> for UserRecord {
    fn from(r: UserRow) -> Self {
        UserRecord {
            user_id: r.user_id.into(),
            password_hash: r.password_hash.map(Into::into),
            is_admin: r.is_admin,
            is_deactivated: r.is_deactivated,
            created_at: r.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct DeviceRow {
    user_id: Text,
    device_id: Text,
    display_name: Option<Text>,
    last_seen_ip: Option<Text>,
    last_seen_ts: Option<i64>,
    created_at: i64,
}

impl From<DeviceRow> for DeviceRecord {
    fn from(r: DeviceRow) -> Self {
        DeviceRecord {
            user_id: r.user_id.into(),
            device_id: r.device_id.into(),
            display_name: r.display_name.map(Into::into),
            last_seen_ip: r.last_seen_ip.map(Into::into),
            last_seen_ts: r.last_seen_ts,
            created_at: r.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct UiaRow {
    session_id: Text,
    user_id: Option<Text>,
    purpose: Text,
    completed: Text,
    data: Text,
    created_at: i64,
}

impl TryFrom<UiaRow> for UiaSession {
    type Error = StorageError;
    fn try_from(r: UiaRow) -> Result<Self> {
        let completed = serde_json::from_str(&r.completed.0)
            .map_err(|e| StorageError::Corrupt(format!("uia_sessions.completed: {e}")))?;
        Ok(UiaSession {
            session_id: r.session_id.into(),
            user_id: r.user_id.map(Into::into),
            purpose: r.purpose.into(),
            completed,
            data: r.data.into(),
            created_at: r.created_at,
        })
    }
}

const USER_COLUMNS: &str = "user_id, password_hash, is_admin, is_deactivated, created_at";
const DEVICE_COLUMNS: &str =
    "user_id, device_id, display_name, last_seen_ip, last_seen_ts, created_at";

#[async_trait]
impl UserRepo for SqlStore {
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id))]
    async fn create_user(&self, user: &NewUser) -> Result<()> {
        let result = on_pool!(
            self.db.primary(),
            "INSERT INTO users (user_id, password_hash, is_admin, is_deactivated, created_at) VALUES (?, ?, ?, ?, ?)",
            |p, sql| {
                sqlx::query(sql)
                    .bind(&user.user_id)
                    .bind(&user.password_hash)
                    .bind(user.is_admin)
                    .bind(false)
                    .bind(user.created_at)
                    .execute(p)
                    .await
                    .map(|_| ())
            }
        );
        result.map_err(|e| StorageError::conflict_or(e, &user.user_id))?;
        self.db.wrote(&user.user_id).await;
        Ok(())
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>> {
        let query = format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = ?");
        let pool = self.db.read_pool(user_id).await;
        let row: Option<UserRow> = on_pool!(&pool, &query, |p, sql| {
            sqlx::query_as(sql).bind(user_id).fetch_optional(p).await?
        });
        Ok(row.map(Into::into))
    }

    async fn set_password_hash(&self, user_id: &str, hash: Option<&str>) -> Result<bool> {
        let affected = on_pool!(
            self.db.primary(),
            "UPDATE users SET password_hash = ? WHERE user_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(hash)
                    .bind(user_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        self.db.wrote(user_id).await;
        Ok(affected > 0)
    }

    async fn deactivate_user(&self, user_id: &str) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "UPDATE users SET is_deactivated = ?, password_hash = NULL WHERE user_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(true)
                    .bind(user_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        self.db.wrote(user_id).await;
        Ok(())
    }

    async fn count_users(&self) -> Result<i64> {
        Ok(on_pool!(
            self.db.fresh(),
            "SELECT COUNT(*) FROM users",
            |p, sql| { sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await? }
        ))
    }
}

/// Hashes of the tokens of the given devices, then deletes tokens and devices, in `tx`.
async fn delete_devices_in(
    tx: &mut crate::db::Tx,
    user_id: &str,
    device_ids: &[String],
) -> Result<Removed> {
    let mut removed = Removed::default();
    for device_id in device_ids {
        let hashes: Vec<Text> = on_tx!(
            tx,
            "SELECT token_hash FROM access_tokens WHERE user_id = ? AND device_id = ?",
            |c, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .fetch_all(&mut *c)
                    .await?
            }
        );
        removed
            .token_hashes
            .extend(hashes.into_iter().map(String::from));
        on_tx!(
            tx,
            "DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        let deleted = on_tx!(
            tx,
            "DELETE FROM devices WHERE user_id = ? AND device_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        if deleted > 0 {
            removed.device_ids.push(device_id.clone());
        }
    }
    Ok(removed)
}

#[async_trait]
impl DeviceRepo for SqlStore {
    #[tracing::instrument(skip_all, fields(user_id = %login.user_id, device_id = %login.device_id))]
    async fn login_device(&self, login: &DeviceLogin) -> Result<Vec<String>> {
        let mut tx = self.db.begin().await?;
        let exists: Option<i64> = on_tx!(
            &mut tx,
            "SELECT created_at FROM devices WHERE user_id = ? AND device_id = ?",
            |c, sql| {
                sqlx::query_scalar(sql)
                    .bind(&login.user_id)
                    .bind(&login.device_id)
                    .fetch_optional(&mut *c)
                    .await?
            }
        );
        if exists.is_some() {
            if login.display_name.is_some() {
                on_tx!(
                    &mut tx,
                    "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                    |c, sql| {
                        sqlx::query(sql)
                            .bind(&login.display_name)
                            .bind(&login.user_id)
                            .bind(&login.device_id)
                            .execute(&mut *c)
                            .await?
                            .rows_affected()
                    }
                );
            }
        } else {
            on_tx!(
                &mut tx,
                "INSERT INTO devices (user_id, device_id, display_name, last_seen_ip, last_seen_ts, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(&login.user_id)
                        .bind(&login.device_id)
                        .bind(&login.display_name)
                        .bind(&login.ip)
                        .bind(login.now)
                        .bind(login.now)
                        .execute(&mut *c)
                        .await
                        .map_err(|e| StorageError::conflict_or(e, &login.device_id))?
                        .rows_affected()
                }
            );
        }
        let replaced: Vec<Text> = on_tx!(
            &mut tx,
            "SELECT token_hash FROM access_tokens WHERE user_id = ? AND device_id = ?",
            |c, sql| {
                sqlx::query_scalar(sql)
                    .bind(&login.user_id)
                    .bind(&login.device_id)
                    .fetch_all(&mut *c)
                    .await?
            }
        );
        on_tx!(
            &mut tx,
            "DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(&login.user_id)
                    .bind(&login.device_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        on_tx!(
            &mut tx,
            "INSERT INTO access_tokens (token_hash, user_id, device_id, created_at) VALUES (?, ?, ?, ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(&login.token_hash)
                    .bind(&login.user_id)
                    .bind(&login.device_id)
                    .bind(login.now)
                    .execute(&mut *c)
                    .await
                    .map_err(|e| StorageError::conflict_or(e, "access token"))?
                    .rows_affected()
            }
        );
        tx.commit().await?;
        self.db.wrote(&login.user_id).await;
        Ok(replaced.into_iter().map(String::from).collect())
    }

    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceRecord>> {
        let query =
            format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ? AND device_id = ?");
        let pool = self.db.read_pool(user_id).await;
        let row: Option<DeviceRow> = on_pool!(&pool, &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(Into::into))
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>> {
        let query =
            format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ? ORDER BY device_id");
        let pool = self.db.read_pool(user_id).await;
        let rows: Vec<DeviceRow> = on_pool!(&pool, &query, |p, sql| {
            sqlx::query_as(sql).bind(user_id).fetch_all(p).await?
        });
        let mut devices: Vec<DeviceRecord> = rows.into_iter().map(Into::into).collect();
        // ORDER BY follows the database's collation (PostgreSQL's may be en_US, where
        // "a" < "B"); sort bytewise so every backend returns the same order.
        devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(devices)
    }

    async fn set_device_display_name(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<bool> {
        // Count a match even when the name is unchanged (MySQL reports changed rows only).
        let Some(_) = self.get_device_on_primary(user_id, device_id).await? else {
            return Ok(false);
        };
        on_pool!(
            self.db.primary(),
            "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(display_name)
                    .bind(user_id)
                    .bind(device_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        self.db.wrote(user_id).await;
        Ok(true)
    }

    async fn delete_devices(&self, user_id: &str, device_ids: &[String]) -> Result<Removed> {
        let mut tx = self.db.begin().await?;
        let removed = delete_devices_in(&mut tx, user_id, device_ids).await?;
        tx.commit().await?;
        self.db.wrote(user_id).await;
        Ok(removed)
    }

    async fn delete_all_devices(&self, user_id: &str, keep: Option<&str>) -> Result<Removed> {
        let mut tx = self.db.begin().await?;
        let all: Vec<Text> = on_tx!(
            &mut tx,
            "SELECT device_id FROM devices WHERE user_id = ?",
            |c, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .fetch_all(&mut *c)
                    .await?
            }
        );
        let doomed: Vec<String> = all
            .into_iter()
            .map(String::from)
            .filter(|d| Some(d.as_str()) != keep)
            .collect();
        let removed = delete_devices_in(&mut tx, user_id, &doomed).await?;
        tx.commit().await?;
        self.db.wrote(user_id).await;
        Ok(removed)
    }

    async fn find_token(&self, token_hash: &str) -> Result<Option<TokenOwner>> {
        let row: Option<(Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(token_hash)
                    .fetch_optional(p)
                    .await?
            }
        );
        Ok(row.map(|(user_id, device_id)| TokenOwner {
            user_id: user_id.into(),
            device_id: device_id.into(),
        }))
    }

    async fn touch_device(
        &self,
        user_id: &str,
        device_id: &str,
        ip: Option<&str>,
        ts: i64,
    ) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "UPDATE devices SET last_seen_ip = ?, last_seen_ts = ? WHERE user_id = ? AND device_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(ip)
                    .bind(ts)
                    .bind(user_id)
                    .bind(device_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(())
    }
}

impl SqlStore {
    async fn get_device_on_primary(&self, user_id: &str, device_id: &str) -> Result<Option<i64>> {
        Ok(on_pool!(
            self.db.fresh(),
            "SELECT created_at FROM devices WHERE user_id = ? AND device_id = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .bind(device_id)
                    .fetch_optional(p)
                    .await?
            }
        ))
    }
}

fn completed_json(session: &UiaSession) -> Result<String> {
    serde_json::to_string(&session.completed).map_err(|e| StorageError::Corrupt(e.to_string()))
}

#[async_trait]
impl UiaRepo for SqlStore {
    async fn create_session(&self, session: &UiaSession) -> Result<()> {
        let completed = completed_json(session)?;
        on_pool!(
            self.db.primary(),
            "INSERT INTO uia_sessions (session_id, user_id, purpose, completed, data, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            |p, sql| {
                sqlx::query(sql)
                    .bind(&session.session_id)
                    .bind(&session.user_id)
                    .bind(&session.purpose)
                    .bind(&completed)
                    .bind(&session.data)
                    .bind(session.created_at)
                    .execute(p)
                    .await
                    .map_err(|e| StorageError::conflict_or(e, &session.session_id))?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<UiaSession>> {
        // From the primary: the next round of the same authentication follows at once.
        let row: Option<UiaRow> = on_pool!(
            self.db.fresh(),
            "SELECT session_id, user_id, purpose, completed, data, created_at FROM uia_sessions WHERE session_id = ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(session_id)
                    .fetch_optional(p)
                    .await?
            }
        );
        row.map(TryInto::try_into).transpose()
    }

    async fn update_session(&self, session: &UiaSession) -> Result<()> {
        let completed = completed_json(session)?;
        on_pool!(
            self.db.primary(),
            "UPDATE uia_sessions SET completed = ?, data = ? WHERE session_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(&completed)
                    .bind(&session.data)
                    .bind(&session.session_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn delete_session(&self, session_id: &str) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "DELETE FROM uia_sessions WHERE session_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(session_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn delete_sessions_before(&self, before: i64) -> Result<u64> {
        Ok(on_pool!(
            self.db.primary(),
            "DELETE FROM uia_sessions WHERE created_at < ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(before)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        ))
    }
}
