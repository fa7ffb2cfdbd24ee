//! Rooms, events, state groups, membership, aliases, profiles and signing keys.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use futures::future::try_join_all;

use super::{ROOMS_PER_UNION, SqlStore, per_room_union, placeholders};
use crate::{
    db::{ArrayBind, Backend, Bind, DeferredWrites, LockTurn, RoomWriteLock, Text, Tx},
    error::{Result, StorageError},
    model::{
        AliasRecord, Direction, DirectoryUser, EventRecord, MembershipRecord, NewEvent, NewRoom,
        PersistedEvent, ProfileRecord, RoomRecord, SigningKeyRecord, StateMap, TokenCheck, TxnKey,
    },
    on_pool, on_tx,
    repo::{AliasRepo, KeyRepo, ProfileRepo, RoomRepo},
    sqlite_tx::SqliteTx,
};

/// Rooms one statement of [`RoomRepo::timeline_between`] names (well under every backend's
/// limit of bound values).
const ROOMS_PER_RANGE_READ: usize = 500;

/// After this many deltas a state group stores the whole state again, so that reading the
/// state of any group merges at most this many rows of parents.
const MAX_STATE_CHAIN: i64 = 50;

pub(crate) const EVENT_COLUMNS: &str = "event_id, room_id, stream_ordering, depth, event_type, state_key, \
     sender, origin_server_ts, state_group, outlier, soft_failed, rejected_reason, redacted_by, \
     pdu_json";

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    event_id: Text,
    room_id: Text,
    stream_ordering: Option<i64>,
    depth: i64,
    event_type: Text,
    state_key: Option<Text>,
    sender: Text,
    origin_server_ts: i64,
    state_group: Option<i64>,
    outlier: bool,
    soft_failed: bool,
    rejected_reason: Option<Text>,
    redacted_by: Option<Text>,
    pdu_json: Text,
}

/// An event with the thread it belongs to.
#[derive(sqlx::FromRow)]
pub(crate) struct ThreadEventRow {
    #[sqlx(flatten)]
    event: EventRow,
    thread_id: Option<Text>,
}

impl ThreadEventRow {
    pub(crate) fn into_pair(self) -> (EventRecord, Option<String>) {
        (self.event.into(), self.thread_id.map(String::from))
    }
}

