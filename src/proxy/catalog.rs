//! Catalog look-ups: which result columns come from encrypted table columns.
//!
//! A RowDescription names each column's source table by OID and attribute number. OIDs are
//! per database, so the catalog keeps one service connection (the upstream URL's credentials,
//! with the client's database) and one OID cache per database. The first sight of a table OID
//! costs one catalog query; after that it is a hash lookup. The cache of a database is dropped
//! when the proxy sees DDL on it (CREATE/ALTER/DROP of tables or schemas), so a re-created table
//! or a dropped-and-added column is looked up again.
//!
//! Service connections are opened on demand and closed after [`IDLE_CLOSE`] without a
//! look-up, so they do not hold a database open: `DROP DATABASE` and `CREATE DATABASE …
//! TEMPLATE` (which wait up to 5 seconds for other sessions to leave) succeed shortly after the
//! last client of that database is gone. A look-up that fails because its connection died
//! (`pg_terminate_backend`, a server restart) is retried once on a fresh connection. The OID
//! cache outlives the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Mutex as AsyncMutex;

use crate::rules::{ColumnRule, RuleSet};

/// Encrypted columns of one table, by attribute number.
#[derive(Debug)]
pub(crate) struct TableMap {
    /// attnum → the column's rule (schema, table, column as in the rules).
    pub(crate) encrypted: HashMap<i16, ColumnRule>,
    /// attnum of the table's tenant column, if the rule has one.
    pub(crate) tenant_attnum: Option<i16>,
    /// attnum of the table's row key, if the rule has one (row binding).
    pub(crate) key_attnum: Option<i16>,
}

/// A catalog query failed.
#[derive(Debug, thiserror::Error)]
#[error("catalog look-up in database {db} failed: {message}")]
pub(crate) struct CatalogError {
    db: String,
    message: String,
}

/// How long a service connection may stay unused before it is closed.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct DbState {
    client: Option<tokio_postgres::Client>,
    /// Bumped per connection, so an idle check closes only the connection it watches.
    generation: u64,
    /// When the connection was last used.
    last_used: Option<Instant>,
}

/// Encrypted columns by database and table OID (`None`: a table without rules).
type TableCache = HashMap<String, HashMap<u32, Option<Arc<TableMap>>>>;

impl DbState {
    /// After a failed look-up: whether it failed because its connection died (then the
    /// look-up may be retried on a fresh one). The connection is dropped either way.
    fn dead(&mut self) -> bool {
        let dead = self
            .client
            .as_ref()
            .is_some_and(tokio_postgres::Client::is_closed);
        self.client = None;
        dead
    }
}

