//! Finding the external programs the end-to-end tests drive: PostgreSQL's server and client
//! binaries, and the interpreters for the client-driver scripts in `tests/clients/`.
//!
//! Environment overrides (all optional; `.ci/run` sets the interpreter ones):
//!
//! | variable | meaning | fallback |
//! |---|---|---|
//! | `PGENVELOPE_PG_BINDIR` | directory with `initdb`, `postgres` | `/usr/lib/postgresql/15/bin`, newest `/usr/lib/postgresql/*/bin`, `pg_config --bindir`, `PATH` |
//! | `PGENVELOPE_TEST_PYTHON` | Python with `psycopg` installed | `python3` on `PATH` |
//! | `PGENVELOPE_TEST_NODE` | Node.js | `node` on `PATH` |
//! | `NODE_PATH` | where `pg` (node-postgres) is installed | Node's own lookup |
//!
//! When `CI` is set, a missing tool is a failure; otherwise tests that need it may skip
//! (see [`require_tool`]).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The directory holding PostgreSQL's server binaries (`initdb`, `postgres`, `pg_ctl`).
pub(crate) fn pg_bindir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGENVELOPE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let debian = Path::new("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").is_file() {
        return Ok(debian.to_path_buf());
    }
    if let Some(dir) = newest_debian_bindir() {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    if let Some(initdb) = which("initdb") {
        if let Some(dir) = initdb.parent() {
            return Ok(dir.to_path_buf());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "PostgreSQL server binaries (initdb) not found; install postgresql or set \
         PGENVELOPE_PG_BINDIR",
    ))
}

/// A PostgreSQL program (`psql`, `pgbench`, `pg_dump`, ...): `PATH` first, then [`pg_bindir`].
pub(crate) fn pg_binary(name: &str) -> io::Result<PathBuf> {
    if let Some(path) = which(name) {
        return Ok(path);
    }
    let path = pg_bindir()?.join(name);
    if path.is_file() {
        return Ok(path);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{name} not found on PATH or in the PostgreSQL bindir"),
    ))
}

/// `psql`.
pub(crate) fn psql() -> io::Result<PathBuf> {
    pg_binary("psql")
}

/// `pgbench`.
pub(crate) fn pgbench() -> io::Result<PathBuf> {
    pg_binary("pgbench")
}

/// The Python interpreter for `tests/clients/*.py`: `PGENVELOPE_TEST_PYTHON`, else `python3`.
pub(crate) fn python() -> io::Result<PathBuf> {
    interpreter("PGENVELOPE_TEST_PYTHON", "python3")
}

/// The Node.js interpreter for `tests/clients/*.js`: `PGENVELOPE_TEST_NODE`, else `node`.
pub(crate) fn node() -> io::Result<PathBuf> {
    interpreter("PGENVELOPE_TEST_NODE", "node")
}

/// Absolute path of a file in `tests/clients/`.
pub(crate) fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// A client-driver script that can be run against a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientScript {
    /// `tests/clients/psycopg_smoke.py` (psycopg 3).
    PsycopgSmoke,
    /// `tests/clients/pg_smoke.js` (node-postgres).
    NodePgSmoke,
}

impl ClientScript {
    /// A command that runs the script with `DATABASE_URL=url`.
    pub(crate) fn command(self, url: &str) -> io::Result<Command> {
        let (interp, script) = match self {
            ClientScript::PsycopgSmoke => (python()?, "psycopg_smoke.py"),
            ClientScript::NodePgSmoke => (node()?, "pg_smoke.js"),
        };
        let mut cmd = Command::new(interp);
        cmd.arg(client_script(script))
            .env("DATABASE_URL", url)
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs the script against `url`; `Ok(stdout)` if it exits 0 and its last line is `ok`.
    pub(crate) fn run(self, url: &str) -> io::Result<String> {
        let out = self.command(url)?.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let last = stdout.lines().last().unwrap_or_default().trim();
        if out.status.success() && last == "ok" {
            return Ok(stdout);
        }
        Err(io::Error::other(format!(
            "{self:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )))
    }

    /// Whether the interpreter and its driver library are available.
    pub(crate) fn available(self) -> bool {
        let probe = match self {
            ClientScript::PsycopgSmoke => python().map(|p| {
                let mut c = Command::new(p);
                c.args(["-c", "import psycopg"]);
                c
            }),
            ClientScript::NodePgSmoke => node().map(|p| {
                let mut c = Command::new(p);
                c.args(["-e", "require('pg')"]);
                c
            }),
        };
        let Ok(mut probe) = probe else {
            return false;
        };
        probe
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Decides whether a test may run: `true` if `available`; otherwise panics under CI (a missing
/// tool there is a setup bug) and returns `false` with a note elsewhere, so the test can skip.
pub(crate) fn require_tool(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{what} is required under CI but is not available (see .ci/run)");
    }
    eprintln!("skipping: {what} is not available (run .ci/run to install it)");
    false
}

/// Looks a program up on `PATH`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn interpreter(var: &str, default: &str) -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    which(default).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{default} not found on PATH and {var} is not set"),
        )
    })
}

fn newest_debian_bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}
