//! The command line: `palpo [--config FILE] [serve | migrate | user create | openapi]`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Palpo, a Matrix homeserver.
///
/// Configuration comes from built-in defaults, then `config/palpo.toml` (or `--config FILE`),
/// then `PALPO__*` environment variables (`PALPO__DATABASE__URL=postgres://...`).
#[derive(Debug, Parser)]
#[command(name = "palpo", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML); default `config/palpo.toml` when it exists.
    #[arg(long, short, global = true, value_name = "FILE", env = "PALPO_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the homeserver (the default): migrate the database, then serve HTTP.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Write the OpenAPI documents of the HTTP API into a directory.
    Openapi(OpenapiArgs),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a local account and print its user id.
    Create(CreateUserArgs),
}

#[derive(Debug, Args)]
pub struct CreateUserArgs {
    /// A localpart (`alice`) or a full user id on this server (`@alice:example.org`).
    pub name: String,
    /// Make the account a server admin.
    #[arg(long)]
    pub admin: bool,
    /// Read the password as one line from stdin, even when stdin is a terminal.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct OpenapiArgs {
    /// Directory to write into; created when missing.
    #[arg(long, value_name = "DIR", default_value = "openapi")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_and_config_is_global() {
        let cli = Cli::try_parse_from(["palpo"]).expect("parses");
        assert!(cli.command.is_none());
        let cli = Cli::try_parse_from([
            "palpo", "user", "create", "alice", "--admin", "--config", "x.toml",
        ])
        .expect("parses");
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        match cli.command {
            Some(Command::User(UserCommand::Create(args))) => {
                assert_eq!(args.name, "alice");
                assert!(args.admin);
                assert!(!args.password_stdin);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
