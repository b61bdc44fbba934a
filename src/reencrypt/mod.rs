//! `reencrypt`: move every stored value of the configured columns under its organisation's
//! active DEK, directly in PostgreSQL, while applications keep writing through proxies.
//!
//! # What happens to a value
//!
//! | stored value | owner | action |
//! |---|---|---|
//! | `NULL` | – | skipped |
//! | plaintext (not `enc:v1:`) | the row's `tenant_column`, else `--default-tenant` | sealed under the owner's active DEK (created if it has none); no owner: counted, left as is |
//! | `enc:v1` under the owner's active DEK | the DEK's organisation | unchanged (not decrypted) |
//! | `enc:v1` under a `decrypt_only` DEK | the DEK's organisation | opened and sealed again under that organisation's active DEK |
//! | `enc:v1` under a destroyed or unknown DEK, for another column, failing authentication, or malformed | – | counted by reason, left as is |
//!
//! Output is exactly what the proxy writes (same [`ColumnKey`], column id from the rule and
//! AAD), so proxies read it back. With an organisation filter, values owned by other
//! organisations are skipped.
//!
//! # Safety against concurrent writers
//!
//! Rows are read in primary-key order (keyset pagination, `(pk…) > (last…)`, composite keys
//! supported) without locks. Each batch is written by one compare-and-set `UPDATE … FROM
//! unnest(…)` that only changes a column whose current text is still the one read (and whose
//! tenant column is unchanged), inside a transaction that also saves the checkpoint. Rows the
//! `UPDATE` skipped were changed in between: they are read again `FOR UPDATE` in the same
//! transaction, processed again and written; an application's newer value is therefore never
//! overwritten. A deadlock or lock timeout rolls the batch back and it is retried. Tables
//! without a primary key are reported and skipped.
//!
//! # Resuming
//!
//! See [`checkpoint`]: the last key of each finished batch is saved with the batch; the next
//! run resumes there unless a `rotate` or `shred` happened since the pass began, in which case
//! the table starts over. A run over finished tables changes nothing.
//!
//! # What this module never does
//!
//! It never logs or returns values, plaintext, ciphertext or keys: errors and reports name
//! tables, columns, DEK ids and organisations only. It never writes through a proxy.

mod checkpoint;
mod error;
mod plan;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};

use crate::cipher::{ById, Cipher, CipherError, CipherPolicy};
use crate::crypto::{looks_like_enc_v1, DekId, EncV1, OrgId};
use crate::keys::{CachedDek, KeyError, KeyManager};
use crate::rules::{ColumnRule, RuleSet, TableRule};
use crate::tls::ServiceTls;

use checkpoint::{Checkpoint, Checkpoints};
pub use error::ReencryptError;
use plan::TablePlan;
pub use verify::Census;

/// Default rows per batch (one transaction each).
pub const DEFAULT_BATCH: u32 = 500;
/// `application_name` of the service connection unless the URL sets one.
const APPLICATION_NAME: &str = "pgenvelope-reencrypt";
/// Class id of the run lock: "pgre" in ASCII.
const RUN_LOCK_CLASS: i32 = 0x7067_7265;
/// Compare-and-set rounds for rows that keep changing before they are left for the next run.
const CAS_ATTEMPTS: usize = 3;
/// Retries of a batch rolled back by a deadlock, serialization failure or lock timeout.
const BATCH_RETRIES: usize = 5;

/// What to re-encrypt and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configured columns.
    pub rules: RuleSet,
    /// Only this table (`schema`, `table` as stored); `None` for all.
    pub table: Option<(String, String)>,
    /// Only values owned by this organisation.
    pub org: Option<OrgId>,
    /// Owner of plaintext in rows with no tenant column value.
    pub default_tenant: Option<OrgId>,
    /// Rows per batch (at least 1).
    pub batch: usize,
    /// Ignore and delete saved checkpoints.
    pub restart: bool,
}

