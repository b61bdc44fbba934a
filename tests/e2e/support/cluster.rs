//! A private, throw-away PostgreSQL cluster for end-to-end tests.
//!
//! [`PrivateCluster::start`] runs `initdb` into a fresh temporary directory, writes a
//! `pg_hba.conf` for the requested authentication method, starts `postgres` directly as a child
//! process on a free loopback port and waits until it answers a startup packet. Dropping the
//! value always stops the server by PID (fast shutdown, then SIGKILL) and removes its files,
//! whatever happened in the test.
//!
//! This module is plain `std`: no async runtime, so any test can use it. Blocking calls are short
//! (a few seconds for `initdb`), which is acceptable inside `#[tokio::test]`.
//!
//! When the tests run as root (CI), `initdb` and `postgres` refuse to run, so both are started
//! with the uid/gid of the `postgres` system user (override with `PGENVELOPE_TEST_PG_OS_USER`)
//! and the temporary directory is handed to that user.
//!
//! The cluster always allows `trust` over its private Unix socket, which is how
//! [`PrivateCluster::psql`] runs administrative SQL; TCP on 127.0.0.1 uses the chosen [`Auth`].

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::binaries::{pg_binary, pg_bindir};

/// How long to wait for the server to accept connections after a start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts at finding a port nobody else grabs between our probe and the server's bind.
const PORT_ATTEMPTS: usize = 5;

/// Client authentication method for TCP connections (the `pg_hba.conf` method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Auth {
    /// No password asked.
    Trust,
    /// Cleartext password.
    Password,
    /// MD5 challenge; passwords are stored as MD5 hashes (`password_encryption = md5`).
    Md5,
    /// SCRAM-SHA-256; passwords are stored as SCRAM verifiers.
    ScramSha256,
}

