//! Logging: `tracing` to stderr, filtered by `RUST_LOG` when set, else by the config's `log`.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Fails on a filter that does not parse.
pub fn init(config_filter: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.trim().is_empty() => EnvFilter::try_new(&from_env)
            .with_context(|| format!("invalid RUST_LOG {from_env:?}"))?,
        _ => EnvFilter::try_new(config_filter).map_err(|e| {
            crate::BadConfig(format!(
                "configuration error: `log`: {config_filter:?}: {e}"
            ))
        })?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
