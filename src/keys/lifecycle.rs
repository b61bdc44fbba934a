//! Key lifecycle operations on the key store: rotate, shred, destroy one retired DEK, and the
//! audit trail (rewrap is in `rewrap`, search-key rotation in `search`). Shredding covers
//! search keys too.
//!
//! Each operation that changes which keys exist runs in one transaction on a connection of its
//! own, serialized per organisation by a transaction-scoped advisory lock, writes its
//! `key_events` rows in the same transaction, and sends `NOTIFY pgenvelope_keys` from inside it
//! (PostgreSQL delivers it at commit, and only if it commits). Every proxy listens on that
//! channel (see `listener`) and evicts the organisation's cached keys at once.
//!
//! Notification payload: `<schema> <event> [<organisation>]`, e.g. `pgenvelope rotate acme`;
//! the organisation is the rest of the line (it may contain spaces). Proxies ignore changes
//! of other schemas. Never carries key material.
//!
//! Shredding sets `wrapped = NULL` and then rewrites `data_keys` and `search_keys`
//! (`VACUUM FULL`) so the old row versions holding the wrapped keys leave the tables' files.
//! Copies in WAL archives and backups remain; they are wrapped by the KEK, so a shred is final
//! only together with the backup retention (or the KEK's own destruction).

use std::time::{Duration, SystemTime};

use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::crypto::{DekId, OrgId};

use super::error::KeyError;
use super::kek::{KekProvider, KeyContext};
use super::search::{
    search_record_from_row, SearchKeyRecord, SEARCH_COLUMNS, SEARCH_KEY_DESTROYED,
};
use super::store::{
    kek_error, record_from_row, DekRecord, DekState, KeyStore, ADVISORY_LOCK_CLASS, COLUMNS,
};

/// Channel on which key changes are announced.
pub const NOTIFY_CHANNEL: &str = "pgenvelope_keys";

/// Class id of the per-organisation advisory locks (next to the schema lock's class).
const ORG_LOCK_CLASS: i32 = ADVISORY_LOCK_CLASS + 1;

/// What a key change notification announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// The organisation has a new active DEK; its previous one is decrypt-only.
    Rotate(OrgId),
    /// Every DEK of the organisation was destroyed.
    Shred(OrgId),
    /// One retired DEK of the organisation was destroyed.
    Destroy(OrgId),
    /// DEKs were re-wrapped under another KEK (their plaintext is unchanged).
    Rewrap,
    /// Anything else: drop every cached key.
    Flush,
}

impl KeyChange {
    /// The event name, as in the payload and the `kind` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rotate(_) => "rotate",
            Self::Shred(_) => "shred",
            Self::Destroy(_) => "destroy",
            Self::Rewrap => "rewrap",
            Self::Flush => "flush",
        }
    }

    /// The notification payload for a change in `schema`.
    pub fn payload(&self, schema: &str) -> String {
        match self.org() {
            Some(org) => format!("{schema} {} {org}", self.kind()),
            None => format!("{schema} {}", self.kind()),
        }
    }

    /// Parse a payload; `None` when it is about another schema. Unknown or malformed
    /// payloads of our schema are [`KeyChange::Flush`] (the safe reading).
    pub fn parse(payload: &str, schema: &str) -> Option<Self> {
        let mut parts = payload.splitn(3, ' ');
        if parts.next()? != schema {
            return None;
        }
        let event = parts.next().unwrap_or("");
        let org = parts.next().and_then(|o| OrgId::new(o).ok());
        Some(match (event, org) {
            ("rotate", Some(org)) => Self::Rotate(org),
            ("shred", Some(org)) => Self::Shred(org),
            ("destroy", Some(org)) => Self::Destroy(org),
            ("rewrap", None) => Self::Rewrap,
            _ => Self::Flush,
        })
    }

    /// The organisation whose cached keys must go, if only one.
    pub fn org(&self) -> Option<&OrgId> {
        match self {
            Self::Rotate(o) | Self::Shred(o) | Self::Destroy(o) => Some(o),
            Self::Rewrap | Self::Flush => None,
        }
    }
}

