//! Database connections: one concrete sqlx pool per backend, behind one type.
//!
//! Queries are written once, with `?` placeholders, and run on any backend through
//! [`on_pool!`](crate::on_pool) and [`on_tx!`](crate::on_tx), which expand the same code for
//! each concrete pool type, so every column type maps natively. For PostgreSQL the `?` become
//! `$1, $2...`. Where dialects truly differ, repositories branch on [`Backend`].

use std::{
    borrow::Cow,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use palpo_core::config::{DatabaseConfig, redact_url};
use sqlx::{
    MySql, Postgres, Sqlite,
    mysql::MySqlConnectOptions,
    postgres::PgConnectOptions,
    sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous},
};
use tracing::Instrument;

pub use crate::conns::{Conns, Readers};
use crate::sqlite_tx::{SqliteBatch, SqliteTx};

use crate::{
    error::{Result, StorageError},
    replica::ReadRouter,
};

/// Which database dialect a pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "mysql" | "mariadb" => Ok(Backend::MySql),
            "sqlite" => Ok(Backend::Sqlite),
            _ => Err(StorageError::Connect(format!(
                "unsupported database URL {}",
                redact_url(url)
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// The connections of one of the three backends: sqlx's pool (writes, transactions) or
/// [`Readers`] (reads; see [`Db::fresh`]).
#[derive(Debug, Clone)]
pub enum Pool {
    Postgres(Conns<Postgres>),
    MySql(Conns<MySql>),
    Sqlite(Conns<Sqlite>),
}

impl Pool {
    pub fn backend(&self) -> Backend {
        match self {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::MySql(_) => Backend::MySql,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The most connections the pool opens.
    pub fn max_connections(&self) -> u32 {
        match self {
            Pool::Postgres(p) => p.max_connections(),
            Pool::MySql(p) => p.max_connections(),
            Pool::Sqlite(p) => p.max_connections(),
        }
    }

    pub async fn close(&self) {
        match self {
            Pool::Postgres(p) => p.close().await,
            Pool::MySql(p) => p.close().await,
            Pool::Sqlite(p) => p.close().await,
        }
    }
}

/// A transaction on one of the three backends.
pub enum Tx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
    Sqlite(SqliteTx),
}

impl Tx {
    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Postgres(tx) => tx.commit().await?,
            Tx::MySql(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            Tx::Postgres(tx) => tx.rollback().await?,
            Tx::MySql(tx) => tx.rollback().await?,
            Tx::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// A value bound to a [`DeferredWrites`] statement.
#[derive(Debug, Clone)]
pub(crate) enum Bind<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Bool(bool),
    /// A PostgreSQL array: only [`DeferredWrites`] made for a PostgreSQL transaction
    /// ([`DeferredWrites::for_tx`]) bind them.
    Array(ArrayBind<'a>),
}

/// The values of one column, bound as one PostgreSQL array.
#[derive(Debug, Clone)]
pub(crate) enum ArrayBind<'a> {
    Ints(Vec<Option<i64>>),
    Texts(Vec<Option<&'a str>>),
    Bools(Vec<bool>),
}

impl<'a> ArrayBind<'a> {
    /// An empty array of `bind`'s type.
    fn like(bind: &Bind<'_>) -> Option<Self> {
        match bind {
            Bind::Int(_) => Some(ArrayBind::Ints(Vec::new())),
            Bind::Text(_) => Some(ArrayBind::Texts(Vec::new())),
            Bind::Bool(_) => Some(ArrayBind::Bools(Vec::new())),
            Bind::Array(_) => None,
        }
    }

    /// Appends `bind`; `false` (and nothing appended) when it is not of the array's type.
    fn push(&mut self, bind: &Bind<'a>) -> bool {
        match (self, bind) {
            (ArrayBind::Ints(values), Bind::Int(v)) => values.push(*v),
            (ArrayBind::Texts(values), Bind::Text(v)) => values.push(*v),
            (ArrayBind::Bools(values), Bind::Bool(v)) => values.push(*v),
            _ => return false,
        }
        true
    }

    fn sql_type(&self) -> &'static str {
        match self {
            ArrayBind::Ints(_) => "BIGINT[]",
            ArrayBind::Texts(_) => "TEXT[]",
            ArrayBind::Bools(_) => "BOOLEAN[]",
        }
    }
}

/// `?::TYPE[], ...`: a placeholder for each of `arrays`, cast to its type (an empty or
/// all-`NULL` array has none of its own).
fn array_placeholders(arrays: &[ArrayBind<'_>]) -> String {
    let casts: Vec<String> = arrays
        .iter()
        .map(|a| format!("?::{}", a.sql_type()))
        .collect();
    casts.join(", ")
}

/// `binds`, rows of `columns` values each, as one array per column; `None` when a column's
/// values are not all of one type (or there are no rows).
fn column_arrays<'a>(columns: usize, binds: &[Bind<'a>]) -> Option<Vec<ArrayBind<'a>>> {
    if columns == 0 || binds.is_empty() || !binds.len().is_multiple_of(columns) {
        return None;
    }
    (0..columns)
        .map(|column| {
            let mut array = ArrayBind::like(&binds[column])?;
            binds
                .iter()
                .skip(column)
                .step_by(columns)
                .all(|v| array.push(v))
                .then_some(array)
        })
        .collect()
}

impl From<i64> for Bind<'_> {
    fn from(v: i64) -> Self {
        Bind::Int(Some(v))
    }
}

impl From<Option<i64>> for Bind<'_> {
    fn from(v: Option<i64>) -> Self {
        Bind::Int(v)
    }
}

impl From<bool> for Bind<'_> {
    fn from(v: bool) -> Self {
        Bind::Bool(v)
    }
}

impl<'a> From<&'a str> for Bind<'a> {
    fn from(v: &'a str) -> Self {
        Bind::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Bind<'a> {
    fn from(v: &'a String) -> Self {
        Bind::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Bind<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Bind::Text(v)
    }
}

impl<'a> From<&'a Option<String>> for Bind<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Bind::Text(v.as_deref())
    }
}

/// Binds `binds`, in order, to `$query` (any backend's `sqlx::query`). Arrays only with
/// `postgres:`; elsewhere one fails the enclosing function (see [`Bind::Array`]).
macro_rules! bind_all {
    (postgres: $query:expr, $binds:expr) => {
        bind_all!(@each $query, $binds, query, array => match array {
            ArrayBind::Ints(v) => query.bind(v),
            ArrayBind::Texts(v) => query.bind(v),
            ArrayBind::Bools(v) => query.bind(v),
        })
    };
    ($query:expr, $binds:expr) => {
        bind_all!(@each $query, $binds, query, _array => {
            return Err(StorageError::Corrupt(
                "an array bound outside PostgreSQL".into(),
            ));
        })
    };
    (@each $query:expr, $binds:expr, $q:ident, $array:ident => $on_array:expr) => {{
        let mut $q = $query;
        for bind in $binds {
            $q = match bind {
                Bind::Int(v) => $q.bind(*v),
                Bind::Text(v) => $q.bind(*v),
                Bind::Bool(v) => $q.bind(*v),
                Bind::Array($array) => $on_array,
            };
        }
        $q
    }};
}