/// Per-database OID caches and service connections.
pub(crate) struct Catalog {
    service: tokio_postgres::Config,
    tls: crate::tls::ServiceTls,
    connect_timeout: Duration,
    dbs: Mutex<HashMap<String, Arc<AsyncMutex<DbState>>>>,
    /// What look-ups found; read without waiting by [`Catalog::peek`].
    tables: Mutex<TableCache>,
    /// Bumped whenever a cache is dropped, so derived caches know to drop theirs.
    epoch: AtomicU64,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

impl Catalog {
    pub(crate) fn new(
        mut service: tokio_postgres::Config,
        connect_timeout: Duration,
        tls: crate::tls::ServiceTls,
    ) -> Self {
        tls.apply(&mut service);
        Self {
            tls,
            service,
            connect_timeout,
            dbs: Mutex::new(HashMap::new()),
            tables: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    fn db(&self, db: &str) -> Arc<AsyncMutex<DbState>> {
        let mut dbs = self.dbs.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(dbs.entry(db.to_owned()).or_default())
    }

    /// Forget everything known about `db` (after DDL).
    pub(crate) fn invalidate(&self, db: &str) {
        // Dropping the entry drops its cache; a look-up in flight finishes on the old state
        // and the next one starts afresh.
        let mut dbs = self.dbs.lock().unwrap_or_else(PoisonError::into_inner);
        dbs.remove(db);
        // Under the tables lock, so a look-up finishing now sees the new epoch.
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        tables.remove(db);
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Forget everything about every database (rules changed).
    pub(crate) fn invalidate_all(&self) {
        let mut dbs = self.dbs.lock().unwrap_or_else(PoisonError::into_inner);
        dbs.clear();
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        tables.clear();
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes whenever cached catalog knowledge was dropped.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// What an earlier look-up found for table `oid` in `db`: `Some(None)` for a table
    /// without rules, `None` when it was not looked up yet (or was forgotten after DDL).
    pub(crate) fn peek(&self, db: &str, oid: u32) -> Option<Option<Arc<TableMap>>> {
        self.tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(db)?
            .get(&oid)
            .cloned()
    }

    /// Record what a look-up of table `oid` in `db` would find (unit tests without a server).
    #[cfg(test)]
    pub(crate) fn insert_for_tests(&self, db: &str, oid: u32, table: Option<Arc<TableMap>>) {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        tables.entry(db.to_owned()).or_default().insert(oid, table);
    }

    /// The encrypted columns of table `oid` in `db`, or `None` if it has none.
    pub(crate) async fn table(
        &self,
        db: &str,
        oid: u32,
        rules: &RuleSet,
    ) -> Result<Option<Arc<TableMap>>, CatalogError> {
        if let Some(hit) = self.peek(db, oid) {
            return Ok(hit);
        }
        let epoch = self.epoch();
        let shared = self.db(db);
        let mut state = shared.lock().await;
        if let Some(hit) = self.peek(db, oid) {
            return Ok(hit);
        }
        let mut result = self.load(&shared, &mut state, db, oid, rules).await;
        if result.is_err() && state.dead() {
            result = self.load(&shared, &mut state, db, oid, rules).await;
        }
        match result {
            Ok(map) => {
                // A look-up that started before DDL dropped the cache is not kept.
                let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
                if self.epoch() == epoch {
                    tables
                        .entry(db.to_owned())
                        .or_default()
                        .insert(oid, map.clone());
                }
                Ok(map)
            }
            Err(e) => {
                state.client = None;
                Err(e)
            }
        }
    }

    /// Column names of `schema.table` in `db` in attribute order, as COPY without a column list
    /// uses them: generated and dropped columns excluded.
    pub(crate) async fn columns(
        &self,
        db: &str,
        schema: &str,
        table: &str,
    ) -> Result<Vec<String>, CatalogError> {
        let shared = self.db(db);
        let mut state = shared.lock().await;
        let mut rows = self
            .column_names(&shared, &mut state, db, schema, table)
            .await;
        if rows.is_err() && state.dead() {
            rows = self
                .column_names(&shared, &mut state, db, schema, table)
                .await;
        }
        match rows {
            Ok(names) => Ok(names),
            Err(e) => {
                state.client = None;
                Err(e)
            }
        }
    }

    async fn column_names(
        &self,
        shared: &Arc<AsyncMutex<DbState>>,
        state: &mut DbState,
        db: &str,
        schema: &str,
        table: &str,
    ) -> Result<Vec<String>, CatalogError> {
        let client = self.client(shared, state, db).await?;
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                 AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await
            .map_err(|e| self.err(db, &e))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    async fn load(
        &self,
        shared: &Arc<AsyncMutex<DbState>>,
        state: &mut DbState,
        db: &str,
        oid: u32,
        rules: &RuleSet,
    ) -> Result<Option<Arc<TableMap>>, CatalogError> {
        let client = self.client(shared, state, db).await?;
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| self.err(db, &e))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let schema: String = row.get(0);
        let name: String = row.get(1);
        let Some(rule) = rules.table(&schema, &name) else {
            return Ok(None);
        };
        let attrs = client
            .query(
                "SELECT attname::text, attnum FROM pg_catalog.pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(|e| self.err(db, &e))?;
        let mut encrypted = HashMap::new();
        let mut tenant_attnum = None;
        let mut key_attnum = None;
        for a in &attrs {
            let attname: String = a.get(0);
            let attnum: i16 = a.get(1);
            if let Some(col) = rule.column(&attname) {
                encrypted.insert(attnum, col.clone());
            }
            if rule.tenant_column() == Some(attname.as_str()) {
                tenant_attnum = Some(attnum);
            }
            if rule.row_key() == Some(attname.as_str()) {
                key_attnum = Some(attnum);
            }
        }
        Ok(Some(Arc::new(TableMap {
            encrypted,
            tenant_attnum,
            key_attnum,
        })))
    }

    /// The database's service connection, (re)connecting if there is none or it has closed.
    async fn client<'a>(
        &self,
        shared: &Arc<AsyncMutex<DbState>>,
        state: &'a mut DbState,
        db: &str,
    ) -> Result<&'a tokio_postgres::Client, CatalogError> {
        state.last_used = Some(Instant::now());
        let stale = state.client.as_ref().is_none_or(|c| c.is_closed());
        if stale {
            let mut config = self.service.clone();
            config.dbname(db);
            config.application_name("pgenvelope-catalog");
            let connect =
                tokio::time::timeout(self.connect_timeout, config.connect(self.tls.clone()));
            let (client, conn) = match connect.await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(self.err(db, &e)),
                Err(_) => {
                    return Err(CatalogError {
                        db: db.to_owned(),
                        message: "connect timed out".to_owned(),
                    })
                }
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            state.client = Some(client);
            state.generation += 1;
            tokio::spawn(close_when_idle(Arc::downgrade(shared), state.generation));
        }
        state.client.as_ref().ok_or_else(|| CatalogError {
            db: db.to_owned(),
            message: "no connection".to_owned(),
        })
    }

    fn err(&self, db: &str, e: &tokio_postgres::Error) -> CatalogError {
        CatalogError {
            db: db.to_owned(),
            message: e.to_string(),
        }
    }
}

/// Close connection `generation` of a database once unused for [`IDLE_CLOSE`] (dropping the
/// client ends its session with a Terminate). Ends when the connection is replaced or closed,
/// or the database's state is dropped (which closes the connection too).
async fn close_when_idle(state: std::sync::Weak<AsyncMutex<DbState>>, generation: u64) {
    loop {
        tokio::time::sleep(IDLE_CLOSE).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let mut state = state.lock().await;
        if state.generation != generation || state.client.is_none() {
            return;
        }
        if state.last_used.is_none_or(|t| t.elapsed() >= IDLE_CLOSE) {
            state.client = None;
            return;
        }
    }
}
