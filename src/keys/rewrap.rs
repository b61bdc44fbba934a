//! `keys rewrap`: move wrapped DEKs and search keys from one KEK to another without touching
//! data rows.
//!
//! Batched and resumable: each batch is one transaction that stores the new wrapped forms,
//! records a `rewrap` event per DEK (`search_key_rewrapped` per search key) and sends
//! `NOTIFY pgenvelope_keys` (see `lifecycle`); a rerun picks up whatever is not under the
//! target KEK yet. Every new wrapped form is verified by unwrapping it before it is stored.
//! Never logs key material.

use std::sync::Arc;

use uuid::Uuid;

use crate::crypto::{DekId, OrgId};

use super::error::KeyError;
use super::kek::{KekError, KekProvider, KeyContext};
use super::lifecycle::{store, KeyChange};
use super::search::{search_record_from_row, SEARCH_COLUMNS, SEARCH_KEY_REWRAPPED};
use super::store::{record_from_row, KeyStore, COLUMNS};

/// Outcome of [`KeyStore::rewrap`].
#[derive(Debug, Default)]
pub struct RewrapReport {
    /// DEKs and search keys re-wrapped by this run.
    pub rewrapped: usize,
    /// Of those, how many were search keys.
    pub search_keys: usize,
    /// Of those, how many the KMS re-encrypted itself (the key never left it).
    pub by_kms: usize,
    /// Live DEKs and search keys that were already under the target KEK.
    pub already: usize,
    /// Keys left as they were, with why (no KEK to unwrap them, changed meanwhile, …); the
    /// reason of a search key starts with `search key:`.
    pub skipped: Vec<(DekId, String)>,
}

impl KeyStore {
    /// Re-wrap every live DEK and search key not yet under `to`, `batch` per transaction.
    /// `from` are the KEKs that may unwrap the current wrapped forms (matched by KEK id). Each
    /// new wrapped form is verified by unwrapping it with `to` and comparing with the key
    /// before it is stored; a row changed meanwhile (rotated, shredded, re-wrapped by someone
    /// else) is left alone. Resumable: a rerun picks up whatever is not under `to` yet.
    pub async fn rewrap(
        &self,
        from: &[Arc<dyn KekProvider>],
        to: &dyn KekProvider,
        batch: usize,
        reason: Option<&str>,
        mut progress: impl FnMut(&RewrapReport),
    ) -> Result<RewrapReport, KeyError> {
        let s = self.quoted_schema();
        let to_id = to.kek_id();
        let batch = i64::try_from(batch.max(1)).unwrap_or(1000);
        let mut report = RewrapReport::default();
        let (mut client, conn) = self.dedicated().await?;
        let driver = tokio::spawn(conn);
        let result = async {
            for table in [KeyTable::Dek, KeyTable::Search] {
                let (name, id) = (table.name(), table.id_column());
                let already: i64 = client
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {s}.{name} \
                             WHERE state <> 'destroyed' AND kek = $1"
                        ),
                        &[&to_id],
                    )
                    .await
                    .map_err(store("count keys"))?
                    .get(0);
                report.already += usize::try_from(already).unwrap_or(0);
                let mut after = Uuid::nil();
                loop {
                    let rows = client
                        .query(
                            &format!(
                                "SELECT {columns} FROM {s}.{name} \
                                 WHERE state <> 'destroyed' AND kek <> $1 AND {id} > $2 \
                                 ORDER BY {id} LIMIT $3",
                                columns = table.columns()
                            ),
                            &[&to_id, &after, &batch],
                        )
                        .await
                        .map_err(store("list keys"))?;
                    let Some(last) = rows.last() else {
                        break;
                    };
                    after = last.try_get(id).map_err(store("decode key row"))?;
                    let mut done = Vec::new();
                    for row in &rows {
                        let key = table.decode(row)?;
                        match rewrap_one(&key, from, to).await {
                            Ok((wrapped, by_kms)) => done.push((key, wrapped, by_kms)),
                            Err(why) => report.skipped.push((key.id, table.describe(why))),
                        }
                    }
                    let tx = client.transaction().await.map_err(store("begin"))?;
                    for (key, wrapped, by_kms) in done {
                        let n = tx
                            .execute(
                                &format!(
                                    "UPDATE {s}.{name} SET kek = $2, wrapped = $3 \
                                     WHERE {id} = $1 AND kek = $4 AND wrapped = $5 \
                                     AND state <> 'destroyed'"
                                ),
                                &[&key.id.0, &to_id, &wrapped, &key.kek, &key.wrapped],
                            )
                            .await
                            .map_err(store("store re-wrapped key"))?;
                        if n == 0 {
                            let why = table.describe("changed meanwhile".to_owned());
                            report.skipped.push((key.id, why));
                            continue;
                        }
                        let detail = format!(
                            "v{} from {}{}",
                            key.version,
                            key.kek,
                            if by_kms { " (KMS ReEncrypt)" } else { "" }
                        );
                        self.event(
                            &tx,
                            key.org.as_str(),
                            Some(key.id),
                            table.rewrap_event(),
                            Some(&to_id),
                            reason,
                            Some(&detail),
                        )
                        .await?;
                        report.rewrapped += 1;
                        report.by_kms += usize::from(by_kms);
                        report.search_keys += usize::from(table == KeyTable::Search);
                    }
                    self.notify(&tx, &KeyChange::Rewrap).await?;
                    tx.commit().await.map_err(store("commit"))?;
                    progress(&report);
                }
            }
            Ok(())
        }
        .await;
        drop(client);
        let _ = driver.await;
        result.map(|()| report)
    }
}