/// A write whose result nothing reads, with what to call it should it break a uniqueness
/// constraint.
#[derive(Debug)]
struct DeferredWrite<'a> {
    sql: String,
    binds: Vec<Bind<'a>>,
    conflict: &'static str,
    /// Rows the write must change, or the flush fails with a conflict (see
    /// [`DeferredWrites::push_expecting`]).
    expected_rows: Option<u64>,
    /// Whether the write touches no row that the other writes of its table in this flush
    /// touch, so that it may share their statement (see [`disjoint_groups`]).
    rows_apart: bool,
    /// PostgreSQL: the name of its `WITH` part when later parts read it, and whether its
    /// one row's `value` column is what the flush hands back
    /// ([`DeferredWrites::push_returning`]).
    name: Option<&'static str>,
    returns_value: bool,
}

impl<'a> DeferredWrite<'a> {
    fn new(sql: String, binds: Vec<Bind<'a>>, conflict: &'static str) -> Self {
        DeferredWrite {
            sql,
            binds,
            conflict,
            expected_rows: None,
            rows_apart: false,
            name: None,
            returns_value: false,
        }
    }
}

/// Writes of a transaction whose results nothing in it reads, kept to be sent together. On
/// SQLite they go as one multi-statement query (sqlx-sqlite numbers `?` across the
/// statements of one query): every query is a hand-off to the connection's thread and back,
/// and under load each of those waits for a core (a batch of one message took ~2.5 ms at 13
/// queries). PostgreSQL's driver sends one statement per round trip, so there they go as few
/// statements as [`disjoint_groups`] allows, the writes of each as data-modifying `WITH`
/// parts of one. MySQL has neither, so there they go one by one, in order.
#[derive(Debug, Default)]
pub(crate) struct DeferredWrites<'a> {
    writes: Vec<DeferredWrite<'a>>,
    /// Whether rows and lists go as arrays ([`DeferredWrites::insert_sql`]).
    arrays: bool,
}

impl<'a> DeferredWrites<'a> {
    /// Writes for `tx`: on PostgreSQL, [`DeferredWrites::insert_sql`] and
    /// [`DeferredWrites::in_list`] bind arrays.
    pub(crate) fn for_tx(tx: &Tx) -> Self {
        DeferredWrites {
            writes: Vec::new(),
            arrays: matches!(tx, Tx::Postgres(_)),
        }
    }

    /// An `INSERT INTO {into}` of the rows of `binds` (`columns` values each, in order).
    ///
    /// On PostgreSQL the rows go as one array per column (`SELECT * FROM unnest(...)`), so
    /// that the statement's text does not change with the number of rows: a connection then
    /// parses and plans it once, not once per row count (and, in a statement of several
    /// writes, per combination of counts). Elsewhere, and for a column whose values are not
    /// all of one type, as `VALUES` rows.
    pub(crate) fn insert_sql(
        &self,
        into: &str,
        columns: usize,
        binds: Vec<Bind<'a>>,
    ) -> (String, Vec<Bind<'a>>) {
        if self.arrays
            && let Some(arrays) = column_arrays(columns, &binds)
        {
            let sql = format!(
                "INSERT INTO {into} SELECT * FROM unnest({})",
                array_placeholders(&arrays)
            );
            return (sql, arrays.into_iter().map(Bind::Array).collect());
        }
        let row = format!("({})", crate::sql::placeholders(columns));
        let rows = binds.len() / columns.max(1);
        let sql = format!("INSERT INTO {into} VALUES {}", vec![row; rows].join(", "));
        (sql, binds)
    }

