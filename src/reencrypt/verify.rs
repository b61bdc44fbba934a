//! Read-only census: how many values of the configured columns sit under each DEK.
//!
//! Reads only the first 55 characters of each value (`enc:v1:` and the base64 of 36 bytes:
//! the algorithm byte and the DEK id, after the search part of a searchable value), never
//! decrypts, and needs no primary key,
//! so it also covers tables `reencrypt` had to skip. Used to say whether a retired DEK still
//! protects anything and, with `--destroy-retired`, to decide whether it may be destroyed.
//!
//! [`first_sealed_column`] asks only whether any `enc:v1:` value is stored at all, for a run
//! whose key store holds no keys yet.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokio_postgres::Client;

use crate::crypto::search::SEARCH_PART_LEN;
use crate::crypto::{Algorithm, DekId, ENC_V1_PREFIX, SEARCHABLE_BYTE};
use crate::rules::RuleSet;

use super::error::ReencryptError;
use super::plan::quote;

/// Characters of base64 holding bytes 0..36 of the binary value: the algorithm byte and the
/// DEK id, also behind a searchable value's 18-byte search part.
const HEAD_B64: usize = 48;
/// Rows fetched per round trip.
const FETCH_ROWS: i32 = 10_000;

/// Values per DEK over every configured column.
#[derive(Debug, Default, Clone)]
pub struct Census {
    /// Values per DEK id found in a well-formed `enc:v1` header.
    pub by_dek: HashMap<DekId, u64>,
    /// Values that are not `enc:v1` (plaintext) or whose header does not parse.
    pub other: u64,
}

impl Census {
    /// Values found under `dek`.
    pub fn under(&self, dek: DekId) -> u64 {
        self.by_dek.get(&dek).copied().unwrap_or(0)
    }
}

/// Count values per DEK in every column of `rules`. Tables that do not exist are an error.
pub(crate) async fn census(client: &mut Client, rules: &RuleSet) -> Result<Census, ReencryptError> {
    let mut census = Census::default();
    for table in rules.tables() {
        let name = table.qualified_name();
        let heads = table
            .columns()
            .map(|c| format!("left({}::text, {})", quote(c.column()), 7 + HEAD_B64))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {heads} FROM {}.{}",
            quote(table.schema()),
            quote(table.name())
        );
        let db = |e| ReencryptError::db("verification scan", Some(&name), e);
        // A portal fetched in chunks keeps memory flat on large tables.
        let tx = client.transaction().await.map_err(db)?;
        let statement = tx.prepare(&sql).await.map_err(db)?;
        let portal = tx.bind(&statement, &[]).await.map_err(db)?;
        let columns = table.columns().len();
        loop {
            let rows = tx.query_portal(&portal, FETCH_ROWS).await.map_err(db)?;
            for row in &rows {
                for i in 0..columns {
                    let head: Option<&str> = row.try_get(i).map_err(db)?;
                    match head.map(dek_of_head) {
                        None => {}
                        Some(Some(dek)) => *census.by_dek.entry(dek).or_insert(0) += 1,
                        Some(None) => census.other += 1,
                    }
                }
            }
            if rows.len() < usize::try_from(FETCH_ROWS).unwrap_or(usize::MAX) {
                break;
            }
        }
        tx.commit().await.map_err(db)?;
    }
    Ok(census)
}

/// The first configured column (`schema.table.column`, in rule order) that holds an `enc:v1:`
/// value, if any. Tables that do not exist are skipped (the run reports them). Stops at the
/// first such value; a table without any reads every row once.
pub(crate) async fn first_sealed_column(
    client: &Client,
    rules: &RuleSet,
) -> Result<Option<String>, ReencryptError> {
    for table in rules.tables() {
        let name = table.qualified_name();
        let db = |e| ReencryptError::db("look for encrypted values", Some(&name), e);
        let relation = format!("{}.{}", quote(table.schema()), quote(table.name()));
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
            .await
            .map_err(db)?
            .get(0);
        if !exists {
            continue;
        }
        for column in table.columns() {
            let col = quote(column.column());
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {relation} WHERE left({col}::text, 7) = 'enc:v1:')"
            );
            let found: bool = client.query_one(&sql, &[]).await.map_err(db)?.get(0);
            if found {
                return Ok(Some(column.qualified_name().to_owned()));
            }
        }
    }
    Ok(None)
}

/// The DEK id in the first 31 characters of an `enc:v1` value, if they are one.
fn dek_of_head(head: &str) -> Option<DekId> {
    let b64 = head.as_bytes().strip_prefix(ENC_V1_PREFIX)?;
    // A value shorter than the head (none is) still decodes in whole 4-character groups.
    let b64 = b64.get(..HEAD_B64).unwrap_or(b64);
    let bytes = STANDARD.decode(b64).ok()?;
    let bytes = match bytes.first() {
        Some(&SEARCHABLE_BYTE) => bytes.get(SEARCH_PART_LEN..)?,
        _ => &bytes[..],
    };
    let algorithm = *bytes.first()?;
    if algorithm != Algorithm::AES_256_GCM_BYTE && algorithm != Algorithm::AES_256_GCM_ROW_BYTE {
        return None;
    }
    let id: [u8; 16] = bytes.get(1..17)?.try_into().ok()?;
    Some(DekId::from_bytes(id))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::{ColumnId, ColumnKey, DataKey, OrgId};

    #[test]
    fn header_prefix_names_the_dek() {
        let dek = DekId::new_random();
        let key = ColumnKey::derive(&DataKey::generate(), dek, ColumnId::from_name("a.b.c"));
        let org = OrgId::new("acme").unwrap();
        for plaintext in [
            "",
            "x",
            "a longer value that spans several blocks of base64",
        ] {
            let value = key
                .danger_seal_with_nonce(&org, plaintext.as_bytes(), [7; 12])
                .unwrap();
            assert_eq!(dek_of_head(&value[..55]), Some(dek));
            assert_eq!(dek_of_head(&value), Some(dek));
            // A searchable value names its DEK behind the search part.
            let term = crate::crypto::TermKey::derive(
                &DataKey::generate(),
                DekId::new_random(),
                ColumnId::from_name("a.b.c"),
                crate::crypto::SearchMode::Equality,
            )
            .term(plaintext.as_bytes());
            let searchable = key
                .danger_seal_searchable_with_nonce(&org, None, &term, plaintext.as_bytes(), [7; 12])
                .unwrap();
            assert_eq!(dek_of_head(&searchable[..55]), Some(dek));
            assert_eq!(dek_of_head(&searchable), Some(dek));
        }
        assert_eq!(dek_of_head("plaintext"), None);
        assert_eq!(dek_of_head("enc:v1:short"), None);
        assert_eq!(dek_of_head("enc:v1:!!!!!!!!!!!!!!!!!!!!!!!!"), None);
        // Algorithm byte 0x02 (reserved) is not counted as a DEK's value.
        let mut bytes = vec![0x02];
        bytes.extend_from_slice(dek.as_bytes());
        bytes.push(0);
        let head = format!("enc:v1:{}", STANDARD.encode(&bytes));
        assert_eq!(dek_of_head(&head), None);
    }
}
