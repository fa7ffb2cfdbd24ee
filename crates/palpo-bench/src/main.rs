//! palpo-bench: a load generator for any Matrix homeserver on a loopback URL, driven over the
//! real Client-Server API, plus a raw database insert probe and a ratio report.

/// jemalloc, as the server: the load generator shares the server's cores, so what it spends
/// in glibc's malloc (an eighth of its CPU) the server does not get.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod load;
mod matrix;
mod rawdb;
mod rss;
mod startup;
mod stats;
mod syncbench;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Map, Value};

use crate::stats::{Figures, fmt_value, higher_is_better};

/// Benchmarks a Matrix homeserver (Palpo, Synapse, ...) on a loopback URL over the
/// Client-Server API. Registration and message rate limits must be off on the target.
#[derive(Parser, Debug, Clone)]
#[command(name = "palpo-bench", version)]
pub struct Args {
    /// Homeserver base URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    pub url: String,
    /// Comma-separated phases: load, sync, startup, raw-db.
    #[arg(long, default_value = "load")]
    pub phase: String,
    /// Users to register for the load phase (the last --listeners of them only listen).
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Rooms to create; every user joins every room.
    #[arg(long, default_value_t = 5)]
    pub rooms: usize,
    /// Concurrent senders (load), parallel requests (sync set-up) and writers (raw-db).
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Users long-polling /sync during the load phase to measure delivery latency.
    #[arg(long, default_value_t = 4)]
    pub listeners: usize,
    /// Total messages per second the senders aim at (spread evenly over them); 0 = flat out.
    /// A rate below the server's saturation measures delivery latency without queueing.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of sending in the load phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Server process id, to read its RSS from /proc/PID/status.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Rooms of the account whose initial sync is timed (sync phase).
    #[arg(long, default_value_t = 100)]
    pub sync_rooms: usize,
    /// Messages per room of that account (sync phase).
    #[arg(long, default_value_t = 100)]
    pub sync_events: usize,
    /// Timed repetitions of initial and incremental sync.
    #[arg(long, default_value_t = 3)]
    pub sync_repeats: usize,
    /// Shell command that starts the server at --url (startup phase).
    #[arg(long)]
    pub start_cmd: Option<String>,
    /// Seconds the startup phase waits for /versions.
    #[arg(long, default_value_t = 120)]
    pub startup_timeout: u64,
    /// Database for the raw-db phase: sqlite://PATH or postgres://USER@127.0.0.1/DB.
    #[arg(long)]
    pub db_url: Option<String>,
    /// Seconds per pass in the raw-db phase (one pass with 1 writer, one with --senders).
    #[arg(long, default_value_t = 5.0)]
    pub raw_seconds: f64,
    /// Name of this target in the output (e.g. palpo-sqlite).
    #[arg(long, default_value = "target")]
    pub label: String,
    /// Write the figures as JSON here (merged into the file when it already holds figures).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Instead of benchmarking, print the ratios A/B of two JSON result files.
    #[arg(long, num_args = 2, value_names = ["A_JSON", "B_JSON"])]
    pub ratio: Option<Vec<PathBuf>>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(files) = &args.ratio {
        return print_ratios(&files[0], &files[1]);
    }
    let run_id = run_id();
    let hs = matrix::Homeserver::new(&args.url, args.senders + args.listeners)?;
    let mut f = Figures::default();
    if let Some(pid) = args.server_pid {
        f.set_opt(
            "rss.idle_mb",
            rss::vm_rss_kb(pid).map(|kb| kb as f64 / 1024.0),
        );
    }
    let mut failed = Vec::new();
    for phase in args
        .phase
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        eprintln!("{}: phase {phase} against {}", args.label, args.url);
        let result: Result<Figures> = match phase {
            "load" => load::run(&hs, &args, &run_id).await,
            "sync" => syncbench::run(&hs, &args, &run_id).await,
            "startup" => match args.start_cmd.as_deref() {
                Some(cmd) => {
                    let timeout = Duration::from_secs(args.startup_timeout);
                    startup::run(&hs, cmd, timeout, Duration::from_secs(2)).await
                }
                None => Err(anyhow::anyhow!("--phase startup needs --start-cmd")),
            },
            "raw-db" => match args.db_url.as_deref() {
                Some(url) => rawdb::run(url, args.raw_seconds, args.senders, &run_id).await,
                None => Err(anyhow::anyhow!("--phase raw-db needs --db-url")),
            },
            other => bail!("unknown phase {other:?} (load, sync, startup, raw-db)"),
        };
        // A failed phase is reported and the others still run; the exit status says so.
        match result {
            Ok(figures) => f.extend(figures),
            Err(e) => {
                eprintln!("{}: phase {phase} FAILED: {e:#}", args.label);
                failed.push(phase.to_owned());
            }
        }
    }
    let collisions = matrix::ROOM_ID_COLLISIONS.load(std::sync::atomic::Ordering::Relaxed);
    if collisions > 0 {
        f.set("rooms.create_id_collisions", collisions as f64);
    }
    if let Some(pid) = args.server_pid {
        f.set_opt(
            "rss.end_mb",
            rss::vm_rss_kb(pid).map(|kb| kb as f64 / 1024.0),
        );
        f.set_opt(
            "rss.peak_mb",
            rss::vm_hwm_kb(pid).map(|kb| kb as f64 / 1024.0),
        );
    }
    print_table(&args.label, &f);
    if let Some(path) = &args.json {
        write_json(path, &args, &f)?;
    }
    if !failed.is_empty() {
        bail!("failed phases: {}", failed.join(", "));
    }
    Ok(())
}