/// Receives progress while tables are processed. All methods default to doing nothing.
pub trait Progress {
    /// A table's pass begins at `done` of about `total` rows.
    fn table_started(&self, _table: &str, _done: u64, _total: u64) {}
    /// A batch was committed.
    fn advanced(&self, _table: &str, _done: u64, _total: u64) {}
    /// A table's pass ended (successfully or not).
    fn table_finished(&self, _table: &str) {}
    /// Something the operator should know (resuming, starting over, retrying).
    fn notice(&self, _table: &str, _message: &str) {}
}

/// Why a value was left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Untouched {
    /// Plaintext in a row whose organisation is unknown (no tenant value, no default tenant).
    NoOrganisation,
    /// Under a destroyed DEK: unrecoverable.
    DestroyedDek,
    /// Under a DEK the key store does not know.
    UnknownDek,
    /// The DEK exists but cannot be unwrapped here (other KEK, rejected by the KEK).
    KeyUnavailable,
    /// Failed authentication, or sealed for another column.
    Authentication,
    /// Starts with `enc:v1:` but is not a well-formed value.
    Malformed,
    /// Changed by someone else in every compare-and-set round; the next run retries it.
    KeptChanging,
}

impl Untouched {
    /// Short description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoOrganisation => {
                "plaintext with no organisation (no tenant value, no --default-tenant)"
            }
            Self::DestroyedDek => "under a destroyed DEK",
            Self::UnknownDek => "under an unknown DEK",
            Self::KeyUnavailable => "under a DEK this KEK cannot unwrap",
            Self::Authentication => "failed authentication or sealed for another column",
            Self::Malformed => "malformed enc:v1",
            Self::KeptChanging => "changed concurrently in every attempt",
        }
    }
}

/// Counts for one table, over values (a row has one value per encrypted column) unless the
/// name says rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Rows read in this run.
    pub rows: u64,
    /// Rows a previous run had done (resumed from a checkpoint).
    pub resumed_rows: u64,
    /// The checkpoint was dropped because keys were rotated or shredded since it was written.
    pub restarted: bool,
    /// NULL values.
    pub nulls: u64,
    /// Plaintext values now encrypted.
    pub encrypted: u64,
    /// Values moved from a retired DEK to the active one.
    pub moved: u64,
    /// Values already under their organisation's active DEK.
    pub unchanged: u64,
    /// Values owned by organisations other than the filter's.
    pub other_org: u64,
    /// Values left as they are, by reason.
    pub untouched: BTreeMap<Untouched, u64>,
    /// Rows whose compare-and-set failed because they changed, and were read again.
    pub conflicts: u64,
    /// A key was rotated or shredded while the table was processed: values written under the
    /// old key since then need another run.
    pub keys_changed_during: bool,
}

impl TableStats {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Null => self.nulls += 1,
            Outcome::Encrypted => self.encrypted += 1,
            Outcome::Moved => self.moved += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::OtherOrg => self.other_org += 1,
            Outcome::Untouched(why) => *self.untouched.entry(why).or_insert(0) += 1,
        }
    }

    fn merge(&mut self, other: &Self) {
        self.rows += other.rows;
        self.nulls += other.nulls;
        self.encrypted += other.encrypted;
        self.moved += other.moved;
        self.unchanged += other.unchanged;
        self.other_org += other.other_org;
        self.conflicts += other.conflicts;
        for (why, n) in &other.untouched {
            *self.untouched.entry(*why).or_insert(0) += n;
        }
    }

    /// Values left as they are, all reasons together.
    pub fn untouched_total(&self) -> u64 {
        self.untouched.values().sum()
    }
}

/// The result for one table.
#[derive(Debug)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Counts, or why the table was skipped or stopped. A table that stopped half-way keeps
    /// its checkpoint.
    pub result: Result<TableStats, ReencryptError>,
}

/// A retired (`decrypt_only`) DEK and what still depends on it.
#[derive(Debug, Clone)]
pub struct RetiredKey {
    /// The DEK.
    pub dek: DekId,
    /// Its organisation.
    pub org: OrgId,
    /// Its version.
    pub version: i32,
    /// Values of the configured columns still under it.
    pub remaining: u64,
    /// Retired longer ago than the cache TTL given, so no proxy can still hold it as its
    /// organisation's active key.
    pub settled: bool,
}

