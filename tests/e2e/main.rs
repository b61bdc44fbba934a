//! End-to-end tests against real PostgreSQL servers: one test binary, one module per area.

mod support;

mod cluster_smoke;