/// A short id unique enough to keep user names and transaction ids of runs apart.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}",
        (nanos ^ (u128::from(std::process::id()) << 40)) & 0xffff_ffff_ffff
    )
}

fn print_table(label: &str, f: &Figures) {
    println!("{:<40} {:>14}", format!("figure ({label})"), "value");
    println!("{}", "-".repeat(55));
    for (name, value) in &f.0 {
        println!("{name:<40} {:>14}", fmt_value(*value));
    }
}

fn read_figures(path: &PathBuf) -> Result<(String, Figures)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let label = v["label"].as_str().unwrap_or("?").to_owned();
    let mut f = Figures::default();
    if let Some(map) = v["figures"].as_object() {
        for (k, v) in map {
            f.set_opt(k.clone(), v.as_f64());
        }
    }
    Ok((label, f))
}

fn write_json(path: &PathBuf, args: &Args, f: &Figures) -> Result<()> {
    let mut figures = if path.exists() {
        read_figures(path)?.1
    } else {
        Figures::default()
    };
    figures.extend(f.clone());
    let map: Map<String, Value> = figures
        .0
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(*v)))
        .collect();
    let out = serde_json::json!({
        "label": args.label,
        "url": args.url,
        "profile": {
            "users": args.users, "rooms": args.rooms, "senders": args.senders, "rate": args.rate,
            "listeners": args.listeners, "seconds": args.seconds,
            "sync_rooms": args.sync_rooms, "sync_events": args.sync_events,
        },
        "figures": map,
    });
    std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")?;
    Ok(())
}

/// Prints every figure both files have, with A/B and which side is better.
fn print_ratios(a: &PathBuf, b: &PathBuf) -> Result<()> {
    let (la, fa) = read_figures(a)?;
    let (lb, fb) = read_figures(b)?;
    println!(
        "{:<36} {:>12} {:>12} {:>10}  better",
        "figure", la, lb, "A/B"
    );
    println!("{}", "-".repeat(82));
    for (name, va) in &fa.0 {
        let Some(vb) = fb.get(name) else { continue };
        let ratio = if vb == 0.0 { f64::NAN } else { va / vb };
        let better = if va == &vb {
            "="
        } else if (va > &vb) == higher_is_better(name) {
            "A"
        } else {
            "B"
        };
        println!(
            "{name:<36} {:>12} {:>12} {:>10.3}  {better}",
            fmt_value(*va),
            fmt_value(vb),
            ratio
        );
    }
    // Persisted events/s as a fraction of the database's own raw insert rate (both in A).
    if let (Some(sent), Some(raw)) = (
        fa.get("load.sent_events_per_s"),
        fa.get("raw.insert_c_writers_per_s"),
    ) {
        println!(
            "{la}: sent events/s = {:.1}% of the raw concurrent insert rate",
            100.0 * sent / raw
        );
    }
    Ok(())
}