impl From<EventRow> for EventRecord {
    fn from(r: EventRow) -> Self {
        EventRecord {
            event_id: r.event_id.into(),
            room_id: r.room_id.into(),
            stream_ordering: r.stream_ordering,
            depth: r.depth,
            event_type: r.event_type.into(),
            state_key: r.state_key.map(Into::into),
            sender: r.sender.into(),
            origin_server_ts: r.origin_server_ts,
            state_group: r.state_group,
            outlier: r.outlier,
            soft_failed: r.soft_failed,
            rejected_reason: r.rejected_reason.map(Into::into),
            redacted_by: r.redacted_by.map(Into::into),
            pdu_json: r.pdu_json.into(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct MembershipRow {
    room_id: Text,
    user_id: Text,
    membership: Text,
    event_id: Text,
    sender: Text,
    stream_ordering: i64,
    forgotten: bool,
}

impl From<MembershipRow> for MembershipRecord {
    fn from(r: MembershipRow) -> Self {
        MembershipRecord {
            room_id: r.room_id.into(),
            user_id: r.user_id.into(),
            membership: r.membership.into(),
            event_id: r.event_id.into(),
            sender: r.sender.into(),
            stream_ordering: r.stream_ordering,
            forgotten: r.forgotten,
        }
    }
}

const MEMBERSHIP_COLUMNS: &str =
    "room_id, user_id, membership, event_id, sender, stream_ordering, forgotten";

/// Reads the room's write version and state group and locks its row until `tx` ends (SQLite
/// has no row locks and needs none: its single writer connection serializes every write
/// transaction). `None` when the room does not exist.
pub(crate) async fn lock_room_row(
    tx: &mut Tx,
    room_id: &str,
) -> Result<Option<(i64, Option<i64>)>> {
    let sql = match tx {
        Tx::Sqlite(_) => "SELECT write_version, state_group FROM rooms WHERE room_id = ?",
        Tx::Postgres(_) | Tx::MySql(_) => {
            "SELECT write_version, state_group FROM rooms WHERE room_id = ? FOR UPDATE"
        }
    };
    let room = on_tx!(tx, sql, |c, sql| {
        sqlx::query_as(sql)
            .bind(room_id)
            .fetch_optional(&mut *c)
            .await?
    });
    Ok(room)
}

/// Takes the next value of a shared counter inside `tx`. The counter row stays locked until
/// the transaction ends, so values commit in the order they were taken.
pub(crate) async fn next_counter(tx: &mut Tx, name: &str) -> Result<i64> {
    take_counter_values(tx, name, 1).await
}

/// Takes the next `n` values of a shared counter inside `tx` and returns the last of them (the
/// others are the `n - 1` before it). One statement: MySQL has no `UPDATE ... RETURNING`, but
/// hands back `LAST_INSERT_ID(expr)` with the result.
async fn take_counter_values(tx: &mut Tx, name: &str, n: usize) -> Result<i64> {
    const RETURNING: &str = "UPDATE id_counters SET counter_value = counter_value + ? WHERE name = ? RETURNING counter_value";
    const MYSQL: &str =
        "UPDATE id_counters SET counter_value = LAST_INSERT_ID(counter_value + ?) WHERE name = ?";
    let n =
        i64::try_from(n).map_err(|_| StorageError::Corrupt("too many counter values".into()))?;
    let value = match tx {
        Tx::MySql(tx) => {
            let done = sqlx::query(MYSQL)
                .bind(n)
                .bind(name)
                .execute(&mut **tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(StorageError::Corrupt(format!("no counter {name}")));
            }
            i64::try_from(done.last_insert_id())
                .map_err(|_| StorageError::Corrupt(format!("counter {name} overflowed")))?
        }
        tx => on_tx!(tx, RETURNING, |c, sql| {
            sqlx::query_scalar(sql)
                .bind(n)
                .bind(name)
                .fetch_one(&mut *c)
                .await?
        }),
    };
    Ok(value)
}

/// Reads and locks the rows of `room_ids` (sorted, so that processes locking several rooms
/// take them in the same order and cannot deadlock) as [`lock_room_row`] does for one room.
/// Rooms that do not exist map to `None`.
async fn lock_room_rows(tx: &mut Tx, room_ids: &[&str]) -> Result<LockedRooms> {
    let lock = match tx {
        Tx::Sqlite(_) => "",
        Tx::Postgres(_) | Tx::MySql(_) => " FOR UPDATE",
    };
    let sql = format!(
        "SELECT room_id, write_version, state_group FROM rooms WHERE room_id IN ({}) ORDER BY room_id{lock}",
        placeholders(room_ids.len())
    );
    let rows: Vec<(Text, i64, Option<i64>)> = on_tx!(tx, &sql, |c, sql| {
        let mut query = sqlx::query_as(sql);
        for room_id in room_ids {
            query = query.bind(*room_id);
        }
        query.fetch_all(&mut *c).await?
    });
    let mut locked: LockedRooms = room_ids.iter().map(|id| ((*id).to_owned(), None)).collect();
    for (room_id, version, group) in rows {
        locked.insert(room_id.0, Some((version, group)));
    }
    Ok(locked)
}

/// What a batch of event writes reads before it writes anything.
struct BatchReads {
    locked: LockedRooms,
    /// Per room, of the rooms whose head an event of the batch extends.
    extremities: HashMap<String, HashSet<String>>,
    /// The batch's transaction ids that earlier sends used.
    used_txns: HashSet<TxnKey>,
    /// Of the access tokens the batch's events are sent with, those that still exist.
    live_tokens: HashSet<TokenCheck>,
    /// The `events_stream` counter as read with the rest, held by this transaction: on SQLite
    /// (the process's one writer connection runs one write transaction at a time; another
    /// process writing meanwhile makes this transaction's first write fail, not race) and on
    /// PostgreSQL (locked with the rooms' rows). The batch writes its new value with its
    /// other deferred writes instead of taking it in a statement of its own. `None`: taken
    /// when the positions are needed.
    stream_counter: Option<i64>,
    /// Whether `extremities` holds the head rooms' forward extremities. When it does not (see
    /// [`postgres_batch_reads`]), the write checks them as it removes them instead.
    extremities_read: bool,
    /// PostgreSQL, a batch that changes no state and redacts nothing: the write statement
    /// takes the counter itself, and the events' positions come back from it (see
    /// [`postgres_batch_reads`]).
    counter_in_write: bool,
}

/// Reads what a batch needs before writing: on SQLite in one query (each query is a hand-off
/// to the connection's thread and back), elsewhere the rooms' rows locked first (unless the
/// caller holds them: `locked`), then the extremities and used transaction ids.
async fn batch_reads(
    tx: &mut Tx,
    room_ids: &[&str],
    locked: Option<LockedRooms>,
    events: &[&NewEvent],
    extremities: ExtremityCheck,
) -> Result<BatchReads> {
    let keys: Vec<&TxnKey> = events.iter().filter_map(|e| e.txn.as_ref()).collect();
    let mut tokens: Vec<&str> = events
        .iter()
        .filter_map(|e| e.sent_with.as_ref().map(|t| t.token_hash.as_str()))
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    match (&mut *tx, &locked) {
        (Tx::Sqlite(sqlite), None) => {
            return sqlite_batch_reads(sqlite, room_ids, &head_rooms(events), &keys, &tokens).await;
        }
        (Tx::Postgres(pg), None)
            if extremities == ExtremityCheck::OnWrite
                && every_accepted_event_extends_head(events) =>
        {
            // Only plain writes can take their positions inside the write statement: a state
            // event's group is numbered by its position before it is written, and a
            // redaction's writes to `events` go as a statement of their own.
            let counter_in_write = events
                .iter()
                .all(|e| e.state_key.is_none() && e.redacts.is_none());
            return postgres_batch_reads(pg, room_ids, &keys, &tokens, counter_in_write).await;
        }
        _ => {}
    }
    let locked = match locked {
        Some(locked) => locked,
        None => lock_room_rows(tx, room_ids).await?,
    };
    let mut reads = BatchReads::new(locked);
    let head_rooms = head_rooms(events);
    let parts = text_read_parts(["'e'", "'t'", "'k'"], "", &head_rooms, &keys, &tokens);
    if parts.is_empty() {
        return Ok(reads);
    }
    // After the lock, so that what it reads is what the rooms' holders last committed.
    let sql = parts.join(" UNION ALL ");
    type Row = (Text, Option<Text>, Option<Text>, Option<Text>);
    let rows: Vec<Row> = on_tx!(tx, &sql, |c, sql| {
        bind_text_reads!(sqlx::query_as(sql), &head_rooms, &keys, &tokens)
            .fetch_all(&mut *c)
            .await?
    });
    for (kind, a, b, c) in rows {
        let part = match kind.0.as_str() {
            "e" => TextRead::Extremity,
            "t" => TextRead::Txn,
            "k" => TextRead::Token,
            _ => return Err(unexpected_read()),
        };
        reads.add_text_row(
            part,
            a.map(String::from),
            b.map(String::from),
            c.map(String::from),
        )?;
    }
    Ok(reads)
}

/// How a batch checks that its events extend their rooms' forward extremities.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ExtremityCheck {
    /// Read them once the rooms are locked.
    Read,
    /// Where that saves a statement (see [`postgres_batch_reads`]), count those the write
    /// removes: any other number fails the batch with [`UNREAD_EXTREMITIES_MOVED`], to be
    /// written again reading them, so that only the events that do not extend them fail.
    OnWrite,
}

/// The conflict of a batch whose events cite forward extremities it did not read and that
/// are not there (events built on one that was never written).
const UNREAD_EXTREMITIES_MOVED: &str = "forward extremities moved";

/// Whether every accepted event of `events` extends its room's head: then a write can check
/// the extremities they cite by counting those it removes (see [`postgres_batch_reads`]).
fn every_accepted_event_extends_head(events: &[&NewEvent]) -> bool {
    events
        .iter()
        .all(|e| e.extends_head || e.outlier || e.rejected_reason.is_some())
}

/// [`batch_reads`] on PostgreSQL for a batch whose accepted events all extend their rooms'
/// heads: one statement locks the rooms' rows (sorted, as [`lock_room_rows`]) and, unless
/// `counter_in_write`, then the stream counter's, and reads the used transaction ids and
/// live tokens.
///
/// The counter is every batch's: whoever holds it, from taking it to its `COMMIT`, holds up
/// every other batch of every room. So a batch that changes no state and redacts nothing
/// (`counter_in_write`, the messages) takes it in its write statement, whose events read
/// their positions from it (`write_events`): it then holds it for that statement and the
/// commit only. Other batches take it here, so that it needs no statement of its own and
/// the writes still go as one: the fewer round trips between a batch's lock and its
/// `COMMIT`, the sooner the next batch can start.
///
/// It does not read the forward extremities: a statement sees what was committed when it
/// began, which is before the lock it waited for was released, and the batch that held it
/// changed them. The write removes the extremities
/// its events cite and fails with a conflict unless it removed them all. The transaction
/// ids and tokens read here may be as stale: a transaction id recorded meanwhile breaks
/// its uniqueness constraint (a conflict, see [`push_txn_ids`]), and a logout is as racy
/// with a send as it ever was.
async fn postgres_batch_reads(
    pg: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    room_ids: &[&str],
    keys: &[&TxnKey],
    tokens: &[&str],
    counter_in_write: bool,
) -> Result<BatchReads> {
    // The counter's condition reads `locked`, so its row is locked after the rooms' rows.
    // Lists go as arrays: the statement's text is the same for every batch, so that each
    // connection parses and plans it once. That plan is then kept (a generic plan) even as
    // the tables grow from the size they had then, so the growing ones are looked up key
    // by key (`LATERAL ... LIMIT 1`: one index probe each), never joined, which a plan made
    // on a near-empty table does with a scan of the whole table.
    macro_rules! reads_sql {
        ($counter:literal, $counter_row:literal) => {
            concat!(
                "WITH locked AS (SELECT room_id, write_version, state_group FROM rooms \
                   WHERE room_id = ANY($1) ORDER BY room_id FOR UPDATE)",
                $counter,
                " SELECT 'r', room_id, NULL, NULL, write_version, state_group FROM locked",
                $counter_row,
                " UNION ALL SELECT 't', k.user_id, k.device_id, k.txn_id, NULL, NULL \
                   FROM unnest($2::TEXT[], $3::TEXT[], $4::TEXT[]) AS k(user_id, device_id, txn_id) \
                   JOIN LATERAL (SELECT 1 FROM event_transactions t WHERE t.user_id = k.user_id \
                     AND t.device_id = k.device_id AND t.txn_id = k.txn_id LIMIT 1) used ON TRUE \
                 UNION ALL SELECT 'k', a.token_hash, a.user_id, a.device_id, NULL, NULL \
                   FROM unnest($5::TEXT[]) AS h(token_hash) \
                   JOIN LATERAL (SELECT token_hash, user_id, device_id FROM access_tokens \
                     WHERE token_hash = h.token_hash LIMIT 1) a ON TRUE"
            )
        };
    }
    const WITH_COUNTER: &str = reads_sql!(
        ", counter AS (SELECT counter_value FROM id_counters \
           WHERE name = 'events_stream' AND (SELECT count(*) FROM locked) >= 0 FOR UPDATE)",
        " UNION ALL SELECT 'c', NULL, NULL, NULL, counter_value, NULL FROM counter"
    );
    const ROOMS_ONLY: &str = reads_sql!("", "");
    let sql = if counter_in_write {
        ROOMS_ONLY
    } else {
        WITH_COUNTER
    };
    type Row = (
        Text,
        Option<Text>,
        Option<Text>,
        Option<Text>,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<Row> = sqlx::query_as(sql)
        .bind(room_ids)
        .bind(keys.iter().map(|k| k.user_id.as_str()).collect::<Vec<_>>())
        .bind(
            keys.iter()
                .map(|k| k.device_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(keys.iter().map(|k| k.txn_id.as_str()).collect::<Vec<_>>())
        .bind(tokens)
        .fetch_all(&mut **pg)
        .await?;
    let mut reads = BatchReads::new(room_ids.iter().map(|id| ((*id).to_owned(), None)).collect());
    reads.extremities_read = false;
    for (kind, a, b, c, n, m) in rows {
        let text = |v: Option<Text>| v.map(String::from);
        match (kind.0.as_str(), n) {
            ("r", Some(version)) => {
                let room_id = text(a).ok_or_else(unexpected_read)?;
                reads.locked.insert(room_id, Some((version, m)));
            }
            ("c", Some(value)) => reads.stream_counter = Some(value),
            ("t", _) => reads.add_text_row(TextRead::Txn, text(a), text(b), text(c))?,
            ("k", _) => reads.add_text_row(TextRead::Token, text(a), text(b), text(c))?,
            _ => return Err(unexpected_read()),
        }
    }
    reads.counter_in_write = counter_in_write;
    if reads.stream_counter.is_none() && !counter_in_write {
        return Err(StorageError::Corrupt("no counter events_stream".into()));
    }
    Ok(reads)
}

/// The parts of a batch's reads that are all text: the forward extremities of
/// `head_rooms`, the used ones of the transaction ids `keys`, the live ones of `tokens`.
#[derive(Clone, Copy)]
enum TextRead {
    Extremity,
    Txn,
    Token,
}

/// The `SELECT`s (to join with `UNION ALL`) reading the [`TextRead`] parts a batch needs,
/// each `kind, a, b, c` then `tail`: `kinds` tells them apart. Bind with
/// [`bind_text_reads`], in the same order.
fn text_read_parts(
    kinds: [&str; 3],
    tail: &str,
    head_rooms: &[&str],
    keys: &[&TxnKey],
    tokens: &[&str],
) -> Vec<String> {
    let [extremity, txn, token] = kinds;
    let mut parts = Vec::new();
    if !head_rooms.is_empty() {
        parts.push(format!(
            "SELECT {extremity}, room_id, event_id, NULL{tail} \
             FROM room_forward_extremities WHERE room_id IN ({})",
            placeholders(head_rooms.len())
        ));
    }
    if !keys.is_empty() {
        parts.push(format!(
            "SELECT {txn}, user_id, device_id, txn_id{tail} FROM event_transactions WHERE {}",
            txn_keys_condition(keys.len())
        ));
    }
    if !tokens.is_empty() {
        parts.push(format!(
            "SELECT {token}, token_hash, user_id, device_id{tail} FROM access_tokens \
             WHERE token_hash IN ({})",
            placeholders(tokens.len())
        ));
    }
    parts
}

/// Binds the values of [`text_read_parts`] to `$query`.
macro_rules! bind_text_reads {
    ($query:expr, $head_rooms:expr, $keys:expr, $tokens:expr) => {{
        let mut query = $query;
        for room_id in $head_rooms {
            query = query.bind(*room_id);
        }
        for key in $keys {
            query = query
                .bind(&key.user_id)
                .bind(&key.device_id)
                .bind(&key.txn_id);
        }
        for token in $tokens {
            query = query.bind(*token);
        }
        query
    }};
}
use bind_text_reads;

fn unexpected_read() -> StorageError {
    StorageError::Corrupt("unexpected row in a batch's reads".into())
}

impl BatchReads {
    /// Reads with the rooms' rows as `locked` and nothing else found yet.
    fn new(locked: LockedRooms) -> Self {
        BatchReads {
            locked,
            extremities: HashMap::new(),
            used_txns: HashSet::new(),
            live_tokens: HashSet::new(),
            stream_counter: None,
            extremities_read: true,
            counter_in_write: false,
        }
    }

    /// Adds a row of a [`TextRead`] part.
    fn add_text_row(
        &mut self,
        part: TextRead,
        a: Option<String>,
        b: Option<String>,
        c: Option<String>,
    ) -> Result<()> {
        match (part, a, b, c) {
            (TextRead::Extremity, Some(room_id), Some(event_id), _) => {
                self.extremities
                    .entry(room_id)
                    .or_default()
                    .insert(event_id);
            }
            (TextRead::Txn, Some(user_id), Some(device_id), Some(txn_id)) => {
                self.used_txns.insert(TxnKey {
                    user_id,
                    device_id,
                    txn_id,
                });
            }
            (TextRead::Token, Some(token_hash), Some(user_id), Some(device_id)) => {
                self.live_tokens.insert(TokenCheck {
                    token_hash,
                    user_id,
                    device_id,
                });
            }
            _ => return Err(unexpected_read()),
        }
        Ok(())
    }
}

/// [`batch_reads`] on SQLite: the rooms' rows, the extremities, the used transaction ids and
/// the stream counter as the parts of one `UNION ALL`, told apart by their first column.
async fn sqlite_batch_reads(
    tx: &mut SqliteTx,
    room_ids: &[&str],
    head_rooms: &[&str],
    keys: &[&TxnKey],
    tokens: &[&str],
) -> Result<BatchReads> {
    const ROOM: i64 = 0;
    const EXTREMITY: i64 = 1;
    const TXN: i64 = 2;
    const COUNTER: i64 = 3;
    const TOKEN: i64 = 4;
    let mut parts = vec![format!(
        "SELECT {ROOM}, room_id, NULL, NULL, write_version, state_group FROM rooms \
         WHERE room_id IN ({})",
        placeholders(room_ids.len())
    )];
    let kinds = [EXTREMITY, TXN, TOKEN].map(|k| k.to_string());
    parts.extend(text_read_parts(
        kinds.each_ref().map(String::as_str),
        ", NULL, NULL",
        head_rooms,
        keys,
        tokens,
    ));
    parts.push(format!(
        "SELECT {COUNTER}, NULL, NULL, NULL, counter_value, NULL FROM id_counters \
         WHERE name = 'events_stream'"
    ));
    // A batch's first query: it begins the transaction (see `SqliteBatch`).
    let reads = parts.join(" UNION ALL ");
    let sql = match tx.take_begin() {
        Some(begin) => format!("{begin};\n{reads}"),
        None => reads,
    };
    type Row = (
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let mut query = sqlx::query_as::<_, Row>(&sql);
    for room_id in room_ids {
        query = query.bind(*room_id);
    }
    let rows = bind_text_reads!(query, head_rooms, keys, tokens)
        .fetch_all(tx.conn())
        .await?;
    let mut reads = BatchReads::new(room_ids.iter().map(|id| ((*id).to_owned(), None)).collect());
    for (kind, a, b, c, n, m) in rows {
        match (kind, a, n) {
            (ROOM, Some(room_id), Some(version)) => {
                reads.locked.insert(room_id, Some((version, m)));
            }
            (COUNTER, _, Some(value)) => reads.stream_counter = Some(value),
            (EXTREMITY, a, _) => reads.add_text_row(TextRead::Extremity, a, b, c)?,
            (TXN, a, _) => reads.add_text_row(TextRead::Txn, a, b, c)?,
            (TOKEN, a, _) => reads.add_text_row(TextRead::Token, a, b, c)?,
            _ => return Err(unexpected_read()),
        }
    }
    if reads.stream_counter.is_none() {
        return Err(StorageError::Corrupt("no counter events_stream".into()));
    }
    Ok(reads)
}

/// The rooms whose head an event of `events` extends (the only ones whose forward
/// extremities the write checks), sorted, each once.
fn head_rooms<'a>(events: &[&'a NewEvent]) -> Vec<&'a str> {
    let mut room_ids: Vec<&str> = events
        .iter()
        .filter(|e| e.extends_head)
        .map(|e| e.room_id.as_str())
        .collect();
    room_ids.sort_unstable();
    room_ids.dedup();
    room_ids
}

/// Rooms whose rows a write transaction holds: write version and state group as locked;
/// `None` for a room that does not exist.
type LockedRooms = HashMap<String, Option<(i64, Option<i64>)>>;

/// A locked room as the events of one write move it on.
struct RoomCursor {
    write_version: i64,
    state_group: Option<i64>,
    max_depth: i64,
    /// Whether an event of the batch changes the room's state (its new group is numbered by
    /// the event's stream position, so the room's row is updated after the counter is taken).
    changes_state: bool,
    written: bool,
}

/// Matches `n` transaction ids, each bound as (user, device, transaction id).
fn txn_keys_condition(n: usize) -> String {
    vec!["(user_id = ? AND device_id = ? AND txn_id = ?)"; n].join(" OR ")
}

/// Records the transaction ids of the written events. [`batch_reads`] checked them in this
/// transaction; should another process have recorded one since, the uniqueness violation
/// fails the batch with a conflict, to be written event by event, each seeing the ids used
/// by then (a send must not answer with two events for one id).
fn push_txn_ids<'a>(writes: &mut DeferredWrites<'a>, txns: &[(&'a TxnKey, &'a str, i64)]) {
    if txns.is_empty() {
        return;
    }
    let mut binds = Vec::with_capacity(txns.len() * 5);
    for (txn, event_id, at) in txns {
        binds.extend([
            Bind::from(&txn.user_id),
            Bind::from(&txn.device_id),
            Bind::from(&txn.txn_id),
            Bind::from(*event_id),
            Bind::from(*at),
        ]);
    }
    let (sql, binds) = writes.insert_sql(
        "event_transactions (user_id, device_id, txn_id, event_id, created_at)",
        5,
        binds,
    );
    writes.push(sql, binds, "transaction id");
}

/// The accepted events of `events` and the (room, event) pairs they cite as prev events.
fn accepted_and_cited<'a>(
    events: &[&'a NewEvent],
) -> (Vec<&'a NewEvent>, HashSet<(&'a str, &'a str)>) {
    let accepted: Vec<&NewEvent> = events
        .iter()
        .copied()
        .filter(|e| !e.outlier && e.rejected_reason.is_none())
        .collect();
    let cited = accepted
        .iter()
        .flat_map(|e| {
            e.prev_events
                .iter()
                .map(|p| (e.room_id.as_str(), p.as_str()))
        })
        .collect();
    (accepted, cited)
}

/// The event graph the written `events` (in order) add: every edge in one statement, and the
/// forward extremities they cite removed in another ([`push_new_extremities`] adds theirs).
/// `must_remove`: how many stored extremities that must remove, for a write that did not
/// read them (any other number is a conflict: the room moved on).
fn push_graph<'a>(
    writes: &mut DeferredWrites<'a>,
    events: &[&'a NewEvent],
    must_remove: Option<usize>,
) {
    let edges: Vec<(&str, &str)> = events
        .iter()
        .flat_map(|e| {
            e.prev_events
                .iter()
                .map(|p| (e.event_id.as_str(), p.as_str()))
        })
        .collect();
    if !edges.is_empty() {
        let binds = edges
            .iter()
            .flat_map(|(event_id, prev)| [Bind::from(*event_id), Bind::from(*prev)])
            .collect();
        let (sql, binds) = writes.insert_sql("event_edges (event_id, prev_event_id)", 2, binds);
        writes.push(sql, binds, "event edge");
    }
    let (_, cited) = accepted_and_cited(events);
    if !cited.is_empty() {
        let mut rooms: Vec<&str> = cited.iter().map(|(room, _)| *room).collect();
        rooms.sort_unstable();
        rooms.dedup();
        let prevs: Vec<&str> = cited.iter().map(|(_, prev)| *prev).collect();
        // Event ids are unique across rooms, so the pairs need no row-value syntax (which
        // SQLite lacks in this form): a room's extremity among `prevs` is one it cites.
        let (in_rooms, mut binds) = writes.in_list("room_id", &rooms);
        let (in_prevs, prev_binds) = writes.in_list("event_id", &prevs);
        binds.extend(prev_binds);
        let sql = format!("DELETE FROM room_forward_extremities WHERE {in_rooms} AND {in_prevs}");
        match must_remove {
            Some(rows) => writes.push_expecting(sql, binds, UNREAD_EXTREMITIES_MOVED, rows as u64),
            None => writes.push(sql, binds, "forward extremity"),
        }
    }
}

/// The accepted events of `events` no later one cites, added as forward extremities, one
/// statement for all (an event cited within the batch never becomes one). Pushed after the
/// batch's `events` rows: on PostgreSQL it goes in their statement.
fn push_new_extremities<'a>(writes: &mut DeferredWrites<'a>, events: &[&'a NewEvent]) {
    let (accepted, cited) = accepted_and_cited(events);
    let new_extremities: Vec<&NewEvent> = accepted
        .into_iter()
        .filter(|e| !cited.contains(&(e.room_id.as_str(), e.event_id.as_str())))
        .collect();
    if !new_extremities.is_empty() {
        let binds = new_extremities
            .iter()
            .flat_map(|e| [Bind::from(&e.room_id), Bind::from(&e.event_id)])
            .collect();
        let (sql, binds) =
            writes.insert_sql("room_forward_extremities (room_id, event_id)", 2, binds);
        // New events: not the extremities `push_graph` removes.
        writes.push_rows_apart(sql, binds, "forward extremity");
    }
}

/// The writes of an event that change what is already stored: the redaction mark (of an event
/// written before this batch; [`push_event_rows`] marks those of the batch) and the room's
/// current state.
fn push_redaction_and_state<'a>(writes: &mut DeferredWrites<'a>, event: &'a NewEvent) {
    let applies = !event.outlier && event.rejected_reason.is_none() && !event.soft_failed;
    if applies && let Some(redacts) = &event.redacts {
        writes.push(
            "UPDATE events SET redacted_by = ? WHERE event_id = ? AND room_id = ?".into(),
            vec![
                Bind::from(&event.event_id),
                Bind::from(redacts),
                Bind::from(&event.room_id),
            ],
            "redaction",
        );
    }
    if event.changes_state() {
        let state_key = event.state_key.as_deref().unwrap_or_default();
        let key = [
            Bind::from(&event.room_id),
            Bind::from(&event.event_type),
            Bind::from(state_key),
        ];
        writes.push(
            "DELETE FROM room_current_state WHERE room_id = ? AND event_type = ? AND state_key = ?"
                .into(),
            key.to_vec(),
            "current state",
        );
        let mut row = key.to_vec();
        row.push(Bind::from(&event.event_id));
        writes.push(
            "INSERT INTO room_current_state (room_id, event_type, state_key, event_id) VALUES (?, ?, ?, ?)"
                .into(),
            row,
            "current state",
        );
    }
}

/// The columns of an `events` row as [`event_row_binds`] binds them.
const EVENT_INSERT_COLUMNS: [&str; 15] = [
    "event_id",
    "room_id",
    "stream_ordering",
    "depth",
    "event_type",
    "state_key",
    "sender",
    "origin_server_ts",
    "state_group",
    "outlier",
    "soft_failed",
    "rejected_reason",
    "redacted_by",
    "pdu_json",
    "thread_id",
];

/// The binds of the `events` rows of `(event, stream position, state group)`, row after row
/// (an outlier's position `NULL`), an event that a later one of them redacts marked so.
fn event_row_binds<'a>(rows: &[(&'a NewEvent, i64, Option<i64>)]) -> Vec<Bind<'a>> {
    let redacted_by: HashMap<&str, &str> = rows
        .iter()
        .filter(|(e, _, _)| !e.outlier && e.rejected_reason.is_none() && !e.soft_failed)
        .filter_map(|(e, _, _)| Some((e.redacts.as_deref()?, e.event_id.as_str())))
        .collect();
    let mut binds = Vec::with_capacity(rows.len() * EVENT_INSERT_COLUMNS.len());
    for (event, stream, state_group) in rows {
        binds.extend([
            Bind::from(&event.event_id),
            Bind::from(&event.room_id),
            Bind::from((!event.outlier).then_some(*stream)),
            Bind::from(event.depth),
            Bind::from(&event.event_type),
            Bind::from(&event.state_key),
            Bind::from(&event.sender),
            Bind::from(event.origin_server_ts),
            Bind::from(*state_group),
            Bind::from(event.outlier),
            Bind::from(event.soft_failed),
            Bind::from(&event.rejected_reason),
            Bind::from(redacted_by.get(event.event_id.as_str()).copied()),
            Bind::from(&event.pdu_json),
            Bind::from(&event.thread_id),
        ]);
    }
    binds
}

