//! Search keys: one active key per organisation for the deterministic search terms of
//! searchable columns, kept in the key store next to the DEKs.
//!
//! A search key is 32 random bytes, generated and wrapped by the deployment's KEK exactly as a
//! DEK is (same [`KekProvider`] calls; the wrapping context is the organisation and the search
//! key's id in the DEK slot). It lives in its own table, `search_keys`, so nothing that looks
//! up DEKs (`lookup`, `active`, `list`, counters, automatic rotation) ever sees one: a search
//! key's id given where a DEK id is expected is an unknown DEK.
//!
//! States: `active` (at most one per organisation, used for every term computed now),
//! `retired` (rotated out; terms computed under it are no longer matched) and `destroyed`
//! (`keys shred`; `wrapped` is `NULL`). The first search key of an organisation is created on
//! first use, race-free across proxies like the first DEK; rotation and shredding are key
//! lifecycle operations (one transaction, a `key_events` row, `NOTIFY pgenvelope_keys`).
//!
//! Never logs key material; [`SearchKeyRecord`]'s `Debug` prints only the wrapped length.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use tokio_postgres::Row;
use uuid::Uuid;

use crate::crypto::{DekId, OrgId};

use super::error::KeyError;
use super::kek::{KekProvider, KeyContext};
use super::lifecycle::{store, KeyChange};
use super::store::{kek_error, KeyStore, CREATE_ATTEMPTS};

/// Columns of `search_keys`, in the order [`search_record_from_row`] reads them.
pub(super) const SEARCH_COLUMNS: &str =
    "key_id, org_id, version, state, kek, wrapped, created_at, retired_at, destroyed_at";

/// `key_events.event` when a proxy creates an organisation's first search key.
pub const SEARCH_KEY_CREATED: &str = "search_key_created";
/// `key_events.event` of `keys rotate --search-key`.
pub const SEARCH_KEY_ROTATED: &str = "search_key_rotated";
/// `key_events.event` of each search key destroyed by `keys shred`.
pub const SEARCH_KEY_DESTROYED: &str = "search_key_destroyed";
/// `key_events.event` of each search key re-wrapped by `keys rewrap`.
pub const SEARCH_KEY_REWRAPPED: &str = "search_key_rewrapped";

/// Lifecycle state of a search key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SearchKeyState {
    /// Computes every search term now; at most one per organisation.
    Active,
    /// Rotated out: terms computed under it are no longer looked up.
    Retired,
    /// Shredded: the wrapped key is gone.
    Destroyed,
}

impl SearchKeyState {
    /// The value stored in `search_keys.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Retired => "retired",
            Self::Destroyed => "destroyed",
        }
    }
}

impl FromStr for SearchKeyState {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "active" => Ok(Self::Active),
            "retired" => Ok(Self::Retired),
            "destroyed" => Ok(Self::Destroyed),
            _ => Err(()),
        }
    }
}

impl fmt::Display for SearchKeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `search_keys`.
///
/// Invariant (checked when read): `wrapped` is `None` exactly when `state` is `Destroyed`.
#[derive(Clone)]
pub struct SearchKeyRecord {
    /// The search key's id (a UUID, like a DEK id, but never found among the DEKs).
    pub key_id: DekId,
    /// The organisation that owns it.
    pub org_id: OrgId,
    /// Version within the organisation, from 1 (independent of its DEK versions).
    pub version: i32,
    /// Lifecycle state.
    pub state: SearchKeyState,
    /// KEK id of the provider that wrapped it.
    pub kek: String,
    /// The wrapped key; `None` once destroyed. Never printed.
    pub wrapped: Option<Vec<u8>>,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it stopped being active, if it has.
    pub retired_at: Option<SystemTime>,
    /// When it was destroyed, if it has been.
    pub destroyed_at: Option<SystemTime>,
}

impl fmt::Debug for SearchKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wrapped = self
            .wrapped
            .as_ref()
            .map(|w| format!("[{} bytes]", w.len()));
        f.debug_struct("SearchKeyRecord")
            .field("key_id", &self.key_id)
            .field("org_id", &self.org_id)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("kek", &self.kek)
            .field("wrapped", &wrapped)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("destroyed_at", &self.destroyed_at)
            .finish()
    }
}

/// Outcome of [`KeyStore::rotate_search_key`].
#[derive(Debug, Clone)]
pub struct SearchRotation {
    /// The search key that was active before, now retired (`None` if there was none).
    pub retired: Option<SearchKeyRecord>,
    /// The new active search key.
    pub active: SearchKeyRecord,
}