/// The two tables of wrapped keys, as `rewrap` walks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyTable {
    Dek,
    Search,
}

impl KeyTable {
    fn name(self) -> &'static str {
        match self {
            Self::Dek => "data_keys",
            Self::Search => "search_keys",
        }
    }

    fn id_column(self) -> &'static str {
        match self {
            Self::Dek => "dek_id",
            Self::Search => "key_id",
        }
    }

    fn columns(self) -> &'static str {
        match self {
            Self::Dek => COLUMNS,
            Self::Search => SEARCH_COLUMNS,
        }
    }

    fn rewrap_event(self) -> &'static str {
        match self {
            Self::Dek => "rewrap",
            Self::Search => SEARCH_KEY_REWRAPPED,
        }
    }

    /// A reason for the report, saying which kind of key it is about.
    fn describe(self, why: String) -> String {
        match self {
            Self::Dek => why,
            Self::Search => format!("search key: {why}"),
        }
    }

    fn decode(self, row: &tokio_postgres::Row) -> Result<WrappedKey, KeyError> {
        Ok(match self {
            Self::Dek => {
                let r = record_from_row(row)?;
                WrappedKey {
                    id: r.dek_id,
                    org: r.org_id,
                    version: r.version,
                    kek: r.kek,
                    wrapped: r.wrapped,
                }
            }
            Self::Search => {
                let r = search_record_from_row(row)?;
                WrappedKey {
                    id: r.key_id,
                    org: r.org_id,
                    version: r.version,
                    kek: r.kek,
                    wrapped: r.wrapped,
                }
            }
        })
    }
}

/// What re-wrapping needs of a DEK or search key row.
struct WrappedKey {
    id: DekId,
    org: OrgId,
    version: i32,
    kek: String,
    wrapped: Option<Vec<u8>>,
}

/// Re-wrap one key for `to`, verified. Returns the new wrapped form and whether the KMS did
/// it without the key leaving it. Errors are reasons for the report (no key material).
async fn rewrap_one(
    record: &WrappedKey,
    from: &[Arc<dyn KekProvider>],
    to: &dyn KekProvider,
) -> Result<(Vec<u8>, bool), String> {
    let Some(wrapped) = &record.wrapped else {
        return Err("destroyed".to_owned());
    };
    let Some(source) = from.iter().find(|k| k.kek_id() == record.kek) else {
        return Err(format!(
            "wrapped by KEK `{}`, which was not given (--kms or --kms-also)",
            record.kek
        ));
    };
    let ctx = KeyContext {
        org: record.org.clone(),
        dek: record.id,
    };
    let describe = |e: KekError| format!("KEK error: {e}");
    let key = source.unwrap(&ctx, wrapped).await.map_err(describe)?;
    let (new, by_kms) = match source.rewrap_to(&ctx, wrapped, to).await {
        Some(Ok(new)) => (new, true),
        Some(Err(e)) => {
            tracing::debug!(error = %e, key = %record.id, "KMS re-encryption failed; unwrapping and wrapping instead");
            (to.wrap(&ctx, &key).await.map_err(describe)?, false)
        }
        None => (to.wrap(&ctx, &key).await.map_err(describe)?, false),
    };
    let check = to.unwrap(&ctx, &new).await.map_err(describe)?;
    if check.expose_secret() != key.expose_secret() {
        return Err("verification failed: the re-wrapped key unwraps to another key".to_owned());
    }
    Ok((new, by_kms))
}
