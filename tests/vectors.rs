//! Fixed `enc:v1` vectors (`tests/vectors/enc_v1.json`, produced by an independent Python
//! implementation of docs/design.md §1): the format must not change by accident.
//!
//! Searchable values (algorithm `0x04`) have their own file, `tests/vectors/enc_v1_search.json`,
//! from an independent Python implementation of the construction described in
//! `src/crypto/search.rs`: terms, prefixes, whole values, and which terms are equal.

#![allow(clippy::unwrap_used)]

use pgenvelope::crypto::{
    ColumnId, ColumnKey, DataKey, DekId, EncV1, OpenError, OrgId, SearchMode, TermKey,
    SEARCHABLE_BYTE, SEARCH_PREFIX_CHARS, TERM_LEN,
};
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

#[derive(Deserialize)]
struct SearchFile {
    format: String,
    algorithm: String,
    vectors: Vec<SearchVector>,
    /// Groups of vector names whose terms must be equal.
    equal_terms: Vec<Vec<String>>,
    /// Pairs of vector names whose terms must differ.
    different_terms: Vec<[String; 2]>,
}

#[derive(Deserialize)]
struct SearchVector {
    name: String,
    search_key: String,
    search_key_id: String,
    column: String,
    column_id: String,
    mode: String,
    org: String,
    dek: String,
    dek_id: String,
    nonce: String,
    plaintext: String,
    /// The bytes the term is computed over.
    normalised: String,
    term: String,
    prefix: String,
    expected: String,
    /// Row-bound values (inner algorithm `0x03`) only.
    #[serde(default)]
    row_key: Option<String>,
}

fn load_search() -> SearchFile {
    let text = include_str!("vectors/enc_v1_search.json");
    let file: SearchFile = serde_json::from_str(text).unwrap();
    assert_eq!(file.format, "enc:v1");
    assert_eq!(file.algorithm, "0x04 searchable");
    assert!(file.vectors.len() >= 20);
    file
}

struct SearchCase {
    terms: TermKey,
    key: ColumnKey,
    org: OrgId,
    row_key: Option<Vec<u8>>,
    nonce: [u8; 12],
    plaintext: Vec<u8>,
    term: Vec<u8>,
}

fn search_case(v: &SearchVector) -> SearchCase {
    let mode = match v.mode.as_str() {
        "equality" => SearchMode::Equality,
        "equality-ci" => SearchMode::EqualityCi,
        other => panic!("{}: unknown mode {other}", v.name),
    };
    assert_eq!(mode.as_str(), v.mode, "{}", v.name);
    let column_id = ColumnId::from_name(&v.column);
    assert_eq!(column_id.to_string(), v.column_id, "{}: column id", v.name);
    let search_key = DataKey::from_slice(&hex(&v.search_key)).unwrap();
    let dek = DataKey::from_slice(&hex(&v.dek)).unwrap();
    let plaintext = hex(&v.plaintext);
    assert_eq!(
        mode.normalise(&plaintext).as_ref(),
        hex(&v.normalised),
        "{}: normalised plaintext",
        v.name
    );
    let term = hex(&v.term);
    assert_eq!(term.len(), TERM_LEN, "{}", v.name);
    SearchCase {
        terms: TermKey::derive(
            &search_key,
            DekId(v.search_key_id.parse().unwrap()),
            column_id,
            mode,
        ),
        key: ColumnKey::derive(&dek, DekId(v.dek_id.parse().unwrap()), column_id),
        org: OrgId::new(v.org.clone()).unwrap(),
        row_key: v.row_key.as_ref().map(|k| k.as_bytes().to_vec()),
        nonce: hex(&v.nonce).try_into().unwrap(),
        plaintext,
        term,
    }
}

#[test]
fn search_terms_match_vectors() {
    for v in load_search().vectors {
        let c = search_case(&v);
        let term = c.terms.term(&c.plaintext);
        assert_eq!(term.as_bytes().as_slice(), c.term, "{}: term", v.name);
        assert_eq!(term.prefix_text(), v.prefix, "{}: prefix", v.name);
        assert_eq!(v.prefix.len(), SEARCH_PREFIX_CHARS, "{}", v.name);
        assert!(v.expected.starts_with(&v.prefix), "{}", v.name);
    }
}

#[test]
fn searchable_seal_matches_vectors() {
    for v in load_search().vectors {
        let c = search_case(&v);
        let term = c.terms.term(&c.plaintext);
        let text = c
            .key
            .danger_seal_searchable_with_nonce(
                &c.org,
                c.row_key.as_deref(),
                &term,
                &c.plaintext,
                c.nonce,
            )
            .unwrap();
        assert_eq!(text, v.expected, "{}", v.name);
    }
}