/// Outcome of a rotation.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The DEK that was active before, now decrypt-only (`None` if there was none).
    pub retired: Option<DekRecord>,
    /// The new active DEK.
    pub active: DekRecord,
}

/// One row of `key_events`.
#[derive(Debug, Clone)]
pub struct KeyEvent {
    /// Sequence number.
    pub id: i64,
    /// When.
    pub at: SystemTime,
    /// Organisation.
    pub org: String,
    /// DEK concerned, if one.
    pub dek: Option<DekId>,
    /// `create`, `rotate`, `rewrap`, `shred`, `destroy`.
    pub event: String,
    /// KEK id involved (the new one for `rewrap`).
    pub kek: Option<String>,
    /// Operator-supplied reason.
    pub reason: Option<String>,
    /// Who: `pgenvelope` (a proxy) or `cli:USER@HOST`.
    pub actor: Option<String>,
    /// Further detail, e.g. the retired DEK of a rotation.
    pub detail: Option<String>,
}

/// Outcome of [`KeyStore::shred`]: the keys it destroyed.
#[derive(Debug, Clone, Default)]
pub struct Shredded {
    /// DEKs destroyed, by version.
    pub deks: Vec<DekRecord>,
    /// Search keys destroyed, by version.
    pub search_keys: Vec<SearchKeyRecord>,
}

