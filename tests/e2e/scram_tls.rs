//! SCRAM through the proxy against a PostgreSQL with `ssl = on`: every client leg ×
//! `channel_binding` setting, directly and through the proxy, with the outcome compared.
//!
//! The proxy's leg to PostgreSQL is TLS, so PostgreSQL offers `SCRAM-SHA-256-PLUS`. A
//! plaintext client must not see that offer (libpq refuses it as a downgrade); a TLS client
//! that chooses it would bind to the proxy's certificate, so it is told how to connect instead
//! of failing on the server's opaque "channel binding check failed".

use std::path::PathBuf;
use std::process::{Command, Stdio};

use pgenvelope::config::SslMode;

use crate::support::binaries::node;
use crate::support::ca::{psql_conninfo, tls_cluster_with, Ca};
use crate::support::harness::{ProxyOptions, TestProxy};
use crate::support::{
    output_text, require_tool, Auth, ClientScript, ClusterOptions, PrivateCluster,
};

const USER: &str = "app";
const PASSWORD: &str = "app-secret";

/// A SCRAM cluster with TLS, a proxy with client TLS in front of it (verify-full upstream),
/// and the CA file both are signed by.
struct Setup {
    cluster: PrivateCluster,
    proxy: TestProxy,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("pgenvelope scram test CA");
        let ca_file = ca.write(dir.path(), "ca.crt");
        let cluster = tls_cluster_with(
            &ca,
            &["localhost", "127.0.0.1"],
            ClusterOptions::new(Auth::ScramSha256),
        );
        cluster.create_user(USER, PASSWORD).unwrap();
        cluster
            .psql("postgres", &format!("GRANT ALL ON DATABASE test TO {USER}"))
            .unwrap();
        let mut opts = ProxyOptions::to("localhost", cluster.port());
        opts.upstream_sslmode = SslMode::VerifyFull;
        opts.upstream_ca = Some(ca_file.clone());
        opts.tls = Some(ca.server(dir.path(), "proxy"));
        let proxy = TestProxy::with(opts);
        Setup {
            cluster,
            proxy,
            ca_file,
            _dir: dir,
        }
    }

    fn conninfo(&self, port: u16, sslmode: &str, channel_binding: &str, password: &str) -> String {
        format!(
            "host=localhost port={port} user={USER} password={password} dbname=test \
             sslmode={sslmode} sslrootcert={} channel_binding={channel_binding}",
            self.ca_file.display()
        )
    }

    /// `Ok(ssl in use on the server's side)` or `Err(libpq's message)`.
    fn connect(
        &self,
        port: u16,
        sslmode: &str,
        cb: &str,
        password: &str,
    ) -> Result<String, String> {
        let out = psql_conninfo(
            &self.conninfo(port, sslmode, cb, password),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(output_text(&out))
        }
    }
}

#[test]
fn plaintext_clients_log_in_with_scram_over_a_tls_upstream() {
    let s = Setup::start();
    let (direct, proxy) = (s.cluster.port(), s.proxy.port());
    // Default channel_binding=prefer: the proxy hides -PLUS, the client sends the `n` flag.
    for port in [direct, proxy] {
        let via = if port == proxy { "proxy" } else { "direct" };
        let ssl = s.connect(port, "disable", "prefer", PASSWORD);
        // Through the proxy the server's leg is TLS even for a plaintext client.
        let expected = if port == proxy { "t" } else { "f" };
        assert_eq!(ssl.as_deref(), Ok(expected), "{via}: {ssl:?}");
    }
    // channel_binding=require cannot be met without TLS to the proxy, as without TLS direct.
    for port in [direct, proxy] {
        let err = s.connect(port, "disable", "require", PASSWORD).unwrap_err();
        assert!(err.contains("channel binding"), "{err}");
    }
    // A wrong password fails as it does directly.
    for port in [direct, proxy] {
        let err = s.connect(port, "disable", "prefer", "wrong").unwrap_err();
        assert!(
            err.contains("password authentication failed for user \"app\""),
            "{err}"
        );
    }
}

#[test]
fn tls_clients_are_told_how_to_connect_when_they_would_bind_to_the_proxy() {
    let s = Setup::start();
    let (direct, proxy) = (s.cluster.port(), s.proxy.port());
    // channel_binding=disable works on both paths.
    for port in [direct, proxy] {
        assert_eq!(
            s.connect(port, "verify-full", "disable", PASSWORD)
                .as_deref(),
            Ok("t")
        );
    }
    // Direct, the binding holds; through the proxy it cannot, and the client is told why.
    assert_eq!(
        s.connect(direct, "verify-full", "prefer", PASSWORD)
            .as_deref(),
        Ok("t")
    );
    for cb in ["prefer", "require"] {
        let err = s.connect(proxy, "verify-full", cb, PASSWORD).unwrap_err();
        assert!(err.contains("pgenvelope: SCRAM channel binding"), "{err}");
        assert!(err.contains("channel_binding=disable"), "{err}");
        assert!(!err.contains("channel binding check failed"), "{err}");
    }
}

/// node-postgres with `enableChannelBinding` sends the GS2 flag `y` when it is not offered
/// `-PLUS`, even without TLS; a server on TLS refuses that flag as a downgrade, and it cannot be
/// changed on the way (the client's proof covers it). Directly (no TLS) it connects; through
/// the proxy it gets the proxy's explanation instead of the server's negotiation error. With
/// the option off (its default) it connects both ways.
#[test]
fn node_postgres_channel_binding_gets_a_clear_answer() {
    if !require_tool(ClientScript::NodePgSmoke.available(), "node-postgres") {
        return;
    }
    let s = Setup::start();
    let script = "const { Client } = require('pg');
        (async () => {
          const c = new Client({
            connectionString: process.env.DATABASE_URL,
            enableChannelBinding: process.env.BIND === '1',
          });
          await c.connect();
          const r = await c.query('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()');
          console.log(r.rows[0].ssl);
          await c.end();
        })().catch((e) => { console.error(e.message); process.exit(1); });";
    let run = |port: u16, bind: bool| {
        let url = format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/test?sslmode=disable");
        Command::new(node().unwrap())
            .args(["-e", script])
            .env("DATABASE_URL", url)
            .env("BIND", if bind { "1" } else { "0" })
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let (direct, proxy) = (s.cluster.port(), s.proxy.port());
    for (port, expected) in [(direct, "false"), (proxy, "true")] {
        let out = run(port, false);
        assert!(out.status.success(), "port {port}: {}", output_text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    }
    let out = run(direct, true);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = run(proxy, true);
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pgenvelope: SCRAM channel binding"), "{err}");
}