#[test]
fn searchable_open_matches_vectors() {
    for v in load_search().vectors {
        let c = search_case(&v);
        let value = EncV1::parse(v.expected.as_bytes()).unwrap();
        assert!(value.is_searchable(), "{}", v.name);
        assert_eq!(
            value.search_term().unwrap().as_bytes().as_slice(),
            c.term,
            "{}",
            v.name
        );
        assert_eq!(value.dek_id(), c.key.dek_id(), "{}", v.name);
        assert_eq!(value.column_id(), c.key.column_id(), "{}", v.name);
        assert_eq!(value.nonce(), c.nonce, "{}", v.name);
        assert_eq!(value.plaintext_len(), c.plaintext.len(), "{}", v.name);
        assert_eq!(value.to_text(), v.expected, "{}", v.name);
        assert_eq!(value.is_row_bound(), c.row_key.is_some(), "{}", v.name);

        let open_in =
            |org: &OrgId, row: Option<&[u8]>| c.key.open_owned_in_row(org, row, value.clone());
        let other_org = OrgId::new(format!("{}x", v.org)).unwrap();
        match &c.row_key {
            Some(k) => {
                assert_eq!(open_in(&c.org, Some(k)).unwrap(), c.plaintext, "{}", v.name);
                let mut other_row = k.clone();
                other_row.push(b'0');
                assert_eq!(
                    open_in(&c.org, Some(&other_row)),
                    Err(OpenError::Authentication),
                    "{}",
                    v.name
                );
                assert_eq!(
                    open_in(&other_org, Some(k)),
                    Err(OpenError::Authentication),
                    "{}",
                    v.name
                );
                assert_eq!(
                    open_in(&c.org, None),
                    Err(OpenError::RowKeyMissing),
                    "{}",
                    v.name
                );
                assert_eq!(
                    c.key.open(&c.org, &value),
                    Err(OpenError::RowKeyMissing),
                    "{}",
                    v.name
                );
            }
            None => {
                assert_eq!(
                    c.key.open(&c.org, &value).unwrap(),
                    c.plaintext,
                    "{}",
                    v.name
                );
                assert_eq!(open_in(&c.org, None).unwrap(), c.plaintext, "{}", v.name);
                assert_eq!(
                    c.key.open(&other_org, &value),
                    Err(OpenError::Authentication),
                    "{}",
                    v.name
                );
            }
        }
    }
}

/// The AAD covers the search part: a changed term, or the value without its search part,
/// fails authentication.
#[test]
fn searchable_term_is_authenticated() {
    for v in load_search().vectors {
        let c = search_case(&v);
        let binary = EncV1::parse(v.expected.as_bytes())
            .unwrap()
            .as_binary()
            .to_vec();
        assert_eq!(binary[0], SEARCHABLE_BYTE, "{}", v.name);
        assert_eq!(&binary[1..1 + TERM_LEN], c.term, "{}", v.name);

        let mut changed = binary.clone();
        changed[TERM_LEN] ^= 0x01;
        let stripped = binary[1 + TERM_LEN..].to_vec();
        for tampered in [changed, stripped] {
            let value = EncV1::from_binary(tampered).unwrap();
            assert_eq!(
                c.key.open_owned_in_row(&c.org, c.row_key.as_deref(), value),
                Err(OpenError::Authentication),
                "{}",
                v.name
            );
        }
    }
}

/// The file pins the normalisation: the terms it lists as equal are equal in the file (and
/// computed so), the pairs it lists as different differ.
#[test]
fn search_vectors_pin_equal_and_different_terms() {
    let file = load_search();
    let find = |name: &str| {
        file.vectors
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no vector named {name}"))
    };
    let computed = |v: &SearchVector| {
        let c = search_case(v);
        c.terms.term(&c.plaintext).as_bytes().to_vec()
    };
    assert!(file.equal_terms.len() >= 5);
    for group in &file.equal_terms {
        assert!(group.len() >= 2, "{group:?}");
        let first = find(&group[0]);
        for name in &group[1..] {
            let v = find(name);
            assert_eq!(v.term, first.term, "{name} and {}", first.name);
            assert_eq!(computed(v), computed(first), "{name} and {}", first.name);
        }
    }
    assert!(file.different_terms.len() >= 5);
    for [a, b] in &file.different_terms {
        let (a, b) = (find(a), find(b));
        assert_ne!(a.term, b.term, "{} and {}", a.name, b.name);
        assert_ne!(computed(a), computed(b), "{} and {}", a.name, b.name);
    }
    // The case-insensitive groups are made of different plaintexts (the other groups show
    // that the term does not depend on the row or the nonce).
    for group in &file.equal_terms {
        let members: Vec<_> = group.iter().map(|n| find(n)).collect();
        if members.iter().all(|v| v.mode == "equality-ci") {
            let distinct: std::collections::HashSet<_> =
                members.iter().map(|v| v.plaintext.as_str()).collect();
            assert_eq!(distinct.len(), members.len(), "{group:?}");
        }
    }
}
