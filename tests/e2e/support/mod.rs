//! Shared helpers for the end-to-end tests: private PostgreSQL clusters and external programs.
//!
//! Not every helper is used by every build of the test binary.
#![allow(dead_code, unused_imports)]

pub(crate) mod binaries;
pub(crate) mod cluster;

pub(crate) use binaries::{pgbench, psql, require_tool, ClientScript};
pub(crate) use cluster::{free_port, Auth, ClusterOptions, PrivateCluster};
