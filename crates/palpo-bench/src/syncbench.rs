//! The sync phase: initial sync of an account with many rooms and events, and incremental
//! sync after one new event, compared with the same on a tiny account.

use std::time::Instant;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt, stream};
use serde_json::json;

use crate::matrix::{Homeserver, User};
use crate::stats::{Figures, median};
use crate::{Args, load};

/// Creates `rooms` rooms for `user` with `events` messages each; returns the room ids.
async fn populate(
    hs: &Homeserver,
    user: &User,
    rooms: usize,
    events: usize,
    parallel: usize,
    tag: &str,
) -> Result<Vec<String>> {
    let room_ids: Vec<String> = stream::iter(0..rooms)
        .map(|r| {
            let (hs, user) = (hs.clone(), user.clone());
            let name = format!("{tag} {r}");
            async move { hs.create_room(&user, &name).await }
        })
        .buffered(parallel)
        .try_collect()
        .await?;
    let sends: Vec<(usize, usize)> = (0..events)
        .flat_map(|e| (0..rooms).map(move |r| (r, e)))
        .collect();
    stream::iter(sends)
        .map(|(r, e)| {
            let (hs, user, room) = (hs.clone(), user.clone(), room_ids[r].clone());
            let txn = format!("{tag}-{r}-{e}");
            async move {
                let content =
                    json!({ "msgtype": "m.text", "body": format!("history {e} in room {r}") });
                match hs.send(&user, &room, &txn, &content).await? {
                    (200, _) => Ok(()),
                    (status, v) => Err(anyhow::anyhow!("send: HTTP {status}: {v}")),
                }
            }
        })
        .buffer_unordered(parallel)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(room_ids)
}

/// Times `repeats` initial syncs and `repeats` incremental syncs (one new event each).
async fn measure(
    hs: &Homeserver,
    user: &User,
    room: &str,
    repeats: usize,
    tag: &str,
    f: &mut Figures,
    prefix: &str,
) -> Result<()> {
    let mut initial = Vec::new();
    let mut bytes = 0usize;
    let mut next_batch = String::new();
    for _ in 0..repeats {
        let t = Instant::now();
        let v = hs.sync(user, None, 0, None).await?;
        initial.push(t.elapsed().as_secs_f64() * 1e3);
        bytes = v.to_string().len();
        next_batch = v["next_batch"]
            .as_str()
            .context("sync without next_batch")?
            .to_owned();
    }
    let mut incremental = Vec::new();
    for i in 0..repeats {
        let content = json!({ "msgtype": "m.text", "body": "one more" });
        hs.send(user, room, &format!("{tag}-inc-{i}"), &content)
            .await?;
        let t = Instant::now();
        let v = hs.sync(user, Some(&next_batch), 0, None).await?;
        incremental.push(t.elapsed().as_secs_f64() * 1e3);
        next_batch = v["next_batch"]
            .as_str()
            .context("sync without next_batch")?
            .to_owned();
    }
    f.set(format!("{prefix}.initial_first_ms"), initial[0]);
    f.set_opt(format!("{prefix}.initial_median_ms"), median(&initial));
    f.set(format!("{prefix}.initial_kb"), bytes as f64 / 1024.0);
    f.set_opt(
        format!("{prefix}.incremental_median_ms"),
        median(&incremental),
    );
    Ok(())
}

pub async fn run(hs: &Homeserver, args: &Args, run_id: &str) -> Result<Figures> {
    let mut f = Figures::default();
    let parallel = args.senders.max(1);
    let users = load::register_users(hs, &format!("sync{run_id}"), 2, 2).await?;
    let (big, small) = (&users[0], &users[1]);
    let t = Instant::now();
    let big_rooms = populate(
        hs,
        big,
        args.sync_rooms,
        args.sync_events,
        parallel,
        &format!("s{run_id}"),
    )
    .await?;
    let populate_s = t.elapsed().as_secs_f64();
    f.set("sync.populate_s", populate_s);
    f.set(
        "sync.populate_events_per_s",
        (args.sync_rooms * args.sync_events) as f64 / populate_s,
    );
    let small_rooms = populate(hs, small, 1, 1, 1, &format!("t{run_id}")).await?;
    eprintln!(
        "sync: {} rooms x {} events written in {populate_s:.1}s",
        args.sync_rooms, args.sync_events
    );
    let repeats = args.sync_repeats.max(1);
    measure(
        hs,
        big,
        &big_rooms[0],
        repeats,
        &format!("b{run_id}"),
        &mut f,
        "sync.big",
    )
    .await?;
    measure(
        hs,
        small,
        &small_rooms[0],
        repeats,
        &format!("m{run_id}"),
        &mut f,
        "sync.small",
    )
    .await?;
    f.set("sync.rooms", args.sync_rooms as f64);
    f.set("sync.events_per_room", args.sync_events as f64);
    Ok(f)
}
