//! Seal and open of `enc:v1` values (including base64 and header handling) next to raw
//! AES-256-GCM of the same sizes, to show the format's overhead.

#![allow(missing_docs, clippy::unwrap_used)]

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgenvelope::crypto::{ColumnId, ColumnKey, DataKey, DekId, EncV1, NonceSource, OrgId};

const SIZES: [usize; 3] = [32, 256, 4096];

fn bench(c: &mut Criterion) {
    let key = ColumnKey::derive(
        &DataKey::from_bytes([7; 32]),
        DekId::from_bytes([1; 16]),
        ColumnId::from_name("public.vault_secrets.value"),
    );
    let org = OrgId::new("acme").unwrap();
    let mut nonces = NonceSource::from_os_rng();
    let raw = Aes256Gcm::new(&[7u8; 32].into());

    let mut group = c.benchmark_group("enc_v1");
    for size in SIZES {
        let plaintext = vec![0x61u8; size];
        group.throughput(Throughput::Bytes(size as u64));

        group.bench_with_input(BenchmarkId::new("seal", size), &plaintext, |b, pt| {
            b.iter(|| key.seal(&org, pt, &mut nonces).unwrap())
        });

        let mut out = String::new();
        group.bench_with_input(BenchmarkId::new("seal_into", size), &plaintext, |b, pt| {
            b.iter(|| {
                out.clear();
                key.seal_into(&org, pt, &mut nonces, &mut out).unwrap();
            })
        });

        let text = key.seal(&org, &plaintext, &mut nonces).unwrap();
        group.bench_with_input(BenchmarkId::new("parse_open", size), &text, |b, text| {
            b.iter(|| {
                let value = EncV1::parse(text.as_bytes()).unwrap();
                key.open(&org, &value).unwrap()
            })
        });

        group.bench_with_input(BenchmarkId::new("parse", size), &text, |b, text| {
            b.iter(|| EncV1::parse(text.as_bytes()).unwrap())
        });

        // Row binding (`row_key`): the same, with a row key in the AAD.
        group.bench_with_input(
            BenchmarkId::new("seal_into_unbound", size),
            &plaintext,
            |b, pt| {
                b.iter(|| {
                    out.clear();
                    key.seal_into(&org, pt, &mut nonces, &mut out).unwrap();
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("seal_into_row_bound", size),
            &plaintext,
            |b, pt| {
                b.iter(|| {
                    out.clear();
                    key.seal_for_row_into(&org, b"1234567", pt, &mut nonces, &mut out)
                        .unwrap();
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("parse_open_owned_unbound", size),
            &text,
            |b, text| {
                b.iter(|| {
                    let value = EncV1::parse(text.as_bytes()).unwrap();
                    key.open_owned(&org, value).unwrap()
                })
            },
        );
        let mut bound = String::new();
        key.seal_for_row_into(&org, b"1234567", &plaintext, &mut nonces, &mut bound)
            .unwrap();
        group.bench_with_input(
            BenchmarkId::new("parse_open_owned_row_bound", size),
            &bound,
            |b, text| {
                b.iter(|| {
                    let value = EncV1::parse(text.as_bytes()).unwrap();
                    key.open_owned_in_row(&org, Some(b"1234567"), value)
                        .unwrap()
                })
            },
        );

        let value = EncV1::parse(text.as_bytes()).unwrap();
        group.bench_with_input(BenchmarkId::new("open", size), &value, |b, value| {
            b.iter(|| key.open(&org, value).unwrap())
        });

        let mut buf = plaintext.clone();
        group.bench_with_input(
            BenchmarkId::new("raw_aes_gcm_encrypt", size),
            &size,
            |b, _| {
                b.iter(|| {
                    raw.encrypt_in_place_detached(Nonce::from_slice(&[0; 12]), b"aad", &mut buf)
                        .unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
