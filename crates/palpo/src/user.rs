//! `palpo user create`: creates a local account from the command line.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, bail};
use palpo_core::Config;
use palpo_service::{AccountService, Services};

use crate::cli::CreateUserArgs;

pub async fn create(config: Config, args: CreateUserArgs) -> anyhow::Result<()> {
    let storage = crate::migrate::open_storage(&config).await?;
    let db = storage.db().clone();
    let services = Services::new(std::sync::Arc::new(config), storage);
    let result = create_with(&services.accounts, &args).await;
    db.close().await;
    let user_id = result?;
    println!("{user_id}");
    Ok(())
}

async fn create_with(accounts: &AccountService, args: &CreateUserArgs) -> anyhow::Result<String> {
    let localpart = localpart_of(&args.name, accounts.server_name())?;
    // Checks the name and that it is free before asking for a password.
    accounts
        .username_available(localpart)
        .await
        .map_err(|e| service_error(&args.name, e))?;
    let user_id = accounts
        .validate_new_localpart(localpart)
        .map_err(|e| service_error(&args.name, e))?;
    let password = read_password(args.password_stdin)?;
    accounts
        .create_account(&user_id, Some(password), args.admin)
        .await
        .map_err(|e| service_error(&user_id, e))?;
    Ok(user_id)
}

/// `alice` → `alice`; `@alice:example.org` → `alice` when `example.org` is this server.
fn localpart_of<'a>(name: &'a str, server_name: &str) -> anyhow::Result<&'a str> {
    let Some(rest) = name.strip_prefix('@') else {
        return Ok(name);
    };
    let Some((localpart, server)) = rest.split_once(':') else {
        bail!("{name:?} is not a user id: expected @localpart:{server_name} or a bare localpart");
    };
    if server != server_name {
        bail!("{name} is not on this server: its server name is {server_name}");
    }
    Ok(localpart)
}

/// A Matrix error as a one-line message for the operator.
fn service_error(subject: &str, error: palpo_core::Error) -> anyhow::Error {
    match error {
        palpo_core::Error::Matrix { message, .. } => anyhow::anyhow!("{subject}: {message}"),
        other => anyhow::anyhow!("{subject}: {other}"),
    }
}

/// Prompts twice on a terminal; otherwise (or with `--password-stdin`) reads one line of stdin.
fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let password = if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        let read = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        if read == 0 {
            bail!("no password on stdin (expected one line)");
        }
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else {
        let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
        let second =
            rpassword::prompt_password("Password (again): ").context("cannot read the password")?;
        if first != second {
            bail!("the passwords do not match");
        }
        first
    };
    if password.is_empty() {
        bail!("the password must not be empty");
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::localpart_of;

    #[test]
    fn names_may_be_localparts_or_local_user_ids() {
        assert_eq!(localpart_of("alice", "example.org").expect("ok"), "alice");
        assert_eq!(
            localpart_of("@alice:example.org", "example.org").expect("ok"),
            "alice"
        );
        assert!(localpart_of("@alice:elsewhere.org", "example.org").is_err());
        assert!(localpart_of("@alice", "example.org").is_err());
    }
}
