//! `pgenvelope check`: validate configuration, rules, TLS files and KEK settings without
//! serving; exit 1 on any error.
//!
//! Prints one line per validated item, then every problem found as an `error:` line. What is
//! checked, offline:
//!
//! - the configuration and the rule files (as `serve` loads them);
//! - TLS toward clients: the `--tls-cert` chain and the `--tls-key` key are loaded with the
//!   listener's own code, so they must parse and the key must belong to the certificate;
//! - TLS toward PostgreSQL: the `--upstream-ca` file must hold CA certificates the verifier
//!   accepts (also when the `sslmode` does not use it), and the client configuration for the
//!   `sslmode` is built as the proxy builds it;
//! - KEKs: every URI parses; a `local:` key file, if it exists, must be a regular file of 32
//!   bytes with no group or world permissions (a missing `--kms` file is reported as created
//!   on first start; a missing `--kms-also` file is an error, as it could unwrap nothing);
//!   a `pkcs11:` URI must parse completely and name a module file that exists.
//!
//! Nothing is created or changed, and only two flags touch the network. `--against-kms` opens
//! every KEK provider as `serve` does (a `local:` file only if it exists) and, with the
//! `--kms` one, wraps and unwraps a random test key bound to organisation `pgenvelope-check`
//! (the unwrap-only providers are just opened: they may lack permission to wrap).
//! `--against-db` asks the database of the application's tables (`--data-database`, else the
//! upstream URL's; the proxy's service credentials) whether every rule's table and columns
//! exist and whether the encrypted columns are text-like (they hold `enc:v1:` text); it also
//! warns about what works but should be fixed: a searchable column without its search index, a
//! unique index on an encrypted column, a `varchar(n)` too short for ciphertext ([`db`]). Warnings go to stderr and never change the exit status. With `--ddl`, stdout
//! carries only the SQL creating the missing search indexes (for `| psql`): every other line
//! goes to stderr, and the exit status is 0 whenever the database could be checked.
//!
//! Never prints key material: a KEK is named by its URI (PIN redacted) and its public id.

mod db;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::common::DataArgs;
use crate::config::{Config, RawConfig, SslMode};
use crate::crypto::{DataKey, DekId, OrgId};
use crate::keys::{KekProvider, KeyContext, KmsUri, LocalKek, Pkcs11Uri};
use crate::proxy::ValidateTlsFiles;
use crate::rules::load_path;
use crate::tls::{validate_ca, ServiceTls, TlsError};

/// Organisation the `--against-kms` test key is bound to (visible in KMS audit logs).
const CHECK_ORG: &str = "pgenvelope-check";

/// Flags of `pgenvelope check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Rule file or directory [default: rules]
    #[arg(long, env = "PGENVELOPE_RULES", value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// KEK provider URI to validate; a local: key file is checked (never created), other
    /// providers are only contacted with --against-kms [default: local:.pgenvelope/kek]
    #[arg(long, env = "PGENVELOPE_KMS", value_name = "URI")]
    pub kms: Option<String>,

    /// Unwrap-only KEK provider to validate; repeatable, or comma-separated in the environment
    #[arg(
        long,
        env = "PGENVELOPE_KMS_ALSO",
        value_name = "URI",
        value_delimiter = ','
    )]
    pub kms_also: Vec<String>,

    /// Upstream URL used by --against-db [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    #[command(flatten)]
    pub(crate) data: DataArgs,

    /// PEM certificate chain for TLS toward clients (with --tls-key): loaded as the listener
    /// loads it [default: off]
    #[arg(long, env = "PGENVELOPE_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for TLS toward clients (with --tls-cert); must belong to the
    /// certificate
    #[arg(long, env = "PGENVELOPE_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// TLS toward PostgreSQL: disable, prefer, require, verify-ca or verify-full
    /// [default: the --upstream URL's sslmode, else verify-full with --upstream-ca, else prefer]
    #[arg(long, env = "PGENVELOPE_UPSTREAM_SSLMODE", value_name = "MODE")]
    pub upstream_sslmode: Option<String>,

    /// PEM CA certificate(s) for verifying PostgreSQL's certificate; must parse
    #[arg(long, env = "PGENVELOPE_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// Also open every KEK provider (AWS KMS, PKCS#11, local) and wrap and unwrap a random
    /// test key with the --kms one; contacts the KMS or HSM
    #[arg(long)]
    pub against_kms: bool,

    /// Also check every rule against the catalog of the database holding the tables
    /// (--data-database, else the --upstream URL's): tables, column types, defaults, row keys;
    /// warns (exit status unchanged) about missing search indexes, unique indexes on encrypted
    /// columns and varchar(n) columns too short for ciphertext
    #[arg(long)]
    pub against_db: bool,

    /// With --against-db: print only SQL on stdout, one statement per line, creating the
    /// missing search indexes of searchable columns (`pgenvelope check --against-db --ddl |
    /// psql` sets them up); for per-organisation uniqueness each comes with its UNIQUE form as
    /// a `--` comment line. Everything else goes to stderr, and the exit status is 0 whenever
    /// the database could be checked
    #[arg(long, requires = "against_db")]
    pub ddl: bool,
}