/// One re-encryption run over service connections of its own: one to the database of the
/// tables, one to the key store (which may be in another database).
///
/// Holds a session advisory lock on the key store schema's name in the database of the tables
/// for its lifetime, so two runs over one database with one key store never interleave.
pub struct Reencryptor {
    /// The database of the tables: rows, checkpoints and the run lock.
    client: Client,
    /// The key store's database: `key_events` and `data_keys`.
    store: Client,
    /// Name of the database of the tables, for messages.
    database: String,
    schema: String,
    checkpoints: Checkpoints,
    crypto: Crypto,
    options: Options,
}

impl Reencryptor {
    /// Connect with `data` (the upstream URL's settings, with the database of the tables), and
    /// to the key store of `keys`, and take the run lock. Creates nothing: [`Reencryptor::run`]
    /// creates the key store's tables and the checkpoint table when they are missing. `keys`
    /// must use the same key store schema `schema`.
    pub async fn connect(
        mut data: tokio_postgres::Config,
        tls: ServiceTls,
        schema: &str,
        keys: Arc<KeyManager>,
        options: Options,
    ) -> Result<Self, ReencryptError> {
        if data.get_application_name().is_none() {
            data.application_name(APPLICATION_NAME);
        }
        let database = data
            .get_dbname()
            .or_else(|| data.get_user())
            .unwrap_or_default()
            .to_owned();
        tls.apply(&mut data);
        let (client, connection) =
            data.connect(tls)
                .await
                .map_err(|e| ReencryptError::Connect {
                    database: database.clone(),
                    source: Arc::new(e),
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "reencrypt connection closed");
            }
        });
        let (store, connection) =
            keys.store()
                .dedicated()
                .await
                .map_err(|source| ReencryptError::KeyStore {
                    op: "connect",
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "reencrypt key store connection closed");
            }
        });
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&RUN_LOCK_CLASS, &schema],
            )
            .await
            .map_err(|e| ReencryptError::db("take the run lock", None, e))?
            .get(0);
        if !locked {
            return Err(ReencryptError::AlreadyRunning {
                database,
                schema: schema.to_owned(),
            });
        }
        // Waiting behind an application's long transaction would stall the run silently;
        // time out and retry the batch instead.
        client
            .batch_execute("SET lock_timeout = '5s'")
            .await
            .map_err(|e| ReencryptError::db("set lock_timeout", None, e))?;
        let checkpoints = Checkpoints::new(schema);
        Ok(Self {
            client,
            store,
            database,
            schema: schema.to_owned(),
            checkpoints,
            crypto: Crypto {
                // Reads of values under destroyed keys are reported per value, never as NULL.
                cipher: Cipher::new(keys, CipherPolicy::default(), Arc::default()),
                unusable: HashMap::new(),
                org_filter: options.org.clone(),
                default_tenant: options.default_tenant.clone(),
            },
            options,
        })
    }

    /// The tables this run covers, in rule order.
    pub fn tables(&self) -> Result<Vec<TableRule>, ReencryptError> {
        let rules = &self.options.rules;
        match &self.options.table {
            None => Ok(rules.tables().cloned().collect()),
            Some((schema, name)) => match rules.table(schema, name) {
                Some(t) => Ok(vec![t.clone()]),
                None => Err(ReencryptError::NotConfigured {
                    table: format!("{schema}.{name}"),
                }),
            },
        }
    }

    /// Process every table of the run. A failing table is reported and the next one taken;
    /// a key store or KEK outage stops the run (the report then ends with that table).
    ///
    /// First, a key store holding no DEKs while the tables hold `enc:v1` values is refused
    /// ([`ReencryptError::ForeignKeyStore`]) before anything is created or written: those
    /// values were sealed with another key store, and plaintext sealed now would be under
    /// keys no proxy reads. Then the key store's tables (as a proxy creates them) and the
    /// checkpoint table are created if missing.
    pub async fn run(
        &mut self,
        progress: &dyn Progress,
    ) -> Result<Vec<TableReport>, ReencryptError> {
        self.prepare().await?;
        let mut reports = Vec::new();
        for rule in self.tables()? {
            let table = rule.qualified_name();
            let result = self.table(&rule, progress).await;
            progress.table_finished(&table);
            if let Err(e) = self.crypto.cipher.keys().flush_counters().await {
                progress.notice(&table, &format!("could not save encryption counts: {e}"));
            }
            let fatal = matches!(
                result,
                Err(ReencryptError::Keys { .. }
                    | ReencryptError::Connect { .. }
                    | ReencryptError::KeyStore { .. })
            ) || self.client.is_closed()
                || self.store.is_closed();
            reports.push(TableReport { table, result });
            if fatal {
                break;
            }
        }
        Ok(reports)
    }

    /// Refuse a key store without keys for tables with sealed values; create the key store's
    /// and the checkpoints' tables if missing.
    async fn prepare(&mut self) -> Result<(), ReencryptError> {
        let store = Arc::clone(self.crypto.cipher.keys().store());
        let key_store = |source| ReencryptError::KeyStore {
            op: "look for data keys",
            source,
        };
        if !store.holds_keys().await.map_err(key_store)? {
            let sealed = verify::first_sealed_column(&self.client, &self.options.rules).await?;
            if let Some(column) = sealed {
                return Err(ReencryptError::ForeignKeyStore {
                    column,
                    database: self.database.clone(),
                    schema: self.schema.clone(),
                    key_store_database: store.database().to_owned(),
                });
            }
        }
        store
            .ensure_schema()
            .await
            .map_err(|source| ReencryptError::KeyStore {
                op: "create its tables",
                source,
            })?;
        self.checkpoints.ensure(&self.client).await
    }

    /// Read-only census of every configured column (not only this run's tables).
    pub async fn census(&mut self) -> Result<Census, ReencryptError> {
        verify::census(&mut self.client, &self.options.rules).await
    }

    /// Every `decrypt_only` DEK (of the filter organisation, if any), whether it was retired
    /// longer ago than `ttl` by the database clock, and the values `census` found under it.
    ///
    /// Call [`Reencryptor::retired_keys`] before taking the census when the answer decides
    /// destruction: a key settled before the census began cannot gain values during it from
    /// a proxy's stale cache.
    pub async fn retired_keys(&self, ttl: Duration) -> Result<Vec<RetiredKey>, ReencryptError> {
        let sql = format!(
            "SELECT dek_id, org_id, version, \
                    retired_at IS NOT NULL AND retired_at <= now() - make_interval(secs => $1) \
             FROM \"{}\".data_keys \
             WHERE state = 'decrypt_only' AND ($2::text IS NULL OR org_id = $2) \
             ORDER BY org_id, version",
            self.schema
        );
        let org = self.options.org.as_ref().map(OrgId::as_str);
        let rows = self
            .store
            .query(&sql, &[&ttl.as_secs_f64(), &org])
            .await
            .map_err(|e| ReencryptError::db("list retired DEKs", None, e))?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let org: String = row.get(1);
            let Ok(org) = OrgId::new(org) else {
                continue;
            };
            keys.push(RetiredKey {
                dek: DekId(row.get(0)),
                org,
                version: row.get(2),
                remaining: 0,
                settled: row.get(3),
            });
        }
        Ok(keys)
    }

    async fn table(
        &mut self,
        rule: &TableRule,
        progress: &dyn Progress,
    ) -> Result<TableStats, ReencryptError> {
        let plan = TablePlan::build(&self.client, &self.database, rule).await?;
        let name = plan.name.clone();
        let scope = self
            .options
            .org
            .as_ref()
            .map_or_else(String::new, |o| o.as_str().to_owned());
        let org_owned = self.options.org.as_ref().map(|o| o.as_str().to_owned());
        let org = org_owned.as_deref();
        let mut stats = TableStats::default();

        let mut saved = self.checkpoints.load(&self.client, &name, &scope).await?;
        if self.options.restart && saved.is_some() {
            self.checkpoints.delete(&self.client, &name, &scope).await?;
            saved = None;
        }
        if let Some(cp) = &saved {
            if cp.last_key.len() != plan.pk.len() {
                return Err(ReencryptError::BadCheckpoint { table: name });
            }
            let changed = self
                .checkpoints
                .stale_events_since(&self.store, cp.since_event, org)
                .await?;
            if changed > 0 {
                progress.notice(
                    &name,
                    "keys were rotated or shredded since the checkpoint: starting over",
                );
                stats.restarted = true;
                saved = None;
            } else {
                progress.notice(
                    &name,
                    &format!(
                        "resuming after {} row(s) done by an earlier run",
                        cp.rows_done
                    ),
                );
            }
        }
        let since_event = match &saved {
            Some(cp) => cp.since_event,
            None => self.checkpoints.high_water(&self.store).await?,
        };
        let total: i64 = self
            .client
            .query_one(&plan.count, &[])
            .await
            .map_err(|e| ReencryptError::db("count rows", Some(&name), e))?
            .get(0);
        let total = u64::try_from(total).unwrap_or(0);
        stats.resumed_rows = saved.as_ref().map_or(0, |cp| cp.rows_done);
        let mut done = stats.resumed_rows;
        let mut last_key = saved.map(|cp| cp.last_key);
        progress.table_started(&name, done, total);

        let batch = self.options.batch.max(1);
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        loop {
            let mut attempt = 0;
            let (read, batch_stats, next_key) = loop {
                match self
                    .batch(&plan, last_key.as_deref(), limit, &scope, since_event, done)
                    .await
                {
                    Ok(r) => break r,
                    Err(e) if e.is_transient() && attempt < BATCH_RETRIES => {
                        attempt += 1;
                        progress.notice(&name, "batch rolled back (lock conflict); retrying");
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            if read == 0 {
                break;
            }
            stats.merge(&batch_stats);
            done += read as u64;
            progress.advanced(&name, done, total.max(done));
            last_key = next_key;
            if read < batch {
                break;
            }
        }
        self.checkpoints.delete(&self.client, &name, &scope).await?;
        stats.keys_changed_during = self
            .checkpoints
            .stale_events_since(&self.store, since_event, org)
            .await?
            > 0;
        Ok(stats)
    }

    /// Read one batch after `after`, write what changed and the checkpoint in one
    /// transaction. Returns the rows read, their counts and the batch's last key.
    async fn batch(
        &mut self,
        plan: &TablePlan,
        after: Option<&[String]>,
        limit: i64,
        scope: &str,
        since_event: i64,
        done: u64,
    ) -> Result<(usize, TableStats, Option<Vec<String>>), ReencryptError> {
        let name = plan.name.as_str();
        let rows = match after {
            None => self.client.query(&plan.select_first, &[&limit]).await,
            Some(key) => {
                let mut params: Vec<&(dyn ToSql + Sync)> =
                    key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
                params.push(&limit);
                self.client.query(&plan.select_after, &params).await
            }
        }
        .map_err(|e| ReencryptError::db("read rows", Some(name), e))?;
        let Some(last) = rows.last() else {
            return Ok((0, TableStats::default(), None));
        };
        let last_key = row_key(plan, last)?;

        let mut stats = TableStats {
            rows: rows.len() as u64,
            ..TableStats::default()
        };
        let mut pending = Vec::new();
        for row in &rows {
            let work = self.crypto.row(plan, row).await?;
            if work.changes() {
                pending.push(work);
            } else {
                work.outcomes.into_iter().for_each(|o| stats.count(o));
            }
        }

        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| ReencryptError::db("begin", Some(name), e))?;
        let mut round = 0;
        while !pending.is_empty() {
            let updated = update(&tx, plan, &pending).await?;
            let (applied, conflicted): (Vec<RowWork>, Vec<RowWork>) =
                pending.into_iter().partition(|w| updated.contains(&w.key));
            for w in applied {
                w.outcomes.into_iter().for_each(|o| stats.count(o));
            }
            if conflicted.is_empty() {
                break;
            }
            stats.conflicts += conflicted.len() as u64;
            round += 1;
            if round >= CAS_ATTEMPTS {
                for w in conflicted {
                    w.give_up().into_iter().for_each(|o| stats.count(o));
                }
                break;
            }
            let locked = select_locked(&tx, plan, &conflicted).await?;
            pending = Vec::new();
            for row in &locked {
                let work = self.crypto.row(plan, row).await?;
                if work.changes() {
                    pending.push(work);
                } else {
                    work.outcomes.into_iter().for_each(|o| stats.count(o));
                }
            }
        }
        let checkpoint = Checkpoint {
            last_key: last_key.clone(),
            rows_done: done + rows.len() as u64,
            since_event,
        };
        self.checkpoints.save(&tx, name, scope, &checkpoint).await?;
        tx.commit()
            .await
            .map_err(|e| ReencryptError::db("commit", Some(name), e))?;
        Ok((rows.len(), stats, Some(last_key)))
    }
}

impl std::fmt::Debug for Reencryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reencryptor")
            .field("database", &self.database)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// What happened to one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Null,
    Encrypted,
    Moved,
    Unchanged,
    OtherOrg,
    Untouched(Untouched),
}

