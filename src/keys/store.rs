//! The key store: wrapped DEKs and their audit trail in the upstream PostgreSQL database.
//!
//! Tables (in a configurable schema, `pgenvelope` by default):
//!
//! - `data_keys`: one row per DEK version of an organisation. `unique (org_id, version)` and a
//!   partial unique index allow at most one `active` DEK per organisation. `wrapped` is `NULL`
//!   exactly when the DEK is `destroyed`.
//! - `search_keys`: one row per search key version of an organisation (see `search`), with
//!   the same constraints. Added to existing key stores by `ensure_schema`.
//! - `key_events`: append-only audit trail (a trigger rejects `UPDATE`, `DELETE` and
//!   `TRUNCATE`).
//!
//! Every statement here is a single statement (no client-side transactions), so one
//! connection can be shared by concurrent callers. Correctness across proxies comes from the
//! database: `ensure_schema` serializes on an advisory lock, and creating the first DEK of an
//! organisation is an `INSERT … ON CONFLICT DO NOTHING` arbitrated by the unique indexes.
//!
//! Never logs wrapped keys; [`DekRecord`]'s `Debug` prints only their length.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio_postgres::{Client, Config, Row};
use uuid::Uuid;

use crate::crypto::{DekId, OrgId};

use super::error::KeyError;
use super::kek::{KekError, KekProvider, KeyContext};

/// Schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "pgenvelope";

/// `application_name` of the service connection unless the URL sets one.
const APPLICATION_NAME: &str = "pgenvelope-keys";
/// Connect timeout unless the URL sets one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `get_or_create_active` retries when racing proxies keep winning.
pub(super) const CREATE_ATTEMPTS: usize = 3;
/// Class id of our advisory locks: "pgen" in ASCII.
pub(super) const ADVISORY_LOCK_CLASS: i32 = 0x7067_656e;

/// Lifecycle state of a DEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DekState {
    /// Used for new encryptions; at most one per organisation.
    Active,
    /// Rotated out: still decrypts, never encrypts.
    DecryptOnly,
    /// Shredded: the wrapped key is gone and its data is unrecoverable.
    Destroyed,
}

impl DekState {
    /// The value stored in `data_keys.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::DecryptOnly => "decrypt_only",
            Self::Destroyed => "destroyed",
        }
    }
}

impl FromStr for DekState {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "active" => Ok(Self::Active),
            "decrypt_only" => Ok(Self::DecryptOnly),
            "destroyed" => Ok(Self::Destroyed),
            _ => Err(()),
        }
    }
}

impl fmt::Display for DekState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `data_keys`.
///
/// Invariant (checked when read): `wrapped` is `None` exactly when `state` is `Destroyed`.
#[derive(Clone)]
pub struct DekRecord {
    /// The DEK's id.
    pub dek_id: DekId,
    /// The organisation that owns it.
    pub org_id: OrgId,
    /// Version within the organisation, from 1.
    pub version: i32,
    /// Lifecycle state.
    pub state: DekState,
    /// KEK id of the provider that wrapped it.
    pub kek: String,
    /// The wrapped key; `None` once destroyed. Never printed.
    pub wrapped: Option<Vec<u8>>,
    /// Encryptions persisted so far (see `KeyManager::flush_counters`).
    pub encryptions: u64,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it stopped being active, if it has.
    pub retired_at: Option<SystemTime>,
    /// When it was destroyed, if it has been.
    pub destroyed_at: Option<SystemTime>,
}

impl fmt::Debug for DekRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wrapped = self
            .wrapped
            .as_ref()
            .map(|w| format!("[{} bytes]", w.len()));
        f.debug_struct("DekRecord")
            .field("dek_id", &self.dek_id)
            .field("org_id", &self.org_id)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("kek", &self.kek)
            .field("wrapped", &wrapped)
            .field("encryptions", &self.encryptions)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("destroyed_at", &self.destroyed_at)
            .finish()
    }
}

/// Handle on the key store, over one lazily (re)connected service connection.
pub struct KeyStore {
    pub(super) config: Config,
    pub(super) tls: crate::tls::ServiceTls,
    schema: String,
    pub(super) actor: String,
    sql: Sql,
    /// Invariant: when `Some`, the client was connected with `config`; it may since have
    /// closed, which the next caller notices and replaces it.
    client: Mutex<Option<Arc<Client>>>,
}

