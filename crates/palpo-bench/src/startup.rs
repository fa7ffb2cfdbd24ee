//! The startup phase: time from spawning the server to its first successful `/versions`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::matrix::Homeserver;
use crate::rss;
use crate::stats::Figures;

pub async fn run(
    hs: &Homeserver,
    start_cmd: &str,
    timeout: Duration,
    idle_wait: Duration,
) -> Result<Figures> {
    if hs.versions_ok().await {
        bail!("startup: something already answers at the URL; stop it first");
    }
    let t = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec {start_cmd}"))
        .kill_on_drop(true)
        .spawn()
        .context("startup: spawning the server command")?;
    let pid = child.id().context("startup: no pid")?;
    let mut up = None;
    while t.elapsed() < timeout {
        if let Some(status) = child.try_wait()? {
            bail!("startup: the server exited with {status} before answering");
        }
        if hs.versions_ok().await {
            up = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut f = Figures::default();
    let result = match up {
        Some(d) => {
            f.set("startup.to_versions_ms", d.as_secs_f64() * 1e3);
            tokio::time::sleep(idle_wait).await;
            f.set_opt(
                "startup.rss_idle_mb",
                rss::vm_rss_kb(pid).map(|kb| kb as f64 / 1024.0),
            );
            Ok(f)
        }
        None => Err(anyhow::anyhow!("startup: no answer within {timeout:?}")),
    };
    // Stop the server we started: SIGTERM, then SIGKILL after 10 s.
    let _ = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    result
}
