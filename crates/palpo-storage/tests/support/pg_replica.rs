//! A throwaway PostgreSQL primary and streaming replica of their own, for tests.
//!
//! [`PgPair::start`] initdb's a fresh primary in a temporary directory, on a free port,
//! listening on 127.0.0.1 only, clones it with `pg_basebackup -R -X stream`, starts the clone
//! as a hot standby on another free port, and waits until it answers as a replica. Drop stops
//! both (`-m immediate`) and removes the directory. The shared server on 5432 is not touched.
//!
//! The binaries come from `$PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`. `initdb` and `postgres` refuse to run as root, so when the
//! tests run as root the server commands run as the `postgres` OS user (`runuser`). Anything
//! missing is an error, never a skip.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub type Result<T> = std::result::Result<T, String>;

/// The primary and replica, both running until dropped.
pub struct PgPair {
    root: PathBuf,
    bin: PathBuf,
    /// `Some(user)` when server commands must run as that OS user.
    run_as: Option<String>,
    primary_port: u16,
    replica_port: u16,
    /// How long `start` took.
    pub startup: Duration,
}

impl PgPair {
    pub fn start() -> Result<Self> {
        let began = Instant::now();
        let bin = find_bin_dir()?;
        for tool in ["initdb", "pg_ctl", "pg_basebackup", "psql"] {
            if !bin.join(tool).is_file() {
                return Err(format!("{} not found in {}", tool, bin.display()));
            }
        }
        let run_as = if is_root() {
            Some("postgres".to_owned())
        } else {
            None
        };
        let root = make_root(run_as.as_deref())?;
        let mut pair = PgPair {
            root,
            bin,
            run_as,
            primary_port: 0,
            replica_port: 0,
            startup: Duration::ZERO,
        };
        // Drop cleans up whatever part of this fails.
        pair.init_primary()?;
        pair.start_primary()?;
        pair.clone_replica()?;
        pair.start_replica()?;
        pair.startup = began.elapsed();
        Ok(pair)
    }