/// Inserts the `events` rows of `(event, stream position, state group)`, one statement for
/// all of them, an event that a later one of them redacts marked so. A duplicate event id is
/// a conflict.
fn push_event_rows<'a>(writes: &mut DeferredWrites<'a>, rows: &[(&'a NewEvent, i64, Option<i64>)]) {
    let into = format!("events ({})", EVENT_INSERT_COLUMNS.join(", "));
    let (sql, binds) = writes.insert_sql(&into, EVENT_INSERT_COLUMNS.len(), event_row_binds(rows));
    writes.push(sql, binds, "event");
}

/// As [`push_event_rows`] on PostgreSQL, each event's position its rank in `rows` (from 1)
/// after the value of the counter taken in the same statement (the `WITH` part `stream`).
fn push_event_rows_at_ranks<'a>(
    writes: &mut DeferredWrites<'a>,
    rows: &[(&'a NewEvent, i64, Option<i64>)],
) -> Result<()> {
    let (sql, binds) = writes
        .insert_offset_sql(
            "events",
            &EVENT_INSERT_COLUMNS,
            2,
            "stream",
            event_row_binds(rows),
        )
        .ok_or_else(|| StorageError::Corrupt("events ranked outside PostgreSQL".into()))?;
    writes.push(sql, binds, "event");
    Ok(())
}

/// Records the membership a member event at `stream` sets (when it applies to the state).
fn push_membership<'a>(writes: &mut DeferredWrites<'a>, event: &'a NewEvent, stream: i64) {
    let applies = !event.outlier && event.rejected_reason.is_none() && !event.soft_failed;
    let (Some(membership), Some(user_id)) = (&event.membership, &event.state_key) else {
        return;
    };
    if !applies {
        return;
    }
    writes.push(
        "DELETE FROM room_memberships WHERE room_id = ? AND user_id = ?".into(),
        vec![Bind::from(&event.room_id), Bind::from(user_id)],
        "membership",
    );
    writes.push(
        "INSERT INTO room_memberships (room_id, user_id, membership, event_id, sender, stream_ordering, forgotten) VALUES (?, ?, ?, ?, ?, ?, ?)".into(),
        vec![
            Bind::from(&event.room_id),
            Bind::from(user_id),
            Bind::from(membership),
            Bind::from(&event.event_id),
            Bind::from(&event.sender),
            Bind::from(stream),
            Bind::from(false),
        ],
        "membership",
    );
}

/// Moves the rows of the rooms a write changed on: write version, state group, and the
/// greatest depth, all rooms in one statement (on PostgreSQL, of a text that does not change
/// with the number of rooms: see [`DeferredWrites::insert_sql`]).
fn push_room_updates<'a>(writes: &mut DeferredWrites<'a>, rooms: &[(&'a str, &RoomCursor)]) {
    if rooms.is_empty() {
        return;
    }
    if writes.binds_arrays() {
        let sql = "UPDATE rooms SET write_version = v.write_version, state_group = v.state_group, \
                   max_depth = GREATEST(rooms.max_depth, v.max_depth) \
                   FROM unnest(?::TEXT[], ?::BIGINT[], ?::BIGINT[], ?::BIGINT[]) \
                   AS v(room_id, write_version, state_group, max_depth) \
                   WHERE rooms.room_id = v.room_id";
        let binds = vec![
            Bind::Array(ArrayBind::Texts(
                rooms.iter().map(|(id, _)| Some(*id)).collect(),
            )),
            Bind::Array(ArrayBind::Ints(
                rooms.iter().map(|(_, r)| Some(r.write_version)).collect(),
            )),
            Bind::Array(ArrayBind::Ints(
                rooms.iter().map(|(_, r)| r.state_group).collect(),
            )),
            Bind::Array(ArrayBind::Ints(
                rooms.iter().map(|(_, r)| Some(r.max_depth)).collect(),
            )),
        ];
        writes.push(sql.into(), binds, "room");
        return;
    }
    let case = |then: &str| {
        format!(
            "CASE room_id {} END",
            vec![format!("WHEN ? THEN {then}"); rooms.len()].join(" ")
        )
    };
    let sql = format!(
        "UPDATE rooms SET write_version = {}, state_group = {}, max_depth = {} WHERE room_id IN ({})",
        case("?"),
        case("?"),
        case("(CASE WHEN max_depth < ? THEN ? ELSE max_depth END)"),
        placeholders(rooms.len())
    );
    let mut binds = Vec::with_capacity(rooms.len() * 8);
    for (room_id, room) in rooms {
        binds.extend([Bind::from(*room_id), Bind::from(room.write_version)]);
    }
    for (room_id, room) in rooms {
        binds.extend([Bind::from(*room_id), Bind::from(room.state_group)]);
    }
    for (room_id, room) in rooms {
        binds.extend([
            Bind::from(*room_id),
            Bind::from(room.max_depth),
            Bind::from(room.max_depth),
        ]);
    }
    binds.extend(rooms.iter().map(|(room_id, _)| Bind::from(*room_id)));
    writes.push(sql, binds, "room");
}

fn merge_chains(rows: Vec<(i64, i64, Text, Text, Text)>) -> HashMap<i64, StateMap> {
    // Per group: per state key, the nearest entry's (chain length, event id).
    type Nearest = BTreeMap<(String, String), (i64, String)>;
    let mut best: HashMap<i64, Nearest> = HashMap::new();
    for (group, level, event_type, state_key, event_id) in rows {
        let entries = best.entry(group).or_default();
        let key = (event_type.0, state_key.0);
        match entries.get(&key) {
            Some((seen, _)) if *seen >= level => {}
            _ => {
                entries.insert(key, (level, event_id.0));
            }
        }
    }
    best.into_iter()
        .map(|(group, entries)| {
            let state = entries.into_iter().map(|(k, (_, id))| (k, id)).collect();
            (group, state)
        })
        .collect()
}

/// The chains of `groups` state groups back to their full snapshots, with every entry, each
/// row tagged with the group it belongs to. `chain_length` falls by one per step towards the
/// snapshot, so the entry with the highest one is the nearest.
fn state_chain_sql(groups: usize) -> String {
    format!(
        "WITH RECURSIVE chain(root, state_group, prev_group, chain_length) AS ( \
           SELECT state_group, state_group, prev_group, chain_length FROM state_groups \
           WHERE state_group IN ({}) \
           UNION ALL \
           SELECT c.root, g.state_group, g.prev_group, g.chain_length FROM state_groups g \
           JOIN chain c ON g.state_group = c.prev_group \
         ) \
         SELECT c.root, c.chain_length, e.event_type, e.state_key, e.event_id FROM chain c \
         JOIN state_group_entries e ON e.state_group = c.state_group",
        placeholders(groups)
    )
}

async fn state_in_tx(tx: &mut Tx, state_group: i64) -> Result<StateMap> {
    let query = state_chain_sql(1);
    let rows: Vec<(i64, i64, Text, Text, Text)> = on_tx!(tx, &query, |c, sql| {
        sqlx::query_as(sql)
            .bind(state_group)
            .fetch_all(&mut *c)
            .await?
    });
    Ok(merge_chains(rows).remove(&state_group).unwrap_or_default())
}

impl SqlStore {
    /// Writes the state group an event creates: parent + one entry, or a full snapshot when
    /// the chain is long (or there is no parent).
    async fn write_state_group(
        &self,
        tx: &mut Tx,
        event: &NewEvent,
        group: i64,
        parent: Option<i64>,
    ) -> Result<()> {
        let state_key = event.state_key.clone().unwrap_or_default();
        let parent_chain: Option<i64> = match parent {
            Some(parent) => on_tx!(
                tx,
                "SELECT chain_length FROM state_groups WHERE state_group = ?",
                |c, sql| {
                    sqlx::query_scalar(sql)
                        .bind(parent)
                        .fetch_optional(&mut *c)
                        .await?
                }
            ),
            None => None,
        };
        let (prev_group, chain_length, entries) = match (parent, parent_chain) {
            (Some(parent), Some(length)) if length + 1 < MAX_STATE_CHAIN => (
                Some(parent),
                length + 1,
                vec![(
                    (event.event_type.clone(), state_key),
                    event.event_id.clone(),
                )],
            ),
            (parent, _) => {
                let mut full = match parent {
                    Some(parent) => state_in_tx(tx, parent).await?,
                    None => StateMap::new(),
                };
                full.insert(
                    (event.event_type.clone(), state_key),
                    event.event_id.clone(),
                );
                (None, 0, full.into_iter().collect())
            }
        };
        on_tx!(
            tx,
            "INSERT INTO state_groups (state_group, room_id, prev_group, chain_length) VALUES (?, ?, ?, ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(group)
                    .bind(&event.room_id)
                    .bind(prev_group)
                    .bind(chain_length)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        for ((event_type, state_key), event_id) in entries {
            on_tx!(
                tx,
                "INSERT INTO state_group_entries (state_group, event_type, state_key, event_id) VALUES (?, ?, ?, ?)",
                |c, sql| {
                    sqlx::query(sql)
                        .bind(group)
                        .bind(&event_type)
                        .bind(&state_key)
                        .bind(&event_id)
                        .execute(&mut *c)
                        .await?
                        .rows_affected()
                }
            );
        }
        Ok(())
    }

    /// Writes `events` in `tx`, which holds the rows of their rooms (`locked`). An event whose
    /// room is unknown or moved past the write version it was built on, or whose transaction
    /// id was used already, writes nothing and gets a conflict; the others are written in
    /// order and take consecutive stream positions. Committing is the caller's.
    ///
    /// Statement order matters for throughput: the global stream counter row stays locked from
    /// the moment it is taken until commit, serializing every writer of every room, so it is
    /// taken once for all the events, after every write that does not need a position. The
    /// writes whose results nothing reads are [`DeferredWrites`]: on SQLite, one query for all.
    async fn write_events(
        &self,
        tx: &mut Tx,
        reads: BatchReads,
        events: &[&NewEvent],
    ) -> Result<Vec<Result<PersistedEvent>>> {
        let BatchReads {
            locked,
            mut extremities,
            mut used_txns,
            live_tokens,
            stream_counter,
            extremities_read,
            counter_in_write,
        } = reads;
        // Without the stored extremities (see `BatchReads::extremities_read`): those the
        // written events cite, each of which the write must remove, and the events of the
        // batch before the one checked (which can only be extremities once written).
        let mut cited_stored: HashSet<&str> = HashSet::new();
        let mut earlier_ids: HashSet<&str> = HashSet::new();
        let mut writes = DeferredWrites::for_tx(tx);
        let mut new_txns: Vec<(&TxnKey, &str, i64)> = Vec::new();
        let mut rooms: HashMap<&str, RoomCursor> = HashMap::new();
        let mut outcomes: Vec<Result<PersistedEvent>> = Vec::with_capacity(events.len());
        let mut written: Vec<usize> = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            if let Some(earlier) = index.checked_sub(1).filter(|_| !extremities_read) {
                earlier_ids.insert(events[earlier].event_id.as_str());
            }
            if let Some(token) = &event.sent_with
                && !live_tokens.contains(token)
            {
                // Logged out since this process last looked the token up (the events built
                // on this one fail the extremities check below and are built again).
                outcomes.push(Err(StorageError::UnknownToken));
                continue;
            }
            let Some(Some((write_version, state_group))) = locked.get(&event.room_id) else {
                outcomes.push(Err(StorageError::Conflict(format!(
                    "no room {}",
                    event.room_id
                ))));
                continue;
            };
            let room = rooms.entry(&event.room_id).or_insert(RoomCursor {
                write_version: *write_version,
                state_group: *state_group,
                max_depth: event.depth,
                changes_state: false,
                written: false,
            });
            let room_extremities = extremities.entry(event.room_id.clone()).or_default();
            // Unread, a stored extremity is taken to be there until an event of the batch
            // cites it; the write checks that it was.
            let is_extremity = |prev: &String| {
                room_extremities.contains(prev)
                    || (!extremities_read
                        && !earlier_ids.contains(prev.as_str())
                        && !cited_stored.contains(prev.as_str()))
            };
            let moved_on = room.write_version != event.expected_write_version
                || (event.extends_head && !event.prev_events.iter().all(is_extremity));
            if moved_on {
                outcomes.push(Err(StorageError::Conflict("room changed meanwhile".into())));
                continue;
            }
            if let Some(txn) = &event.txn {
                // Used by an earlier send, or by another event of this batch.
                if !used_txns.insert(txn.clone()) {
                    outcomes.push(Err(StorageError::Conflict("transaction id".into())));
                    continue;
                }
                new_txns.push((txn, &event.event_id, event.origin_server_ts));
            }
            push_redaction_and_state(&mut writes, event);
            if !event.outlier && event.rejected_reason.is_none() {
                for prev in &event.prev_events {
                    if !room_extremities.remove(prev) && !extremities_read {
                        cited_stored.insert(prev);
                    }
                }
                room_extremities.insert(event.event_id.clone());
            }
            room.write_version += 1;
            room.max_depth = room.max_depth.max(event.depth);
            room.changes_state |= event.changes_state();
            room.written = true;
            // Filled in once the positions are taken.
            outcomes.push(Ok(PersistedEvent {
                stream_ordering: 0,
                state_group: None,
            }));
            written.push(index);
        }
        if written.is_empty() {
            return Ok(outcomes);
        }
        push_txn_ids(&mut writes, &new_txns);
        let written_events: Vec<&NewEvent> = written.iter().map(|&i| events[i]).collect();
        let must_remove = (!extremities_read).then_some(cited_stored.len());
        push_graph(&mut writes, &written_events, must_remove);
        if counter_in_write {
            // The write statement takes the counter (see `postgres_batch_reads`): each
            // event's position is the counter's value before plus its rank in `written`.
            let taken = written.len() as i64;
            writes.push_returning(
                "stream",
                "UPDATE id_counters SET counter_value = counter_value + ? \
                 WHERE name = 'events_stream' RETURNING counter_value - ? AS value"
                    .into(),
                vec![Bind::from(taken), Bind::from(taken)],
                "stream counter",
            );
            let ranked: Vec<(&NewEvent, i64, Option<i64>)> = written
                .iter()
                .zip(1..)
                .map(|(&index, rank)| {
                    let event = events[index];
                    let group = rooms
                        .get(event.room_id.as_str())
                        .and_then(|room| room.state_group);
                    (event, rank, group)
                })
                .collect();
            push_event_rows_at_ranks(&mut writes, &ranked)?;
            push_new_extremities(&mut writes, &written_events);
            let written_rooms: Vec<(&str, &RoomCursor)> = rooms
                .iter()
                .filter(|(_, room)| room.written)
                .map(|(room_id, room)| (*room_id, room))
                .collect();
            push_room_updates(&mut writes, &written_rooms);
            if !writes.one_statement() {
                return Err(StorageError::Corrupt(
                    "positions read from a counter taken in another statement".into(),
                ));
            }
            let before = writes.flush_last(tx).await?.ok_or_else(|| {
                StorageError::Corrupt("the stream counter answered nothing".into())
            })?;
            for (&index, (_, rank, state_group)) in written.iter().zip(&ranked) {
                outcomes[index] = Ok(PersistedEvent {
                    stream_ordering: before + rank,
                    state_group: *state_group,
                });
            }
            return Ok(outcomes);
        }
        // Rooms whose state changed are updated once their new state group is numbered; all
        // of them then when the counter is held already (nothing is sent before it).
        let mut state_rooms: Vec<&str> = Vec::new();
        let mut other_rooms: Vec<(&str, &RoomCursor)> = Vec::new();
        for (room_id, room) in &rooms {
            match (room.written, room.changes_state || stream_counter.is_some()) {
                (true, true) => state_rooms.push(*room_id),
                (true, false) => other_rooms.push((*room_id, room)),
                (false, _) => {}
            }
        }
        if stream_counter.is_none() {
            push_room_updates(&mut writes, &other_rooms);
            writes.flush_unless_combined(tx).await?;
        }

        // From here on the stream counter is held.
        let last = match stream_counter {
            Some(current) => {
                let last = current + written.len() as i64;
                writes.push(
                    "UPDATE id_counters SET counter_value = ? WHERE name = 'events_stream'".into(),
                    vec![Bind::from(last)],
                    "stream counter",
                );
                last
            }
            None => take_counter_values(tx, "events_stream", written.len()).await?,
        };
        let first = last + 1 - written.len() as i64;
        let mut rows = Vec::with_capacity(written.len());
        for (offset, &index) in written.iter().enumerate() {
            let event = events[index];
            let stream = first + offset as i64;
            let room = rooms
                .get_mut(event.room_id.as_str())
                .ok_or_else(|| StorageError::Corrupt("written event without a room".into()))?;
            // A state event's group is numbered by its stream position (unique, increasing).
            if event.changes_state() {
                self.write_state_group(tx, event, stream, room.state_group)
                    .await?;
                room.state_group = Some(stream);
            }
            outcomes[index] = Ok(PersistedEvent {
                stream_ordering: stream,
                state_group: room.state_group,
            });
            rows.push((event, stream, room.state_group));
        }
        push_event_rows(&mut writes, &rows);
        push_new_extremities(&mut writes, &written_events);
        for &(event, stream, _) in &rows {
            push_membership(&mut writes, event, stream);
        }
        let state_rooms: Vec<(&str, &RoomCursor)> = state_rooms
            .into_iter()
            .filter_map(|room_id| Some((room_id, rooms.get(room_id)?)))
            .collect();
        push_room_updates(&mut writes, &state_rooms);
        writes.flush_last(tx).await?;
        Ok(outcomes)
    }
}

#[async_trait]
impl RoomRepo for SqlStore {
    async fn create_room(&self, room: &NewRoom) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "INSERT INTO rooms (room_id, room_version, creator, is_public, state_group, max_depth, write_version, created_at) VALUES (?, ?, ?, ?, NULL, 0, 0, ?)",
            |p, sql| {
                sqlx::query(sql)
                    .bind(&room.room_id)
                    .bind(&room.room_version)
                    .bind(&room.creator)
                    .bind(room.is_public)
                    .bind(room.created_at)
                    .execute(p)
                    .await
                    .map_err(|e| StorageError::conflict_or(e, &room.room_id))?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn set_room_published(&self, room_id: &str, published: bool) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "UPDATE rooms SET is_public = ? WHERE room_id = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(published)
                    .bind(room_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn published_rooms(&self) -> Result<Vec<(String, i64)>> {
        let rows: Vec<(Text, i64)> = on_pool!(
            self.db.fresh(),
            "SELECT r.room_id, COUNT(m.user_id) AS joined FROM rooms r \
             LEFT JOIN room_memberships m ON m.room_id = r.room_id AND m.membership = 'join' \
             WHERE r.is_public = ? GROUP BY r.room_id ORDER BY joined DESC, r.room_id",
            |p, sql| { sqlx::query_as(sql).bind(true).fetch_all(p).await? }
        );
        Ok(rows
            .into_iter()
            .map(|(room_id, joined)| (room_id.into(), joined))
            .collect())
    }

    async fn get_room(&self, room_id: &str) -> Result<Option<RoomRecord>> {
        let pool = self.db.fresh();
        let row: Option<(Text, Text, Text, bool, Option<i64>, i64, i64)> = on_pool!(
            pool,
            "SELECT room_id, room_version, creator, is_public, state_group, max_depth, write_version FROM rooms WHERE room_id = ?",
            |p, sql| { sqlx::query_as(sql).bind(room_id).fetch_optional(p).await? }
        );
        let Some((
            room_id,
            room_version,
            creator,
            is_public,
            state_group,
            max_depth,
            write_version,
        )) = row
        else {
            return Ok(None);
        };
        let (room_id, room_version, creator) = (room_id.0, room_version.0, creator.0);
        let extremities: Vec<Text> = on_pool!(
            pool,
            "SELECT event_id FROM room_forward_extremities WHERE room_id = ?",
            |p, sql| { sqlx::query_scalar(sql).bind(&room_id).fetch_all(p).await? }
        );
        let mut forward_extremities: Vec<String> =
            extremities.into_iter().map(String::from).collect();
        forward_extremities.sort();
        Ok(Some(RoomRecord {
            room_id,
            room_version,
            creator,
            is_public,
            state_group,
            max_depth,
            write_version,
            forward_extremities,
        }))
    }

    async fn lock_room_writes(&self, room_id: &str) -> Result<RoomWriteLock> {
        RoomWriteLock::acquire(&self.db, room_id).await
    }

    #[tracing::instrument(skip_all, fields(room_id = %event.room_id, event_id = %event.event_id))]
    async fn persist_event_locked(
        &self,
        event: &NewEvent,
        lock: Option<RoomWriteLock>,
    ) -> Result<PersistedEvent> {
        let (mut tx, locked) = match lock.and_then(|lock| lock.held) {
            Some(held) => (
                held.tx,
                Some(HashMap::from([(event.room_id.clone(), held.room)])),
            ),
            None => (self.db.begin().await?, None),
        };
        let reads = batch_reads(
            &mut tx,
            &[&event.room_id],
            locked,
            &[event],
            ExtremityCheck::Read,
        )
        .await?;
        let outcome = self
            .write_events(&mut tx, reads, &[event])
            .await?
            .pop()
            .ok_or_else(|| StorageError::Corrupt("no outcome for the event".into()))?;
        match outcome {
            Ok(persisted) => {
                tx.commit().await?;
                Ok(persisted)
            }
            Err(conflict) => {
                tx.rollback().await?;
                Err(conflict)
            }
        }
    }

    #[tracing::instrument(skip_all, fields(events = events.len()))]
    async fn persist_events_in_turn(
        &self,
        events: &[NewEvent],
        mut turn: LockTurn,
    ) -> Result<Vec<Result<PersistedEvent>>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut room_ids: Vec<&str> = events.iter().map(|e| e.room_id.as_str()).collect();
        room_ids.sort_unstable();
        room_ids.dedup();
        let events: Vec<&NewEvent> = events.iter().collect();
        let mut check = ExtremityCheck::OnWrite;
        // Before taking a connection: on SQLite the batch before needs the one writer.
        turn.wait().await;
        loop {
            let mut tx = self.db.begin_batch().await?;
            let reads = batch_reads(&mut tx, &room_ids, None, &events, check).await?;
            turn.locks_taken();
            let outcomes = match self.write_events(&mut tx, reads, &events).await {
                Err(StorageError::Conflict(what))
                    if what == UNREAD_EXTREMITIES_MOVED && check == ExtremityCheck::OnWrite =>
                {
                    // Rare: an event built on one that was never written. Again, reading
                    // them, so that only the events that do not extend them fail.
                    tx.rollback().await?;
                    check = ExtremityCheck::Read;
                    continue;
                }
                outcomes => outcomes?,
            };
            if outcomes.iter().any(Result::is_ok) {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            return Ok(outcomes);
        }
    }

    fn after_batch(&self, events: usize) {
        self.db.checkpoint_if_due(events)
    }

    async fn get_event(&self, event_id: &str) -> Result<Option<EventRecord>> {
        let query = format!("SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ?");
        let row: Option<EventRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql).bind(event_id).fetch_optional(p).await?
        });
        Ok(row.map(Into::into))
    }

    async fn get_events(&self, event_ids: &[String]) -> Result<Vec<EventRecord>> {
        // Bounded IN lists keep every backend within its parameter limits; the parts are read
        // at once, on as many connections.
        let chunks: Vec<_> = event_ids.chunks(200).collect();
        let mut parts = Vec::with_capacity(chunks.len());
        // A few parts at a time, so one large read leaves the pool to other requests.
        for wave in chunks.chunks(super::PARTS_AT_ONCE) {
            parts.extend(
                try_join_all(wave.iter().map(|&chunk| async move {
                    let query = format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE event_id IN ({})",
                        placeholders(chunk.len())
                    );
                    let rows: Vec<EventRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                        let mut q = sqlx::query_as(sql);
                        for id in chunk {
                            q = q.bind(id);
                        }
                        q.fetch_all(p).await?
                    });
                    Ok::<_, StorageError>(rows)
                }))
                .await?,
            );
        }
        Ok(parts.into_iter().flatten().map(EventRecord::from).collect())
    }

    async fn states_at_groups(&self, groups: &[i64]) -> Result<HashMap<i64, StateMap>> {
        let mut groups = groups.to_vec();
        groups.sort_unstable();
        groups.dedup();
        let mut out = HashMap::with_capacity(groups.len());
        // Each group's chain is at most `MAX_STATE_CHAIN` steps: bounded result per statement.
        for chunk in groups.chunks(100) {
            let query = state_chain_sql(chunk.len());
            let rows: Vec<(i64, i64, Text, Text, Text)> =
                on_pool!(self.db.fresh(), &query, |p, sql| {
                    let mut q = sqlx::query_as(sql);
                    for group in chunk {
                        q = q.bind(group);
                    }
                    q.fetch_all(p).await?
                });
            out.extend(merge_chains(rows));
        }
        Ok(out)
    }

    async fn current_state(&self, room_id: &str) -> Result<StateMap> {
        let rows: Vec<(Text, Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT event_type, state_key, event_id FROM room_current_state WHERE room_id = ?",
            |p, sql| { sqlx::query_as(sql).bind(room_id).fetch_all(p).await? }
        );
        Ok(rows
            .into_iter()
            .map(|(t, k, id)| ((t.0, k.0), id.0))
            .collect())
    }

    async fn current_state_entries(
        &self,
        room_id: &str,
        keys: &[(String, String)],
    ) -> Result<StateMap> {
        if keys.is_empty() {
            return Ok(StateMap::new());
        }
        let pairs = vec!["(event_type = ? AND state_key = ?)"; keys.len()].join(" OR ");
        let query = format!(
            "SELECT event_type, state_key, event_id FROM room_current_state \
             WHERE room_id = ? AND ({pairs})"
        );
        let rows: Vec<(Text, Text, Text)> = on_pool!(self.db.fresh(), &query, |p, sql| {
            let mut q = sqlx::query_as(sql).bind(room_id);
            for (kind, key) in keys {
                q = q.bind(kind).bind(key);
            }
            q.fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .map(|(t, k, id)| ((t.0, k.0), id.0))
            .collect())
    }

    async fn room_events(
        &self,
        room_id: &str,
        from: i64,
        to: Option<i64>,
        dir: Direction,
        limit: i64,
    ) -> Result<Vec<EventRecord>> {
        let (cmp, to_cmp, order) = match dir {
            Direction::Forward => (">", "<", "ASC"),
            Direction::Backward => ("<", ">", "DESC"),
        };
        let to_clause = if to.is_some() {
            format!(" AND stream_ordering {to_cmp} ?")
        } else {
            String::new()
        };
        let query = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = ? AND stream_ordering {cmp} ?{to_clause} \
             AND outlier = ? AND soft_failed = ? AND rejected_reason IS NULL \
             ORDER BY stream_ordering {order} LIMIT ?"
        );
        let rows: Vec<EventRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            let mut q = sqlx::query_as(sql).bind(room_id).bind(from);
            if let Some(to) = to {
                q = q.bind(to);
            }
            q.bind(false).bind(false).bind(limit).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn latest_events_in(
        &self,
        room_ids: &[String],
        before: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>> {
        let per_room = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = ? AND stream_ordering < ? \
             AND outlier = ? AND soft_failed = ? AND rejected_reason IS NULL \
             ORDER BY stream_ordering DESC LIMIT ?"
        );
        let per_room = &per_room;
        let chunks: Vec<_> = room_ids.chunks(ROOMS_PER_UNION).collect();
        let mut parts = Vec::with_capacity(chunks.len());
        // A few parts at a time, so one large read leaves the pool to other requests.
        for wave in chunks.chunks(super::PARTS_AT_ONCE) {
            parts.extend(
                try_join_all(wave.iter().map(|&chunk| async move {
                    let query = per_room_union(chunk.len(), per_room);
                    let rows: Vec<EventRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                        let mut q = sqlx::query_as(sql);
                        for room_id in chunk {
                            q = q
                                .bind(room_id)
                                .bind(before)
                                .bind(false)
                                .bind(false)
                                .bind(limit);
                        }
                        q.fetch_all(p).await?
                    });
                    Ok::<_, StorageError>(rows)
                }))
                .await?,
            );
        }
        let mut events: Vec<EventRecord> = parts.into_iter().flatten().map(Into::into).collect();
        // A union promises no order: one room after the other, newest first.
        events.sort_by(|a, b| {
            a.room_id
                .cmp(&b.room_id)
                .then(b.stream_ordering.cmp(&a.stream_ordering))
        });
        Ok(events)
    }

    async fn max_stream_ordering(&self) -> Result<i64> {
        Ok(on_pool!(
            self.db.fresh(),
            "SELECT counter_value FROM id_counters WHERE name = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind("events_stream")
                    .fetch_one(p)
                    .await?
            }
        ))
    }

    async fn event_near_ts(
        &self,
        room_id: &str,
        ts: i64,
        dir: Direction,
    ) -> Result<Option<EventRecord>> {
        let (cmp, order) = match dir {
            Direction::Forward => (">=", "ASC"),
            Direction::Backward => ("<=", "DESC"),
        };
        let query = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = ? AND origin_server_ts {cmp} ? \
             AND stream_ordering IS NOT NULL AND outlier = ? AND soft_failed = ? AND rejected_reason IS NULL \
             ORDER BY origin_server_ts {order}, stream_ordering {order} LIMIT 1"
        );
        let row: Option<EventRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(room_id)
                .bind(ts)
                .bind(false)
                .bind(false)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(Into::into))
    }

    async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<MembershipRecord>> {
        let query = format!(
            "SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE room_id = ? AND user_id = ?"
        );
        let row: Option<MembershipRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql)
                .bind(room_id)
                .bind(user_id)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(Into::into))
    }

    async fn room_members(
        &self,
        room_id: &str,
        membership: Option<&str>,
    ) -> Result<Vec<MembershipRecord>> {
        let filter = if membership.is_some() {
            " AND membership = ?"
        } else {
            ""
        };
        let query =
            format!("SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE room_id = ?{filter}");
        let rows: Vec<MembershipRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            let mut q = sqlx::query_as(sql).bind(room_id);
            if let Some(membership) = membership {
                q = q.bind(membership);
            }
            q.fetch_all(p).await?
        });
        // Sorted here, bytewise, so the order does not depend on a backend's collation.
        let mut members: Vec<MembershipRecord> = rows.into_iter().map(Into::into).collect();
        members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(members)
    }

    async fn members_of_rooms(&self, room_ids: &[String]) -> Result<Vec<MembershipRecord>> {
        let mut members = Vec::new();
        for chunk in room_ids.chunks(200) {
            let query = format!(
                "SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE room_id IN ({})",
                placeholders(chunk.len())
            );
            let rows: Vec<MembershipRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql);
                for room_id in chunk {
                    q = q.bind(room_id);
                }
                q.fetch_all(p).await?
            });
            members.extend(rows.into_iter().map(MembershipRecord::from));
        }
        // Sorted here, bytewise, so the order does not depend on a backend's collation.
        members.sort_by(|a, b| (&a.room_id, &a.user_id).cmp(&(&b.room_id, &b.user_id)));
        Ok(members)
    }

    async fn room_versions(&self, room_ids: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::with_capacity(room_ids.len());
        for chunk in room_ids.chunks(200) {
            let query = format!(
                "SELECT room_id, room_version FROM rooms WHERE room_id IN ({})",
                placeholders(chunk.len())
            );
            let rows: Vec<(Text, Text)> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql);
                for room_id in chunk {
                    q = q.bind(room_id);
                }
                q.fetch_all(p).await?
            });
            out.extend(rows.into_iter().map(|(room, version)| (room.0, version.0)));
        }
        Ok(out)
    }

    async fn rooms_for_user(&self, user_id: &str, membership: &str) -> Result<Vec<String>> {
        let rooms: Vec<Text> = on_pool!(
            self.db.fresh(),
            "SELECT room_id FROM room_memberships WHERE user_id = ? AND membership = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(user_id)
                    .bind(membership)
                    .fetch_all(p)
                    .await?
            }
        );
        let mut rooms: Vec<String> = rooms.into_iter().map(String::from).collect();
        rooms.sort();
        Ok(rooms)
    }

    async fn forget_room(&self, room_id: &str, user_id: &str) -> Result<bool> {
        let affected = on_pool!(
            self.db.primary(),
            "UPDATE room_memberships SET forgotten = ? WHERE room_id = ? AND user_id = ? AND membership IN ('leave', 'ban')",
            |p, sql| {
                sqlx::query(sql)
                    .bind(true)
                    .bind(room_id)
                    .bind(user_id)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(affected > 0)
    }

    async fn txn_event(&self, txn: &TxnKey) -> Result<Option<String>> {
        let id: Option<Text> = on_pool!(
            self.db.fresh(),
            "SELECT event_id FROM event_transactions WHERE user_id = ? AND device_id = ? AND txn_id = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(&txn.user_id)
                    .bind(&txn.device_id)
                    .bind(&txn.txn_id)
                    .fetch_optional(p)
                    .await?
            }
        );
        Ok(id.map(String::from))
    }

    async fn memberships_of_user(&self, user_id: &str) -> Result<Vec<MembershipRecord>> {
        let query = format!("SELECT {MEMBERSHIP_COLUMNS} FROM room_memberships WHERE user_id = ?");
        let rows: Vec<MembershipRow> = on_pool!(self.db.fresh(), &query, |p, sql| {
            sqlx::query_as(sql).bind(user_id).fetch_all(p).await?
        });
        let mut memberships: Vec<MembershipRecord> = rows.into_iter().map(Into::into).collect();
        memberships.sort_by(|a, b| a.room_id.cmp(&b.room_id));
        Ok(memberships)
    }

    async fn rooms_changed_between(&self, after: i64, up_to: i64) -> Result<Vec<String>> {
        let rooms: Vec<Text> = on_pool!(
            self.db.fresh(),
            "SELECT DISTINCT room_id FROM events WHERE stream_ordering > ? AND stream_ordering <= ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(after)
                    .bind(up_to)
                    .fetch_all(p)
                    .await?
            }
        );
        Ok(rooms.into_iter().map(String::from).collect())
    }

    async fn timeline_between(
        &self,
        room_ids: &[String],
        after: i64,
        up_to: i64,
    ) -> Result<Vec<(EventRecord, Option<String>)>> {
        let mut events = Vec::new();
        for chunk in room_ids.chunks(ROOMS_PER_RANGE_READ) {
            let sql = format!(
                "SELECT {EVENT_COLUMNS}, thread_id FROM events \
                 WHERE stream_ordering > ? AND stream_ordering <= ? AND room_id IN ({}) \
                 AND outlier = ? AND soft_failed = ? AND rejected_reason IS NULL",
                placeholders(chunk.len())
            );
            let rows: Vec<ThreadEventRow> = on_pool!(self.db.fresh(), &sql, |p, sql| {
                let mut q = sqlx::query_as(sql).bind(after).bind(up_to);
                for room_id in chunk {
                    q = q.bind(room_id);
                }
                q.bind(false).bind(false).fetch_all(p).await?
            });
            events.extend(rows.into_iter().map(ThreadEventRow::into_pair));
        }
        events.sort_by_key(|(event, _)| event.stream_ordering);
        Ok(events)
    }

    async fn stream_range(
        &self,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<(EventRecord, Option<String>)>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, thread_id FROM events \
             WHERE stream_ordering > ? AND stream_ordering <= ? \
             AND outlier = ? AND soft_failed = ? AND rejected_reason IS NULL \
             ORDER BY stream_ordering LIMIT ?"
        );
        let rows: Vec<ThreadEventRow> = on_pool!(self.db.fresh(), &sql, |p, sql| {
            sqlx::query_as(sql)
                .bind(after)
                .bind(up_to)
                .bind(false)
                .bind(false)
                .bind(limit)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(ThreadEventRow::into_pair).collect())
    }

    async fn latest_positions(&self, room_ids: &[String]) -> Result<Vec<(String, i64)>> {
        let mut out = Vec::with_capacity(room_ids.len());
        for chunk in room_ids.chunks(200) {
            let query = format!(
                "SELECT room_id, MAX(stream_ordering) FROM events WHERE room_id IN ({}) \
                 AND stream_ordering IS NOT NULL GROUP BY room_id",
                placeholders(chunk.len())
            );
            let rows: Vec<(Text, Option<i64>)> = on_pool!(self.db.fresh(), &query, |p, sql| {
                let mut q = sqlx::query_as(sql);
                for id in chunk {
                    q = q.bind(id);
                }
                q.fetch_all(p).await?
            });
            out.extend(
                rows.into_iter()
                    .filter_map(|(room, pos)| Some((room.0, pos?))),
            );
        }
        Ok(out)
    }

    async fn thread_of_event(&self, event_id: &str) -> Result<Option<String>> {
        let thread: Option<Option<Text>> = on_pool!(
            self.db.fresh(),
            "SELECT thread_id FROM events WHERE event_id = ?",
            |p, sql| {
                sqlx::query_scalar(sql)
                    .bind(event_id)
                    .fetch_optional(p)
                    .await?
            }
        );
        Ok(thread.flatten().map(Into::into))
    }
}

