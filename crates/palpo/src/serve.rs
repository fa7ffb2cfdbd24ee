//! `palpo serve`: open storage (migrating it), build the services, serve HTTP until SIGINT/SIGTERM.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use palpo_core::{Config, config::redact_url};
use palpo_service::Services;
use poem::{
    Server,
    listener::{Acceptor, Listener, TcpListener},
};

/// How long in-flight requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        server_name = %config.server_name,
        listen = %config.listen,
        database = %redact_url(&config.database.url),
        replicas = config.database.replica_urls.len(),
        cache = %config.cache.redis_url.as_deref().map(redact_url).unwrap_or_else(|| "off".into()),
        "starting palpo"
    );
    warn_about_open_registration(&config);

    let storage = crate::migrate::open_storage(&config).await?;
    let db = storage.db().clone();
    let listen = config.listen;
    let services = Services::new(Arc::new(config), storage);
    // The signing key is made at first start, not at the first event.
    let keys = services
        .rooms
        .signing_keys()
        .await
        .map_err(|e| anyhow::anyhow!("cannot load the server signing key: {e}"))?;
    tracing::info!(key_id = %keys.key_id, "signing key loaded");
    let app = palpo_api::build_app(services);

    let acceptor = TcpListener::bind(listen)
        .into_acceptor()
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = acceptor
        .local_addr()
        .first()
        .and_then(|addr| addr.0.as_socket_addr().copied())
        .unwrap_or(listen);
    tracing::info!("listening on http://{bound}");

    let served = Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, shutdown_signal(), Some(SHUTDOWN_GRACE))
        .await;
    db.close().await;
    served.context("HTTP server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Open registration on a reachable address invites spam accounts: say so.
fn warn_about_open_registration(config: &Config) {
    if config.registration.enabled
        && config.registration.token.is_none()
        && !config.listen.ip().is_loopback()
    {
        tracing::warn!(
            listen = %config.listen,
            "registration is open to anyone who can reach this server: set registration.token \
             (PALPO__REGISTRATION__TOKEN) or registration.enabled = false"
        );
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
