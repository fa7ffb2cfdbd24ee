//! SQLite: writes are answered without a checkpoint (the automatic one is off), and a
//! background checkpointer still moves the write-ahead log into the database file.

use std::time::{Duration, Instant};

use palpo_storage::{Backend, testing::TestDatabase};
use sqlx::{Connection, sqlite::SqliteConnection};

#[tokio::test]
async fn the_log_moves_into_the_database_file_in_the_background() {
    let db = TestDatabase::create(Backend::Sqlite).await;
    // Migrating writes every table, into the log first.
    let storage = db.storage().await;
    let path = db
        .url()
        .strip_prefix("sqlite://")
        .expect("a sqlite URL")
        .to_owned();
    let mut reader = SqliteConnection::connect(&format!("sqlite://{path}?mode=ro"))
        .await
        .expect("reader");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The database as readers see it (log included) against what the file itself holds.
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut reader)
            .await
            .expect("page count");
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut reader)
            .await
            .expect("page size");
        let file = std::fs::metadata(&path).expect("database file").len() as i64;
        if pages > 1 && file == pages * page_size {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log was not checkpointed: file {file} bytes, {pages} pages of {page_size}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.close().await.expect("close");
    drop(storage);
    db.drop_database().await;
}