    /// `{column} IN (values)`, for a write: on PostgreSQL `= ANY` of one array (as
    /// [`DeferredWrites::insert_sql`], for a text that does not change with the values).
    pub(crate) fn in_list(&self, column: &str, values: &[&'a str]) -> (String, Vec<Bind<'a>>) {
        if self.arrays {
            let array = values.iter().map(|v| Some(*v)).collect();
            return (
                format!("{column} = ANY(?)"),
                vec![Bind::Array(ArrayBind::Texts(array))],
            );
        }
        let sql = format!("{column} IN ({})", crate::sql::placeholders(values.len()));
        (sql, values.iter().map(|v| Bind::from(*v)).collect())
    }

    /// Whether this is PostgreSQL's, whose writes may bind arrays.
    pub(crate) fn binds_arrays(&self) -> bool {
        self.arrays
    }

    /// As [`DeferredWrites::insert_sql`] on PostgreSQL, with the column `offset_column` of
    /// each row added to the `value` of the `WITH` part `base` of the same statement (a
    /// [`DeferredWrites::push_returning`] write queued before it; a `NULL` offset stays
    /// `NULL`). `None` where rows do not go as arrays.
    pub(crate) fn insert_offset_sql(
        &self,
        into: &str,
        columns: &[&str],
        offset_column: usize,
        base: &str,
        binds: Vec<Bind<'a>>,
    ) -> Option<(String, Vec<Bind<'a>>)> {
        if !self.arrays {
            return None;
        }
        let arrays = column_arrays(columns.len(), &binds)?;
        let values: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, column)| match i == offset_column {
                true => format!("{base}.value + r.{column}"),
                false => format!("r.{column}"),
            })
            .collect();
        let sql = format!(
            "INSERT INTO {into} ({}) SELECT {} FROM unnest({}) AS r({}) CROSS JOIN {base}",
            columns.join(", "),
            values.join(", "),
            array_placeholders(&arrays),
            columns.join(", ")
        );
        Some((sql, arrays.into_iter().map(Bind::Array).collect()))
    }

    /// Queues, on PostgreSQL, a write that answers one row with a `value` column
    /// (`... RETURNING ... AS value`), as the `WITH` part `name`, which the writes queued after
    /// it in the same statement may read. The flush hands the value back
    /// (`flush` answers it).
    pub(crate) fn push_returning(
        &mut self,
        name: &'static str,
        sql: String,
        binds: Vec<Bind<'a>>,
        conflict: &'static str,
    ) {
        let mut write = DeferredWrite::new(sql, binds, conflict);
        write.name = Some(name);
        write.returns_value = true;
        self.writes.push(write);
    }

    /// Whether the queued writes go as one statement on PostgreSQL (see
    /// [`disjoint_groups`]), as writes reading a [`DeferredWrites::push_returning`] part must.
    pub(crate) fn one_statement(&self) -> bool {
        disjoint_groups(&self.writes).len() == 1
    }

    /// Queues a write; a uniqueness violation in it fails the flush with
    /// [`StorageError::Conflict`]`(conflict)`.
    pub(crate) fn push(&mut self, sql: String, binds: Vec<Bind<'a>>, conflict: &'static str) {
        self.writes.push(DeferredWrite::new(sql, binds, conflict));
    }

    /// Queues a write (an `UPDATE` or `DELETE`) that must change exactly `rows` rows: if it
    /// changes another number, the flush fails with [`StorageError::Conflict`]`(conflict)`
    /// and the caller rolls the transaction back. A check that costs no statement of its own
    /// (where the rows' count is not known before, only what they must be).
    pub(crate) fn push_expecting(
        &mut self,
        sql: String,
        binds: Vec<Bind<'a>>,
        conflict: &'static str,
        rows: u64,
    ) {
        let mut write = DeferredWrite::new(sql, binds, conflict);
        write.expected_rows = Some(rows);
        self.writes.push(write);
    }

    /// Queues a write whose rows none of the other queued writes of its table touch (new
    /// rows of keys nothing else writes), so that on PostgreSQL it may share their
    /// statement.
    pub(crate) fn push_rows_apart(
        &mut self,
        sql: String,
        binds: Vec<Bind<'a>>,
        conflict: &'static str,
    ) {
        let mut write = DeferredWrite::new(sql, binds, conflict);
        write.rows_apart = true;
        self.writes.push(write);
    }

    /// Sends the queued writes now where they would go one by one anyway (not SQLite), so
    /// that what the transaction does next (taking a lock others wait on) comes after them.
    pub(crate) async fn flush_unless_combined(&mut self, tx: &mut Tx) -> Result<()> {
        match tx {
            Tx::Sqlite(_) => Ok(()),
            tx => self.flush(tx).await.map(|_| ()),
        }
    }

    /// Sends the transaction's last writes. A SQLite batch ([`SqliteBatch`]) commits with
    /// them, in the same query; its `commit` then has nothing left to do. Other transactions
    /// are committed by their owner as usual. Answers what [`DeferredWrites::flush`] does.
    pub(crate) async fn flush_last(&mut self, tx: &mut Tx) -> Result<Option<i64>> {
        let Tx::Sqlite(sqlite @ SqliteTx::Batch(_)) = tx else {
            return self.flush(tx).await;
        };
        if let Some(begin) = sqlite.take_begin() {
            self.writes
                .insert(0, DeferredWrite::new(begin.into(), Vec::new(), "begin"));
        }
        self.push("COMMIT".into(), Vec::new(), "commit");
        let returned = self.flush(tx).await?;
        if let Tx::Sqlite(SqliteTx::Batch(batch)) = tx {
            batch.committed();
        }
        Ok(returned)
    }

    /// Sends the queued writes, in order. Answers the value of the
    /// [`DeferredWrites::push_returning`] write among them, if any.
    pub(crate) async fn flush(&mut self, tx: &mut Tx) -> Result<Option<i64>> {
        let writes = std::mem::take(&mut self.writes);
        let mut returned = None;
        if !matches!(tx, Tx::Postgres(_)) && writes.iter().any(|w| w.returns_value) {
            return Err(StorageError::Corrupt(
                "a write read by others outside PostgreSQL".into(),
            ));
        }
        match tx {
            Tx::Sqlite(tx) if writes.iter().any(|w| w.expected_rows.is_some()) => {
                // One statement at a time, to count each one's rows.
                for write in &writes {
                    let done = bind_all!(sqlx::query(&write.sql), &write.binds)
                        .execute(tx.conn())
                        .await
                        .map_err(|e| StorageError::conflict_or(e, write.conflict))?;
                    expect_rows(write, done.rows_affected())?;
                }
            }
            Tx::Sqlite(tx) if writes.len() > 1 => {
                let sql = writes
                    .iter()
                    .map(|w| w.sql.as_str())
                    .collect::<Vec<_>>()
                    .join(";\n");
                let binds = writes.iter().flat_map(|w| w.binds.iter());
                bind_all!(sqlx::query(&sql), binds)
                    .execute(tx.conn())
                    .await
                    .map_err(|e| StorageError::conflict_or(e, conflict_names(&writes)))?;
            }
            Tx::Postgres(tx) => {
                for group in disjoint_groups(&writes) {
                    let combined = with_statements(group);
                    let sql = postgres_placeholders(&combined);
                    let binds = group.iter().flat_map(|w| w.binds.iter());
                    let query = bind_all!(postgres: sqlx::query_as::<_, (i64, i64)>(&sql), binds);
                    let counts = query
                        .fetch_all(&mut **tx)
                        .await
                        .map_err(|e| StorageError::conflict_or(e, conflict_names(group)))?;
                    for (index, value) in counts {
                        match usize::try_from(index).ok().and_then(|i| group.get(i)) {
                            Some(write) if write.returns_value => returned = Some(value),
                            _ => check_rows(group, index, value)?,
                        }
                    }
                }
            }
            tx => {
                for write in &writes {
                    let rows = crate::on_tx!(tx, &write.sql, |c, sql| {
                        bind_all!(sqlx::query(sql), &write.binds)
                            .execute(&mut *c)
                            .await
                            .map_err(|e| StorageError::conflict_or(e, write.conflict))?
                            .rows_affected()
                    });
                    expect_rows(write, rows)?;
                }
            }
        }
        Ok(returned)
    }
}

/// Fails with the write's conflict unless it changed the rows it must.
fn expect_rows(write: &DeferredWrite<'_>, rows: u64) -> Result<()> {
    match write.expected_rows {
        Some(expected) if expected != rows => Err(StorageError::Conflict(write.conflict.into())),
        _ => Ok(()),
    }
}