    pub fn primary_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.primary_port
        )
    }

    pub fn replica_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.replica_port
        )
    }

    fn primary_dir(&self) -> PathBuf {
        self.root.join("primary")
    }

    fn replica_dir(&self) -> PathBuf {
        self.root.join("replica")
    }

    fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    fn init_primary(&mut self) -> Result<()> {
        let dir = self.primary_dir();
        self.run(
            "initdb",
            &[
                "-D",
                path_str(&dir)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        let socket_dir = self.socket_dir();
        self.run("mkdir", &["-p", path_str(&socket_dir)?])?;
        let mut conf = String::from("\n# palpo test primary\n");
        for line in [
            "listen_addresses = '127.0.0.1'",
            "wal_level = replica",
            "max_wal_senders = 4",
            "hot_standby = on",
            "fsync = off",
            "full_page_writes = off",
            "shared_buffers = 16MB",
            "max_connections = 40",
            "wal_sender_timeout = 5s",
            "wal_receiver_status_interval = 1s",
            "log_min_messages = warning",
        ] {
            writeln!(conf, "{line}").ok();
        }
        append(&dir.join("postgresql.conf"), &conf)?;
        let hba = "local all all trust\n\
                   host all all 127.0.0.1/32 trust\n\
                   local replication all trust\n\
                   host replication all 127.0.0.1/32 trust\n";
        std::fs::write(dir.join("pg_hba.conf"), hba)
            .map_err(|e| format!("cannot write pg_hba.conf: {e}"))
    }

    fn start_primary(&mut self) -> Result<()> {
        let dir = self.primary_dir();
        self.primary_port = self.start_server(&dir, "primary", None)?;
        Ok(())
    }

    fn clone_replica(&mut self) -> Result<()> {
        let dir = self.replica_dir();
        let port = self.primary_port.to_string();
        self.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                path_str(&dir)?,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )?;
        Ok(())
    }

    /// Starts (or restarts, on the same port) the replica and waits until it answers as a
    /// hot standby.
    pub fn start_replica(&mut self) -> Result<()> {
        let dir = self.replica_dir();
        let same_port = (self.replica_port != 0).then_some(self.replica_port);
        self.replica_port = self.start_server(&dir, "replica", same_port)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.psql(self.replica_port, "SELECT pg_is_in_recovery()");
            match answer {
                Ok(text) if text == "t" => return Ok(()),
                Ok(text) => {
                    return Err(format!(
                        "the replica answers pg_is_in_recovery() = {text:?}, not a standby"
                    ));
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "the replica does not accept connections: {e}\n{}",
                        self.log_tail("replica")
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Stops the replica at once, as a crash would.
    pub fn stop_replica(&self) -> Result<()> {
        let dir = self.replica_dir();
        self.run(
            "pg_ctl",
            &["-D", path_str(&dir)?, "stop", "-m", "immediate", "-w"],
        )?;
        Ok(())
    }

    /// `pg_ctl start` on `port`, or on a free port, retried on a fresh port if that one was
    /// taken meanwhile.
    fn start_server(&self, dir: &Path, name: &str, port: Option<u16>) -> Result<u16> {
        let log = self.root.join(format!("{name}.log"));
        let mut last = String::new();
        let attempts = if port.is_some() { 1 } else { 3 };
        for _ in 0..attempts {
            let port = match port {
                Some(port) => port,
                None => free_port()?,
            };
            let options = format!("-p {port} -k {}", path_str(&self.socket_dir())?);
            let started = self.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(dir)?,
                    "-l",
                    path_str(&log)?,
                    "-o",
                    &options,
                    "-t",
                    "60",
                    "-w",
                    "start",
                ],
            );
            match started {
                Ok(_) => return Ok(port),
                Err(e) => last = format!("{e}\n{}", self.log_tail(name)),
            }
        }
        Err(format!("cannot start the {name}: {last}"))
    }

    /// One value from a query, through `psql` over TCP.
    pub fn psql(&self, port: u16, sql: &str) -> Result<String> {
        let port = port.to_string();
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        check("psql", &output).map(|out| out.trim().to_owned())
    }

    /// Runs a PostgreSQL tool (or `mkdir`) as the server's OS user.
    fn run(&self, tool: &str, args: &[&str]) -> Result<String> {
        let program = if tool == "mkdir" {
            PathBuf::from("mkdir")
        } else {
            self.bin.join(tool)
        };
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        // Not under our root's cwd: the server user may not be able to enter it.
        command.args(args).current_dir(&self.root);
        let output = command
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        check(tool, &output)
    }

    fn log_tail(&self, name: &str) -> String {
        let log = self.root.join(format!("{name}.log"));
        match std::fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!("--- {} (last lines) ---\n{tail}", log.display())
            }
            Err(_) => String::new(),
        }
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for dir in [self.replica_dir(), self.primary_dir()] {
            if dir.join("postmaster.pid").exists()
                && let Some(dir) = dir.to_str()
            {
                let _ = self.run("pg_ctl", &["-D", dir, "stop", "-m", "immediate", "-w"]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn check(tool: &str, output: &Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{tool} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot append to {}: {e}", path.display()))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A fresh directory under the temp dir, owned by the server user.
fn make_root(run_as: Option<&str>) -> Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let root = std::env::temp_dir().join(format!(
        "palpo-pg-pair-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    if let Some(user) = run_as {
        let status = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(&root)
            .status()
            .map_err(|e| format!("cannot run chown: {e}"))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&root);
            return Err(format!(
                "cannot give {} to the {user} OS user (does it exist?)",
                root.display()
            ));
        }
    }
    Ok(root)
}

fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("PostgreSQL server binaries not found (set PG_BIN; /usr/lib/postgresql: {e})")
        })?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "PostgreSQL server binaries not found (set PG_BIN)".to_owned())
}
