//! Shared helpers for the end-to-end tests: the in-process proxy and one-call fixtures, private
//! PostgreSQL clusters (plain, TLS, killable), a raw protocol client, external programs.
//!
//! Not every helper is used by every build of the test binary.
#![allow(dead_code, unused_imports)]

pub(crate) mod binaries;
pub(crate) mod ca;
pub(crate) mod cluster;
pub(crate) mod harness;
pub(crate) mod raw;
pub(crate) mod site;
pub(crate) mod vault;

pub(crate) use binaries::{pgbench, psql, require_tool, ClientScript};
pub(crate) use cluster::{free_port, Auth, ClusterOptions, PrivateCluster};

/// Exit status, stdout and stderr of a finished command, for assertion messages.
pub(crate) fn output_text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