/// [`expect_rows`] for the `index`th write of `group` (as [`with_statements`] counts them).
fn check_rows(group: &[DeferredWrite<'_>], index: i64, rows: i64) -> Result<()> {
    let write = usize::try_from(index)
        .ok()
        .and_then(|index| group.get(index))
        .ok_or_else(|| StorageError::Corrupt("a count for no write".into()))?;
    expect_rows(write, u64::try_from(rows).unwrap_or(u64::MAX))
}

/// What to call a uniqueness violation in one of `writes`, sent together (which statement
/// broke the constraint is not known).
fn conflict_names(writes: &[DeferredWrite<'_>]) -> String {
    let mut names: Vec<&str> = writes.iter().map(|w| w.conflict).collect();
    names.dedup();
    names.join(" or ")
}

/// The table an `INSERT INTO`, `UPDATE` or `DELETE FROM` statement writes; `None` for other
/// statements.
fn written_table(sql: &str) -> Option<&str> {
    let mut words = sql.split_whitespace();
    let table = match words.next()? {
        "INSERT" | "DELETE" => {
            words.next()?;
            words.next()?
        }
        "UPDATE" => words.next()?,
        _ => return None,
    };
    Some(table.split('(').next().unwrap_or(table))
}

/// `writes` cut into runs (in order) that PostgreSQL may run as one statement: no two
/// writes of a run touch the same table. The sub-statements of one statement all see the
/// snapshot it started with and run in no set order, so a write that depends on another
/// (a current-state row deleted and inserted again) must not share its statement.
fn disjoint_groups<'w, 'a>(writes: &'w [DeferredWrite<'a>]) -> Vec<&'w [DeferredWrite<'a>]> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut tables: Vec<&str> = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        let table = written_table(&write.sql);
        let fits = table.is_some_and(|t| write.rows_apart || !tables.contains(&t));
        if !fits && index > start {
            groups.push(&writes[start..index]);
            start = index;
            tables.clear();
        }
        match table {
            Some(t) => tables.push(t),
            // Not a plain write: alone.
            None => {
                groups.push(&writes[start..=index]);
                start = index + 1;
            }
        }
    }
    if start < writes.len() {
        groups.push(&writes[start..]);
    }
    groups
}

/// `writes` as one PostgreSQL statement (binds in the same order as the text): all but the
/// last as data-modifying `WITH` parts, or every one of them when one must change a given
/// number of rows or answers a value; then the statement answers `(index, rows changed)` for
/// each of the former and `(index, value)` for the latter.
fn with_statements(writes: &[DeferredWrite<'_>]) -> String {
    let part_name = |i: usize| match writes[i].name {
        Some(name) => name.to_owned(),
        None => format!("w{i}"),
    };
    let reported: Vec<String> = (0..writes.len())
        .filter_map(|i| {
            let write = &writes[i];
            let name = part_name(i);
            if write.returns_value {
                Some(format!("SELECT {i}::BIGINT, value FROM {name}"))
            } else {
                write
                    .expected_rows
                    .map(|_| format!("SELECT {i}::BIGINT, count(*) FROM {name}"))
            }
        })
        .collect();
    let (parts, main) = match writes {
        [] => return String::new(),
        _ if !reported.is_empty() => (writes, reported.join(" UNION ALL ")),
        [only] => return only.sql.clone(),
        [parts @ .., last] => (parts, last.sql.clone()),
    };
    let parts: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let returning = if w.expected_rows.is_some() {
                " RETURNING 1"
            } else {
                ""
            };
            format!("{} AS ({}{returning})", part_name(i), w.sql)
        })
        .collect();
    format!("WITH {} {main}", parts.join(", "))
}

/// A text column as read back. Decode string columns into this, not `String`: MySQL flags
/// columns with a binary collation (`utf8mb4_bin`, which makes our ids case-sensitive) as
/// BINARY, and sqlx refuses to decode those as `String` ("VARCHAR is not compatible with
/// VARBINARY"). Identical to `String` on PostgreSQL and SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl From<Text> for String {
    fn from(text: Text) -> Self {
        text.0
    }
}