impl KeyStore {
    /// Make a new active DEK for `org` (generated by `kek`); the previous active DEK becomes
    /// decrypt-only. With `only_if` set, nothing happens (`Ok(None)`) unless that DEK is still
    /// the active one: concurrent automatic rotations by several proxies rotate once.
    pub async fn rotate(
        &self,
        org: &OrgId,
        kek: &dyn KekProvider,
        only_if: Option<DekId>,
        reason: Option<&str>,
    ) -> Result<Option<Rotation>, KeyError> {
        let ctx = KeyContext {
            org: org.clone(),
            dek: DekId::new_random(),
        };
        let kek_id = kek.kek_id();
        let (_key, wrapped) = kek
            .generate(&ctx)
            .await
            .map_err(|source| kek_error(&kek_id, source))?;
        let s = self.quoted_schema();
        let (mut client, conn) = self.dedicated().await?;
        let driver = tokio::spawn(conn);
        let result = async {
            let tx = client.transaction().await.map_err(store("begin"))?;
            self.lock_org(&tx, org).await?;
            let old = tx
                .query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM {s}.data_keys \
                         WHERE org_id = $1 AND state = 'active' FOR UPDATE"
                    ),
                    &[&org.as_str()],
                )
                .await
                .map_err(store("look up active DEK"))?
                .as_ref()
                .map(record_from_row)
                .transpose()?;
            if let Some(expected) = only_if {
                if old.as_ref().map(|r| r.dek_id) != Some(expected) {
                    return Ok(None);
                }
            }
            let retired = match &old {
                Some(old) => {
                    let row = tx
                        .query_one(
                            &format!(
                                "UPDATE {s}.data_keys SET state = 'decrypt_only', \
                                 retired_at = now() WHERE dek_id = $1 RETURNING {COLUMNS}"
                            ),
                            &[&old.dek_id.0],
                        )
                        .await
                        .map_err(store("retire DEK"))?;
                    Some(record_from_row(&row)?)
                }
                None => None,
            };
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO {s}.data_keys (dek_id, org_id, version, state, kek, wrapped) \
                         SELECT $1, $2, COALESCE(max(version), 0) + 1, 'active', $3, $4 \
                         FROM {s}.data_keys WHERE org_id = $2 RETURNING {COLUMNS}"
                    ),
                    &[&ctx.dek.0, &org.as_str(), &kek_id, &wrapped],
                )
                .await
                .map_err(store("insert DEK"))?;
            let active = record_from_row(&row)?;
            let detail = match &retired {
                Some(r) => format!("v{} → v{}; retired {}", r.version, active.version, r.dek_id),
                None => format!("v{}; no active key before", active.version),
            };
            self.event(
                &tx,
                org.as_str(),
                Some(active.dek_id),
                "rotate",
                Some(&kek_id),
                reason,
                Some(&detail),
            )
            .await?;
            self.notify(&tx, &KeyChange::Rotate(org.clone())).await?;
            tx.commit().await.map_err(store("commit"))?;
            Ok(Some(Rotation { retired, active }))
        }
        .await;
        drop(client);
        let _ = driver.await;
        if let Ok(Some(r)) = &result {
            tracing::info!(
                tenant = %org,
                dek = %r.active.dek_id,
                version = r.active.version,
                "rotated data key"
            );
        }
        result
    }

    /// Destroy every DEK and every search key of `org`: wrapped keys erased, state
    /// `destroyed`, one `shred` event per DEK and one `search_key_destroyed` event per search
    /// key (tombstones). Returns the keys destroyed by this call.
    ///
    /// Like a later write creating a new DEK, a later search-key request creates a new search
    /// key: shredding erases data, it does not ban the organisation.
    pub async fn shred(&self, org: &OrgId, reason: Option<&str>) -> Result<Shredded, KeyError> {
        let s = self.quoted_schema();
        let (mut client, conn) = self.dedicated().await?;
        let driver = tokio::spawn(conn);
        let result = async {
            let tx = client.transaction().await.map_err(store("begin"))?;
            self.lock_org(&tx, org).await?;
            let rows = tx
                .query(
                    &format!(
                        "UPDATE {s}.data_keys SET state = 'destroyed', wrapped = NULL, \
                         destroyed_at = now(), retired_at = COALESCE(retired_at, now()) \
                         WHERE org_id = $1 AND state <> 'destroyed' RETURNING {COLUMNS}"
                    ),
                    &[&org.as_str()],
                )
                .await
                .map_err(store("destroy DEKs"))?;
            let destroyed = rows
                .iter()
                .map(record_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            for r in &destroyed {
                let detail = format!("v{} was {}", r.version, state_before(r));
                self.event(
                    &tx,
                    org.as_str(),
                    Some(r.dek_id),
                    "shred",
                    Some(&r.kek),
                    reason,
                    Some(&detail),
                )
                .await?;
            }
            if destroyed.is_empty() {
                self.event(
                    &tx,
                    org.as_str(),
                    None,
                    "shred",
                    None,
                    reason,
                    Some("no live data keys"),
                )
                .await?;
            }
            let rows = tx
                .query(
                    &format!(
                        "UPDATE {s}.search_keys SET state = 'destroyed', wrapped = NULL, \
                         destroyed_at = now(), retired_at = COALESCE(retired_at, now()) \
                         WHERE org_id = $1 AND state <> 'destroyed' RETURNING {SEARCH_COLUMNS}"
                    ),
                    &[&org.as_str()],
                )
                .await
                .map_err(store("destroy search keys"))?;
            let search_keys = rows
                .iter()
                .map(search_record_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            for k in &search_keys {
                let was = match k.retired_at.zip(k.destroyed_at) {
                    Some((retired, destroyed)) if retired < destroyed => "retired",
                    _ => "active",
                };
                self.event(
                    &tx,
                    org.as_str(),
                    Some(k.key_id),
                    SEARCH_KEY_DESTROYED,
                    Some(&k.kek),
                    reason,
                    Some(&format!("v{} was {was}", k.version)),
                )
                .await?;
            }
            self.notify(&tx, &KeyChange::Shred(org.clone())).await?;
            tx.commit().await.map_err(store("commit"))?;
            Ok(Shredded {
                deks: destroyed,
                search_keys,
            })
        }
        .await;
        if let Ok(shredded) = &result {
            self.compact(&client, "data_keys").await;
            if !shredded.search_keys.is_empty() {
                self.compact(&client, "search_keys").await;
            }
        }
        drop(client);
        let _ = driver.await;
        result
    }

    /// Destroy one `decrypt_only` DEK (after `reencrypt` moved every value off it). Returns
    /// whether it was destroyed; `false` when it is not (or no longer) decrypt-only.
    pub async fn destroy_retired(
        &self,
        dek: DekId,
        reason: Option<&str>,
    ) -> Result<bool, KeyError> {
        let Some(record) = self.lookup(dek).await? else {
            return Ok(false);
        };
        let s = self.quoted_schema();
        let (mut client, conn) = self.dedicated().await?;
        let driver = tokio::spawn(conn);
        let result = async {
            let tx = client.transaction().await.map_err(store("begin"))?;
            self.lock_org(&tx, &record.org_id).await?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE {s}.data_keys SET state = 'destroyed', wrapped = NULL, \
                         destroyed_at = now() WHERE dek_id = $1 AND state = 'decrypt_only'"
                    ),
                    &[&dek.0],
                )
                .await
                .map_err(store("destroy DEK"))?;
            if n == 0 {
                return Ok(false);
            }
            let detail = format!("v{} (retired)", record.version);
            self.event(
                &tx,
                record.org_id.as_str(),
                Some(dek),
                "destroy",
                Some(&record.kek),
                reason,
                Some(&detail),
            )
            .await?;
            self.notify(&tx, &KeyChange::Destroy(record.org_id.clone()))
                .await?;
            tx.commit().await.map_err(store("commit"))?;
            Ok(true)
        }
        .await;
        if matches!(result, Ok(true)) {
            self.compact(&client, "data_keys").await;
        }
        drop(client);
        let _ = driver.await;
        result
    }

    /// Key events, oldest first (of `org`, or all), at most `limit` of the most recent.
    pub async fn events(&self, org: Option<&OrgId>, limit: i64) -> Result<Vec<KeyEvent>, KeyError> {
        let s = self.quoted_schema();
        let org = org.map(OrgId::as_str);
        let sql = format!(
            "SELECT * FROM (SELECT id, at, org_id, dek_id, event, kek, reason, actor, detail \
             FROM {s}.key_events WHERE $1::text IS NULL OR org_id = $1 \
             ORDER BY id DESC LIMIT $2) e ORDER BY id"
        );
        let (sql, org, limit) = (&sql, &org, &limit);
        let rows = self
            .run("list key events", |c| async move {
                c.query(sql.as_str(), &[org, limit]).await
            })
            .await?;
        rows.iter()
            .map(|r| {
                let get = |e| KeyError::store("decode key event", e);
                Ok(KeyEvent {
                    id: r.try_get("id").map_err(get)?,
                    at: r.try_get("at").map_err(get)?,
                    org: r.try_get("org_id").map_err(get)?,
                    dek: r
                        .try_get::<_, Option<Uuid>>("dek_id")
                        .map_err(get)?
                        .map(DekId),
                    event: r.try_get("event").map_err(get)?,
                    kek: r.try_get("kek").map_err(get)?,
                    reason: r.try_get("reason").map_err(get)?,
                    actor: r.try_get("actor").map_err(get)?,
                    detail: r.try_get("detail").map_err(get)?,
                })
            })
            .collect()
    }

    /// Active DEKs due for automatic rotation: at least `max_encryptions` encryptions, or
    /// (with `max_age`) created longer ago than that. At most 100 per call.
    pub async fn due_for_rotation(
        &self,
        max_encryptions: u64,
        max_age: Option<Duration>,
    ) -> Result<Vec<(OrgId, DekId, String)>, KeyError> {
        let s = self.quoted_schema();
        let sql = format!(
            "SELECT org_id, dek_id, encryptions, \
                    extract(epoch FROM now() - created_at)::float8 AS age \
             FROM {s}.data_keys WHERE state = 'active' \
               AND (encryptions >= $1 \
                    OR ($2::float8 IS NOT NULL \
                        AND created_at < now() - make_interval(secs => $2::float8))) \
             ORDER BY created_at LIMIT 100"
        );
        let max_enc = i64::try_from(max_encryptions).unwrap_or(i64::MAX);
        let age = max_age.map(|d| d.as_secs_f64());
        let (sql, max_enc_ref, age_ref) = (&sql, &max_enc, &age);
        let rows = self
            .run("find DEKs due for rotation", |c| async move {
                c.query(sql.as_str(), &[max_enc_ref, age_ref]).await
            })
            .await?;
        let mut due = Vec::with_capacity(rows.len());
        for r in rows {
            let get = |e| KeyError::store("decode key row", e);
            let dek = DekId(r.try_get("dek_id").map_err(get)?);
            let Ok(org) = OrgId::new(r.try_get::<_, String>("org_id").map_err(get)?) else {
                continue;
            };
            let n: i64 = r.try_get("encryptions").map_err(get)?;
            let why = if n >= max_enc {
                format!("automatic: {n} encryptions reached the limit of {max_encryptions}")
            } else {
                let age: f64 = r.try_get("age").map_err(get)?;
                format!("automatic: key is {} s old", age.round())
            };
            due.push((org, dek, why));
        }
        Ok(due)
    }

    /// `"schema"`, quoted (the name is a plain identifier: see `is_plain_identifier`).
    pub(super) fn quoted_schema(&self) -> String {
        format!("\"{}\"", self.schema())
    }

    pub(super) async fn lock_org(&self, tx: &Transaction<'_>, org: &OrgId) -> Result<(), KeyError> {
        let key = format!("{}/{}", self.schema(), org.as_str());
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&ORG_LOCK_CLASS, &key],
        )
        .await
        .map_err(store("lock organisation"))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn event(
        &self,
        tx: &Transaction<'_>,
        org: &str,
        dek: Option<DekId>,
        event: &str,
        kek: Option<&str>,
        reason: Option<&str>,
        detail: Option<&str>,
    ) -> Result<(), KeyError> {
        let s = self.quoted_schema();
        tx.execute(
            &format!(
                "INSERT INTO {s}.key_events (org_id, dek_id, event, kek, reason, actor, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            &[
                &org,
                &dek.map(|d| d.0),
                &event,
                &kek,
                &reason,
                &self.actor.as_str(),
                &detail,
            ],
        )
        .await
        .map_err(store("record key event"))?;
        Ok(())
    }

    pub(super) async fn notify(
        &self,
        tx: &Transaction<'_>,
        change: &KeyChange,
    ) -> Result<(), KeyError> {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&NOTIFY_CHANNEL, &change.payload(self.schema())],
        )
        .await
        .map_err(store("notify proxies"))?;
        Ok(())
    }

    /// Rewrite `table` (`data_keys` or `search_keys`) so erased wrapped keys leave its files.
    /// Best effort: a busy table is left for later, with a warning.
    ///
    /// Two round trips: PostgreSQL runs a query string of several statements as one implicit
    /// transaction, where `VACUUM` is refused.
    async fn compact(&self, client: &tokio_postgres::Client, table: &'static str) {
        let s = self.quoted_schema();
        let vacuum = format!("VACUUM FULL {s}.{table}");
        let result = async {
            client.batch_execute("SET lock_timeout = '2s'").await?;
            client.batch_execute(&vacuum).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(
                error = %e,
                table,
                "could not compact the key store; run VACUUM FULL on the table so erased wrapped keys leave its files"
            );
        }
    }
}