impl KeyStore {
    /// A store in `schema` reached through `config`. Does not connect yet.
    ///
    /// Sets `application_name = pgenvelope-keys` and a 5 s connect timeout unless `config`
    /// has its own.
    pub fn new(mut config: Config, schema: &str) -> Result<Self, KeyError> {
        if !is_plain_identifier(schema) {
            return Err(KeyError::InvalidSchemaName {
                name: schema.to_owned(),
            });
        }
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let tls = crate::tls::ServiceTls::default();
        tls.apply(&mut config);
        Ok(Self {
            sql: Sql::new(schema),
            config,
            tls,
            schema: schema.to_owned(),
            actor: "pgenvelope".to_owned(),
            client: Mutex::new(None),
        })
    }

    /// A store in `schema` reached through a connection URL or key=value string, such as
    /// the proxy's upstream URL. Does not connect yet.
    pub fn from_url(url: &str, schema: &str) -> Result<Self, KeyError> {
        let config = url
            .parse::<Config>()
            .map_err(|e| KeyError::InvalidStoreUrl {
                source: Arc::new(e),
            })?;
        Self::new(config, schema)
    }

    /// Connect with TLS as `tls` says (its `sslmode` replaces the one in the config).
    pub fn with_tls(mut self, tls: crate::tls::ServiceTls) -> Self {
        tls.apply(&mut self.config);
        self.tls = tls;
        self
    }