macro_rules! text_decodes_as_string {
    ($db:ty, $compatible:ty) => {
        impl sqlx::Type<$db> for Text {
            fn type_info() -> <$db as sqlx::Database>::TypeInfo {
                <String as sqlx::Type<$db>>::type_info()
            }

            fn compatible(ty: &<$db as sqlx::Database>::TypeInfo) -> bool {
                <$compatible as sqlx::Type<$db>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, $db> for Text {
            fn decode(
                value: <$db as sqlx::Database>::ValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                // Still checks that the bytes are UTF-8.
                <String as sqlx::Decode<'r, $db>>::decode(value).map(Text)
            }
        }
    };
}

text_decodes_as_string!(sqlx::Postgres, String);
text_decodes_as_string!(sqlx::Sqlite, String);
// `[u8]` accepts the same column types as `String`, whatever their BINARY flag.
text_decodes_as_string!(sqlx::MySql, [u8]);

/// Rewrites `?` placeholders to PostgreSQL's `$n`, leaving quoted text alone.
pub fn postgres_placeholders(sql: &str) -> Cow<'_, str> {
    if !sql.contains('?') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// A query's text in PostgreSQL's placeholder style: for a literal, rewritten once per call
/// site and kept (a `static` in each expansion); otherwise rewritten at each call. Used by
/// [`on_pool!`](crate::on_pool) and [`on_tx!`](crate::on_tx).
#[doc(hidden)]
#[macro_export]
macro_rules! postgres_sql {
    (literal $query:literal) => {{
        static POSTGRES: ::std::sync::OnceLock<String> = ::std::sync::OnceLock::new();
        ::std::borrow::Cow::<str>::Borrowed(
            POSTGRES
                .get_or_init(|| $crate::db::postgres_placeholders($query).into_owned())
                .as_str(),
        )
    }};
    (expr $query:expr) => {
        $crate::db::postgres_placeholders($query)
    };
}

/// Runs the same sqlx code on whichever pool `$pool` holds.
///
/// `on_pool!(pool, "SELECT ... WHERE a = ?", |p, sql| sqlx::query(sql).bind(a).fetch_one(p).await)`
/// binds `p` to the concrete `&Pool` and `sql` to the query in that backend's placeholder style.
#[macro_export]
macro_rules! on_pool {
    (@run $kind:ident, $pool:expr, $query:tt, |$p:ident, $sql:ident| $body:expr) => {
        match $pool {
            // Bodies rustfmt collapses to `{ expr }` are fine here.
            #[allow(unused_braces)]
            $crate::db::Pool::Postgres($p) => {
                let owned = $crate::postgres_sql!($kind $query);
                let $sql: &str = &owned;
                $body
            }
            #[allow(unused_braces)]
            $crate::db::Pool::MySql($p) => {
                let $sql: &str = $query;
                $body
            }
            #[allow(unused_braces)]
            $crate::db::Pool::Sqlite($p) => {
                let $sql: &str = $query;
                $body
            }
        }
    };
    ($pool:expr, $query:literal, |$p:ident, $sql:ident| $body:expr) => {
        $crate::on_pool!(@run literal, $pool, $query, |$p, $sql| $body)
    };
    ($pool:expr, $query:expr, |$p:ident, $sql:ident| $body:expr) => {
        $crate::on_pool!(@run expr, $pool, ($query), |$p, $sql| $body)
    };
}

/// As [`on_pool!`], inside a transaction: `$c` is the transaction's `&mut` connection.
#[macro_export]
macro_rules! on_tx {
    (@run $kind:ident, $tx:expr, $query:tt, |$c:ident, $sql:ident| $body:expr) => {
        match $tx {
            // Bodies rustfmt collapses to `{ expr }` are fine here.
            #[allow(unused_braces)]
            $crate::db::Tx::Postgres(tx) => {
                let $c = &mut **tx;
                let owned = $crate::postgres_sql!($kind $query);
                let $sql: &str = &owned;
                $body
            }
            #[allow(unused_braces)]
            $crate::db::Tx::MySql(tx) => {
                let $c = &mut **tx;
                let $sql: &str = $query;
                $body
            }
            #[allow(unused_braces)]
            $crate::db::Tx::Sqlite(tx) => {
                let $c = tx.conn();
                let $sql: &str = $query;
                $body
            }
        }
    };
    ($tx:expr, $query:literal, |$c:ident, $sql:ident| $body:expr) => {
        $crate::on_tx!(@run literal, $tx, $query, |$c, $sql| $body)
    };
    ($tx:expr, $query:expr, |$c:ident, $sql:ident| $body:expr) => {
        $crate::on_tx!(@run expr, $tx, ($query), |$c, $sql| $body)
    };
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// The embedded migrations of a backend: `(version, description, sql)`.
pub fn migrations(backend: Backend) -> &'static [(i64, &'static str, &'static str)] {
    match backend {
        Backend::Postgres => embedded::POSTGRES,
        Backend::MySql => embedded::MYSQL,
        Backend::Sqlite => embedded::SQLITE,
    }
}

fn migrator(backend: Backend) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType};
    let list = migrations(backend)
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                Cow::Borrowed(*sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    sqlx::migrate::Migrator {
        migrations: Cow::Owned(list),
        ignore_missing: false,
        // An advisory lock (PostgreSQL, MySQL) so several processes can start at once.
        locking: true,
        no_tx: false,
    }
}

/// The database: the primary pool every write goes to, and the router that picks a pool
/// for each read.
pub struct Db {
    backend: Backend,
    primary: Pool,
    /// Where reads that must see every committed write go: the primary's [`Readers`].
    fresh: Pool,
    reads: ReadRouter,
    /// SQLite: events written since the write-ahead log was last checkpointed.
    events_since_checkpoint: AtomicUsize,
    /// SQLite: the connection that checkpoints the log beside the writer.
    checkpointer: Option<Arc<tokio::sync::Mutex<SqliteConnection>>>,
}

/// SQLite: the event writer has the write-ahead log checkpointed after this many events (about
/// 1000 log pages, SQLite's own default interval; see [`Db::checkpoint_if_due`]).
pub const CHECKPOINT_EVERY_EVENTS: usize = 40;

/// SQLite: the log size at which SQLite checkpoints by itself, inside the commit that crosses
/// it. Only a safety net: writes other than events (receipts, typing, keys) do not count
/// towards [`CHECKPOINT_EVERY_EVENTS`].
const AUTOCHECKPOINT_PAGES: &str = "10000";

impl Db {
    /// Connects to the primary (and any replicas). Does not migrate: call [`Db::migrate`].
    #[tracing::instrument(skip_all, fields(url = %redact_url(&config.url)))]
    pub async fn connect(config: &DatabaseConfig) -> Result<Self> {
        let backend = Backend::from_url(&config.url)?;
        if backend != Backend::Postgres && !config.replica_urls.is_empty() {
            // Replica routing reads PostgreSQL WAL positions; a replica pool of another
            // backend would be handed out for reads of a primary it does not mirror.
            return Err(StorageError::Connect(
                "database.replica_urls: replicas are supported with PostgreSQL only".into(),
            ));
        }
        let acquire = Duration::from_secs(config.acquire_timeout_secs);
        let connect_err =
            |e: sqlx::Error| StorageError::Connect(format!("{}: {e}", redact_url(&config.url)));
        // The primary's connections twice over: sqlx's pool for writes and transactions, and
        // readers (see `Db::fresh`) for the reads that must see every commit.
        let mut sqlite_checkpointer = None;
        let (primary, fresh) = match backend {
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(&config.url).map_err(connect_err)?;
                let (pool, readers) = pool_and_readers::<Postgres>(options, config, acquire)
                    .await
                    .map_err(connect_err)?;
                (Pool::Postgres(pool), Pool::Postgres(readers))
            }
            Backend::MySql => {
                let options = MySqlConnectOptions::from_str(&config.url)
                    .map_err(connect_err)?
                    .charset("utf8mb4");
                let (pool, readers) = pool_and_readers::<MySql>(options, config, acquire)
                    .await
                    .map_err(connect_err)?;
                (Pool::MySql(pool), Pool::MySql(readers))
            }
            Backend::Sqlite => {
                let (writer, readers, checkpointer) = connect_sqlite(config, acquire).await?;
                sqlite_checkpointer = Some(Arc::new(tokio::sync::Mutex::new(checkpointer)));
                (
                    Pool::Sqlite(Conns::Pool(writer)),
                    Pool::Sqlite(Conns::Readers(readers)),
                )
            }
        };
        let mut replicas = Vec::new();
        for url in &config.replica_urls {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| StorageError::Connect(format!("{}: {e}", redact_url(url))))?;
            // Lazy: a replica that is down at start must not stop the server.
            let pool = pool_options::<Postgres>()
                .max_connections(config.max_connections)
                .acquire_timeout(Duration::from_secs(2))
                .connect_lazy_with(options);
            replicas.push(pool);
        }
        let reads = ReadRouter::new(fresh.clone(), replicas);
        Ok(Db {
            backend,
            primary,
            fresh,
            reads,
            events_since_checkpoint: AtomicUsize::new(0),
            checkpointer: sqlite_checkpointer,
        })
    }

    /// Applies every pending migration of this backend.
    pub async fn migrate(&self) -> Result<()> {
        let migrator = migrator(self.backend);
        match &self.primary {
            Pool::Postgres(p) => migrator.run(sqlx_pool(p)?).await?,
            Pool::MySql(p) => migrator.run(sqlx_pool(p)?).await?,
            Pool::Sqlite(p) => migrator.run(sqlx_pool(p)?).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool for writes.
    pub fn primary(&self) -> &Pool {
        &self.primary
    }

    /// The connections for reads that must see every committed write (never a replica): the
    /// primary's [`Readers`], which go back idle without sqlx's ping. On SQLite they are
    /// read-only connections, which see every commit and do not queue behind the single
    /// writer.
    pub fn fresh(&self) -> &Pool {
        &self.fresh
    }

    /// The read router (replica selection, read-your-writes bookkeeping).
    pub fn reads(&self) -> &ReadRouter {
        &self.reads
    }

    /// A pool for a read on behalf of `user_id`: a replica when it has caught up with that
    /// user's last write, otherwise the primary.
    pub async fn read_pool(&self, user_id: &str) -> Pool {
        self.reads.pool_for(user_id).await
    }

    /// Records that `user_id` just committed a write, so their next reads see it.
    pub async fn wrote(&self, user_id: &str) {
        self.reads.note_write(user_id).await
    }

    pub async fn begin(&self) -> Result<Tx> {
        Ok(match &self.primary {
            Pool::Postgres(p) => Tx::Postgres(sqlx_pool(p)?.begin().await?),
            Pool::MySql(p) => Tx::MySql(sqlx_pool(p)?.begin().await?),
            Pool::Sqlite(p) => Tx::Sqlite(SqliteTx::Sqlx(sqlx_pool(p)?.begin().await?)),
        })
    }

    /// A transaction for a batch of writes: on SQLite a [`SqliteBatch`], which its first
    /// query begins and [`DeferredWrites::flush_last`] commits; elsewhere as [`Self::begin`].
    ///
    /// On PostgreSQL the batch's statements run on generic plans, planned once per
    /// connection: their text is the same for every batch (arrays, not lists), but their
    /// arrays' lengths make each custom plan look cheaper than the generic one, so left to
    /// itself PostgreSQL plans them again at every execution (a quarter of a millisecond of
    /// its CPU per batch). They look rows up by key, which a generic plan does as well. Set
    /// in the `BEGIN`'s own round trip, for this transaction only.
    pub async fn begin_batch(&self) -> Result<Tx> {
        match &self.primary {
            Pool::Sqlite(p) => Ok(Tx::Sqlite(SqliteTx::Batch(SqliteBatch::new(
                sqlx_pool(p)?.acquire().await?,
            )))),
            Pool::Postgres(p) => Ok(Tx::Postgres(
                sqlx_pool(p)?
                    .begin_with("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan")
                    .await?,
            )),
            Pool::MySql(_) => self.begin().await,
        }
    }

    /// SQLite: counts `events` just written and, once [`CHECKPOINT_EVERY_EVENTS`] were, starts
    /// copying the write-ahead log into the database (a passive checkpoint) on a connection of
    /// its own, and returns without waiting for it; while one is running, none is started.
    /// Elsewhere nothing.
    ///
    /// Left to SQLite, the checkpoint and its `fsync`s ran inside the commit that crossed
    /// 1000 log pages, and that commit's sends waited for them. Run on the writer connection
    /// after a batch's answers (until the seventeenth benchmark run), it made the next batch
    /// wait instead: under load the writer spent as long checkpointing as writing. A passive
    /// checkpoint takes no write lock, so the writer appends to the log meanwhile.
    pub fn checkpoint_if_due(&self, events: usize) {
        let Some(checkpointer) = &self.checkpointer else {
            return;
        };
        let written = self
            .events_since_checkpoint
            .fetch_add(events, Ordering::Relaxed)
            + events;
        if written < CHECKPOINT_EVERY_EVENTS {
            return;
        }
        let Ok(mut conn) = checkpointer.clone().try_lock_owned() else {
            // The last one is still copying; a later batch starts the next.
            return;
        };
        self.events_since_checkpoint.store(0, Ordering::Relaxed);
        tokio::spawn(
            async move {
                if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut *conn)
                    .await
                {
                    tracing::warn!(%error, "checkpointing the database's log failed");
                }
            }
            .in_current_span(),
        );
    }

    /// SQLite: waits until no checkpoint started by [`Db::checkpoint_if_due`] is running.
    pub async fn checkpoints_settled(&self) {
        if let Some(checkpointer) = &self.checkpointer {
            drop(checkpointer.lock().await);
        }
    }

    pub async fn close(&self) {
        self.primary.close().await;
        self.reads.close().await;
    }
}

