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

/// Pins glibc's mmap threshold at its default (128 KiB). Left dynamic, glibc raises it to the
/// size of any large block freed (a password hash's 7 MiB, a big sync response), after which
/// such blocks come from per-thread arenas that keep the memory: under a burst of registrations
/// the RSS grew from 18 to 155 MB and stayed there; pinned, it peaks near 34 MB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, with a documented option and an in-range value.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    if ok != 1 {
        eprintln!("warning: cannot set the allocator's mmap threshold");
    }
}

/// A configuration problem: reported in one line, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_allocator();
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
