//! Checks the test support itself: private clusters with each authentication method, restart
//! and crash recovery, and the client-driver scripts run directly against PostgreSQL.

use std::process::{Command, Stdio};

use tokio_postgres::{Client, NoTls};

use crate::support::{psql, require_tool, Auth, ClientScript, ClusterOptions, PrivateCluster};

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn select_one(url: &str) -> i32 {
    let client = connect(url).await.expect("connect");
    let row = client.query_one("SELECT 1", &[]).await.expect("SELECT 1");
    row.get(0)
}

#[tokio::test]
async fn scram_cluster_checks_passwords_and_survives_restart() {
    let mut cluster =
        PrivateCluster::start(ClusterOptions::new(Auth::ScramSha256)).expect("start cluster");
    let good = cluster.superuser_url("test");
    assert_eq!(select_one(&good).await, 1);

    let bad = cluster.url(cluster.superuser(), Some("wrong"), "test");
    let Err(err) = connect(&bad).await else {
        panic!("wrong password must fail");
    };
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );
    let none = cluster.url(cluster.superuser(), None, "test");
    assert!(connect(&none).await.is_err(), "missing password must fail");

    let stored = cluster
        .psql(
            "postgres",
            "SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = current_user",
        )
        .expect("psql");
    assert_eq!(stored.trim(), "SCRAM-SHA-256$");

    let port = cluster.port();
    cluster.restart().expect("restart");
    assert_eq!(cluster.port(), port);
    assert_eq!(select_one(&good).await, 1);

    cluster.kill9().expect("kill9");
    assert!(connect(&good).await.is_err(), "server must be down");
    cluster.start_again().expect("start after crash");
    assert_eq!(select_one(&good).await, 1);

    let pid = cluster.pid().expect("running");
    drop(cluster);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "postmaster {pid} must be gone after drop"
    );
}

#[tokio::test]
async fn md5_and_password_clusters_with_extra_users() {
    for auth in [Auth::Md5, Auth::Password] {
        let cluster = PrivateCluster::start(ClusterOptions::new(auth)).expect("start cluster");
        cluster.create_user("app user", "p@ss w'rd").expect("user");
        let url = cluster.url("app user", Some("p@ss w'rd"), "test");
        assert_eq!(select_one(&url).await, 1, "{auth:?}");
        let bad = cluster.url("app user", Some("nope"), "test");
        assert!(connect(&bad).await.is_err(), "{auth:?}: wrong password");
        if auth == Auth::Md5 {
            let stored = cluster
                .psql(
                    "postgres",
                    "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'app user'",
                )
                .expect("psql");
            assert_eq!(stored.trim(), "md5");
        }
    }
}

#[tokio::test]
async fn trust_cluster_accepts_psql_and_settings() {
    let cluster =
        PrivateCluster::start(ClusterOptions::new(Auth::Trust).setting("work_mem", "'7MB'"))
            .expect("start cluster");
    let out = Command::new(psql().expect("psql"))
        .args(["-X", "-qAt", "-d"])
        .arg(cluster.url("postgres", None, "test"))
        .args(["-c", "SHOW work_mem"])
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7MB");
}

#[test]
fn client_scripts_pass_against_postgres() {
    let cluster = PrivateCluster::start(ClusterOptions::new(Auth::ScramSha256)).expect("start");
    let url = cluster.superuser_url("test");
    for script in [ClientScript::PsycopgSmoke, ClientScript::NodePgSmoke] {
        if !require_tool(
            script.available(),
            &format!("{script:?} interpreter and driver"),
        ) {
            continue;
        }
        script.run(&url).expect("client script");
    }
}
