//! `pgenvelope guard`: CHECK constraints that make PostgreSQL itself refuse plaintext in
//! encrypted columns.
//!
//! The proxy encrypts what passes through it, by table name. Writes it cannot see — through an
//! updatable view, a partition or inheritance child addressed by its own name, a trigger, a
//! function or procedure, a rule, or a connection that bypasses the proxy — would store
//! plaintext. A guard closes that gap in the database: every encrypted column gets
//!
//! ```sql
//! ALTER TABLE t ADD CONSTRAINT pgenvelope_enc_<column>
//!     CHECK (<column> IS NULL OR left(<column>::text, 7) = 'enc:v1:') NOT VALID
//! ```
//!
//! so any such write fails with SQLSTATE 23514 instead of storing plaintext. CHECK constraints
//! are inherited by partitions and inheritance children, and apply to writes made through views,
//! triggers and functions. `NOT VALID` means rows already stored are not checked (adding the
//! guard takes a brief lock and never scans); `--validate` checks them once (after `reencrypt`)
//! and marks the constraint valid. `--remove` drops the guards.
//!
//! The guard checks the prefix only: it stops accidental plaintext, not a writer that forges
//! `enc:v1:` text on purpose.

use std::path::PathBuf;

use anyhow::Context;

use super::common::{self, DataArgs};
use crate::config::{Config, RawConfig};
use crate::rules::{load_path, ColumnRule};

/// Flags of `pgenvelope guard`.
#[derive(Debug, Clone, clap::Args)]
pub struct GuardArgs {
    /// Rule file, or directory of *.toml rule files (the proxy's --rules) [default: rules]
    #[arg(long, env = "PGENVELOPE_RULES", value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// Upstream URL (the proxy's --upstream); its user needs to own the tables
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    #[command(flatten)]
    pub(crate) data: DataArgs,

    /// Also check the rows already stored and mark the guards valid (fails, naming the column
    /// and the number of plaintext values, while any remain: run `reencrypt` first)
    #[arg(long, conflicts_with = "remove")]
    pub validate: bool,

    /// Drop the guards instead of adding them
    #[arg(long)]
    pub remove: bool,
}

impl GuardArgs {
    /// The settings these flags give (the rest come from the file and the defaults).
    pub(crate) fn overlay(&self) -> RawConfig {
        RawConfig {
            rules: self.rules.clone(),
            upstream: self.upstream.clone(),
            data_database: self.data.data_database.clone(),
            ..RawConfig::default()
        }
    }
}

/// Name of the guard constraint of `column` (at most 63 bytes, PostgreSQL's identifier limit).
pub(crate) fn constraint_name(column: &str) -> String {
    let name = format!("pgenvelope_enc_{column}");
    if name.len() <= 63 {
        return name;
    }
    // Long column names: a stable hash keeps names unique within the table.
    use sha2::Digest;
    let digest = sha2::Sha256::digest(column.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("pgenvelope_enc_{hex}")
}

/// `"name"` with embedded quotes doubled.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn table_sql(column: &ColumnRule) -> String {
    format!(
        "{}.{}",
        quote_ident(column.schema()),
        quote_ident(column.table())
    )
}

/// Run the command; prints one line per column and returns the exit code.
pub(crate) fn run(config: &Config, args: &GuardArgs) -> anyhow::Result<i32> {
    let rules = load_path(&config.encryption.rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    let columns: Vec<ColumnRule> = rules.tables().flat_map(|t| t.columns().cloned()).collect();
    if columns.is_empty() {
        println!(
            "no encrypted columns in {}",
            config.encryption.rules.display()
        );
        return Ok(0);
    }
    let runtime = common::runtime()?;
    runtime.block_on(async {
        let client = common::connect_data(config).await?;
        let mut failed = 0usize;
        for column in &columns {
            match guard_one(&client, column, args, config).await {
                Ok(line) => println!("{}: {line}", column.qualified_name()),
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {}: {e:#}", column.qualified_name());
                }
            }
        }
        Ok(i32::from(failed > 0))
    })
}

/// Add, validate or remove the guard of one column; returns what was done.
async fn guard_one(
    client: &tokio_postgres::Client,
    column: &ColumnRule,
    args: &GuardArgs,
    config: &Config,
) -> anyhow::Result<String> {
    let name = constraint_name(column.column());
    let table = table_sql(column);
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .context("reading the catalog")?
        .get(0);
    if !exists {
        anyhow::bail!(
            "table {}.{} {}",
            column.schema(),
            column.table(),
            common::not_in_data_database(config)
        );
    }
    let existing = client
        .query_opt(
            "SELECT con.convalidated FROM pg_constraint con \
             JOIN pg_class c ON c.oid = con.conrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND con.conname = $3 AND con.contype = 'c'",
            &[&column.schema(), &column.table(), &name],
        )
        .await
        .context("reading the catalog")?
        .map(|r| r.get::<_, bool>(0));
    if args.remove {
        if existing.is_none() {
            return Ok("no guard".into());
        }
        client
            .batch_execute(&format!(
                "ALTER TABLE {table} DROP CONSTRAINT {}",
                quote_ident(&name)
            ))
            .await
            .context("dropping the guard")?;
        return Ok(format!("guard {name} removed"));
    }
    let col = quote_ident(column.column());
    let added = if existing.is_none() {
        client
            .batch_execute(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT {} \
                 CHECK ({col} IS NULL OR left({col}::text, 7) = 'enc:v1:') NOT VALID",
                quote_ident(&name)
            ))
            .await
            .context("adding the guard")?;
        true
    } else {
        false
    };
    let valid = existing == Some(true);
    if !args.validate || valid {
        return Ok(match (added, valid) {
            (true, _) => format!("guard {name} added (new writes checked)"),
            (false, true) => format!("guard {name} present, valid"),
            (false, false) => format!("guard {name} present (new writes checked)"),
        });
    }
    let plaintext: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {table} WHERE {col} IS NOT NULL \
                 AND left({col}::text, 7) <> 'enc:v1:'"
            ),
            &[],
        )
        .await
        .context("counting plaintext values")?
        .get(0);
    if plaintext > 0 {
        anyhow::bail!(
            "{plaintext} value(s) are not encrypted; run `pgenvelope reencrypt` first \
             (new writes are checked already)"
        );
    }
    client
        .batch_execute(&format!(
            "ALTER TABLE {table} VALIDATE CONSTRAINT {}",
            quote_ident(&name)
        ))
        .await
        .context("validating the guard")?;
    Ok(format!("guard {name} valid (every stored value checked)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_names_fit_and_stay_unique() {
        assert_eq!(constraint_name("value"), "pgenvelope_enc_value");
        let a = constraint_name(&"a".repeat(60));
        let b = constraint_name(&format!("{}b", "a".repeat(59)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