/// One row as read, and what to write.
///
/// Invariant: `old`, `new` and `outcomes` have one entry per encrypted column; `new[i]` is
/// `Some` exactly when `outcomes[i]` is `Encrypted` or `Moved`.
struct RowWork {
    key: Vec<String>,
    tenant: Option<String>,
    old: Vec<Option<String>>,
    new: Vec<Option<String>>,
    outcomes: Vec<Outcome>,
}

impl RowWork {
    fn changes(&self) -> bool {
        self.new.iter().any(Option::is_some)
    }

    /// Outcomes when the row is left for the next run.
    fn give_up(self) -> Vec<Outcome> {
        self.outcomes
            .into_iter()
            .zip(&self.new)
            .map(|(o, n)| match n {
                Some(_) => Outcome::Untouched(Untouched::KeptChanging),
                None => o,
            })
            .collect()
    }
}

/// Why a DEK cannot be used, with its organisation when the key store knows it.
#[derive(Debug, Clone)]
struct Unusable {
    why: Untouched,
    org: Option<OrgId>,
}

/// Keys and the per-value decisions, over the crate's one [`Cipher`].
struct Crypto {
    cipher: Cipher,
    /// DEKs that cannot decrypt (destroyed, unknown, unwrappable): remembered so each costs
    /// one key-store look-up, not one per value.
    unusable: HashMap<DekId, Unusable>,
    org_filter: Option<OrgId>,
    default_tenant: Option<OrgId>,
}

