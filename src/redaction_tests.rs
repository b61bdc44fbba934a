//! Every type that holds a key, a value bound for or read from an encrypted column, a
//! password or ciphertext prints none of it with `Debug` (plain or `{:#?}`): logs and panic
//! messages stay safe to archive.

use std::sync::Arc;

use crate::cipher::{Cipher, CipherPolicy, Classified, ReadOutcome, Restored};
use crate::crypto::{ColumnId, ColumnKey, DataKey, DekId, EncV1, NonceSource, OrgId};
use crate::proxy::Encryption;
use crate::rules::RuleSet;

/// A value no Debug output may contain.
const CANARY: &str = "canary-7f3a9e-plaintext";

/// Assert that `debug` (the Debug output of something) holds none of `secrets`, and that
/// bytes given as `secret_bytes` appear neither as a list, nor in hex, nor in base64.
fn assert_clean(what: &str, debug: &str, secret_bytes: &[&[u8]]) {
    use base64::Engine as _;
    assert!(!debug.contains(CANARY), "{what} prints the value: {debug}");
    for bytes in secret_bytes {
        let list = format!("{bytes:?}");
        let inner = list.trim_start_matches('[').trim_end_matches(']');
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        for form in [inner, &hex[..16], &b64[..16]] {
            assert!(
                !debug.contains(form),
                "{what} prints secret bytes ({form}): {debug}"
            );
        }
    }
}

/// Both Debug forms of `x`.
fn debug(x: &impl std::fmt::Debug) -> String {
    format!("{x:?}\n{x:#?}")
}

fn rules() -> RuleSet {
    RuleSet::from_sources(&[(
        "rules.toml",
        "[[table]]\nname = \"public.secrets\"\ntenant_column = \"org_id\"\nencrypt = [\"value\"]\n",
    )])
    .unwrap()
}

#[test]
fn keys_print_no_key_bytes() {
    let bytes = [0xab_u8; 32];
    let key = DataKey::from_bytes(bytes);
    assert_clean("DataKey", &debug(&key), &[&bytes]);
    let column = ColumnKey::derive(&key, DekId::new_random(), ColumnId::from_name("a.b.c"));
    assert_clean("ColumnKey", &debug(&column), &[&bytes]);
    assert_clean("NonceSource", &debug(&NonceSource::from_os_rng()), &[]);

    let enc = Encryption::offline(rules(), None);
    let dek = enc.keys().dek_for_tests(&OrgId::new("acme").unwrap());
    let secret = *dek.key().expose_secret();
    assert_clean("CachedDek", &debug(&dek), &[&secret]);
    let mut cipher = enc.cipher();
    cipher.insert_for_tests(Arc::clone(&dek), true);
    assert_clean("Cipher", &debug(&cipher), &[&secret]);
}

#[test]
fn values_and_ciphertext_are_never_printed() {
    let enc = Encryption::offline(rules(), None);
    let acme = OrgId::new("acme").unwrap();
    let dek = enc.keys().dek_for_tests(&acme);
    let mut cipher: Cipher = Cipher::new(
        Arc::clone(enc.keys()),
        CipherPolicy::default(),
        Arc::default(),
    );
    cipher.insert_for_tests(Arc::clone(&dek), true);
    let snapshot = enc.rules.snapshot();
    let column = snapshot.rules.column("public", "secrets", "value").unwrap();
    let sealed = cipher.seal(column, &acme, None, CANARY.as_bytes()).unwrap();
    let ciphertext = sealed.trim_start_matches("enc:v1:").as_bytes().to_vec();

    let parsed = EncV1::parse(sealed.as_bytes()).unwrap();
    assert_clean("EncV1", &debug(&parsed), &[]);
    assert!(!debug(&parsed).contains(&sealed[10..40]));

    let read = cipher
        .read(&snapshot.rules, Some(column), sealed.as_bytes(), None, None)
        .unwrap();
    assert!(matches!(read, ReadOutcome::Opened(_)));
    assert_clean("ReadOutcome", &debug(&read), &[]);
    let Classified::Sealed { parsed, .. } = cipher
        .classify(&snapshot.rules, Some(column), sealed.as_bytes())
        .unwrap()
    else {
        panic!("sealed");
    };
    let restored = cipher.open_restored(&dek, parsed, column, None).unwrap();
    assert!(matches!(restored, Some(Restored::AsIs(_))));
    assert_clean("Restored", &debug(&restored), &[]);

    // The statement analysis and the messages carrying values.
    let sql = format!(
        "INSERT INTO secrets (org_id, value) VALUES ('acme', '{CANARY}'); SET pgenvelope.tenant = 'acme'"
    );
    let analysis = crate::sql::analyze(&sql, &snapshot.protected);
    assert_eq!(analysis.literals.len(), 1);
    assert_clean("Analysis", &debug(&analysis), &[]);
    let parse = crate::wire::frontend::Parse {
        name: b"s",
        sql: sql.as_bytes(),
        param_types: Vec::new(),
    };
    assert_clean("Parse", &debug(&parse), &[]);
    let bind = crate::wire::frontend::Bind {
        portal: b"",
        statement: b"s",
        param_formats: Vec::new(),
        params: vec![Some(CANARY.as_bytes()), Some(&ciphertext)],
        result_formats: Vec::new(),
    };
    assert_clean("Bind", &debug(&bind), &[&ciphertext]);
    let mut row = bytes::BytesMut::new();
    row.extend_from_slice(&1_i16.to_be_bytes());
    row.extend_from_slice(&i32::try_from(CANARY.len()).unwrap().to_be_bytes());
    row.extend_from_slice(CANARY.as_bytes());
    let data_row = crate::wire::backend::DataRow::parse(&row).unwrap();
    assert_clean("DataRow", &debug(&data_row), &[]);
    let mut frame = vec![b'D'];
    frame.extend_from_slice(&u32::try_from(row.len() + 4).unwrap().to_be_bytes());
    frame.extend_from_slice(&row);
    let frame = crate::wire::Frame::from_raw(frame.into()).unwrap();
    assert_clean("Frame", &debug(&frame), &[]);
    let sasl = crate::wire::auth::SaslInitialResponse {
        mechanism: b"SCRAM-SHA-256",
        data: Some(CANARY.as_bytes()),
    };
    assert_clean("SaslInitialResponse", &debug(&sasl), &[]);
}

#[test]
fn configuration_prints_no_password() {
    let upstream =
        crate::config::Upstream::parse(&format!("postgres://svc:{CANARY}@db:5432/app")).unwrap();
    assert_clean("Upstream", &debug(&upstream), &[]);
}
