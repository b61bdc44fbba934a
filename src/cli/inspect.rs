//! `pgenvelope inspect VALUE`: print the header of an `enc:v1:` value. Never decrypts, never
//! unwraps a key; the key store is only asked which organisation the DEK belongs to.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, RawConfig};
use crate::keys::KeyStore;
use crate::rules::load_path;

/// Flags of `pgenvelope inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The value, e.g. 'enc:v1:AQ…'
    pub value: String,

    /// Rule file or directory, to name the column [default: rules]
    #[arg(long, env = "PGENVELOPE_RULES", value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// Upstream URL whose database holds the key store, to name the organisation
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Schema of the key store [default: pgenvelope]
    #[arg(long, env = "PGENVELOPE_KEY_SCHEMA", value_name = "NAME")]
    pub key_schema: Option<String>,

    /// Do not contact the key store
    #[arg(long)]
    pub offline: bool,
}

impl InspectArgs {
    /// The settings these flags give (the rest come from the file and the defaults).
    pub(crate) fn overlay(&self) -> RawConfig {
        RawConfig {
            rules: self.rules.clone(),
            upstream: self.upstream.clone(),
            key_schema: self.key_schema.clone(),
            ..RawConfig::default()
        }
    }
}

/// Print the header; exit 1 if the value is not a well-formed enc:v1 value.
pub(crate) fn run(config: &Config, args: &InspectArgs) -> anyhow::Result<i32> {
    let rules = load_path(&config.encryption.rules).ok();
    let value = match crate::cipher::inspect(args.value.trim().as_bytes(), rules.as_ref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pgenvelope: not a valid enc:v1 value: {e}");
            return Ok(1);
        }
    };
    println!("format:     enc:v1");
    if value.searchable {
        println!(
            "algorithm:  {:?}, searchable (a search term in front)",
            value.algorithm
        );
    } else {
        println!("algorithm:  {:?}", value.algorithm);
    }
    println!("dek:        {}", value.dek_id);
    let column = match (&rules, &value.column) {
        (Some(_), Some(name)) => name.clone(),
        (Some(_), None) => "(no rule has this column id)".to_owned(),
        (None, _) => "(rules not loaded)".to_owned(),
    };
    println!("column id:  {} {}", value.column_id, column);
    println!("plaintext:  {} bytes", value.plaintext_len);
    if args.offline {
        return Ok(0);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let org = runtime.block_on(async {
        let tls = crate::tls::ServiceTls::new(
            config.proxy.upstream_sslmode,
            config.proxy.upstream_ca.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let store = KeyStore::new(config.upstream.service.clone(), &config.keys.key_schema)
            .map_err(|e| e.to_string())?
            .with_tls(tls);
        match tokio::time::timeout(Duration::from_secs(5), store.lookup(value.dek_id)).await {
            Ok(Ok(Some(rec))) => Ok(format!(
                "{} (version {}, {}, kek {})",
                rec.org_id, rec.version, rec.state, rec.kek
            )),
            Ok(Ok(None)) => Ok("(DEK not in the key store)".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("key store did not answer in time".to_owned()),
        }
    });
    match org {
        Ok(org) => println!("org:        {org}"),
        Err(e) => println!("org:        unknown ({e})"),
    }
    Ok(0)
}
