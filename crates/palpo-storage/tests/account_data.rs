//! Conformance of `AccountDataRepo` (filters and account data) on every backend, with and
//! without the Redis cache in front of the other repositories. Each scenario becomes one test
//! per backend and cache mode, named `<scenario>::<backend>[_cached]`.

use palpo_storage::Storage;

palpo_storage::conformance!(cached:
    filters,
    concurrent_filter_uploads_get_distinct_ids,
    account_data_round_trips,
    account_data_positions_follow_the_event_stream,
    account_data_since_reads_a_range,
    replace_writes_only_over_what_was_read,
    concurrent_read_modify_writes_lose_nothing,
);

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const ROOM: &str = "!room:example.org";

async fn filters(storage: Storage) {
    let repo = &storage.account_data;
    assert_eq!(repo.get_filter(ALICE, "0").await.expect("get"), None);
    let first = repo
        .create_filter(ALICE, r#"{"room":{"timeline":{"limit":3}}}"#, 1)
        .await
        .expect("create");
    let second = repo
        .create_filter(ALICE, r#"{"presence":{"not_types":["*"]}}"#, 2)
        .await
        .expect("create");
    assert_ne!(first, second);
    assert!(!first.starts_with('{') && !second.starts_with('{'));
    // Ids are per user: Bob's first filter may have Alice's id, and is another filter.
    let bobs = repo.create_filter(BOB, "{}", 3).await.expect("create");
    assert_eq!(bobs, first);
    assert_eq!(
        repo.get_filter(ALICE, &first)
            .await
            .expect("get")
            .as_deref(),
        Some(r#"{"room":{"timeline":{"limit":3}}}"#)
    );
    assert_eq!(
        repo.get_filter(ALICE, &second)
            .await
            .expect("get")
            .as_deref(),
        Some(r#"{"presence":{"not_types":["*"]}}"#)
    );
    assert_eq!(
        repo.get_filter(BOB, &bobs).await.expect("get").as_deref(),
        Some("{}")
    );
    assert_eq!(repo.get_filter(BOB, &second).await.expect("get"), None);
    // Unicode and big filters survive.
    let big = format!(r#"{{"x":"{}","é":"ü🎉"}}"#, "a".repeat(100_000));
    let id = repo.create_filter(ALICE, &big, 4).await.expect("create");
    assert_eq!(repo.get_filter(ALICE, &id).await.expect("get"), Some(big));
}

async fn concurrent_filter_uploads_get_distinct_ids(storage: Storage) {
    let uploads = (0..8).map(|n| {
        let repo = storage.account_data.clone();
        async move {
            repo.create_filter(ALICE, &format!(r#"{{"n":{n}}}"#), n)
                .await
                .expect("create")
        }
    });
    let ids = futures::future::join_all(uploads).await;
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            storage
                .account_data
                .get_filter(ALICE, id)
                .await
                .expect("get"),
            Some(format!(r#"{{"n":{n}}}"#))
        );
    }
}

async fn account_data_round_trips(storage: Storage) {
    let repo = &storage.account_data;
    assert_eq!(
        repo.get_account_data(ALICE, None, "org.example.config")
            .await
            .expect("get"),
        None
    );
    let p1 = repo
        .put_account_data(ALICE, None, "org.example.config", r#"{"a":1}"#)
        .await
        .expect("put");
    let p2 = repo
        .put_account_data(ALICE, Some(ROOM), "org.example.config", r#"{"room":true}"#)
        .await
        .expect("put");
    assert!(p2 > p1, "{p1} then {p2}");
    let global = repo
        .get_account_data(ALICE, None, "org.example.config")
        .await
        .expect("get")
        .expect("global data");
    assert_eq!(global.content, r#"{"a":1}"#);
    assert_eq!(global.room_id, None);
    assert_eq!(global.user_id, ALICE);
    assert_eq!(global.stream_position, p1);
    let room = repo
        .get_account_data(ALICE, Some(ROOM), "org.example.config")
        .await
        .expect("get")
        .expect("room data");
    assert_eq!(room.content, r#"{"room":true}"#);
    assert_eq!(room.room_id.as_deref(), Some(ROOM));
    assert_eq!(room.stream_position, p2);

    // Replacing keeps one row, with the new content and a new position.
    let p3 = repo
        .put_account_data(ALICE, None, "org.example.config", r#"{"a":2,"ü":"🎉"}"#)
        .await
        .expect("put");
    assert!(p3 > p2);
    let global = repo
        .get_account_data(ALICE, None, "org.example.config")
        .await
        .expect("get")
        .expect("global data");
    assert_eq!(global.content, r#"{"a":2,"ü":"🎉"}"#);
    assert_eq!(global.stream_position, p3);
    let all = repo.account_data_since(ALICE, 0, p3).await.expect("since");
    assert_eq!(all.len(), 2, "{all:?}");

    // Other users, types differing only in case, and other rooms are separate.
    assert_eq!(
        repo.get_account_data(BOB, None, "org.example.config")
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        repo.get_account_data(ALICE, None, "org.example.CONFIG")
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        repo.get_account_data(ALICE, Some("!other:example.org"), "org.example.config")
            .await
            .expect("get"),
        None
    );
    // Big content (MEDIUMTEXT on MySQL).
    let big = format!(r#"{{"x":"{}"}}"#, "b".repeat(200_000));
    repo.put_account_data(ALICE, Some(ROOM), "m.tag", &big)
        .await
        .expect("put");
    assert_eq!(
        repo.get_account_data(ALICE, Some(ROOM), "m.tag")
            .await
            .expect("get")
            .map(|r| r.content),
        Some(big)
    );
}

async fn account_data_positions_follow_the_event_stream(storage: Storage) {
    let before = storage.rooms.max_stream_ordering().await.expect("max");
    let position = storage
        .account_data
        .put_account_data(ALICE, None, "org.example.config", "{}")
        .await
        .expect("put");
    assert_eq!(position, before + 1);
    assert_eq!(
        storage.rooms.max_stream_ordering().await.expect("max"),
        position,
        "the write moved the one global stream"
    );
    // Concurrent writes take distinct positions, all of them committed.
    let writes = (0..6).map(|n| {
        let repo = storage.account_data.clone();
        async move {
            repo.put_account_data(ALICE, None, &format!("org.example.{n}"), "{}")
                .await
                .expect("put")
        }
    });
    let mut positions = futures::future::join_all(writes).await;
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), 6, "{positions:?}");
    let max = storage.rooms.max_stream_ordering().await.expect("max");
    assert_eq!(positions.last(), Some(&max));
    let since = storage
        .account_data
        .account_data_since(ALICE, position, max)
        .await
        .expect("since");
    assert_eq!(
        since.iter().map(|r| r.stream_position).collect::<Vec<_>>(),
        positions
    );
}

async fn account_data_since_reads_a_range(storage: Storage) {
    let repo = &storage.account_data;
    let p1 = repo
        .put_account_data(ALICE, None, "a", r#"{"n":1}"#)
        .await
        .expect("put");
    let p2 = repo
        .put_account_data(ALICE, Some(ROOM), "b", r#"{"n":2}"#)
        .await
        .expect("put");
    let p3 = repo
        .put_account_data(BOB, None, "a", r#"{"n":3}"#)
        .await
        .expect("put");
    let p4 = repo
        .put_account_data(ALICE, None, "c", r#"{"n":4}"#)
        .await
        .expect("put");
    let types = |records: Vec<palpo_storage::model::AccountDataRecord>| {
        records
            .into_iter()
            .map(|r| (r.room_id, r.data_type, r.stream_position))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        types(repo.account_data_since(ALICE, 0, p4).await.expect("since")),
        [
            (None, "a".to_owned(), p1),
            (Some(ROOM.to_owned()), "b".to_owned(), p2),
            (None, "c".to_owned(), p4),
        ]
    );
    // (after, up_to]: the lower bound is exclusive, the upper inclusive.
    assert_eq!(
        types(repo.account_data_since(ALICE, p1, p2).await.expect("since")),
        [(Some(ROOM.to_owned()), "b".to_owned(), p2)]
    );
    assert_eq!(
        types(repo.account_data_since(ALICE, p2, p3).await.expect("since")),
        []
    );
    assert_eq!(
        types(repo.account_data_since(BOB, 0, p4).await.expect("since")),
        [(None, "a".to_owned(), p3)]
    );
    // Rewriting moves a row forward: it is read once, at its new position.
    let p5 = repo
        .put_account_data(ALICE, None, "a", r#"{"n":5}"#)
        .await
        .expect("put");
    let changed = repo.account_data_since(ALICE, p4, p5).await.expect("since");
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].content, r#"{"n":5}"#);
    assert_eq!(
        types(repo.account_data_since(ALICE, 0, p5).await.expect("since")),
        [
            (Some(ROOM.to_owned()), "b".to_owned(), p2),
            (None, "c".to_owned(), p4),
            (None, "a".to_owned(), p5),
        ]
    );
}

async fn replace_writes_only_over_what_was_read(storage: Storage) {
    let repo = &storage.account_data;
    let content = async |room_id| {
        repo.get_account_data(ALICE, room_id, "m.tag")
            .await
            .expect("get")
            .map(|record| (record.content, record.stream_position))
    };
    // Read as missing: written only while there is none.
    let first = repo
        .replace_account_data(ALICE, Some(ROOM), "m.tag", r#"{"n":1}"#, None)
        .await
        .expect("replace")
        .expect("nothing was stored");
    assert_eq!(
        content(Some(ROOM)).await,
        Some((r#"{"n":1}"#.into(), first))
    );
    let refused = repo
        .replace_account_data(ALICE, Some(ROOM), "m.tag", r#"{"n":0}"#, None)
        .await
        .expect("replace");
    assert_eq!(refused, None, "another write came first");
    assert_eq!(
        content(Some(ROOM)).await,
        Some((r#"{"n":1}"#.into(), first))
    );

    // Read at a position: written only while that write is the stored one.
    let second = repo
        .replace_account_data(ALICE, Some(ROOM), "m.tag", r#"{"n":2}"#, Some(first))
        .await
        .expect("replace")
        .expect("still the one read");
    assert!(second > first);
    let stale = repo
        .replace_account_data(ALICE, Some(ROOM), "m.tag", r#"{"n":0}"#, Some(first))
        .await
        .expect("replace");
    assert_eq!(stale, None, "overtaken");
    assert_eq!(
        content(Some(ROOM)).await,
        Some((r#"{"n":2}"#.into(), second))
    );
    // A refused write took no position: the stream is where the last write left it.
    assert_eq!(
        storage.rooms.max_stream_ordering().await.expect("max"),
        second
    );

    // Another room's, another user's and global data are other pieces.
    assert_eq!(content(None).await, None);
    let global = repo
        .replace_account_data(ALICE, None, "m.tag", "{}", None)
        .await
        .expect("replace");
    assert!(global.is_some());
    let bobs = repo
        .replace_account_data(BOB, Some(ROOM), "m.tag", "{}", None)
        .await
        .expect("replace");
    assert!(bobs.is_some());
    assert_eq!(
        content(Some(ROOM)).await,
        Some((r#"{"n":2}"#.into(), second))
    );
}

/// Writers each adding their own key to one JSON object, all at once, the way tag and push
/// rule changes do (read, change, replace, again when overtaken): every key is kept.
async fn concurrent_read_modify_writes_lose_nothing(storage: Storage) {
    const WRITERS: usize = 6;
    let writers = (0..WRITERS).map(|n| {
        let repo = storage.account_data.clone();
        async move {
            for _ in 0..100 {
                let record = repo
                    .get_account_data(ALICE, Some(ROOM), "m.tag")
                    .await
                    .expect("get");
                let read_at = record.as_ref().map(|r| r.stream_position);
                let mut object: serde_json::Map<String, serde_json::Value> = record
                    .map(|r| serde_json::from_str(&r.content).expect("stored JSON"))
                    .unwrap_or_default();
                object.insert(format!("w{n}"), serde_json::Value::from(n));
                let content = serde_json::Value::Object(object).to_string();
                let written = repo
                    .replace_account_data(ALICE, Some(ROOM), "m.tag", &content, read_at)
                    .await
                    .expect("replace");
                if written.is_some() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("writer {n} overtaken 100 times");
        }
    });
    futures::future::join_all(writers).await;
    let stored = storage
        .account_data
        .get_account_data(ALICE, Some(ROOM), "m.tag")
        .await
        .expect("get")
        .expect("written");
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&stored.content).expect("JSON");
    let mut keys: Vec<&String> = object.keys().collect();
    keys.sort();
    let expected: Vec<String> = (0..WRITERS).map(|n| format!("w{n}")).collect();
    assert_eq!(keys, expected.iter().collect::<Vec<_>>());
}
