//! Checkpoints: the last primary key done per table, in `<schema>.reencrypt_progress` of the
//! database of the tables (the key store's database unless `--data-database` names another;
//! there the schema is created for it if needed).
//!
//! A row is keyed by table and scope (the `--org` filter, or `''` for all organisations), so a
//! filtered run never makes an unfiltered one skip rows. It is written in the same transaction
//! as the batch it follows, so it never runs ahead of the data, and deleted when the table is
//! done; kept next to the tables, it also never names a table of another database.
//! `since_event` is the highest `key_events.id` of the key store when the pass over the table
//! began: a `rotate` or `shred` after it may have put earlier rows under a retired key, and
//! the pass then starts over. The `key_events` queries take the key store's connection, the
//! others the connection of the tables.

use tokio_postgres::{Client, GenericClient};

use super::error::ReencryptError;

/// Key events that cannot make values already re-encrypted stale: a new organisation's first
/// key, a re-wrap (same key material) and the destruction of a retired key.
const HARMLESS_EVENTS: &[&str] = &["create", "rewrap", "destroy"];

/// A saved position.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoint {
    /// Text form of the last primary key done, one entry per key column.
    pub(crate) last_key: Vec<String>,
    /// Rows scanned by the pass so far.
    pub(crate) rows_done: u64,
    /// `key_events.id` high-water mark when the pass began.
    pub(crate) since_event: i64,
}

/// SQL against the progress table of one key store schema.
///
/// Invariant: `schema` passed `keys::is_plain_identifier` (checked by the key store).
#[derive(Debug, Clone)]
pub(crate) struct Checkpoints {
    schema: String,
    ensure_schema: String,
    ensure: String,
    load: String,
    save: String,
    delete: String,
    high_water: String,
    changed_since: String,
}

impl Checkpoints {
    pub(crate) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Self {
            schema: schema.to_owned(),
            ensure_schema: format!("CREATE SCHEMA IF NOT EXISTS {s}"),
            ensure: format!(
                "CREATE TABLE IF NOT EXISTS {s}.reencrypt_progress (
                     table_name  text        NOT NULL,
                     scope       text        NOT NULL,
                     last_key    text[]      NOT NULL,
                     rows_done   bigint      NOT NULL,
                     since_event bigint      NOT NULL,
                     started_at  timestamptz NOT NULL DEFAULT now(),
                     updated_at  timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (table_name, scope)
                 )"
            ),
            load: format!(
                "SELECT last_key, rows_done, since_event FROM {s}.reencrypt_progress \
                 WHERE table_name = $1 AND scope = $2"
            ),
            save: format!(
                "INSERT INTO {s}.reencrypt_progress \
                     (table_name, scope, last_key, rows_done, since_event) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (table_name, scope) DO UPDATE \
                 SET last_key = EXCLUDED.last_key, rows_done = EXCLUDED.rows_done, \
                     since_event = EXCLUDED.since_event, updated_at = now()"
            ),
            delete: format!(
                "DELETE FROM {s}.reencrypt_progress WHERE table_name = $1 AND scope = $2"
            ),
            high_water: format!("SELECT coalesce(max(id), 0)::bigint FROM {s}.key_events"),
            changed_since: format!(
                "SELECT count(*) FROM {s}.key_events \
                 WHERE id > $1 AND event <> ALL ($2::text[]) \
                   AND ($3::text IS NULL OR org_id = $3)"
            ),
        }
    }

    /// Create the table, and its schema when the database has none of that name (a database
    /// of tables other than the key store's), if needed. The caller holds the run lock, so
    /// there is no race between runs. The schema is looked up first so that the key store's
    /// database, where it exists, asks for no CREATE privilege on the database.
    pub(crate) async fn ensure(&self, client: &Client) -> Result<(), ReencryptError> {
        let has_schema: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&self.schema],
            )
            .await
            .map_err(|e| ReencryptError::db("look up the checkpoint schema", None, e))?
            .get(0);
        if !has_schema {
            client
                .batch_execute(&self.ensure_schema)
                .await
                .map_err(|e| ReencryptError::db("create the checkpoint schema", None, e))?;
        }
        client
            .batch_execute(&self.ensure)
            .await
            .map_err(|e| ReencryptError::db("create the checkpoint table", None, e))
    }

    pub(crate) async fn load(
        &self,
        client: &Client,
        table: &str,
        scope: &str,
    ) -> Result<Option<Checkpoint>, ReencryptError> {
        let row = client
            .query_opt(&self.load, &[&table, &scope])
            .await
            .map_err(|e| ReencryptError::db("read the checkpoint", Some(table), e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let rows_done: i64 = row.get(1);
        Ok(Some(Checkpoint {
            last_key: row.get(0),
            rows_done: u64::try_from(rows_done).unwrap_or(0),
            since_event: row.get(2),
        }))
    }

    pub(crate) async fn save(
        &self,
        client: &impl GenericClient,
        table: &str,
        scope: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), ReencryptError> {
        let rows = i64::try_from(checkpoint.rows_done).unwrap_or(i64::MAX);
        client
            .execute(
                &self.save,
                &[
                    &table,
                    &scope,
                    &checkpoint.last_key,
                    &rows,
                    &checkpoint.since_event,
                ],
            )
            .await
            .map_err(|e| ReencryptError::db("write the checkpoint", Some(table), e))?;
        Ok(())
    }

    pub(crate) async fn delete(
        &self,
        client: &Client,
        table: &str,
        scope: &str,
    ) -> Result<(), ReencryptError> {
        client
            .execute(&self.delete, &[&table, &scope])
            .await
            .map_err(|e| ReencryptError::db("delete the checkpoint", Some(table), e))?;
        Ok(())
    }

    /// The current `key_events` high-water mark.
    pub(crate) async fn high_water(&self, client: &Client) -> Result<i64, ReencryptError> {
        let row = client
            .query_one(&self.high_water, &[])
            .await
            .map_err(|e| ReencryptError::db("read key events", None, e))?;
        Ok(row.get(0))
    }

    /// How many key events since `event_id` may have made re-encrypted values stale (all
    /// organisations, or only `org`).
    pub(crate) async fn stale_events_since(
        &self,
        client: &Client,
        event_id: i64,
        org: Option<&str>,
    ) -> Result<i64, ReencryptError> {
        let row = client
            .query_one(&self.changed_since, &[&event_id, &HARMLESS_EVENTS, &org])
            .await
            .map_err(|e| ReencryptError::db("read key events", None, e))?;
        Ok(row.get(0))
    }
}