/// sqlx's pool of the primary's connections (on SQLite the one writer), which transactions
/// and migrations need; readers are not one.
pub fn sqlx_pool<DB: sqlx::Database>(conns: &Conns<DB>) -> Result<&sqlx::Pool<DB>> {
    conns
        .pool()
        .ok_or_else(|| StorageError::Connect("readers are not sqlx's pool".into()))
}

/// Connections idle longer than this are checked before use.
const PING_IF_IDLE: Duration = Duration::from_secs(30);

/// Pool options shared by every backend. sqlx pings a connection on every checkout by
/// default: one more round trip (or thread hand-off, on SQLite) per query. Only connections
/// idle for a while are checked here; a busy one has just proven itself.
fn pool_options<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// PostgreSQL and MySQL: sqlx's pool for writes and transactions, and [`Readers`] for the reads
/// that must see every commit, each of up to `max_connections`.
async fn pool_and_readers<DB: sqlx::Database>(
    options: <DB::Connection as sqlx::Connection>::Options,
    config: &DatabaseConfig,
    acquire: Duration,
) -> std::result::Result<(Conns<DB>, Conns<DB>), sqlx::Error> {
    let pool = pool_options::<DB>()
        .max_connections(config.max_connections)
        .acquire_timeout(acquire)
        .connect_with(options.clone())
        .await?;
    let readers = Readers::connect(options, config.max_connections, acquire).await?;
    Ok((Conns::Pool(pool), Conns::Readers(readers)))
}

/// SQLite: WAL, one writer connection (SQLite allows one writer at a time; queueing in the
/// pool is cheaper than busy-waiting), a pool of readers, and a busy timeout for both.
async fn connect_sqlite(
    config: &DatabaseConfig,
    acquire: Duration,
) -> Result<(sqlx::SqlitePool, Readers<Sqlite>, SqliteConnection)> {
    let err = |e: sqlx::Error| StorageError::Connect(format!("{}: {e}", config.url));
    let options = SqliteConnectOptions::from_str(&config.url)
        .map_err(err)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        // Rows cross from the connection's thread to the caller through a bounded channel; at
        // sqlx's default of 50 a large read (a sync over many rooms) stops and wakes the
        // thread every 50 rows.
        .row_buffer_size(1024)
        // A write statement inside a larger transaction keeps a statement journal; past 64 KiB
        // (a batch's event rows) SQLite moved it to a temporary file, created and deleted
        // about once per batch. Kept in memory, it costs those file system calls nothing.
        .pragma("temp_store", "memory");
    if let Some(parent) = options.get_filename().parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StorageError::Connect(format!("cannot create {}: {e}", parent.display()))
        })?;
    }
    let writer = pool_options::<Sqlite>()
        .max_connections(1)
        .acquire_timeout(acquire)
        .connect_with(
            options
                .clone()
                .pragma("wal_autocheckpoint", AUTOCHECKPOINT_PAGES),
        )
        .await
        .map_err(err)?;
    // A connection of its own for checkpoints (`Db::checkpoint_if_due`).
    let checkpointer = sqlx::ConnectOptions::connect(&options).await.map_err(err)?;
    let readers = Readers::connect(
        options.read_only(true),
        config.max_connections.max(2),
        acquire,
    )
    .await
    .map_err(err)?;
    Ok((writer, readers, checkpointer))
}