#[async_trait]
impl AliasRepo for SqlStore {
    async fn create_alias(&self, alias: &AliasRecord) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "INSERT INTO room_aliases (room_alias, room_id, creator, created_at) VALUES (?, ?, ?, ?)",
            |p, sql| {
                sqlx::query(sql)
                    .bind(&alias.room_alias)
                    .bind(&alias.room_id)
                    .bind(&alias.creator)
                    .bind(palpo_core::now_millis())
                    .execute(p)
                    .await
                    .map_err(|e| StorageError::conflict_or(e, &alias.room_alias))?
                    .rows_affected()
            }
        );
        Ok(())
    }

    async fn get_alias(&self, room_alias: &str) -> Result<Option<AliasRecord>> {
        let row: Option<(Text, Text, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT room_alias, room_id, creator FROM room_aliases WHERE room_alias = ?",
            |p, sql| {
                sqlx::query_as(sql)
                    .bind(room_alias)
                    .fetch_optional(p)
                    .await?
            }
        );
        Ok(row.map(|(room_alias, room_id, creator)| AliasRecord {
            room_alias: room_alias.0,
            room_id: room_id.0,
            creator: creator.0,
        }))
    }

    async fn delete_alias(&self, room_alias: &str) -> Result<bool> {
        let affected = on_pool!(
            self.db.primary(),
            "DELETE FROM room_aliases WHERE room_alias = ?",
            |p, sql| {
                sqlx::query(sql)
                    .bind(room_alias)
                    .execute(p)
                    .await?
                    .rows_affected()
            }
        );
        Ok(affected > 0)
    }

    async fn aliases_of_room(&self, room_id: &str) -> Result<Vec<String>> {
        let aliases: Vec<Text> = on_pool!(
            self.db.fresh(),
            "SELECT room_alias FROM room_aliases WHERE room_id = ?",
            |p, sql| { sqlx::query_scalar(sql).bind(room_id).fetch_all(p).await? }
        );
        let mut aliases: Vec<String> = aliases.into_iter().map(String::from).collect();
        aliases.sort();
        Ok(aliases)
    }
}