impl Auth {
    /// The method name as written in `pg_hba.conf`.
    pub(crate) fn hba_method(self) -> &'static str {
        match self {
            Auth::Trust => "trust",
            Auth::Password => "password",
            Auth::Md5 => "md5",
            Auth::ScramSha256 => "scram-sha-256",
        }
    }

    fn password_encryption(self) -> &'static str {
        match self {
            Auth::Md5 => "md5",
            Auth::Trust | Auth::Password | Auth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// Options for [`PrivateCluster::start`].
#[derive(Clone, Debug)]
pub(crate) struct ClusterOptions {
    /// TCP authentication method.
    pub(crate) auth: Auth,
    /// Name of the bootstrap superuser.
    pub(crate) superuser: String,
    /// Password of the bootstrap superuser.
    pub(crate) password: String,
    /// Extra `postgresql.conf` settings, written verbatim as `name = value`.
    pub(crate) settings: Vec<(String, String)>,
    /// Databases created once the server is up (in addition to `postgres`).
    pub(crate) databases: Vec<String>,
}

impl ClusterOptions {
    /// Options with the given authentication method, superuser `postgres` with password
    /// `postgres-secret`, and a database `test`.
    pub(crate) fn new(auth: Auth) -> Self {
        Self {
            auth,
            superuser: "postgres".to_owned(),
            password: "postgres-secret".to_owned(),
            settings: Vec::new(),
            databases: vec!["test".to_owned()],
        }
    }

    /// Adds a `postgresql.conf` setting; `value` is written as is, so quote strings: `"'on'"`.
    pub(crate) fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the superuser's password.
    pub(crate) fn password(mut self, password: &str) -> Self {
        self.password = password.to_owned();
        self
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self::new(Auth::Trust)
    }
}

/// A running PostgreSQL server in a temporary directory, stopped and deleted on drop.
pub(crate) struct PrivateCluster {
    /// Invariant: dropped after the server is stopped (field order and `Drop`).
    dir: TempDir,
    bindir: PathBuf,
    port: u16,
    opts: ClusterOptions,
    run_as: Option<(u32, u32)>,
    /// Invariant: `Some` while a postmaster we started may be running.
    child: Option<Child>,
}

impl PrivateCluster {
    /// Creates, configures and starts a new cluster; returns once it accepts connections.
    pub(crate) fn start(opts: ClusterOptions) -> io::Result<Self> {
        let bindir = pg_bindir()?;
        let run_as = run_as_user()?;
        let dir = tempfile::Builder::new().prefix("pgenv-pg-").tempdir()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let mut cluster = Self {
            dir,
            bindir,
            port: 0,
            opts,
            run_as,
            child: None,
        };
        cluster.initdb()?;
        cluster.write_config()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.spawn_and_wait() {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => {
                    let log = cluster.log_contents();
                    if log.contains("could not bind") || log.contains("could not create listen") {
                        last_err = Some(e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        cluster.after_first_start()?;
        Ok(cluster)
    }

    /// The TCP port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The bootstrap superuser's name.
    pub(crate) fn superuser(&self) -> &str {
        &self.opts.superuser
    }

    /// The bootstrap superuser's password.
    pub(crate) fn superuser_password(&self) -> &str {
        &self.opts.password
    }

    /// The authentication method on TCP.
    pub(crate) fn auth(&self) -> Auth {
        self.opts.auth
    }

    /// `postgres://user[:password]@127.0.0.1:PORT/db`, with user and password percent-encoded.
    pub(crate) fn url(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut url = format!("postgres://{}", percent_encode(user));
        if let Some(password) = password {
            url.push(':');
            url.push_str(&percent_encode(password));
        }
        let _ = write!(url, "@127.0.0.1:{}/{}", self.port, percent_encode(db));
        url
    }

    /// URL of the superuser with its password, for database `db`.
    pub(crate) fn superuser_url(&self, db: &str) -> String {
        self.url(&self.opts.superuser, Some(&self.opts.password), db)
    }

    /// The directory holding the server's Unix socket (trust authentication).
    pub(crate) fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The data directory.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (stdout and stderr of `postgres`).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log so far, for assertion messages.
    pub(crate) fn log_contents(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The postmaster's PID while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs SQL as the superuser through `psql` over the Unix socket; returns its stdout
    /// (unaligned, tuples only).
    pub(crate) fn psql(&self, db: &str, sql: &str) -> io::Result<String> {
        let out = Command::new(pg_binary("psql")?)
            .arg("-X")
            .args(["-v", "ON_ERROR_STOP=1", "-qAt"])
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-U", &self.opts.superuser, "-d", db, "-c", sql])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a login role with a password (hashed per the cluster's auth method).
    pub(crate) fn create_user(&self, name: &str, password: &str) -> io::Result<()> {
        self.psql(
            "postgres",
            &format!(
                "CREATE ROLE {} LOGIN PASSWORD {}",
                quote_ident(name),
                quote_literal(password)
            ),
        )
        .map(drop)
    }

    /// Creates a database owned by the superuser.
    pub(crate) fn create_database(&self, name: &str) -> io::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .map(drop)
    }

    /// Fast shutdown (SIGINT) by PID, escalating to SIGKILL after a timeout. Idempotent.
    pub(crate) fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        signal(child.id(), "INT");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait()?;
        Err(io::Error::other(
            "postgres did not stop within the timeout and was killed",
        ))
    }

    /// Kills the postmaster with SIGKILL, as a crash would (backends notice and exit).
    pub(crate) fn kill9(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = child.kill();
        child.wait()?;
        Ok(())
    }

    /// Kills the postmaster and every one of its children with SIGKILL, as a machine or
    /// container crash would: no backend gets to answer its client or write anything more.
    pub(crate) fn kill9_all(&mut self) -> io::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let children = child_pids(pid);
        self.kill9()?;
        for child in children {
            signal(child, "KILL");
        }
        Ok(())
    }

    /// Sends `sig` (`"STOP"`, `"CONT"`, …) to the postmaster alone.
    pub(crate) fn signal_postmaster(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            signal(pid, sig);
        }
    }

    /// Stops the server if it runs, then starts it again on the same port and data directory.
    pub(crate) fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Starts a stopped (or killed) server again on the same port and data directory.
    pub(crate) fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        // After kill9 the old backends may hold the port or shared memory for a moment.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn initdb(&self) -> io::Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.opts.password))?;
        self.give_to_server_user(&pwfile)?;
        let mut cmd = Command::new(self.bindir.join("initdb"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", &self.opts.superuser])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["-A", "trust"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        self.as_server_user(&mut cmd);
        let out = cmd.output()?;
        std::fs::remove_file(&pwfile)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn write_config(&self) -> io::Result<()> {
        let data = self.data_dir();
        let sock = self.socket_dir();
        std::fs::create_dir(&sock)?;
        self.give_to_server_user(&sock)?;
        let hba = format!(
            "# written by the e2e test support\n\
             local all all trust\n\
             host all all 127.0.0.1/32 {m}\n\
             host all all ::1/128 {m}\n\
             host replication all 127.0.0.1/32 {m}\n",
            m = self.opts.auth.hba_method()
        );
        std::fs::write(data.join("pg_hba.conf"), hba)?;
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        let _ = write!(
            conf,
            "\n# e2e test support\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             password_encryption = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 100\n\
             shared_buffers = 32MB\n\
             logging_collector = off\n\
             log_min_messages = warning\n",
            sock.display(),
            self.opts.auth.password_encryption()
        );
        for (name, value) in &self.opts.settings {
            let _ = writeln!(conf, "{name} = {value}");
        }
        std::fs::write(data.join("postgresql.conf"), conf)?;
        Ok(())
    }

    /// Re-stores the superuser password under the configured hashing (initdb always uses the
    /// compiled-in default) and creates the requested databases.
    fn after_first_start(&self) -> io::Result<()> {
        if self.opts.auth == Auth::Md5 {
            self.psql(
                "postgres",
                &format!(
                    "SET password_encryption = 'md5'; ALTER ROLE {} PASSWORD {}",
                    quote_ident(&self.opts.superuser),
                    quote_literal(&self.opts.password)
                ),
            )?;
        }
        for db in &self.opts.databases {
            self.create_database(db)?;
        }
        Ok(())
    }

    fn spawn_and_wait(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        self.give_to_server_user(&self.log_path())?;
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.as_server_user(&mut cmd);
        self.child = Some(cmd.spawn()?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "postgres exited during start ({status}); log:\n{}",
                        self.log_contents()
                    )));
                }
            }
            if accepts_startup(self.port, &self.opts.superuser) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.kill9();
                return Err(io::Error::other(format!(
                    "postgres did not accept connections within {START_TIMEOUT:?}; log:\n{}",
                    self.log_contents()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn as_server_user(&self, cmd: &mut Command) {
        if let Some((uid, gid)) = self.run_as {
            // std clears supplementary groups when dropping from root.
            cmd.gid(gid).uid(uid);
        }
    }

    fn give_to_server_user(&self, path: &Path) -> io::Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.kill9();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, release).
pub(crate) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `Some((uid, gid))` of the OS user to run PostgreSQL as when we are root, `None` otherwise.
fn run_as_user() -> io::Result<Option<(u32, u32)>> {
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        return Ok(None);
    }
    let name = std::env::var("PGENVELOPE_TEST_PG_OS_USER").unwrap_or_else(|_| "postgres".into());
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            let uid = fields[2].parse().map_err(io::Error::other)?;
            let gid = fields[3].parse().map_err(io::Error::other)?;
            return Ok(Some((uid, gid)));
        }
    }
    Err(io::Error::other(format!(
        "running as root, but OS user {name:?} does not exist: PostgreSQL refuses to run as \
         root (install the postgresql package or set PGENVELOPE_TEST_PG_OS_USER)"
    )))
}

/// True once the server answers a startup packet with an authentication request ('R'),
/// rather than refusing the connection or reporting that it is still starting up.
fn accepts_startup(port: u16, user: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut body = Vec::new();
    body.extend_from_slice(&196_608_i32.to_be_bytes());
    for s in ["user", user, "database", "postgres"] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let Ok(len) = i32::try_from(body.len() + 4) else {
        return false;
    };
    let mut msg = len.to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    if stream.write_all(&msg).is_err() {
        return false;
    }
    let mut tag = [0u8; 1];
    let ready = matches!(stream.read_exact(&mut tag), Ok(()) if tag[0] == b'R');
    let _ = stream.shutdown(Shutdown::Both);
    ready
}

/// PIDs of the live processes whose parent is `parent` (from `/proc/*/stat`).
fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Quotes an SQL identifier.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on by default).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
