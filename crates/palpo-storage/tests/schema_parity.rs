//! The three migration sets must produce the same schema: the same tables, columns,
//! nullability and secondary indexes, so one code path can serve every backend.
//!
//! Unlike the per-backend conformance tests this needs all three backends at once; it fails
//! when any of them is down (and does not consult `PALPO_TEST_BACKENDS`).

use std::{collections::BTreeSet, path::PathBuf};

use palpo_storage::{Backend, db::Pool, testing::with_database};

/// (table, column, nullable)
type Columns = BTreeSet<(String, String, bool)>;
/// (table, index name), primary keys excluded
type Indexes = BTreeSet<(String, String)>;

const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

async fn schema_of(backend: Backend) -> (Columns, Indexes) {
    with_database(backend, |db| async move {
        let storage = db.storage().await;
        let schema = match storage.db().primary() {
            Pool::Postgres(pool) => {
                let columns: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT table_name::text, column_name::text, is_nullable::text \
                     FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name <> $1",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_all(pool)
                .await
                .expect("postgres columns");
                let indexes: Vec<(String, String)> = sqlx::query_as(
                    "SELECT t.relname::text, i.relname::text \
                     FROM pg_index x \
                     JOIN pg_class i ON i.oid = x.indexrelid \
                     JOIN pg_class t ON t.oid = x.indrelid \
                     JOIN pg_namespace n ON n.oid = t.relnamespace \
                     WHERE n.nspname = current_schema() AND NOT x.indisprimary \
                       AND t.relname <> $1",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_all(pool)
                .await
                .expect("postgres indexes");
                (nullable_yes_no(columns), indexes.into_iter().collect())
            }
            Pool::MySql(pool) => {
                // information_schema text comes back as binary on some servers: decode bytes.
                let columns: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = sqlx::query_as(
                    "SELECT table_name, column_name, is_nullable FROM information_schema.columns \
                     WHERE table_schema = DATABASE() AND table_name <> ?",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_all(pool)
                .await
                .expect("mysql columns");
                let indexes: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
                    "SELECT DISTINCT table_name, index_name FROM information_schema.statistics \
                     WHERE table_schema = DATABASE() AND index_name <> 'PRIMARY' \
                       AND table_name <> ?",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_all(pool)
                .await
                .expect("mysql indexes");
                (
                    nullable_yes_no(
                        columns
                            .into_iter()
                            .map(|(t, c, n)| (text(t), text(c), text(n)))
                            .collect(),
                    ),
                    indexes
                        .into_iter()
                        .map(|(t, i)| (text(t), text(i)))
                        .collect(),
                )
            }
            Pool::Sqlite(pool) => {
                let columns: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT m.name, p.name, p.\"notnull\" \
                     FROM sqlite_master m JOIN pragma_table_info(m.name) p \
                     WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> ?",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_all(pool)
                .await
                .expect("sqlite columns");
                // Automatic indexes (primary keys, UNIQUE) are named sqlite_autoindex_*.
                let indexes: Vec<(String, String)> = sqlx::query_as(
                    "SELECT tbl_name, name FROM sqlite_master \
                     WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex_%' \
                       AND tbl_name <> ?",
                )
                .bind(MIGRATIONS_TABLE)
                .fetch_all(pool)
                .await
                .expect("sqlite indexes");
                (
                    columns
                        .into_iter()
                        // SQLite lets a non-integer PRIMARY KEY hold NULL unless it is declared
                        // NOT NULL, so `notnull` (the declaration) is the right comparison.
                        .map(|(t, c, not_null)| (t, c, not_null == 0))
                        .collect(),
                    indexes.into_iter().collect(),
                )
            }
        };
        storage.db().close().await;
        schema
    })
    .await
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("utf-8 identifier")
}

fn nullable_yes_no(columns: Vec<(String, String, String)>) -> Columns {
    columns
        .into_iter()
        .map(|(table, column, nullable)| {
            (
                table.to_lowercase(),
                column.to_lowercase(),
                nullable == "YES",
            )
        })
        .collect()
}

fn diff<T: Ord + std::fmt::Debug>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> String {
    format!(
        "only in first: {:?}\nonly in second: {:?}",
        a.difference(b).collect::<Vec<_>>(),
        b.difference(a).collect::<Vec<_>>()
    )
}

#[tokio::test]
async fn every_backend_migrates_to_the_same_schema() {
    let (pg_columns, pg_indexes) = schema_of(Backend::Postgres).await;
    let (my_columns, my_indexes) = schema_of(Backend::MySql).await;
    let (lite_columns, lite_indexes) = schema_of(Backend::Sqlite).await;

    // Guard against comparing three empty sets.
    for table in ["users", "devices", "access_tokens", "uia_sessions"] {
        assert!(
            pg_columns.iter().any(|(t, _, _)| t == table),
            "table {table} missing on postgres: {pg_columns:?}"
        );
    }
    assert!(pg_columns.contains(&("users".into(), "user_id".into(), false)));
    assert!(pg_columns.contains(&("users".into(), "password_hash".into(), true)));
    assert!(!pg_columns.iter().any(|(t, _, _)| t == MIGRATIONS_TABLE));
    assert!(!pg_indexes.is_empty());

    assert!(
        pg_columns == my_columns,
        "postgres vs mysql columns differ:\n{}",
        diff(&pg_columns, &my_columns)
    );
    assert!(
        pg_columns == lite_columns,
        "postgres vs sqlite columns differ:\n{}",
        diff(&pg_columns, &lite_columns)
    );
    assert!(
        pg_indexes == my_indexes,
        "postgres vs mysql indexes differ:\n{}",
        diff(&pg_indexes, &my_indexes)
    );
    assert!(
        pg_indexes == lite_indexes,
        "postgres vs sqlite indexes differ:\n{}",
        diff(&pg_indexes, &lite_indexes)
    );
}

fn migration_files(backend: &str) -> BTreeSet<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(format!("migrations-{backend}"));
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn migration_folders_hold_the_same_files() {
    let postgres = migration_files("postgres");
    let mysql = migration_files("mysql");
    let sqlite = migration_files("sqlite");
    assert!(
        postgres.iter().any(|name| name.ends_with(".sql")),
        "no migrations found: {postgres:?}"
    );
    assert!(
        postgres.iter().all(|name| name.ends_with(".sql")),
        "stray file in migrations-postgres (not embedded): {postgres:?}"
    );
    assert_eq!(postgres, mysql, "migrations-postgres vs migrations-mysql");
    assert_eq!(postgres, sqlite, "migrations-postgres vs migrations-sqlite");
}
