//! `pgenvelope check`: validate configuration and rules without serving; exit 1 on any error.
//!
//! Without `--against-db` nothing touches the network. With it, the upstream (the proxy's
//! service credentials) is asked whether every rule's table and columns exist and whether the
//! encrypted columns are text-like (they hold `enc:v1:` text).

use std::path::PathBuf;

use anyhow::Context;

use crate::config::{Config, Overrides};
use crate::rules::{load_path, RuleSet};

/// Flags of `pgenvelope check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Rule file or directory [default: rules]
    #[arg(long, env = "PGENVELOPE_RULES", value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// KEK provider URI to validate [default: local:.pgenvelope/kek]
    #[arg(long, env = "PGENVELOPE_KMS", value_name = "URI")]
    pub kms: Option<String>,

    /// Upstream URL used by --against-db [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Also check every rule against the upstream database's catalog
    #[arg(long)]
    pub against_db: bool,
}

impl CheckArgs {
    pub(crate) fn overrides(&self) -> Overrides {
        Overrides {
            rules: self.rules.clone(),
            kms: self.kms.clone(),
            upstream: self.upstream.clone(),
            ..Overrides::default()
        }
    }
}

/// Run the check; prints a summary and returns the exit code.
pub(crate) fn run(config: &Config, args: &CheckArgs) -> anyhow::Result<i32> {
    let rules = load_path(&config.rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    let columns: usize = rules.tables().map(|t| t.columns().len()).sum();
    println!(
        "rules: {} table(s), {} encrypted column(s) from {}",
        rules.len(),
        columns,
        config.rules.display()
    );
    println!("kms: {}", config.kms);
    for uri in &config.kms_also {
        println!("kms (unwrap only): {uri}");
    }
    if !args.against_db {
        println!("ok");
        return Ok(0);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let problems = runtime.block_on(check_against_db(config, &rules))?;
    if problems.is_empty() {
        println!("database: every table and column exists and is text-like");
        println!("ok");
        return Ok(0);
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    eprintln!("{} problem(s) found", problems.len());
    Ok(1)
}

/// Types whose values can hold `enc:v1:` text.
const TEXT_LIKE: &[&str] = &["text", "character varying", "character", "citext", "name"];

async fn check_against_db(config: &Config, rules: &RuleSet) -> anyhow::Result<Vec<String>> {
    let tls = crate::tls::ServiceTls::new(config.upstream_sslmode, config.upstream_ca.as_deref())
        .context("TLS settings for the upstream")?;
    let mut service = config.upstream.service.clone();
    tls.apply(&mut service);
    let (client, conn) = tokio::time::timeout(config.connect_timeout, service.connect(tls))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the upstream timed out"))?
        .context("connecting to the upstream")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut problems = Vec::new();
    for table in rules.tables() {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL), a.atthasdef \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table.schema(), &table.name()],
            )
            .await
            .context("reading the catalog")?;
        if rows.is_empty() {
            problems.push(format!(
                "{} ({}): table does not exist",
                table.qualified_name(),
                table.location()
            ));
            continue;
        }
        let find = |name: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == name)
                .map(|r| (r.get::<_, String>(1), r.get::<_, bool>(2)))
        };
        if let Some(tenant) = table.tenant_column() {
            if find(tenant).is_none() {
                problems.push(format!(
                    "{}.{tenant} ({}): tenant column does not exist",
                    table.qualified_name(),
                    table.location()
                ));
            }
        }
        for col in table.columns() {
            match find(col.column()) {
                None => problems.push(format!(
                    "{} ({}): column does not exist",
                    col.qualified_name(),
                    col.location()
                )),
                Some((ty, has_default)) => {
                    if !TEXT_LIKE.contains(&ty.as_str()) {
                        problems.push(format!(
                            "{} ({}): column type is {ty}, but encrypted columns must be text-like \
                             (text, varchar, char)",
                            col.qualified_name(),
                            col.location()
                        ));
                    }
                    if has_default {
                        problems.push(format!(
                            "{} ({}): column has a DEFAULT, which would store plaintext; drop it",
                            col.qualified_name(),
                            col.location()
                        ));
                    }
                }
            }
        }
    }
    Ok(problems)
}