impl Crypto {
    async fn row(&mut self, plan: &TablePlan, row: &Row) -> Result<RowWork, ReencryptError> {
        let key = row_key(plan, row)?;
        let get_err = |e| ReencryptError::db("decode row", Some(&plan.name), e);
        let tenant: Option<String> = row.try_get(plan.pk.len()).map_err(get_err)?;
        let row_org = tenant
            .as_deref()
            .and_then(|t| OrgId::new(t).ok())
            .or_else(|| self.default_tenant.clone());
        let n = plan.columns.len();
        let mut work = RowWork {
            key,
            tenant,
            old: Vec::with_capacity(n),
            new: Vec::with_capacity(n),
            outcomes: Vec::with_capacity(n),
        };
        for (i, column) in plan.columns.iter().enumerate() {
            let value: Option<String> = row.try_get(plan.value_offset() + i).map_err(get_err)?;
            // Row binding: the row key is the (single-column) primary key, checked when the
            // plan was built.
            let row_key = column
                .row_key()
                .and_then(|_| work.key.first())
                .map(String::as_str);
            let (outcome, new) = self
                .value(
                    &plan.name,
                    column,
                    row_org.as_ref(),
                    row_key,
                    value.as_deref(),
                )
                .await?;
            work.old.push(if new.is_some() { value } else { None });
            work.new.push(new);
            work.outcomes.push(outcome);
        }
        Ok(work)
    }

