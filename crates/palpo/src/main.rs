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