impl CheckArgs {
    /// The settings these flags give (the rest come from the file and the defaults).
    pub(crate) fn overlay(&self) -> RawConfig {
        RawConfig {
            rules: self.rules.clone(),
            kms: self.kms.clone(),
            kms_also: self.kms_also.clone(),
            upstream: self.upstream.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            upstream_sslmode: self.upstream_sslmode.clone(),
            upstream_ca: self.upstream_ca.clone(),
            data_database: self.data.data_database.clone(),
            ..RawConfig::default()
        }
    }
}

/// Run the check; prints a summary and returns the exit code.
pub(crate) fn run(config: &Config, args: &CheckArgs) -> anyhow::Result<i32> {
    let out = Out { sql_only: args.ddl };
    let rules = load_path(&config.encryption.rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    let columns: usize = rules.tables().map(|t| t.columns().len()).sum();
    out.line(format_args!(
        "rules: {} table(s), {} encrypted column(s) from {}",
        rules.len(),
        columns,
        config.encryption.rules.display()
    ));
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    check_client_tls(config, out, &mut problems);
    let upstream_tls_ok = check_upstream_tls(config, out, &mut problems);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let keks = std::iter::once((&config.keys.kms, Role::Primary)).chain(
            config
                .keys
                .kms_also
                .iter()
                .map(|uri| (uri, Role::UnwrapOnly)),
        );
        for (uri, role) in keks {
            if let Err(e) = check_kek(uri, role, args.against_kms, out).await {
                problems.push(format!("{} ({}): {uri}: {e:#}", role.label(), role.flag()));
            }
        }
    });

    let mut db_checked = false;
    if args.against_db {
        if upstream_tls_ok {
            let found = runtime.block_on(db::check_against_db(config, &rules))?;
            db_checked = true;
            if found.problems.is_empty() {
                out.line(format_args!(
                    "database {}: every table and column exists and is text-like",
                    config.upstream.data_database_name()
                ));
            }
            for note in &found.notes {
                out.line(note);
            }
            if args.ddl {
                for sql in &found.ddl {
                    println!("{sql}");
                }
                if found.ddl.is_empty() {
                    out.line("ddl: nothing to create");
                }
            }
            problems.extend(found.problems);
            warnings.extend(found.warnings);
        } else {
            problems.push("database: not checked, the upstream TLS settings are invalid".into());
        }
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if problems.is_empty() {
        match warnings.len() {
            0 => out.line("ok"),
            n => out.line(format_args!("ok ({n} warning(s))")),
        }
        return Ok(0);
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    eprintln!("{} problem(s) found", problems.len());
    // `--ddl` feeds psql: its exit status says whether the SQL could be worked out.
    if args.ddl && db_checked {
        return Ok(0);
    }
    Ok(1)
}

/// Where the lines saying what was validated go: stdout, or stderr under `--ddl`, whose stdout
/// carries SQL only.
#[derive(Debug, Clone, Copy)]
struct Out {
    sql_only: bool,
}

impl Out {
    fn line(self, text: impl std::fmt::Display) {
        if self.sql_only {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// Load the client-facing certificate and key with the listener's code.
fn check_client_tls(config: &Config, out: Out, problems: &mut Vec<String>) {
    let Some(files) = &config.proxy.tls else {
        out.line("tls (clients): off (SSLRequest is answered N)");
        return;
    };
    match files.validate() {
        Ok(()) => out.line(format_args!(
            "tls (clients): certificate {} and key {} ok{}",
            files.cert.display(),
            files.key.display(),
            if config.proxy.require_client_tls {
                ", TLS required"
            } else {
                ""
            }
        )),
        Err(e) => {
            let hint = match &e {
                TlsError::Rustls {
                    source: rustls::Error::InconsistentKeys(_),
                    ..
                } => " (the key does not belong to the certificate)",
                _ => "",
            };
            problems.push(format!("tls (clients) (--tls-cert/--tls-key): {e}{hint}"));
        }
    }
}

/// Check the CA file (if any) and build the upstream client configuration for the `sslmode`.
/// Returns whether the settings are usable.
fn check_upstream_tls(config: &Config, out: Out, problems: &mut Vec<String>) -> bool {
    let mode = config.proxy.upstream_sslmode;
    let ca = config.proxy.upstream_ca.as_deref();
    let ca_note = match ca.map(|ca| (ca, validate_ca(ca))) {
        None => None,
        Some((ca, Ok(n))) => Some(format!(
            "CA {} ({n} certificate{}) ok",
            ca.display(),
            if n == 1 { "" } else { "s" }
        )),
        Some((_, Err(e))) => {
            problems.push(format!("tls (upstream) (--upstream-ca): {e}"));
            return false;
        }
    };
    if let Err(e) = ServiceTls::new(mode, ca) {
        problems.push(format!("tls (upstream) (--upstream-sslmode {mode}): {e}"));
        return false;
    }
    let verified = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
    let line = match (mode, ca_note) {
        (SslMode::Disable, None) => "sslmode disable (no TLS toward PostgreSQL)".to_owned(),
        (_, None) => format!("sslmode {mode} (server certificate not verified)"),
        (_, Some(note)) if verified => format!("sslmode {mode}, {note}"),
        (_, Some(note)) => format!(
            "sslmode {mode}, {note} (unused: only verify-ca and verify-full check the server \
             certificate)"
        ),
    };
    out.line(format_args!("tls (upstream): {line}"));
    true
}

/// Which setting a KEK comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `--kms`: wraps new data keys.
    Primary,
    /// `--kms-also`: unwraps the data keys it wrapped earlier.
    UnwrapOnly,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Self::Primary => "kms",
            Self::UnwrapOnly => "kms (unwrap only)",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::Primary => "--kms",
            Self::UnwrapOnly => "--kms-also",
        }
    }
}

/// Validate one KEK: offline, and with `against_kms` by opening it (and, for the primary
/// one, a wrap and unwrap round trip). Prints what was validated; never creates a key file.
async fn check_kek(uri: &KmsUri, role: Role, against_kms: bool, out: Out) -> anyhow::Result<()> {
    let label = role.label();
    let kek: Arc<dyn KekProvider> = if let KmsUri::Local { path } = uri {
        match LocalKek::open_existing(path)? {
            Some(kek) => {
                out.line(format_args!(
                    "{label}: {uri}: key file ok (KEK id {}; local keys are for development only)",
                    kek.kek_id()
                ));
                Arc::new(kek)
            }
            None if role == Role::Primary => {
                out.line(format_args!(
                    "{label}: {uri}: the key file does not exist yet; it will be created \
                     (mode 0600) on first start"
                ));
                return Ok(());
            }
            None => anyhow::bail!(
                "the key file {} does not exist; an unwrap-only KEK must be the key that \
                 wrapped existing data keys",
                path.display()
            ),
        }
    } else {
        if let KmsUri::Pkcs11 { uri } = uri {
            check_pkcs11_offline(uri)?;
        }
        if !against_kms {
            out.line(format_args!(
                "{label}: {uri}: not contacted (--against-kms opens it)"
            ));
            return Ok(());
        }
        let kek = uri.open().await.context("opening the provider")?;
        if role == Role::UnwrapOnly {
            out.line(format_args!(
                "{label}: {uri}: opened (KEK id {})",
                kek.kek_id()
            ));
        }
        kek
    };
    if !against_kms || role == Role::UnwrapOnly {
        return Ok(());
    }
    round_trip(kek.as_ref()).await?;
    out.line(format_args!(
        "{label}: {uri}: round trip ok (wrapped and unwrapped a random test key; KEK id {})",
        kek.kek_id()
    ));
    Ok(())
}

/// The parts of a `pkcs11:` URI that can be checked without loading the module: every
/// attribute and the PIN source parse, and a module given as a path exists.
fn check_pkcs11_offline(uri: &str) -> anyhow::Result<()> {
    let parsed = Pkcs11Uri::parse(uri)?;
    let module = parsed.module_path();
    // Like dlopen: a name without `/` is looked up by the dynamic loader, so only a path can
    // be checked here.
    if module.to_string_lossy().contains('/') {
        check_module_file(module)?;
    }
    Ok(())
}

fn check_module_file(module: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(module)
        .with_context(|| format!("PKCS#11 module {}", module.display()))?;
    if !meta.is_file() {
        anyhow::bail!("PKCS#11 module {} is not a file", module.display());
    }
    Ok(())
}

/// Wrap a fresh random key and unwrap it again; the result must be the same key.
async fn round_trip(kek: &dyn KekProvider) -> anyhow::Result<()> {
    let ctx = KeyContext {
        org: OrgId::new(CHECK_ORG).context("the check organisation id")?,
        dek: DekId::new_random(),
    };
    let key = DataKey::generate();
    let wrapped = kek.wrap(&ctx, &key).await.context("wrapping a test key")?;
    let back = kek
        .unwrap(&ctx, &wrapped)
        .await
        .context("unwrapping the test key")?;
    if back.expose_secret() != key.expose_secret() {
        anyhow::bail!("the unwrapped test key differs from the one wrapped");
    }
    Ok(())
}