/// SQL for the text at `content.<field>` of a stored PDU (`pdu`, a column of JSON text):
/// each dialect reads JSON its own way. A text search of the JSON could also match the
/// field nested elsewhere in the event.
fn pdu_content_text(backend: Backend, pdu: &str, field: &str) -> String {
    match backend {
        Backend::Postgres => format!("(({pdu})::jsonb -> 'content' ->> '{field}')"),
        Backend::MySql => format!("JSON_UNQUOTE(JSON_EXTRACT({pdu}, '$.content.{field}'))"),
        Backend::Sqlite => format!("json_extract({pdu}, '$.content.{field}')"),
    }
}

#[async_trait]
impl ProfileRepo for SqlStore {
    async fn get_profile(&self, user_id: &str) -> Result<Option<ProfileRecord>> {
        let row: Option<(Option<Text>, Option<Text>, Text)> = on_pool!(
            self.db.fresh(),
            "SELECT displayname, avatar_url, fields FROM profiles WHERE user_id = ?",
            |p, sql| { sqlx::query_as(sql).bind(user_id).fetch_optional(p).await? }
        );
        Ok(row.map(|(displayname, avatar_url, fields)| ProfileRecord {
            displayname: displayname.map(String::from),
            avatar_url: avatar_url.map(String::from),
            fields: fields.0,
        }))
    }

