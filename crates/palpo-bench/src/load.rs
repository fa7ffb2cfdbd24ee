//! The load phase: users, rooms, concurrent senders and long-polling listeners.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use serde_json::json;

use crate::matrix::{Homeserver, User};
use crate::stats::Figures;
use crate::{Args, rss};

/// Most requests one sender makes, whatever the duration: keeps the loop bounded.
const MAX_SENDS_PER_SENDER: u64 = 1_000_000;
/// How long listeners keep polling after the senders stop, to see the last events.
const DRAIN: Duration = Duration::from_secs(3);
/// Errors kept verbatim for the report.
const KEEP_ERRORS: usize = 5;

/// Registers `count` users named `<prefix>_<i>`, `parallel` at a time.
pub async fn register_users(
    hs: &Homeserver,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> Result<Vec<User>> {
    stream::iter(0..count)
        .map(|i| {
            let hs = hs.clone();
            let name = format!("{prefix}_{i}");
            async move { hs.register(&name, "bench-password-1").await }
        })
        .buffered(parallel.max(1))
        .try_collect()
        .await
}

pub async fn run(hs: &Homeserver, args: &Args, run_id: &str) -> Result<Figures> {
    if args.users < 2 {
        bail!("--users must be at least 2 (senders and listeners are different users)");
    }
    let mut f = Figures::default();
    let setup = Instant::now();
    let users = register_users(
        hs,
        &format!("bench{run_id}"),
        args.users,
        args.senders.min(8),
    )
    .await?;
    f.set(
        "load.register_per_s",
        args.users as f64 / setup.elapsed().as_secs_f64(),
    );
    let t = Instant::now();
    let mut rooms = Vec::new();
    for r in 0..args.rooms {
        rooms.push(
            hs.create_room(&users[r % users.len()], &format!("bench {run_id} {r}"))
                .await?,
        );
    }
    let joins: Vec<(usize, usize)> = (0..users.len())
        .flat_map(|u| (0..rooms.len()).map(move |r| (u, r)))
        .filter(|(u, r)| r % users.len() != *u)
        .collect();
    let join_count = joins.len();
    stream::iter(joins)
        .map(|(u, r)| {
            let (hs, user, room) = (hs.clone(), users[u].clone(), rooms[r].clone());
            async move { hs.join(&user, &room).await }
        })
        .buffer_unordered(args.senders.clamp(1, 8))
        .try_collect::<Vec<()>>()
        .await?;
    f.set(
        "load.joins_per_s",
        join_count as f64 / t.elapsed().as_secs_f64().max(1e-9),
    );
    f.set("load.setup_s", setup.elapsed().as_secs_f64());
    eprintln!(
        "load: {} users, {} rooms, {} joins ready in {:.1}s",
        users.len(),
        rooms.len(),
        join_count,
        setup.elapsed().as_secs_f64()
    );

    // Listeners are the last users; senders cycle through the others.
    let listeners = args.listeners.clamp(1, users.len() - 1);
    let senders_pool: Vec<User> = users[..users.len() - listeners].to_vec();
    let listener_users: Vec<User> = users[users.len() - listeners..].to_vec();
    let filter = r#"{"room":{"timeline":{"limit":500}},"presence":{"not_types":["*"]}}"#;

    let t0 = Instant::now();
    let duration = Duration::from_secs_f64(args.seconds);
    let stop_listeners = Arc::new(AtomicBool::new(false));
    let delivery = Arc::new(Mutex::new(Vec::<f64>::new()));
    let listener_errors = Arc::new(AtomicU64::new(0));
    let listener_syncs = Arc::new(AtomicU64::new(0));

    // Each listener takes its position first, so it only sees events sent from now on.
    let mut listener_tasks = Vec::new();
    for user in listener_users {
        let since = hs.sync(&user, None, 0, Some(filter)).await?["next_batch"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (hs, stop, delivery, errors, syncs) = (
            hs.clone(),
            stop_listeners.clone(),
            delivery.clone(),
            listener_errors.clone(),
            listener_syncs.clone(),
        );
        let run_id = run_id.to_owned();
        listener_tasks.push(tokio::spawn(async move {
            let mut since = since;
            let hard_stop = t0 + duration + DRAIN + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                match hs.listener_sync(&user, &since, 1_000, filter).await {
                    Ok(answer) => {
                        syncs.fetch_add(1, Ordering::Relaxed);
                        let now = t0.elapsed().as_secs_f64() * 1e3;
                        let mut seen = Vec::new();
                        for ev in answer.timeline_events() {
                            let marks = &ev.content;
                            if marks.run() == Some(run_id.as_str())
                                && ev.sender.as_deref() != Some(user.user_id.as_str())
                                && let Some(sent_us) = marks.sent_us()
                            {
                                seen.push(now - sent_us as f64 / 1e3);
                            }
                        }
                        delivery
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(seen);
                        since = answer.next_batch;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }

    // RSS sampler.
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = args.server_pid.map(|pid| {
        let (peak, stop) = (peak_rss.clone(), stop_listeners.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = rss::vm_rss_kb(pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    let send_latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let error_samples = Arc::new(Mutex::new(Vec::<String>::new()));
    // CPU of the server and of this load generator over the sending phase.
    let server_pid = args.server_pid;
    let cpu_at_start = (
        server_pid.and_then(rss::cpu_time_us),
        rss::cpu_time_us(std::process::id()),
    );
    let start = Instant::now();
    let deadline = start + duration;
    // With --rate, each sender sends every `period`, its start offset so that sends interleave.
    let period =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.senders as f64 / args.rate));
    let mut sender_tasks = Vec::new();
    for s in 0..args.senders {
        let user = senders_pool[s % senders_pool.len()].clone();
        let room = rooms[s % rooms.len()].clone();
        let (hs, lat, sent, errors, samples) = (
            hs.clone(),
            send_latencies.clone(),
            sent.clone(),
            errors.clone(),
            error_samples.clone(),
        );
        let run_id = run_id.to_owned();
        let mut ticks = period.map(|period| {
            let offset = period.mul_f64(s as f64 / args.senders as f64);
            let mut ticks = tokio::time::interval_at((start + offset).into(), period);
            // A slow send delays the next one rather than causing a catch-up burst.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        sender_tasks.push(tokio::spawn(async move {
            let mut local = Vec::new();
            for n in 0..MAX_SENDS_PER_SENDER {
                if let Some(ticks) = &mut ticks {
                    ticks.tick().await;
                }
                if Instant::now() >= deadline {
                    break;
                }
                let content = json!({
                    "msgtype": "m.text",
                    "body": format!("bench message {n} from sender {s}"),
                    "bench_run": run_id,
                    "bench_t_us": t0.elapsed().as_micros() as u64,
                });
                let txn = format!("{run_id}-{s}-{n}");
                let t = Instant::now();
                match hs.send(&user, &room, &txn, &content).await {
                    Ok((200, _)) => {
                        local.push(t.elapsed().as_secs_f64() * 1e3);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let message = match other {
                            Ok((status, v)) => format!("HTTP {status}: {v}"),
                            Err(e) => format!("{e:#}"),
                        };
                        {
                            let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
                            if samples.len() < KEEP_ERRORS {
                                samples.push(message);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            lat.lock().unwrap_or_else(|e| e.into_inner()).extend(local);
        }));
    }
    for t in sender_tasks {
        t.await?;
    }
    let send_elapsed = start.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    let cpu_at_end = (
        server_pid.and_then(rss::cpu_time_us),
        rss::cpu_time_us(std::process::id()),
    );

    // Let listeners catch up with every event (bounded by DRAIN).
    let drain_deadline = Instant::now() + DRAIN;
    let expected = sent as usize * listeners;
    while Instant::now() < drain_deadline
        && delivery.lock().unwrap_or_else(|e| e.into_inner()).len() < expected
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_listeners.store(true, Ordering::Relaxed);
    for t in listener_tasks {
        t.await?;
    }
    if let Some(s) = sampler {
        s.await?;
    }

    let lat = send_latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let del = delivery.lock().unwrap_or_else(|e| e.into_inner()).clone();
    f.set("load.sent_events", sent as f64);
    f.set("load.sent_events_per_s", sent as f64 / send_elapsed);
    f.set_latencies("load.send", &lat, &[50.0, 95.0, 99.0]);
    f.set_latencies("load.delivery", &del, &[50.0, 99.0]);
    f.set(
        "load.delivered_fraction",
        if expected == 0 {
            0.0
        } else {
            del.len() as f64 / expected as f64
        },
    );
    f.set("load.send_errors", errors.load(Ordering::Relaxed) as f64);
    f.set(
        "load.sync_errors",
        listener_errors.load(Ordering::Relaxed) as f64,
    );
    // How often listeners were answered: under a flat-out load they share the cores with the
    // senders, so a cheaper sync means more syncs, not only more sends.
    f.set(
        "load.syncs_per_s",
        listener_syncs.load(Ordering::Relaxed) as f64 / send_elapsed,
    );
    // CPU per event sent (the listeners' syncs included) and cores used.
    if let (Some(before), Some(after)) = (cpu_at_start.0, cpu_at_end.0)
        && sent > 0
    {
        let used = after.saturating_sub(before) as f64;
        f.set("load.server_cpu_us_per_event", used / sent as f64);
        f.set("load.server_cores", used / 1e6 / send_elapsed);
    }
    if let (Some(before), Some(after)) = (cpu_at_start.1, cpu_at_end.1) {
        let used = after.saturating_sub(before) as f64;
        f.set("load.bench_cores", used / 1e6 / send_elapsed);
    }
    let peak = peak_rss.load(Ordering::Relaxed);
    if peak > 0 {
        f.set("rss.load_peak_mb", peak as f64 / 1024.0);
    }
    for e in error_samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        eprintln!("load: send error: {e}");
    }
    Ok(f)
}
