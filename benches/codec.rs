//! Wire codec micro-benchmarks: the pass-through frame scan over a buffer of many messages, and
//! the read path's DataRow parse + rewrite of one column, next to a plain copy of the same bytes.

#![allow(missing_docs, clippy::unwrap_used)]

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgenvelope::wire::backend::DataRow;
use pgenvelope::wire::Header;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn data_row_body(values: &[&[u8]]) -> Vec<u8> {
    let mut b = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v);
    }
    b
}

/// A result set as the server sends it: `rows` DataRows of `width` bytes per column (3
/// columns), then CommandComplete and ReadyForQuery.
fn result_set(rows: usize, width: usize) -> Vec<u8> {
    let value = vec![b'x'; width];
    let row = frame(b'D', &data_row_body(&[b"12345", &value, &value]));
    let mut buf = Vec::with_capacity(rows * row.len() + 32);
    for _ in 0..rows {
        buf.extend_from_slice(&row);
    }
    buf.extend_from_slice(&frame(b'C', b"SELECT 1000\0"));
    buf.extend_from_slice(&frame(b'Z', b"I"));
    buf
}

fn frame_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_scan");
    for width in [16usize, 256] {
        let buf = result_set(1000, width);
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_with_input(BenchmarkId::new("1000_rows", width), &buf, |b, buf| {
            b.iter(|| {
                let mut pos = 0;
                let mut n = 0usize;
                while let Some(h) = Header::scan(&buf[pos..], 1 << 30).unwrap() {
                    pos += h.frame_len();
                    n += usize::from(h.tag() == b'D');
                }
                n
            })
        });
    }
    group.finish();
}

fn data_row_rewrite(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_row");
    for width in [64usize, 1024] {
        let value = vec![b'x'; width];
        let other = vec![b'y'; 64];
        let body = data_row_body(&[b"12345", b"acme", &value, &other]);
        let replacement = vec![b'p'; width];
        group.throughput(Throughput::Bytes(body.len() as u64));

        group.bench_with_input(BenchmarkId::new("parse", width), &body, |b, body| {
            b.iter(|| DataRow::parse(body).unwrap().len())
        });

        let mut out = BytesMut::with_capacity(4096);
        group.bench_with_input(
            BenchmarkId::new("parse_rewrite_one_column", width),
            &body,
            |b, body| {
                b.iter(|| {
                    out.clear();
                    let row = DataRow::parse(body).unwrap();
                    row.encode_with(&[(2, Some(replacement.clone()))], &mut out)
                        .unwrap();
                    out.len()
                })
            },
        );

        group.bench_with_input(BenchmarkId::new("copy_only", width), &body, |b, body| {
            b.iter(|| {
                out.clear();
                out.extend_from_slice(body);
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frame_scan, data_row_rewrite);
criterion_main!(benches);
