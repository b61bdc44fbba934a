//! Fixed `enc:v1` vectors (`tests/vectors/enc_v1.json`, produced by an independent Python
//! implementation of docs/design.md §1): the format must not change by accident.

#![allow(clippy::unwrap_used)]

use pgenvelope::crypto::{ColumnId, ColumnKey, DataKey, DekId, EncV1, OpenError, OrgId};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    format: String,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    dek: String,
    dek_id: String,
    column: String,
    column_id: String,
    org: String,
    nonce: String,
    plaintext: String,
    expected: String,
    /// Row-bound values (algorithm `0x03`) only: the row key in the AAD.
    #[serde(default)]
    row_key: Option<String>,
}

fn load() -> File {
    let text = include_str!("vectors/enc_v1.json");
    let file: File = serde_json::from_str(text).unwrap();
    assert_eq!(file.format, "enc:v1");
    assert!(file.vectors.len() >= 6);
    file
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0);
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Case {
    key: ColumnKey,
    org: OrgId,
    nonce: [u8; 12],
    plaintext: Vec<u8>,
}

fn case(v: &Vector) -> Case {
    let dek = DataKey::from_slice(&hex(&v.dek)).unwrap();
    let dek_id = DekId(v.dek_id.parse().unwrap());
    let column_id = ColumnId::from_name(&v.column);
    assert_eq!(column_id.to_string(), v.column_id, "{}: column id", v.name);
    Case {
        key: ColumnKey::derive(&dek, dek_id, column_id),
        org: OrgId::new(v.org.clone()).unwrap(),
        nonce: hex(&v.nonce).try_into().unwrap(),
        plaintext: hex(&v.plaintext),
    }
}

#[test]
fn seal_matches_vectors() {
    for v in load().vectors {
        let c = case(&v);
        let text = match &v.row_key {
            None => c.key.danger_seal_with_nonce(&c.org, &c.plaintext, c.nonce),
            Some(k) => {
                c.key
                    .danger_seal_for_row_with_nonce(&c.org, k.as_bytes(), &c.plaintext, c.nonce)
            }
        }
        .unwrap();
        assert_eq!(text, v.expected, "{}", v.name);
    }
}

#[test]
fn open_matches_vectors() {
    for v in load().vectors {
        let c = case(&v);
        let value = EncV1::parse(v.expected.as_bytes()).unwrap();
        assert_eq!(value.dek_id(), c.key.dek_id(), "{}", v.name);
        assert_eq!(value.column_id(), c.key.column_id(), "{}", v.name);
        assert_eq!(value.nonce(), c.nonce, "{}", v.name);
        assert_eq!(value.to_text(), v.expected, "{}", v.name);
        assert_eq!(value.is_row_bound(), v.row_key.is_some(), "{}", v.name);
        if let Some(k) = &v.row_key {
            let open = |row: &str| {
                c.key
                    .open_owned_in_row(&c.org, Some(row.as_bytes()), value.clone())
            };
            assert_eq!(open(k).unwrap(), c.plaintext, "{}", v.name);
            assert_eq!(
                open(&format!("{k}0")),
                Err(OpenError::Authentication),
                "{}",
                v.name
            );
            continue;
        }
        assert_eq!(
            c.key.open(&c.org, &value).unwrap(),
            c.plaintext,
            "{}",
            v.name
        );

        let other = OrgId::new(format!("{}x", &v.org[..v.org.len().min(200)])).unwrap();
        assert_eq!(
            c.key.open(&other, &value),
            Err(OpenError::Authentication),
            "{}",
            v.name
        );
    }
}
