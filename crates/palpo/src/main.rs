//! The Palpo binary: command line, configuration loading, logging, and wiring of the layers.

mod cli;
mod migrate;
mod openapi;
mod serve;
mod telemetry;
mod user;

use std::{path::Path, process::ExitCode};

use clap::Parser;
use palpo_core::Config;

use crate::cli::{Cli, Command, UserCommand};

/// jemalloc: memory is freed mostly on other threads than the one that allocated it (rows
/// built on SQLite's connection threads, requests on the runtime's), which glibc's allocator
/// serves under its arenas' locks; with jemalloc the server answers about 10% more requests on
/// the same cores (docs/benchmarks.md, tenth run). It is the process's `malloc` too (the
/// crate's `unprefixed_malloc_on_supported_platforms`), so SQLite's allocations, one or more
/// per value of every row read, take its thread caches instead of glibc's arenas: with SQLite
/// built without memory statistics, a 100-room initial sync costs about a third less CPU
/// (twenty-first run).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`MALLOC_CONF` in the environment, or
/// `_RJEM_MALLOC_CONF` where jemalloc stays prefixed, overrides
/// them): one arena and small thread caches (the server's threads mostly wait, and every
/// arena and cache holds memory of its own), and freed pages returned to the system within a
/// quarter of a second (unused pages still count in RSS). Left at its defaults, jemalloc kept
/// the peak RSS under load at 49–63 MB where these options keep it near 39 (glibc: 35).
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code, non_upper_case_globals)]
// SAFETY: the name jemalloc reads its compiled-in options from: a pointer to a NUL-terminated
// string that lives forever. Built unprefixed (as the process's malloc) it reads
// `malloc_conf`; on the systems where the crate cannot replace malloc (Apple's, Android,
// DragonFly) jemalloc keeps its `_rjem_` prefix, and the name with it.
#[cfg_attr(
    any(
        target_vendor = "apple",
        target_os = "android",
        target_os = "dragonfly"
    ),
    unsafe(export_name = "_rjem_malloc_conf")
)]
#[cfg_attr(
    not(any(
        target_vendor = "apple",
        target_os = "android",
        target_os = "dragonfly"
    )),
    unsafe(export_name = "malloc_conf")
)]
static malloc_conf: &u8 = &b"narenas:1,tcache_max:1024,dirty_decay_ms:250,muzzy_decay_ms:0\0"[0];

/// A configuration problem: reported in one line, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<BadConfig>() => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config_file = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve::run(load_config(config_file)?).await,
        Command::Migrate => migrate::run(load_config(config_file)?).await,
        Command::User(UserCommand::Create(args)) => {
            user::create(load_config(config_file)?, args).await
        }
        Command::Openapi(args) => openapi::write(&args.out),
    }
}

/// Loads the configuration and installs logging, which the configuration filters.
fn load_config(file: Option<&Path>) -> anyhow::Result<Config> {
    let config = Config::load(file).map_err(|e| BadConfig(e.to_string()))?;
    telemetry::init(&config.log)?;
    Ok(config)
}