impl KeyStore {
    /// The organisation's active search key, creating version 1 (or the next version) if it
    /// has none.
    ///
    /// Race-free across proxies as for the first DEK: a key is generated and wrapped, then
    /// inserted with `ON CONFLICT DO NOTHING` together with its `search_key_created` event;
    /// whoever loses the race discards its key and reads the winner's row.
    pub async fn get_or_create_search_key(
        &self,
        org: &OrgId,
        kek: &dyn KekProvider,
    ) -> Result<SearchKeyRecord, KeyError> {
        for _ in 0..CREATE_ATTEMPTS {
            if let Some(record) = self.active_search_key(org).await? {
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
            let s = self.quoted_schema();
            // No conflict target: the primary key, (org_id, version) and the one-active-per-org
            // index all arbitrate, so a lost race inserts nothing.
            let sql = format!(
                r#"
WITH ins AS (
    INSERT INTO {s}.search_keys (key_id, org_id, version, state, kek, wrapped)
    SELECT $1, $2,
           COALESCE((SELECT max(version) FROM {s}.search_keys WHERE org_id = $2), 0) + 1,
           'active', $3, $4
    ON CONFLICT DO NOTHING
    RETURNING {SEARCH_COLUMNS}
), ev AS (
    INSERT INTO {s}.key_events (org_id, dek_id, event, kek, actor, detail)
    SELECT org_id, key_id, '{SEARCH_KEY_CREATED}', kek, $5, 'v' || version FROM ins
)
SELECT {SEARCH_COLUMNS} FROM ins"#
            );
            let (sql, id, org_s, actor) = (&sql, &ctx.dek.0, org.as_str(), self.actor.as_str());
            let (kek_s, wrapped) = (kek_id.as_str(), wrapped.as_slice());
            let row = self
                .run("create search key", |c| async move {
                    c.query_opt(sql.as_str(), &[id, &org_s, &kek_s, &wrapped, &actor])
                        .await
                })
                .await?;
            if let Some(row) = row {
                let record = search_record_from_row(&row)?;
                tracing::info!(
                    tenant = %org,
                    search_key = %record.key_id,
                    version = record.version,
                    kek = %record.kek,
                    "created search key"
                );
                return Ok(record);
            }
        }
        self.active_search_key(org)
            .await?
            .ok_or_else(|| KeyError::ActiveKeyContention { org: org.clone() })
    }

    /// The organisation's active search key, if it has one.
    pub async fn active_search_key(
        &self,
        org: &OrgId,
    ) -> Result<Option<SearchKeyRecord>, KeyError> {
        let s = self.quoted_schema();
        let sql = format!(
            "SELECT {SEARCH_COLUMNS} FROM {s}.search_keys WHERE org_id = $1 AND state = 'active'"
        );
        let (sql, org) = (&sql, org.as_str());
        let row = self
            .run("look up active search key", |c| async move {
                c.query_opt(sql.as_str(), &[&org]).await
            })
            .await?;
        row.as_ref().map(search_record_from_row).transpose()
    }

    /// The search key with this id, in any state.
    pub async fn lookup_search_key(&self, id: DekId) -> Result<Option<SearchKeyRecord>, KeyError> {
        let s = self.quoted_schema();
        let sql = format!("SELECT {SEARCH_COLUMNS} FROM {s}.search_keys WHERE key_id = $1");
        let (sql, id) = (&sql, &id.0);
        let row = self
            .run("look up search key", |c| async move {
                c.query_opt(sql.as_str(), &[id]).await
            })
            .await?;
        row.as_ref().map(search_record_from_row).transpose()
    }

    /// Every search key (of `org`, or of all organisations), ordered by organisation and
    /// version. Empty, and creates nothing, when the key store predates search keys (its
    /// `search_keys` table is made by the next `ensure_schema`).
    pub async fn list_search_keys(
        &self,
        org: Option<&OrgId>,
    ) -> Result<Vec<SearchKeyRecord>, KeyError> {
        let s = self.quoted_schema();
        let exists = format!("SELECT to_regclass('{s}.search_keys') IS NOT NULL");
        let sql = format!(
            "SELECT {SEARCH_COLUMNS} FROM {s}.search_keys \
             WHERE $1::text IS NULL OR org_id = $1 ORDER BY org_id, version"
        );
        let (exists, sql, org) = (&exists, &sql, org.map(OrgId::as_str));
        let rows = self
            .run("list search keys", |c| async move {
                let exists: bool = c.query_one(exists.as_str(), &[]).await?.get(0);
                if !exists {
                    return Ok(Vec::new());
                }
                c.query(sql.as_str(), &[&org]).await
            })
            .await?;
        rows.iter().map(search_record_from_row).collect()
    }

    /// Make a new active search key for `org` (generated by `kek`); the previous active one
    /// becomes `retired`. One transaction, serialized per organisation with the DEK
    /// operations, that records a `search_key_rotated` event and announces the change like a
    /// DEK rotation (`rotate`), so every proxy drops the organisation's cached keys.
    ///
    /// Look-ups use the active search key only: values whose terms were computed under the
    /// retired key are found again once `reencrypt` has rewritten them.
    pub async fn rotate_search_key(
        &self,
        org: &OrgId,
        kek: &dyn KekProvider,
        reason: Option<&str>,
    ) -> Result<SearchRotation, KeyError> {
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
            let retired = tx
                .query_opt(
                    &format!(
                        "UPDATE {s}.search_keys SET state = 'retired', retired_at = now() \
                         WHERE org_id = $1 AND state = 'active' RETURNING {SEARCH_COLUMNS}"
                    ),
                    &[&org.as_str()],
                )
                .await
                .map_err(store("retire search key"))?
                .as_ref()
                .map(search_record_from_row)
                .transpose()?;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO {s}.search_keys (key_id, org_id, version, state, kek, wrapped) \
                         SELECT $1, $2, COALESCE(max(version), 0) + 1, 'active', $3, $4 \
                         FROM {s}.search_keys WHERE org_id = $2 RETURNING {SEARCH_COLUMNS}"
                    ),
                    &[&ctx.dek.0, &org.as_str(), &kek_id, &wrapped],
                )
                .await
                .map_err(store("insert search key"))?;
            let active = search_record_from_row(&row)?;
            let detail = match &retired {
                Some(r) => format!("v{} → v{}; retired {}", r.version, active.version, r.key_id),
                None => format!("v{}; no active search key before", active.version),
            };
            self.event(
                &tx,
                org.as_str(),
                Some(active.key_id),
                SEARCH_KEY_ROTATED,
                Some(&kek_id),
                reason,
                Some(&detail),
            )
            .await?;
            self.notify(&tx, &KeyChange::Rotate(org.clone())).await?;
            tx.commit().await.map_err(store("commit"))?;
            Ok(SearchRotation { retired, active })
        }
        .await;
        drop(client);
        let _ = driver.await;
        if let Ok(r) = &result {
            tracing::info!(
                tenant = %org,
                search_key = %r.active.key_id,
                version = r.active.version,
                "rotated search key"
            );
        }
        result
    }
}