    async fn value(
        &mut self,
        table: &str,
        column: &ColumnRule,
        row_org: Option<&OrgId>,
        row_key: Option<&str>,
        value: Option<&str>,
    ) -> Result<(Outcome, Option<String>), ReencryptError> {
        let Some(value) = value else {
            return Ok((Outcome::Null, None));
        };
        if !looks_like_enc_v1(value.as_bytes()) {
            let Some(org) = row_org else {
                return Ok((Outcome::Untouched(Untouched::NoOrganisation), None));
            };
            if self.org_filter.as_ref().is_some_and(|f| f != org) {
                return Ok((Outcome::OtherOrg, None));
            }
            let active = self.active(table, column, org).await?;
            let sealed = self.seal(column, &active, org, row_key, value.as_bytes())?;
            return Ok((Outcome::Encrypted, Some(sealed)));
        }
        let Ok(parsed) = EncV1::parse(value.as_bytes()) else {
            return Ok((Outcome::Untouched(Untouched::Malformed), None));
        };
        let dek = parsed.dek_id();
        let cached = match self.dek(table, column, dek).await? {
            Ok(cached) => cached,
            Err(unusable) => {
                let other = match (&self.org_filter, &unusable.org) {
                    (Some(f), Some(o)) => f != o,
                    _ => false,
                };
                if other {
                    return Ok((Outcome::OtherOrg, None));
                }
                return Ok((Outcome::Untouched(unusable.why), None));
            }
        };
        let org = cached.org().clone();
        if self.org_filter.as_ref().is_some_and(|f| *f != org) {
            return Ok((Outcome::OtherOrg, None));
        }
        if parsed.column_id() != column.id() {
            return Ok((Outcome::Untouched(Untouched::Authentication), None));
        }
        let active = self.active(table, column, &org).await?;
        // A value not bound as the rules say (row binding turned on since it was written) is
        // sealed again even under the active DEK.
        let binding_as_ruled = parsed.is_row_bound() == row_key.is_some();
        // Likewise a value whose search term is not as its column's rule says: a term is added
        // when the column became searchable, removed when it stopped being so, and computed
        // again under the organisation's current search key (after `keys rotate --search-key`).
        let searchable = column.search().is_some();
        let stored_term = parsed.search_term();
        let as_ruled = active.dek_id() == dek && binding_as_ruled;
        if as_ruled && !searchable && stored_term.is_none() {
            return Ok((Outcome::Unchanged, None));
        }
        let opened =
            self.cipher
                .open_as_stored(&cached, parsed, column, row_key.map(str::as_bytes));
        let Ok(opened) = opened else {
            return Ok((Outcome::Untouched(Untouched::Authentication), None));
        };
        if as_ruled && searchable {
            let term = self
                .cipher
                .term(column, &org, &opened.plaintext)
                .map_err(|e| keys_error(table, column, e))?;
            if term == stored_term {
                return Ok((Outcome::Unchanged, None));
            }
        }
        let sealed = self.seal(column, &active, &org, row_key, &opened.plaintext)?;
        Ok((Outcome::Moved, Some(sealed)))
    }