    async fn set_profile(&self, user_id: &str, profile: &ProfileRecord) -> Result<()> {
        let mut tx = self.db.begin().await?;
        on_tx!(
            &mut tx,
            "DELETE FROM profiles WHERE user_id = ?",
            |c, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        on_tx!(
            &mut tx,
            "INSERT INTO profiles (user_id, displayname, avatar_url, fields) VALUES (?, ?, ?, ?)",
            |c, sql| {
                sqlx::query(sql)
                    .bind(user_id)
                    .bind(&profile.displayname)
                    .bind(&profile.avatar_url)
                    .bind(&profile.fields)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            }
        );
        tx.commit().await?;
        Ok(())
    }

    async fn search_user_directory(
        &self,
        searcher: &str,
        term: &str,
        limit: i64,
    ) -> Result<Vec<DirectoryUser>> {
        // `!` escapes LIKE's wildcards in the term: a backslash means different things in
        // MySQL's string literals and the others'. The term is lowercased by the database,
        // as the columns are, so that both sides fold case alike.
        let mut escaped = String::with_capacity(term.len() + 2);
        for c in term.chars() {
            if matches!(c, '!' | '%' | '_') {
                escaped.push('!');
            }
            escaped.push(c);
        }
        let pattern = format!("%{escaped}%");
        // Rooms whose members anyone may see: published in the directory, or whose current
        // join rule is public or history world-readable.
        let backend = self.db.backend();
        let join_rule = pdu_content_text(backend, "e.pdu_json", "join_rule");
        let visibility = pdu_content_text(backend, "e.pdu_json", "history_visibility");
        let query = format!(
            "SELECT found.user_id, p.displayname, p.avatar_url FROM ( \
                SELECT theirs.user_id FROM room_memberships mine \
                JOIN room_memberships theirs ON theirs.room_id = mine.room_id \
                WHERE mine.user_id = ? AND mine.membership = 'join' AND theirs.membership = 'join' \
                UNION \
                SELECT m.user_id FROM room_memberships m JOIN rooms r ON r.room_id = m.room_id \
                WHERE r.is_public = ? AND m.membership = 'join' \
                UNION \
                SELECT m.user_id FROM room_current_state cs \
                JOIN events e ON e.event_id = cs.event_id \
                JOIN room_memberships m ON m.room_id = cs.room_id AND m.membership = 'join' \
                WHERE cs.state_key = '' AND ( \
                    (cs.event_type = 'm.room.join_rules' AND {join_rule} = 'public') \
                    OR (cs.event_type = 'm.room.history_visibility' \
                        AND {visibility} = 'world_readable')) \
             ) found \
             LEFT JOIN profiles p ON p.user_id = found.user_id \
             LEFT JOIN users u ON u.user_id = found.user_id \
             WHERE (u.is_deactivated IS NULL OR u.is_deactivated = ?) \
             AND (LOWER(found.user_id) LIKE LOWER(?) ESCAPE '!' \
                  OR LOWER(p.displayname) LIKE LOWER(?) ESCAPE '!') \
             ORDER BY found.user_id LIMIT ?"
        );
        let rows: Vec<(Text, Option<Text>, Option<Text>)> =
            on_pool!(self.db.fresh(), &query, |p, sql| {
                sqlx::query_as(sql)
                    .bind(searcher)
                    .bind(true)
                    .bind(false)
                    .bind(&pattern)
                    .bind(&pattern)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            });
        Ok(rows
            .into_iter()
            .map(|(user_id, displayname, avatar_url)| DirectoryUser {
                user_id: user_id.into(),
                displayname: displayname.map(String::from),
                avatar_url: avatar_url.map(String::from),
            })
            .collect())
    }
}

#[async_trait]
impl KeyRepo for SqlStore {
    async fn own_signing_keys(&self, server_name: &str) -> Result<Vec<SigningKeyRecord>> {
        let rows: Vec<(Text, Text, Text, Option<Text>, i64, Option<i64>, i64)> = on_pool!(
            self.db.fresh(),
            "SELECT server_name, key_id, public_key, private_key, valid_until_ts, expired_ts, created_at FROM server_signing_keys WHERE server_name = ? AND private_key IS NOT NULL ORDER BY created_at, key_id",
            |p, sql| { sqlx::query_as(sql).bind(server_name).fetch_all(p).await? }
        );
        Ok(rows
            .into_iter()
            .map(
                |(
                    server_name,
                    key_id,
                    public_key,
                    private_key,
                    valid_until_ts,
                    expired_ts,
                    created_at,
                )| {
                    SigningKeyRecord {
                        server_name: server_name.0,
                        key_id: key_id.0,
                        public_key: public_key.0,
                        private_key: private_key.map(String::from),
                        valid_until_ts,
                        expired_ts,
                        created_at,
                    }
                },
            )
            .collect())
    }

    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<()> {
        on_pool!(
            self.db.primary(),
            "INSERT INTO server_signing_keys (server_name, key_id, public_key, private_key, valid_until_ts, expired_ts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            |p, sql| {
                sqlx::query(sql)
                    .bind(&key.server_name)
                    .bind(&key.key_id)
                    .bind(&key.public_key)
                    .bind(&key.private_key)
                    .bind(key.valid_until_ts)
                    .bind(key.expired_ts)
                    .bind(key.created_at)
                    .execute(p)
                    .await
                    .map_err(|e| StorageError::conflict_or(e, &key.key_id))?
                    .rows_affected()
            }
        );
        Ok(())
    }
}