/// A batch of event writes' turn to lock its rooms' rows: only once the batch before it
/// (of the same writer) holds its own. Without it, two batches written at once could lock in
/// either order; a batch whose events are built on the other's would then find its rooms a
/// write version short and fail them all, to be built again one at a time under the room's
/// write lock. With it, the later batch waits for the earlier one's commit instead.
#[derive(Default)]
pub struct LockTurn {
    after: Option<tokio::sync::oneshot::Receiver<()>>,
    taken: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LockTurn {
    /// The turn of the next batch after one holding `self`'s turn: it comes once that one
    /// has taken its locks (or failed before).
    pub fn then(&mut self) -> LockTurn {
        let (taken, after) = tokio::sync::oneshot::channel();
        self.taken = Some(taken);
        LockTurn {
            after: Some(after),
            taken: None,
        }
    }

    /// Waits for the turn.
    pub(crate) async fn wait(&mut self) {
        if let Some(after) = self.after.take() {
            // An error: the batch before ended without taking its locks.
            let _ = after.await;
        }
    }

    /// Says that this batch holds its locks: the next one may take its own.
    pub(crate) fn locks_taken(&mut self) {
        if let Some(taken) = self.taken.take() {
            let _ = taken.send(());
        }
    }
}

/// A room's write lock, shared by every process on the database: held from reading the room
/// to persisting the event built on it, so that processes take turns instead of racing (racing
/// lets one process starve another). It is an open transaction holding the room's row
/// (`SELECT ... FOR UPDATE`); [`RoomRepo::persist_event`](crate::RoomRepo::persist_event)
/// writes the event in that same transaction and commits it. Dropping the lock rolls back.
pub struct RoomWriteLock {
    /// `None` on SQLite: it serves one process, whose in-process room lock suffices, and its
    /// single writer connection must not be held while an event is built.
    pub(crate) held: Option<HeldRoom>,
}

pub(crate) struct HeldRoom {
    pub tx: Tx,
    /// The room's write version and state group as locked; `None` when the room is unknown.
    pub room: Option<(i64, Option<i64>)>,
}

impl RoomWriteLock {
    pub(crate) async fn acquire(db: &Db, room_id: &str) -> Result<Self> {
        if db.backend() == Backend::Sqlite {
            return Ok(RoomWriteLock { held: None });
        }
        let mut tx = db.begin().await?;
        let room = crate::sql::lock_room_row(&mut tx, room_id).await?;
        Ok(RoomWriteLock {
            held: Some(HeldRoom { tx, room }),
        })
    }

    /// The room's write version as locked: `None` on SQLite (nothing is locked there) or
    /// when the room is unknown.
    pub fn locked_version(&self) -> Option<i64> {
        self.held
            .as_ref()
            .and_then(|held| held.room)
            .map(|(version, _)| version)
    }

    /// Whether the lock holds the room's row (not on SQLite, where nothing is locked).
    pub fn holds_room(&self) -> bool {
        self.held.is_some()
    }