    /// The organisation's active DEK; a failure stops the run.
    async fn active(
        &mut self,
        table: &str,
        column: &ColumnRule,
        org: &OrgId,
    ) -> Result<Arc<CachedDek>, ReencryptError> {
        let active = self
            .cipher
            .with_keys(|c| c.active(org, column))
            .await
            .map_err(|e| keys_error(table, column, e))?;
        // A searchable column's values also need the organisation's search key.
        self.cipher
            .with_keys(|c| c.term(column, org, b"").map(|_| ()))
            .await
            .map_err(|e| keys_error(table, column, e))?;
        Ok(active)
    }

    /// The DEK for decrypting, or why it cannot be used. Errors that stop the run (key store
    /// or KEK unreachable) are `Err`.
    async fn dek(
        &mut self,
        table: &str,
        column: &ColumnRule,
        dek: DekId,
    ) -> Result<Result<Arc<CachedDek>, Unusable>, ReencryptError> {
        if let Some(unusable) = self.unusable.get(&dek) {
            return Ok(Err(unusable.clone()));
        }
        let found = self.cipher.with_keys(|c| c.by_id(dek, column)).await;
        let why = match found {
            Ok(ById::Key(cached)) => return Ok(Ok(cached)),
            // The cipher's policy reads destroyed keys as errors; kept for completeness.
            Ok(ById::Shredded) => Untouched::DestroyedDek,
            Err(CipherError::Key { error, .. }) => match error {
                KeyError::DestroyedDek(_) => Untouched::DestroyedDek,
                KeyError::UnknownDek(_) => Untouched::UnknownDek,
                KeyError::UnwrapRejected { .. }
                | KeyError::KekMismatch { .. }
                | KeyError::KekUnusable { .. }
                | KeyError::CorruptRecord { .. } => Untouched::KeyUnavailable,
                e => {
                    return Err(ReencryptError::Keys {
                        table: table.to_owned(),
                        source: e,
                    })
                }
            },
            Err(e) => return Err(keys_error(table, column, e)),
        };
        let org = match self.cipher.keys().store().lookup(dek).await {
            Ok(record) => record.map(|r| r.org_id),
            Err(KeyError::CorruptRecord { .. }) => None,
            Err(e) => {
                return Err(ReencryptError::Keys {
                    table: table.to_owned(),
                    source: e,
                })
            }
        };
        let unusable = Unusable { why, org };
        self.unusable.insert(dek, unusable.clone());
        Ok(Err(unusable))
    }

