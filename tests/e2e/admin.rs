//! The admin endpoint: metrics move as a workload runs, health and readiness.

use std::io::{Read, Write};

use crate::support::harness::{ProxyOptions, TestProxy};
use crate::support::vault::Vault;
use crate::support::{Auth, ClusterOptions, PrivateCluster};

/// Start an admin endpoint for `proxy` on a free port; returns its address.
fn admin_for(proxy: &TestProxy, rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    let handle = proxy.handle.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(pgenvelope::admin::serve(
            listener,
            handle,
            std::future::pending(),
        ));
        addr
    })
}

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// The value of one sample line, e.g. `pgenvelope_values_encrypted_total`.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_move_with_the_workload_and_health_answers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(Vault::new());
    let admin = admin_for(&v.proxy, &rt);
    let (status, before) = get(admin, "/metrics");
    assert_eq!(status, 200);
    let t = v.table.clone();
    rt.block_on(async {
        let c = v.client().await;
        for i in 0..10 {
            c.execute(
                &format!("INSERT INTO {t} (org_id, name, value) VALUES ('m', $1, $2)"),
                &[&format!("n{i}"), &"secret"],
            )
            .await
            .unwrap();
        }
        c.query(&format!("SELECT value FROM {t}"), &[])
            .await
            .unwrap();
        let _ = c
            .simple_query(&format!("SELECT * FROM {t} ORDER BY value"))
            .await;
    });
    let (_, after) = get(admin, "/metrics");
    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(delta("pgenvelope_values_encrypted_total"), 10.0, "{after}");
    assert_eq!(delta("pgenvelope_values_decrypted_total"), 10.0);
    assert_eq!(
        delta("pgenvelope_statements_rejected_total{reason=\"unsafe_statement\"}"),
        1.0
    );
    assert!(
        sample(
            &after,
            "pgenvelope_kek_requests_total{op=\"unwrap\",result=\"ok\"}"
        ) >= 1.0,
        "{after}"
    );
    assert!(after.contains("pgenvelope_kek_request_seconds_bucket"));
    assert!(delta("pgenvelope_dek_cache_hits_total") >= 10.0);
    assert!(sample(&after, "pgenvelope_sessions_total") >= 1.0);
    assert!(
        delta("pgenvelope_statements_total{kind=\"extended\"}") >= 11.0,
        "{after}"
    );
    assert_eq!(delta("pgenvelope_statements_total{kind=\"simple\"}"), 1.0);
    // Never data: no value, no SQL text, no key material in the exposition.
    assert!(!after.contains("secret") && !after.contains(&t));
    assert_eq!(get(admin, "/healthz").0, 200);
    let (status, why) = get(admin, "/readyz");
    assert_eq!(status, 200, "{why}");
    assert_eq!(get(admin, "/nope").0, 404);
}

#[test]
fn readiness_follows_the_upstream() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cluster = PrivateCluster::start(ClusterOptions::new(Auth::Trust)).unwrap();
    let proxy = TestProxy::with(ProxyOptions::to("127.0.0.1", cluster.port()));
    let admin = admin_for(&proxy, &rt);
    assert_eq!(get(admin, "/readyz").0, 200);
    cluster.stop().unwrap();
    let (status, why) = get(admin, "/readyz");
    assert_eq!(status, 503);
    assert!(why.contains("upstream"), "{why}");
    cluster.start_again().unwrap();
    assert_eq!(get(admin, "/readyz").0, 200);
    proxy.handle.drain();
    assert_eq!(get(admin, "/readyz").0, 503);
}