    /// Releases the lock without writing.
    pub async fn release(self) -> Result<()> {
        if let Some(held) = self.held {
            held.tx.rollback().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that must change a given number of rows fails the flush with a conflict on
    /// any other count, on every backend, in a batch with other writes (SQLite's batch sends
    /// its writes one at a time then, to count them); nothing it wrote stays.
    #[tokio::test]
    async fn a_write_expecting_rows_fails_on_any_other_count() {
        for backend in crate::testing::backends_under_test() {
            crate::testing::with_storage(backend, |s| async move {
                for (expected, holds) in [(1, true), (2, false)] {
                    let mut tx = s.db().begin_batch().await.expect("begin");
                    let mut writes = DeferredWrites::default();
                    writes.push(
                        "INSERT INTO id_counters (name, counter_value) VALUES (?, 0)".into(),
                        vec![Bind::from("probe")],
                        "probe",
                    );
                    writes.push(
                        "INSERT INTO profiles (user_id, fields) VALUES (?, '{}')".into(),
                        vec![Bind::from("@probe:test")],
                        "profile",
                    );
                    writes.push_expecting(
                        "DELETE FROM profiles WHERE user_id LIKE ?".into(),
                        vec![Bind::from("@%")],
                        "counted",
                        expected,
                    );
                    let flushed = writes.flush_last(&mut tx).await;
                    if holds {
                        flushed.expect("the count holds");
                        tx.commit().await.expect("commit");
                    } else {
                        let error = flushed.expect_err("the count does not hold");
                        assert!(
                            matches!(&error, StorageError::Conflict(w) if w == "counted"),
                            "{backend:?}: {error:?}"
                        );
                        tx.rollback().await.expect("rollback");
                    }
                    let probes: i64 = crate::on_pool!(
                        s.db().primary(),
                        "SELECT COUNT(*) FROM id_counters WHERE name = 'probe'",
                        |p, sql| { sqlx::query_scalar(sql).fetch_one(p).await.expect("count") }
                    );
                    assert_eq!(
                        probes,
                        i64::from(holds),
                        "{backend:?}, expecting {expected}"
                    );
                    if holds {
                        crate::on_pool!(
                            s.db().primary(),
                            "DELETE FROM id_counters WHERE name = 'probe'",
                            |p, sql| {
                                sqlx::query(sql)
                                    .execute(p)
                                    .await
                                    .expect("clean up")
                                    .rows_affected()
                            }
                        );
                    }
                }
            })
            .await;
        }
    }

    /// On PostgreSQL, rows go as one array per column, whatever their number, in a text that
    /// does not change with it; a column of mixed types falls back to `VALUES` rows, as on
    /// the other backends.
    #[test]
    fn postgres_inserts_bind_one_array_per_column() {
        let postgres = DeferredWrites {
            arrays: true,
            ..DeferredWrites::default()
        };
        let rows = vec![
            Bind::from("a"),
            Bind::from(1),
            Bind::from(None::<&str>),
            Bind::from("b"),
            Bind::from(None::<i64>),
            Bind::from(Some("c")),
        ];
        let (sql, binds) = postgres.insert_sql("t (x, n, y)", 3, rows.clone());
        assert_eq!(
            sql,
            "INSERT INTO t (x, n, y) SELECT * FROM unnest(?::TEXT[], ?::BIGINT[], ?::TEXT[])"
        );
        let arrays: Vec<String> = binds.iter().map(|b| format!("{b:?}")).collect();
        assert_eq!(
            arrays,
            [
                r#"Array(Texts([Some("a"), Some("b")]))"#,
                "Array(Ints([Some(1), None]))",
                r#"Array(Texts([None, Some("c")]))"#,
            ]
        );
        let values = "INSERT INTO t (x, n, y) VALUES (?, ?, ?), (?, ?, ?)";
        let (sql, binds) = DeferredWrites::default().insert_sql("t (x, n, y)", 3, rows.clone());
        assert_eq!((sql.as_str(), binds.len()), (values, 6));
        let mut mixed = rows;
        mixed[4] = Bind::from("not a number");
        let (sql, binds) = postgres.insert_sql("t (x, n, y)", 3, mixed);
        assert_eq!((sql.as_str(), binds.len()), (values, 6));
        let (sql, binds) = postgres.in_list("x", &["a", "b"]);
        assert_eq!(sql, "x = ANY(?)");
        assert_eq!(
            format!("{binds:?}"),
            r#"[Array(Texts([Some("a"), Some("b")]))]"#
        );
    }

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            postgres_placeholders("SELECT a FROM t WHERE b = ? AND c = ?"),
            "SELECT a FROM t WHERE b = $1 AND c = $2"
        );
        assert_eq!(
            postgres_placeholders("SELECT '?' FROM t WHERE b = ?"),
            "SELECT '?' FROM t WHERE b = $1"
        );
        assert!(matches!(
            postgres_placeholders("SELECT 1"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_literal_query_is_rewritten_once_per_call_site() {
        fn literal() -> Cow<'static, str> {
            crate::postgres_sql!(literal "SELECT a FROM t WHERE b = ?")
        }
        let (first, again) = (literal(), literal());
        assert_eq!(first, "SELECT a FROM t WHERE b = $1");
        assert!(matches!(first, Cow::Borrowed(_)), "kept, not rebuilt");
        assert!(
            std::ptr::eq(first.as_ptr(), again.as_ptr()),
            "the same text"
        );
        let built = format!("SELECT {} FROM t WHERE b = ?", "a");
        assert_eq!(
            crate::postgres_sql!(expr built.as_str()),
            "SELECT a FROM t WHERE b = $1"
        );
    }

    #[test]
    fn postgres_writes_share_a_statement_only_across_tables() {
        let write = |sql: &str| DeferredWrite::new(sql.into(), vec![Bind::from(1)], "x");
        let writes = [
            write("INSERT INTO a (x) VALUES (?)"),
            write("DELETE FROM b WHERE x = ?"),
            write("INSERT INTO b(x) VALUES (?)"),
            write("UPDATE c SET x = ?"),
            write("COMMIT"),
            write("UPDATE a SET x = ?"),
        ];
        let groups: Vec<Vec<&str>> = disjoint_groups(&writes)
            .iter()
            .map(|g| g.iter().map(|w| w.sql.as_str()).collect())
            .collect();
        assert_eq!(
            groups,
            [
                vec!["INSERT INTO a (x) VALUES (?)", "DELETE FROM b WHERE x = ?"],
                vec!["INSERT INTO b(x) VALUES (?)", "UPDATE c SET x = ?"],
                vec!["COMMIT"],
                vec!["UPDATE a SET x = ?"],
            ]
        );
        assert_eq!(
            with_statements(&writes[..2]),
            "WITH w0 AS (INSERT INTO a (x) VALUES (?)) DELETE FROM b WHERE x = ?"
        );
        assert_eq!(with_statements(&writes[3..4]), "UPDATE c SET x = ?");
    }

    /// A write whose value later parts read goes as a named part, and the statement answers
    /// its value with the counts of the counted writes; rows ranked after it add that value
    /// to their offset column.
    #[test]
    fn postgres_parts_may_read_a_value_a_write_returns() {
        let mut writes = DeferredWrites {
            arrays: true,
            ..DeferredWrites::default()
        };
        writes.push_expecting(
            "DELETE FROM e WHERE x = ?".into(),
            vec![Bind::from(1)],
            "e",
            1,
        );
        writes.push_returning(
            "stream",
            "UPDATE c SET v = v + ? RETURNING v - ? AS value".into(),
            vec![Bind::from(2), Bind::from(2)],
            "counter",
        );
        let rows = vec![
            Bind::from("a"),
            Bind::from(1),
            Bind::from("b"),
            Bind::from(None::<i64>),
        ];
        let (sql, binds) = writes
            .insert_offset_sql("t", &["id", "pos"], 1, "stream", rows)
            .expect("arrays");
        assert_eq!(
            sql,
            "INSERT INTO t (id, pos) SELECT r.id, stream.value + r.pos \
             FROM unnest(?::TEXT[], ?::BIGINT[]) AS r(id, pos) CROSS JOIN stream"
        );
        assert_eq!(binds.len(), 2);
        writes.push(sql, binds, "t");
        assert!(writes.one_statement());
        assert_eq!(
            with_statements(&writes.writes),
            "WITH w0 AS (DELETE FROM e WHERE x = ? RETURNING 1), \
             stream AS (UPDATE c SET v = v + ? RETURNING v - ? AS value), \
             w2 AS (INSERT INTO t (id, pos) SELECT r.id, stream.value + r.pos \
             FROM unnest(?::TEXT[], ?::BIGINT[]) AS r(id, pos) CROSS JOIN stream) \
             SELECT 0::BIGINT, count(*) FROM w0 UNION ALL SELECT 1::BIGINT, value FROM stream"
        );
        assert!(
            DeferredWrites::default()
                .insert_offset_sql("t", &["id", "pos"], 1, "stream", Vec::new())
                .is_none(),
            "only PostgreSQL ranks rows after a returned value"
        );
    }

    #[test]
    fn every_backend_has_the_same_migration_versions() {
        let names = |b| {
            migrations(b)
                .iter()
                .map(|(v, d, _)| format!("{v}_{d}"))
                .collect::<Vec<_>>()
        };
        assert!(!names(Backend::Postgres).is_empty());
        assert_eq!(names(Backend::Postgres), names(Backend::MySql));
        assert_eq!(names(Backend::Postgres), names(Backend::Sqlite));
    }
}
