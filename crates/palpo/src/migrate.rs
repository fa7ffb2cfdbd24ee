//! `palpo migrate`, and opening storage for the other commands.

use anyhow::Context;
use palpo_core::{Config, config::redact_url};
use palpo_storage::{
    Db, Storage,
    db::{Pool, sqlx_pool},
};
use sqlx::migrate::Migrate;

/// Connects to the database (and Redis, when configured) and applies pending migrations.
pub async fn open_storage(config: &Config) -> anyhow::Result<Storage> {
    Storage::open_with_cache(&config.database, &config.cache)
        .await
        .with_context(|| {
            format!(
                "cannot open the database {}",
                redact_url(&config.database.url)
            )
        })
}

/// Applies every pending migration and prints which ones ran.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let url = redact_url(&config.database.url);
    let db = Db::connect(&config.database)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let known = palpo_storage::db::migrations(db.backend());
    let before = applied_versions(db.primary())
        .await
        .with_context(|| format!("cannot read the migration history of {url}"))?;
    db.migrate()
        .await
        .with_context(|| format!("cannot migrate {url}"))?;
    db.close().await;

    println!("database: {url} ({})", db.backend().name());
    let mut applied = 0;
    for (version, description, _) in known {
        if !before.contains(version) {
            println!("applied {version:04} {description}");
            applied += 1;
        }
    }
    if applied == 0 {
        println!("up to date: {} migrations already applied", before.len());
    } else {
        println!("done: {applied} applied, {} in total", known.len());
    }
    Ok(())
}

/// Versions recorded in the migration table (created when missing).
async fn applied_versions(pool: &Pool) -> anyhow::Result<Vec<i64>> {
    async fn list<DB>(pool: &sqlx::Pool<DB>) -> anyhow::Result<Vec<i64>>
    where
        DB: sqlx::Database,
        DB::Connection: Migrate,
    {
        let mut conn = pool.acquire().await?;
        conn.ensure_migrations_table().await?;
        let applied = conn.list_applied_migrations().await?;
        Ok(applied.into_iter().map(|m| m.version).collect())
    }
    match pool {
        Pool::Postgres(p) => list(sqlx_pool(p)?).await,
        Pool::MySql(p) => list(sqlx_pool(p)?).await,
        Pool::Sqlite(p) => list(sqlx_pool(p)?).await,
    }
}
