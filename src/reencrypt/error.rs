//! The error type of `reencrypt`. Messages name tables and columns, never values.

use std::sync::Arc;

use crate::keys::KeyError;

/// Why re-encryption of a table, or the whole run, failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReencryptError {
    /// The service connection to the database of the tables could not be opened.
    #[error("could not connect to database {database}")]
    Connect {
        /// The database of the tables.
        database: String,
        /// What tokio-postgres reported.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// The key store failed outside the work on a table (the run's own connection to it).
    #[error("key store: could not {op}")]
    KeyStore {
        /// What was being done.
        op: &'static str,
        /// What the key store reported.
        #[source]
        source: KeyError,
    },
    /// A statement failed; `op` says which, `table` names the table when there is one.
    #[error("{op}{} failed", table.as_deref().map(|t| format!(" on {t}")).unwrap_or_default())]
    Database {
        /// What was being done.
        op: &'static str,
        /// The table concerned (`schema.table`), if any.
        table: Option<String>,
        /// What PostgreSQL or the connection reported.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A table named in the rules does not exist in the database of the tables.
    #[error("table {table} does not exist in database {database}")]
    NoSuchTable {
        /// `schema.table`.
        table: String,
        /// The database looked in.
        database: String,
    },
    /// A column named in the rules does not exist in its table.
    #[error("column {column} does not exist")]
    NoSuchColumn {
        /// `schema.table.column`.
        column: String,
    },
    /// The table has no primary key, so it cannot be walked in key order and rows cannot be
    /// updated one by one safely.
    #[error("table {table} has no primary key; add one to re-encrypt it")]
    NoPrimaryKey {
        /// `schema.table`.
        table: String,
    },
    /// The rule's `row_key` is not the table's primary key (a single column): rows are walked
    /// and re-sealed by primary key, so the key bound into each value must be it.
    #[error("the row_key {column} of {table} is not the table's single-column primary key")]
    RowKeyNotPrimaryKey {
        /// `schema.table`.
        table: String,
        /// The rule's row key.
        column: String,
    },
    /// `--table` names a table that no rule covers.
    #[error("no rule covers table {table}")]
    NotConfigured {
        /// The name as given.
        table: String,
    },
    /// A checkpoint row does not match the table's primary key (the key changed since).
    #[error("the checkpoint of {table} does not match its primary key; rerun with --restart")]
    BadCheckpoint {
        /// `schema.table`.
        table: String,
    },
    /// Another `reencrypt` holds the lock of this database of tables and key store schema.
    #[error("another reencrypt is running on database {database} with key store schema {schema}")]
    AlreadyRunning {
        /// The database of the tables.
        database: String,
        /// The key store schema.
        schema: String,
    },
    /// The key store holds no DEKs, yet the tables hold `enc:v1` values: they were sealed with
    /// another key store (another database or schema than the proxies'), and a run would
    /// create keys no proxy reads. Nothing was changed.
    #[error(
        "{column} in database {database} holds encrypted values, but the key store (schema \
         {schema} in database {key_store_database}) holds no data keys: they were sealed with \
         another key store; nothing was changed"
    )]
    ForeignKeyStore {
        /// The first column found holding an `enc:v1` value (`schema.table.column`).
        column: String,
        /// The database of the tables.
        database: String,
        /// The key store schema.
        schema: String,
        /// The key store's database.
        key_store_database: String,
    },
    /// The key store or KEK failed in a way that stops the run (unreachable, unavailable).
    #[error("key store or KEK failed while working on {table}")]
    Keys {
        /// `schema.table`.
        table: String,
        /// The underlying key error.
        #[source]
        source: KeyError,
    },
    /// A value could not be sealed (too long for the format).
    #[error("a value of {column} could not be encrypted: {reason}")]
    Seal {
        /// `schema.table.column`.
        column: String,
        /// Why (no value content).
        reason: String,
    },
}

impl ReencryptError {
    pub(crate) fn db(op: &'static str, table: Option<&str>, source: tokio_postgres::Error) -> Self {
        Self::Database {
            op,
            table: table.map(str::to_owned),
            source: Arc::new(source),
        }
    }

    /// Whether the failed statement is worth retrying as a whole (deadlock, serialization
    /// failure, lock timeout).
    pub(crate) fn is_transient(&self) -> bool {
        let Self::Database { source, .. } = self else {
            return false;
        };
        use tokio_postgres::error::SqlState;
        matches!(
            source.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::LOCK_NOT_AVAILABLE
        )
    }
}
