//! Authentication, server restarts, two-phase commit, replication and other drivers, through
//! the proxy against private clusters (password, md5, scram-sha-256).

use std::time::Duration;

use crate::support::harness::{connect, ProxyOptions, TestProxy};
use crate::support::{require_tool, Auth, ClientScript, ClusterOptions, PrivateCluster};

fn proxy_for(cluster: &PrivateCluster) -> TestProxy {
    TestProxy::with(ProxyOptions::to("127.0.0.1", cluster.port()))
}

async fn login(
    proxy: &TestProxy,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user(user)
        .password(password)
        .dbname("test");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_md5_and_scram_logins_pass_through() {
    for auth in [Auth::Password, Auth::Md5, Auth::ScramSha256] {
        let cluster = PrivateCluster::start(ClusterOptions::new(auth)).unwrap();
        cluster.create_user("app_user", "s3cr'et pässword").unwrap();
        cluster
            .psql("test", "GRANT ALL ON SCHEMA public TO app_user")
            .unwrap();
        let proxy = proxy_for(&cluster);

        let client = login(&proxy, "app_user", "s3cr'et pässword")
            .await
            .unwrap_or_else(|e| panic!("{auth:?} login through the proxy: {e}"));
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, "app_user");

        let err = login(&proxy, "app_user", "wrong")
            .await
            .expect_err("wrong password refused");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{auth:?}: {err}"
        );
        // The proxy is unaffected by the failed login.
        let again = login(&proxy, "app_user", "s3cr'et pässword").await.unwrap();
        again.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_while_connected() {
    let mut cluster = PrivateCluster::start(ClusterOptions::new(Auth::ScramSha256)).unwrap();
    let proxy = proxy_for(&cluster);
    let pw = cluster.superuser_password().to_owned();
    let client = login(&proxy, "postgres", &pw).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();

    tokio::task::block_in_place(|| cluster.restart()).unwrap();

    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("old session is gone");
    assert!(err.is_closed() || err.code().is_some(), "{err}");
    let fresh = login(&proxy, "postgres", &pw).await.unwrap();
    let one: i32 = fresh.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // While the server is down, new clients get a clear error instead of hanging.
    tokio::task::block_in_place(|| cluster.stop()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), login(&proxy, "postgres", &pw))
        .await
        .expect("bounded")
        .expect_err("no server");
    assert!(
        err.to_string().contains("08006")
            || err.as_db_error().is_some()
            || err.to_string().contains("upstream"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_commit() {
    let cluster = PrivateCluster::start(
        ClusterOptions::new(Auth::Trust).setting("max_prepared_transactions", "10"),
    )
    .unwrap();
    let proxy = proxy_for(&cluster);
    let client = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    client
        .batch_execute(
            "CREATE TABLE tpc (id int); BEGIN; INSERT INTO tpc VALUES (1); PREPARE TRANSACTION 'tx1';",
        )
        .await
        .unwrap();
    let other = connect(&proxy.pg_config("postgres", None, "test"))
        .await
        .unwrap();
    let n: i64 = other
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'tx1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    other.batch_execute("COMMIT PREPARED 'tx1'").await.unwrap();
    let n: i64 = other
        .query_one("SELECT count(*) FROM tpc", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn replication_connections_pass_through_raw() {
    let cluster =
        PrivateCluster::start(ClusterOptions::new(Auth::Trust).setting("wal_level", "logical"))
            .unwrap();
    let proxy = proxy_for(&cluster);
    // Physical replication protocol command over a replication connection.
    let out = crate::clients::psql_ok(
        proxy.port(),
        "replication=database dbname=test",
        &["-At", "-c", "IDENTIFY_SYSTEM"],
    );
    assert!(out.contains('|'), "IDENTIFY_SYSTEM answered: {out}");
    // A logical slot streamed through CopyBoth with pg_recvlogical.
    cluster.psql("test", "CREATE TABLE r (id int)").unwrap();
    cluster
        .psql(
            "test",
            "SELECT pg_create_logical_replication_slot('s1', 'test_decoding')",
        )
        .unwrap();
    cluster.psql("test", "INSERT INTO r VALUES (42);").unwrap();
    let bindir = crate::support::binaries::pg_bindir().unwrap();
    let mut child = std::process::Command::new(bindir.join("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "test",
        ])
        .args(["--slot", "s1", "--start", "-f", "-", "-F", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("INSERT: id[integer]:42") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "pg_recvlogical streamed through the proxy: {seen:?}");
}

#[test]
fn psycopg_and_node_postgres_through_the_proxy() {
    let cluster = PrivateCluster::start(ClusterOptions::new(Auth::ScramSha256)).unwrap();
    let proxy = proxy_for(&cluster);
    let url = proxy.url("postgres", Some(cluster.superuser_password()), "test");
    for script in [ClientScript::PsycopgSmoke, ClientScript::NodePgSmoke] {
        if !require_tool(script.available(), &format!("{script:?}")) {
            continue;
        }
        script
            .run(&url)
            .unwrap_or_else(|e| panic!("{script:?} through the proxy: {e}"));
    }
}
