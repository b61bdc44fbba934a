//! `keys rewrap`: move wrapped DEKs from one KEK to another without touching data rows.
//!
//! Batched and resumable: each batch is one transaction that stores the new wrapped forms,
//! records a `rewrap` event per DEK and sends `NOTIFY pgenvelope_keys` (see `lifecycle`); a
//! rerun picks up whatever is not under the target KEK yet. Every new wrapped form is verified
//! by unwrapping it before it is stored. Never logs key material.

use std::sync::Arc;

use uuid::Uuid;

use crate::crypto::DekId;

use super::error::KeyError;
use super::kek::{KekError, KekProvider, KeyContext};
use super::lifecycle::{store, KeyChange};
use super::store::{record_from_row, DekRecord, KeyStore, COLUMNS};

/// Outcome of [`KeyStore::rewrap`].
#[derive(Debug, Default)]
pub struct RewrapReport {
    /// DEKs re-wrapped by this run.
    pub rewrapped: usize,
    /// Of those, how many the KMS re-encrypted itself (the key never left it).
    pub by_kms: usize,
    /// Live DEKs that were already under the target KEK.
    pub already: usize,
    /// DEKs left as they were, with why (no KEK to unwrap them, changed meanwhile, …).
    pub skipped: Vec<(DekId, String)>,
}

impl KeyStore {
    /// Re-wrap every live DEK not yet under `to`, `batch` per transaction. `from` are the
    /// KEKs that may unwrap the current wrapped forms (matched by KEK id). Each new wrapped
    /// form is verified by unwrapping it with `to` and comparing with the key before it is
    /// stored; a row changed meanwhile (rotated, shredded, re-wrapped by someone else) is
    /// left alone. Resumable: a rerun picks up whatever is not under `to` yet.
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
            let already: i64 = client
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {s}.data_keys \
                         WHERE state <> 'destroyed' AND kek = $1"
                    ),
                    &[&to_id],
                )
                .await
                .map_err(store("count DEKs"))?
                .get(0);
            report.already = usize::try_from(already).unwrap_or(0);
            let mut after = Uuid::nil();
            loop {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM {s}.data_keys \
                             WHERE state <> 'destroyed' AND kek <> $1 AND dek_id > $2 \
                             ORDER BY dek_id LIMIT $3"
                        ),
                        &[&to_id, &after, &batch],
                    )
                    .await
                    .map_err(store("list DEKs"))?;
                let Some(last) = rows.last() else {
                    break;
                };
                after = last.try_get("dek_id").map_err(store("decode key row"))?;
                let mut done = Vec::new();
                for row in &rows {
                    let record = record_from_row(row)?;
                    match rewrap_one(&record, from, to).await {
                        Ok((wrapped, by_kms)) => done.push((record, wrapped, by_kms)),
                        Err(why) => report.skipped.push((record.dek_id, why)),
                    }
                }
                let tx = client.transaction().await.map_err(store("begin"))?;
                for (record, wrapped, by_kms) in done {
                    let n = tx
                        .execute(
                            &format!(
                                "UPDATE {s}.data_keys SET kek = $2, wrapped = $3 \
                                 WHERE dek_id = $1 AND kek = $4 AND wrapped = $5 \
                                 AND state <> 'destroyed'"
                            ),
                            &[
                                &record.dek_id.0,
                                &to_id,
                                &wrapped,
                                &record.kek,
                                &record.wrapped,
                            ],
                        )
                        .await
                        .map_err(store("store re-wrapped DEK"))?;
                    if n == 0 {
                        report
                            .skipped
                            .push((record.dek_id, "changed meanwhile".to_owned()));
                        continue;
                    }
                    let detail = format!(
                        "v{} from {}{}",
                        record.version,
                        record.kek,
                        if by_kms { " (KMS ReEncrypt)" } else { "" }
                    );
                    self.event(
                        &tx,
                        record.org_id.as_str(),
                        Some(record.dek_id),
                        "rewrap",
                        Some(&to_id),
                        reason,
                        Some(&detail),
                    )
                    .await?;
                    report.rewrapped += 1;
                    report.by_kms += usize::from(by_kms);
                }
                self.notify(&tx, &KeyChange::Rewrap).await?;
                tx.commit().await.map_err(store("commit"))?;
                progress(&report);
            }
            Ok(())
        }
        .await;
        drop(client);
        let _ = driver.await;
        result.map(|()| report)
    }
}

/// Re-wrap one DEK for `to`, verified. Returns the new wrapped form and whether the KMS did
/// it without the key leaving it. Errors are reasons for the report (no key material).
async fn rewrap_one(
    record: &DekRecord,
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
        org: record.org_id.clone(),
        dek: record.dek_id,
    };
    let describe = |e: KekError| format!("KEK error: {e}");
    let key = source.unwrap(&ctx, wrapped).await.map_err(describe)?;
    let (new, by_kms) = match source.rewrap_to(&ctx, wrapped, to).await {
        Some(Ok(new)) => (new, true),
        Some(Err(e)) => {
            tracing::debug!(error = %e, dek = %record.dek_id, "KMS re-encryption failed; unwrapping and wrapping instead");
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