pub(super) fn search_record_from_row(row: &Row) -> Result<SearchKeyRecord, KeyError> {
    let get = |e: tokio_postgres::Error| KeyError::store("decode search key row", e);
    let key_id = DekId(row.try_get::<_, Uuid>("key_id").map_err(get)?);
    let corrupt = |reason| KeyError::CorruptRecord {
        dek: key_id,
        reason,
    };
    let org_id = OrgId::new(row.try_get::<_, String>("org_id").map_err(get)?)
        .map_err(|_| corrupt("search key with an invalid organisation id"))?;
    let state = row
        .try_get::<_, &str>("state")
        .map_err(get)?
        .parse::<SearchKeyState>()
        .map_err(|()| corrupt("search key with an unknown state"))?;
    let wrapped: Option<Vec<u8>> = row.try_get("wrapped").map_err(get)?;
    if (state == SearchKeyState::Destroyed) != wrapped.is_none() {
        return Err(corrupt(
            "search key's wrapped key must be present exactly when not destroyed",
        ));
    }
    Ok(SearchKeyRecord {
        key_id,
        org_id,
        version: row.try_get("version").map_err(get)?,
        state,
        kek: row.try_get("kek").map_err(get)?,
        wrapped,
        created_at: row.try_get("created_at").map_err(get)?,
        retired_at: row.try_get("retired_at").map_err(get)?,
        destroyed_at: row.try_get("destroyed_at").map_err(get)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn states_round_trip() {
        for state in [
            SearchKeyState::Active,
            SearchKeyState::Retired,
            SearchKeyState::Destroyed,
        ] {
            assert_eq!(state.as_str().parse::<SearchKeyState>(), Ok(state));
        }
        // The DEK state name is not a search key state.
        assert!("decrypt_only".parse::<SearchKeyState>().is_err());
    }

    #[test]
    fn record_debug_hides_wrapped_bytes() {
        let record = SearchKeyRecord {
            key_id: DekId::from_bytes([0x22; 16]),
            org_id: OrgId::new("acme").unwrap(),
            version: 1,
            state: SearchKeyState::Active,
            kek: "local:0011223344556677".into(),
            wrapped: Some(vec![0xCD; 61]),
            created_at: SystemTime::UNIX_EPOCH,
            retired_at: None,
            destroyed_at: None,
        };
        let debug = format!("{record:?}");
        assert!(debug.contains("[61 bytes]"), "{debug}");
        assert!(
            !debug.contains("205, 205") && !debug.to_lowercase().contains("cdcd"),
            "{debug}"
        );
    }
}