    /// Record `actor` in the `key_events` rows this store writes (default `pgenvelope`).
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Create the schema, tables, indexes and audit trigger if they do not exist (a key store
    /// made by an earlier version gains the tables it lacks, such as `search_keys`).
    ///
    /// Idempotent, and safe when several proxies start at once: `CREATE … IF NOT EXISTS` can
    /// still fail with a unique violation when two sessions race, so the whole script runs as
    /// one implicit transaction holding a transaction-scoped advisory lock.
    pub async fn ensure_schema(&self) -> Result<(), KeyError> {
        let script = &self.sql.ensure_schema;
        self.run(
            "ensure schema",
            |c| async move { c.batch_execute(script).await },
        )
        .await
    }

    /// The organisation's active DEK, creating version 1 (or the next version) if it has
    /// none.
    ///
    /// Race-free across proxies: when none is active, a key is generated and wrapped, then
    /// inserted with `ON CONFLICT DO NOTHING`; whoever loses the race discards its key and
    /// reads the winner's row. The insert and its `create` event are one statement.
    pub async fn get_or_create_active(
        &self,
        org: &OrgId,
        kek: &dyn KekProvider,
    ) -> Result<DekRecord, KeyError> {
        for _ in 0..CREATE_ATTEMPTS {
            if let Some(record) = self.active(org).await? {
                return Ok(record);
            }
            let ctx = KeyContext {
                org: org.clone(),
                dek: DekId::new_random(),
            };
            let kek_id = kek.kek_id();
            let (_key, wrapped) = kek
                .generate(&ctx)
                .await
                .map_err(|source| kek_error(&kek_id, source))?;
            let (dek, org_s, actor) = (&ctx.dek.0, org.as_str(), self.actor.as_str());
            let (kek_s, wrapped) = (kek_id.as_str(), wrapped.as_slice());
            let sql = &self.sql.insert_active;
            let row = self
                .run("create DEK", |c| async move {
                    c.query_opt(sql, &[dek, &org_s, &kek_s, &wrapped, &actor])
                        .await
                })
                .await?;
            if let Some(row) = row {
                let record = record_from_row(&row)?;
                tracing::info!(
                    tenant = %org,
                    dek = %record.dek_id,
                    version = record.version,
                    kek = %record.kek,
                    "created data key"
                );
                return Ok(record);
            }
        }
        // Still nothing: the organisation's rows keep changing under us.
        self.active(org)
            .await?
            .ok_or_else(|| KeyError::ActiveKeyContention { org: org.clone() })
    }

    /// The organisation's active DEK, if it has one.
    pub async fn active(&self, org: &OrgId) -> Result<Option<DekRecord>, KeyError> {
        let (sql, org) = (&self.sql.select_active, org.as_str());
        let row = self
            .run("look up active DEK", |c| async move {
                c.query_opt(sql, &[&org]).await
            })
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// Every DEK (of `org`, or of all organisations), ordered by organisation and version.
    pub async fn list(&self, org: Option<&OrgId>) -> Result<Vec<DekRecord>, KeyError> {
        let (sql, org) = (&self.sql.select_list, org.map(OrgId::as_str));
        let rows = self
            .run("list DEKs", |c| async move {
                c.query(sql.as_str(), &[&org]).await
            })
            .await?;
        rows.iter().map(record_from_row).collect()
    }

    /// Whether the key store answers and its schema exists (for readiness checks).
    pub async fn ping(&self) -> Result<(), KeyError> {
        let sql = &self.sql.ping;
        self.run(
            "ping",
            |c| async move { c.query_opt(sql.as_str(), &[]).await },
        )
        .await
        .map(|_| ())
    }

    /// Whether the store holds any DEK (in any state); `false` also when its tables do not
    /// exist yet. Never creates anything.
    pub async fn holds_keys(&self) -> Result<bool, KeyError> {
        let (exists, holds) = (&self.sql.data_keys_exists, &self.sql.ping);
        let found = self
            .run("look for DEKs", |c| async move {
                let exists: bool = c.query_one(exists.as_str(), &[]).await?.get(0);
                if !exists {
                    return Ok(false);
                }
                Ok(c.query_opt(holds.as_str(), &[]).await?.is_some())
            })
            .await?;
        Ok(found)
    }

    /// Name of the database the store is in (the one its connection settings name, else the
    /// user's name, as PostgreSQL does).
    pub fn database(&self) -> &str {
        self.config
            .get_dbname()
            .or_else(|| self.config.get_user())
            .unwrap_or_default()
    }

    /// The DEK with this id, in any state.
    pub async fn lookup(&self, dek: DekId) -> Result<Option<DekRecord>, KeyError> {
        let (sql, id) = (&self.sql.select_by_id, &dek.0);
        let row = self
            .run(
                "look up DEK",
                |c| async move { c.query_opt(sql, &[id]).await },
            )
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// Add encryption counts to DEKs in one statement. Ids may repeat; unknown ids are
    /// ignored. Not retried on a lost connection: the statement may have committed.
    pub async fn add_encryptions(&self, counts: &[(DekId, u64)]) -> Result<(), KeyError> {
        if counts.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = counts.iter().map(|(d, _)| d.0).collect();
        let ns: Vec<i64> = counts
            .iter()
            .map(|&(_, n)| i64::try_from(n).unwrap_or(i64::MAX))
            .collect();
        let client = self.client().await?;
        client
            .execute(&self.sql.add_encryptions, &[&ids, &ns])
            .await
            .map_err(|e| KeyError::store("add encryptions", e))?;
        Ok(())
    }

    /// Run an idempotent operation, retrying once on a fresh connection if the connection
    /// turned out to be closed.
    pub(super) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, KeyError>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        match f(Arc::clone(&client)).await {
            Ok(v) => Ok(v),
            Err(e) if client.is_closed() => {
                tracing::warn!(error = %e, "key store connection lost; reconnecting");
                let client = self.client().await?;
                f(client).await.map_err(|e| KeyError::store(op, e))
            }
            Err(e) => Err(KeyError::store(op, e)),
        }
    }

    /// A new connection of its own, for transactions (key lifecycle operations, the change
    /// listener). Its driver task ends when the client is dropped.
    pub(crate) async fn dedicated(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, crate::tls::ServiceTlsStream>,
        ),
        KeyError,
    > {
        self.config
            .connect(self.tls.clone())
            .await
            .map_err(|e| KeyError::store("connect", e))
    }

    /// The shared connection, (re)connecting if there is none or it has closed.
    async fn client(&self) -> Result<Arc<Client>, KeyError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| KeyError::store("connect", e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "key store connection closed");
            }
        });
        let client = Arc::new(client);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config may hold the service password: print only where the tables are.
        f.debug_struct("KeyStore")
            .field("schema", &self.schema)
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

/// SQL text with the schema name spliced in once.
///
/// Invariant: built only from a schema name that passed `is_plain_identifier`, and always
/// quoted, so splicing cannot inject SQL.
struct Sql {
    ensure_schema: String,
    select_active: String,
    select_by_id: String,
    insert_active: String,
    add_encryptions: String,
    ping: String,
    data_keys_exists: String,
    select_list: String,
}