    fn seal(
        &mut self,
        column: &ColumnRule,
        active: &Arc<CachedDek>,
        org: &OrgId,
        row_key: Option<&str>,
        plaintext: &[u8],
    ) -> Result<String, ReencryptError> {
        self.cipher
            .seal_with(active, column, org, row_key.map(str::as_bytes), plaintext)
            .map_err(|e| ReencryptError::Seal {
                column: column.qualified_name().to_owned(),
                reason: e.to_string(),
            })
    }
}

/// A cipher error where a key was needed: the key error stops the run.
fn keys_error(table: &str, column: &ColumnRule, e: CipherError) -> ReencryptError {
    match e {
        CipherError::Key { error, .. } => ReencryptError::Keys {
            table: table.to_owned(),
            source: error,
        },
        other => ReencryptError::Seal {
            column: column.qualified_name().to_owned(),
            reason: other.to_string(),
        },
    }
}

/// The text form of a row's primary key.
fn row_key(plan: &TablePlan, row: &Row) -> Result<Vec<String>, ReencryptError> {
    (0..plan.pk.len())
        .map(|i| {
            row.try_get::<_, String>(i)
                .map_err(|e| ReencryptError::db("decode primary key", Some(&plan.name), e))
        })
        .collect()
}

/// Run the compare-and-set update for `work`; returns the keys of the rows it changed.
async fn update(
    client: &impl GenericClient,
    plan: &TablePlan,
    work: &[RowWork],
) -> Result<HashSet<Vec<String>>, ReencryptError> {
    let keys: Vec<Vec<&str>> = (0..plan.pk.len())
        .map(|i| work.iter().map(|w| w.key[i].as_str()).collect())
        .collect();
    let tenants: Vec<Option<&str>> = work.iter().map(|w| w.tenant.as_deref()).collect();
    let mut values: Vec<Vec<Option<&str>>> = Vec::with_capacity(2 * plan.columns.len());
    for i in 0..plan.columns.len() {
        values.push(work.iter().map(|w| w.old[i].as_deref()).collect());
        values.push(work.iter().map(|w| w.new[i].as_deref()).collect());
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(keys.len() + 1 + values.len());
    params.extend(keys.iter().map(|k| k as &(dyn ToSql + Sync)));
    params.push(&tenants);
    params.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
    let rows = client
        .query(&plan.update, &params)
        .await
        .map_err(|e| ReencryptError::db("update rows", Some(&plan.name), e))?;
    rows.iter().map(|r| row_key(plan, r)).collect()
}

/// Read the rows of `work` again, locked against further changes until commit.
async fn select_locked(
    client: &impl GenericClient,
    plan: &TablePlan,
    work: &[RowWork],
) -> Result<Vec<Row>, ReencryptError> {
    let keys: Vec<Vec<&str>> = (0..plan.pk.len())
        .map(|i| work.iter().map(|w| w.key[i].as_str()).collect())
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
    client
        .query(&plan.select_locked, &params)
        .await
        .map_err(|e| ReencryptError::db("re-read changed rows", Some(&plan.name), e))
}