pub(super) fn store(op: &'static str) -> impl Fn(tokio_postgres::Error) -> KeyError {
    move |e| KeyError::store(op, e)
}

fn state_before(r: &DekRecord) -> &'static str {
    // The record is the row after the update; retired_at set before the shred means it was
    // decrypt-only.
    match r.retired_at.zip(r.destroyed_at) {
        Some((retired, destroyed)) if retired < destroyed => DekState::DecryptOnly.as_str(),
        _ => DekState::Active.as_str(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn payloads_round_trip() {
        let org = OrgId::new("acme corp").unwrap();
        for change in [
            KeyChange::Rotate(org.clone()),
            KeyChange::Shred(org.clone()),
            KeyChange::Destroy(org.clone()),
            KeyChange::Rewrap,
            KeyChange::Flush,
        ] {
            let p = change.payload("pgenvelope");
            assert_eq!(
                KeyChange::parse(&p, "pgenvelope"),
                Some(change.clone()),
                "{p}"
            );
            assert_eq!(KeyChange::parse(&p, "other"), None, "{p}");
        }
    }

    #[test]
    fn odd_payloads_flush() {
        for p in [
            "pgenvelope",
            "pgenvelope rotate",
            "pgenvelope what x",
            "pgenvelope  ",
        ] {
            assert_eq!(
                KeyChange::parse(p, "pgenvelope"),
                Some(KeyChange::Flush),
                "{p}"
            );
        }
        assert_eq!(KeyChange::parse("", "pgenvelope"), None);
    }
}