pub(super) const COLUMNS: &str =
    "dek_id, org_id, version, state, kek, wrapped, encryptions, created_at, \
                       retired_at, destroyed_at";

impl Sql {
    fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let ensure_schema = format!(
            r#"
SELECT pg_advisory_xact_lock({ADVISORY_LOCK_CLASS}, hashtext('{schema}'));
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.data_keys (
    dek_id       uuid        PRIMARY KEY,
    org_id       text        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    state        text        NOT NULL CHECK (state IN ('active', 'decrypt_only', 'destroyed')),
    kek          text        NOT NULL,
    wrapped      bytea,
    encryptions  bigint      NOT NULL DEFAULT 0 CHECK (encryptions >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz,
    destroyed_at timestamptz,
    CONSTRAINT data_keys_org_version_key UNIQUE (org_id, version),
    CONSTRAINT data_keys_wrapped_iff_not_destroyed CHECK ((state = 'destroyed') = (wrapped IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_one_active_per_org
    ON {s}.data_keys (org_id) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS {s}.search_keys (
    key_id       uuid        PRIMARY KEY,
    org_id       text        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    state        text        NOT NULL CHECK (state IN ('active', 'retired', 'destroyed')),
    kek          text        NOT NULL,
    wrapped      bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz,
    destroyed_at timestamptz,
    CONSTRAINT search_keys_org_version_key UNIQUE (org_id, version),
    CONSTRAINT search_keys_wrapped_iff_not_destroyed CHECK ((state = 'destroyed') = (wrapped IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS search_keys_one_active_per_org
    ON {s}.search_keys (org_id) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS {s}.key_events (
    id     bigserial   PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    org_id text        NOT NULL,
    dek_id uuid,
    event  text        NOT NULL,
    kek    text,
    reason text,
    actor  text
);
ALTER TABLE {s}.key_events ADD COLUMN IF NOT EXISTS detail text;
CREATE OR REPLACE FUNCTION {s}.key_events_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgenvelope key_events is append-only';
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgname = 'key_events_append_only'
                     AND tgrelid = '{s}.key_events'::regclass) THEN
        CREATE TRIGGER key_events_append_only
            BEFORE UPDATE OR DELETE ON {s}.key_events
            FOR EACH ROW EXECUTE FUNCTION {s}.key_events_append_only();
        CREATE TRIGGER key_events_no_truncate
            BEFORE TRUNCATE ON {s}.key_events
            FOR EACH STATEMENT EXECUTE FUNCTION {s}.key_events_append_only();
    END IF;
END
$$;
"#
        );
        let select_active =
            format!("SELECT {COLUMNS} FROM {s}.data_keys WHERE org_id = $1 AND state = 'active'");
        let select_by_id = format!("SELECT {COLUMNS} FROM {s}.data_keys WHERE dek_id = $1");
        let select_list = format!(
            "SELECT {COLUMNS} FROM {s}.data_keys WHERE $1::text IS NULL OR org_id = $1 \
             ORDER BY org_id, version"
        );
        // No conflict target: every unique index arbitrates (primary key, (org_id, version)
        // and the one-active-per-org partial index), so a lost race inserts nothing.
        let insert_active = format!(
            r#"
WITH ins AS (
    INSERT INTO {s}.data_keys (dek_id, org_id, version, state, kek, wrapped)
    SELECT $1, $2,
           COALESCE((SELECT max(version) FROM {s}.data_keys WHERE org_id = $2), 0) + 1,
           'active', $3, $4
    ON CONFLICT DO NOTHING
    RETURNING {COLUMNS}
), ev AS (
    INSERT INTO {s}.key_events (org_id, dek_id, event, kek, actor)
    SELECT org_id, dek_id, 'create', kek, $5 FROM ins
)
SELECT {COLUMNS} FROM ins"#
        );
        let add_encryptions = format!(
            "UPDATE {s}.data_keys AS k SET encryptions = k.encryptions + v.n \
             FROM (SELECT id, sum(n)::bigint AS n \
                   FROM unnest($1::uuid[], $2::bigint[]) AS u(id, n) GROUP BY id) AS v \
             WHERE k.dek_id = v.id"
        );
        let ping = format!("SELECT 1 FROM {s}.data_keys LIMIT 1");
        let data_keys_exists = format!("SELECT to_regclass('{s}.data_keys') IS NOT NULL");
        Self {
            ensure_schema,
            select_active,
            select_by_id,
            insert_active,
            add_encryptions,
            ping,
            data_keys_exists,
            select_list,
        }
    }
}

pub(super) fn record_from_row(row: &Row) -> Result<DekRecord, KeyError> {
    let get = |e: tokio_postgres::Error| KeyError::store("decode key row", e);
    let dek_id = DekId(row.try_get::<_, Uuid>("dek_id").map_err(get)?);
    let corrupt = |reason| KeyError::CorruptRecord {
        dek: dek_id,
        reason,
    };
    let org_id = OrgId::new(row.try_get::<_, String>("org_id").map_err(get)?)
        .map_err(|_| corrupt("invalid organisation id"))?;
    let state = row
        .try_get::<_, &str>("state")
        .map_err(get)?
        .parse::<DekState>()
        .map_err(|()| corrupt("unknown state"))?;
    let wrapped: Option<Vec<u8>> = row.try_get("wrapped").map_err(get)?;
    if (state == DekState::Destroyed) != wrapped.is_none() {
        return Err(corrupt(
            "wrapped key must be present exactly when not destroyed",
        ));
    }
    let encryptions = u64::try_from(row.try_get::<_, i64>("encryptions").map_err(get)?)
        .map_err(|_| corrupt("negative encryption count"))?;
    Ok(DekRecord {
        dek_id,
        org_id,
        version: row.try_get("version").map_err(get)?,
        state,
        kek: row.try_get("kek").map_err(get)?,
        wrapped,
        encryptions,
        created_at: row.try_get("created_at").map_err(get)?,
        retired_at: row.try_get("retired_at").map_err(get)?,
        destroyed_at: row.try_get("destroyed_at").map_err(get)?,
    })
}

pub(super) fn kek_error(kek: &str, source: KekError) -> KeyError {
    KeyError::kek(kek.to_owned(), source)
}

/// Whether `name` can be a key store schema: 1..=63 bytes of `[a-z0-9_]`, not starting with a
/// digit (needs no escaping when quoted).
pub fn is_plain_identifier(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && !bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["pgenvelope", "pgenvelope_test_01", "_x", &"a".repeat(63)] {
            assert!(is_plain_identifier(ok), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Pgenvelope",
            "a-b",
            "a\"b",
            "a;drop",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(!is_plain_identifier(bad), "{bad}");
            let config: Config = "host=127.0.0.1".parse().unwrap();
            assert!(matches!(
                KeyStore::new(config, bad),
                Err(KeyError::InvalidSchemaName { .. })
            ));
        }
    }

    #[test]
    fn url_errors_do_not_echo_the_password() {
        KeyStore::from_url("postgres://svc:pw@127.0.0.1:5432/app", DEFAULT_SCHEMA).unwrap();
        let err =
            KeyStore::from_url("postgres://svc:hunter2@127.0.0.1:notaport/app", "x").unwrap_err();
        assert!(matches!(err, KeyError::InvalidStoreUrl { .. }), "{err}");
        let chain = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(!chain.contains("hunter2"), "{chain}");
    }

    #[test]
    fn states_round_trip() {
        for state in [DekState::Active, DekState::DecryptOnly, DekState::Destroyed] {
            assert_eq!(state.as_str().parse::<DekState>(), Ok(state));
        }
        assert!("retired".parse::<DekState>().is_err());
    }

    #[test]
    fn record_debug_hides_wrapped_bytes() {
        let record = DekRecord {
            dek_id: DekId::from_bytes([0x11; 16]),
            org_id: OrgId::new("acme").unwrap(),
            version: 1,
            state: DekState::Active,
            kek: "local:0011223344556677".into(),
            wrapped: Some(vec![0xAB; 61]),
            encryptions: 0,
            created_at: SystemTime::UNIX_EPOCH,
            retired_at: None,
            destroyed_at: None,
        };
        let debug = format!("{record:?}");
        assert!(debug.contains("[61 bytes]"), "{debug}");
        assert!(
            !debug.contains("171, 171") && !debug.to_lowercase().contains("abab"),
            "{debug}"
        );
    }

    #[test]
    fn store_debug_hides_password() {
        let config: Config = "host=127.0.0.1 user=svc password=hunter2".parse().unwrap();
        let store = KeyStore::new(config, DEFAULT_SCHEMA).unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
    }
}
