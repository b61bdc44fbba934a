//! A private certificate authority per test, and PostgreSQL clusters serving TLS with its
//! certificates.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgenvelope::proxy::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::support::cluster::{ClusterOptions, PrivateCluster};

/// A private CA that signs server certificates for `localhost` and `127.0.0.1`.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Write the CA certificate to `dir/name`.
    pub(crate) fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }

    /// Write a server certificate and key for `localhost`/`127.0.0.1` to `dir`.
    pub(crate) fn server(&self, dir: &Path, prefix: &str) -> TlsFiles {
        self.server_for(dir, prefix, &["localhost", "127.0.0.1"])
    }

    /// Write a server certificate and key for `names` to `dir`.
    fn server_for(&self, dir: &Path, prefix: &str, names: &[&str]) -> TlsFiles {
        let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{prefix}.crt")),
            key: dir.join(format!("{prefix}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        files
    }
}

pub(crate) fn psql_conninfo(conninfo: &str, sql: &str) -> Output {
    Command::new("psql")
        .args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed")
}

/// A private cluster serving TLS with a certificate from `ca`. The files go into the data
/// directory, owned by the server's OS user, key mode 0600; ssl is turned on by a reload.
pub(crate) fn tls_cluster(ca: &Ca) -> PrivateCluster {
    tls_cluster_for(ca, &["localhost", "127.0.0.1"])
}

pub(crate) fn tls_cluster_for(ca: &Ca, names: &[&str]) -> PrivateCluster {
    tls_cluster_with(ca, names, ClusterOptions::default())
}

/// A private cluster started with `opts`, serving TLS with a certificate from `ca` for `names`.
pub(crate) fn tls_cluster_with(ca: &Ca, names: &[&str], opts: ClusterOptions) -> PrivateCluster {
    let cluster = PrivateCluster::start(opts).unwrap();
    let data = cluster.data_dir();
    let meta = std::fs::metadata(&data).unwrap();
    let files = ca.server_for(&data, "server", names);
    for f in [&files.cert, &files.key] {
        std::os::unix::fs::chown(f, Some(meta.uid()), Some(meta.gid())).unwrap();
    }
    cluster
        .psql("postgres", "ALTER SYSTEM SET ssl = on")
        .unwrap();
    cluster.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    for _ in 0..50 {
        if cluster.psql("postgres", "SHOW ssl").unwrap().contains("on") {
            return cluster;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("ssl did not turn on:\n{}", cluster.log_contents());
}
