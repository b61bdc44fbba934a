use std::convert::Infallible;

use proptest::prelude::*;

use super::*;

type Value = Option<Vec<u8>>;

const MAX_ROW: usize = 1 << 16;

/// Feed `chunks` through a rewriter, then finish.
fn run<E>(
    format: &CopyFormat,
    targets: &[usize],
    chunks: &[&[u8]],
    f: &mut impl FnMut(&mut CopyRow<'_>) -> Result<(), E>,
) -> Result<Vec<u8>, CopyError<E>> {
    let mut rw = CopyRewriter::new(format.clone(), targets.to_vec(), MAX_ROW).unwrap();
    let mut out = Vec::new();
    for chunk in chunks {
        rw.feed(chunk, &mut out, f)?;
    }
    rw.finish(&mut out, f)?;
    Ok(out)
}

/// Split `input` into pieces at the given (unsorted, possibly repeated) offsets.
fn split_at_points<'a>(input: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut last = 0;
    for c in cuts {
        pieces.push(&input[last..c]);
        last = c;
    }
    pieces.push(&input[last..]);
    pieces
}

/// Every field of every row that has at least one field, decoded.
fn decode_all(format: &CopyFormat, input: &[u8]) -> Result<Vec<Vec<Value>>, CopyError<Infallible>> {
    let mut rows = Vec::new();
    let targets: Vec<usize> = (0..64).collect();
    run(format, &targets, &[input], &mut |row: &mut CopyRow<'_>| {
        let values = (0..row.len())
            .map(|i| row.get(i).unwrap().map(|v| v.into_owned()))
            .collect();
        rows.push(values);
        Ok::<_, Infallible>(())
    })?;
    Ok(rows)
}

/// Callback that sets the targets to `transform` of their value.
fn rewrite_with(
    targets: Vec<usize>,
    transform: fn(Value) -> Value,
) -> impl FnMut(&mut CopyRow<'_>) -> Result<(), Infallible> {
    move |row| {
        for &t in &targets {
            if let Some(v) = row.get(t) {
                let new = transform(v.map(|v| v.into_owned()));
                row.set(t, new);
            }
        }
        Ok(())
    }
}

fn transform(v: Value) -> Value {
    match v {
        None => Some(b"was-null".to_vec()),
        Some(mut x) => {
            x.reverse();
            x.push(0xff);
            x.push(b'\\');
            Some(x)
        }
    }
}

fn set_to(
    value: &'static [u8],
    column: usize,
) -> impl FnMut(&mut CopyRow<'_>) -> Result<(), Infallible> {
    move |row| {
        row.set(column, Some(value.to_vec()));
        Ok(())
    }
}

fn v(s: &[u8]) -> Value {
    Some(s.to_vec())
}

// ---- text format ----

#[test]
fn text_decodes_every_escape() {
    let input = b"a\\b\\f\\n\\r\\t\\vz\tx\\\\y\\\t\tq\\101\\7\\0618\\x41\\x4g\\xg\\q\\N\t\\N\n";
    let rows = decode_all(&CopyFormat::text(), input).unwrap();
    assert_eq!(
        rows,
        vec![vec![
            v(b"a\x08\x0c\n\r\t\x0bz"),
            v(b"x\\y\t"),
            v(b"qA\x0718A\x04gxgqN"),
            None,
        ]]
    );
}

#[test]
fn text_octal_keeps_low_eight_bits() {
    let rows = decode_all(&CopyFormat::text(), b"\\777\\0000\n").unwrap();
    assert_eq!(rows, vec![vec![v(b"\xff\x000")]]);
}

#[test]
fn text_encodes_specials_with_escapes() {
    let mut out = Vec::new();
    let value = b"\\\n\r\t\x08\x0c\x0b\x01\x7f,\xfe";
    encode_field(&CopyFormat::text(), Some(value), &mut out).unwrap();
    assert_eq!(out, b"\\\\\\n\\r\\t\\b\\f\\v\\x01\\x7f,\xfe");
    let mut comma = CopyFormat::text();
    comma.delimiter = b',';
    out.clear();
    encode_field(&comma, Some(b"a,b\t"), &mut out).unwrap();
    assert_eq!(out, b"a\\,b\\t");
}

#[test]
fn text_null_handling() {
    let f = CopyFormat::text();
    let rows = decode_all(&f, b"\\N\t\\\\N\t\tN\n").unwrap();
    assert_eq!(rows, vec![vec![None, v(b"\\N"), v(b""), v(b"N")]]);

    let out = run(&f, &[1], &[b"a\tb\tc\n"], &mut |row: &mut CopyRow<'_>| {
        row.set(1, None);
        Ok::<_, Infallible>(())
    })
    .unwrap();
    assert_eq!(out, b"a\t\\N\tc\n");

    // A value spelled like a custom NULL string must not read back as NULL.
    let mut custom = f.clone();
    custom.null = b"NULL".to_vec();
    let mut out = Vec::new();
    encode_field(&custom, Some(b"NULL"), &mut out).unwrap();
    assert_eq!(out, b"\\x4eULL");
    assert_eq!(decode_all(&custom, &out).unwrap(), vec![vec![v(b"NULL")]]);
}

#[test]
fn text_empty_string_with_empty_null_is_unrepresentable() {
    let mut f = CopyFormat::text();
    f.null = Vec::new();
    let err = run(&f, &[0], &[b"a\n"], &mut set_to(b"", 0)).unwrap_err();
    assert_eq!(err, CopyError::Unrepresentable { line: 1, column: 0 });
}

#[test]
fn text_rewrite_keeps_other_fields_byte_exact() {
    let input = b"\\x41\\101\tsecret\\tvalue\t\\N\xff\n";
    let out = run(
        &CopyFormat::text(),
        &[1],
        &[input],
        &mut set_to(b"enc:v1:x\ty", 1),
    )
    .unwrap();
    assert_eq!(out, b"\\x41\\101\tenc:v1:x\\ty\t\\N\xff\n");
}

#[test]
fn text_escaped_newline_does_not_end_the_row() {
    let rows = decode_all(&CopyFormat::text(), b"a\\\nb\tc\n").unwrap();
    assert_eq!(rows, vec![vec![v(b"a\nb"), v(b"c")]]);
}

#[test]
fn text_crlf_line_endings_are_kept() {
    let out = run(
        &CopyFormat::text(),
        &[1],
        &[b"a\tb\r\nc\td\r\n"],
        &mut set_to(b"X", 1),
    )
    .unwrap();
    assert_eq!(out, b"a\tX\r\nc\tX\r\n");
    let rows = decode_all(&CopyFormat::text(), b"a\\\r\n").unwrap();
    assert_eq!(rows, vec![vec![v(b"a\r")]]);
}

#[test]
fn bare_carriage_return_is_rejected() {
    for f in [CopyFormat::text(), CopyFormat::csv()] {
        let err = run(&f, &[0], &[b"ok\na\rb\n"], &mut set_to(b"X", 0)).unwrap_err();
        assert_eq!(
            err,
            CopyError::Malformed {
                line: 2,
                what: "carriage return in data"
            }
        );
        let err = run(&f, &[0], &[b"a\r"], &mut set_to(b"X", 0)).unwrap_err();
        assert!(matches!(err, CopyError::Malformed { line: 1, .. }));
    }
}

#[test]
fn text_end_of_data_marker_passes_through_and_stops() {
    let input = b"a\tb\n\\.\n\\.garbage\\x\r";
    let mut calls = 0;
    let out = run(
        &CopyFormat::text(),
        &[0],
        &[input],
        &mut |row: &mut CopyRow<'_>| {
            calls += 1;
            row.set(0, Some(b"X".to_vec()));
            Ok::<_, Infallible>(())
        },
    )
    .unwrap();
    assert_eq!(out, b"X\tb\n\\.\n\\.garbage\\x\r");
    assert_eq!(calls, 1);

    for input in [&b"\\.\r\nrest"[..], b"\\."] {
        let out = run(&CopyFormat::text(), &[0], &[input], &mut set_to(b"X", 0)).unwrap();
        assert_eq!(out, input);
    }
}

#[test]
fn text_marker_not_alone_is_rejected() {
    for (input, what) in [
        (
            &b"a\tb\\.\n"[..],
            "end-of-copy marker is not alone on its line",
        ),
        (b"\\.x\n", "end-of-copy marker corrupt"),
    ] {
        let err = run(&CopyFormat::text(), &[], &[input], &mut set_to(b"X", 0)).unwrap_err();
        assert_eq!(err, CopyError::Malformed { line: 1, what });
    }
    // An escaped backslash before a dot is data.
    let rows = decode_all(&CopyFormat::text(), b"\\\\.\n").unwrap();
    assert_eq!(rows, vec![vec![v(b"\\.")]]);
}

#[test]
fn header_passes_through_untouched() {
    for mut f in [CopyFormat::text(), CopyFormat::csv()] {
        f.header = true;
        let out = run(&f, &[0], &[b"\"name\nx\",\xff\nv\n"], &mut set_to(b"X", 0));
        let expected: &[u8] = if f.kind == CopyFormatKind::Csv {
            b"\"name\nx\",\xff\nX\n"
        } else {
            b"\"name\nX\nX\n"
        };
        assert_eq!(out.unwrap(), expected);
    }
}

#[test]
fn final_row_without_newline_is_processed() {
    let out = run(
        &CopyFormat::text(),
        &[1],
        &[b"a\tb\nc\td"],
        &mut set_to(b"X", 1),
    )
    .unwrap();
    assert_eq!(out, b"a\tX\nc\tX");
    let out = run(&CopyFormat::csv(), &[0], &[b"a"], &mut set_to(b"X,Y", 0)).unwrap();
    assert_eq!(out, b"\"X,Y\"");
}

#[test]
fn rows_without_the_target_column_are_copied() {
    let mut calls = 0;
    let out = run(
        &CopyFormat::text(),
        &[2],
        &[b"a\tb\na\tb\tc\n"],
        &mut |row: &mut CopyRow<'_>| {
            calls += 1;
            assert_eq!(row.line(), 2);
            row.set(2, Some(b"X".to_vec()));
            row.set(9, Some(b"ignored".to_vec()));
            Ok::<_, Infallible>(())
        },
    )
    .unwrap();
    assert_eq!(out, b"a\tb\na\tb\tX\n");
    assert_eq!(calls, 1);
}

#[test]
fn get_sees_earlier_set_and_out_of_range_is_none() {
    run(
        &CopyFormat::csv(),
        &[0],
        &[b"a,b\n"],
        &mut |row: &mut CopyRow<'_>| {
            assert_eq!(row.len(), 2);
            assert!(!row.is_empty());
            assert_eq!(row.get(2), None);
            row.set(0, None);
            assert_eq!(row.get(0), Some(None));
            row.set(0, Some(b"z".to_vec()));
            assert_eq!(row.get(0).unwrap().as_deref(), Some(&b"z"[..]));
            Ok::<_, Infallible>(())
        },
    )
    .unwrap();
}

#[test]
fn output_can_go_into_bytes_mut() {
    let mut rw = CopyRewriter::new(CopyFormat::csv(), vec![1], MAX_ROW).unwrap();
    let mut out = bytes::BytesMut::new();
    rw.feed(b"a,b\nc,", &mut out, &mut set_to(b"X", 1)).unwrap();
    rw.finish(&mut out, &mut set_to(b"X", 1)).unwrap();
    assert_eq!(&out[..], b"a,X\nc,X");
    assert_eq!(rw.rows(), 2);
}

#[test]
fn callback_error_is_returned() {
    let err = run(
        &CopyFormat::text(),
        &[0],
        &[b"a\n"],
        &mut |_: &mut CopyRow<'_>| Err("no key"),
    )
    .unwrap_err();
    assert_eq!(err, CopyError::Callback("no key"));
}

#[test]
fn long_rows_are_refused_whatever_the_chunking() {
    let input = b"abcdefghij\tk\n";
    for max in [0, 5, 12] {
        let mut rw = CopyRewriter::new(CopyFormat::text(), vec![0], max).unwrap();
        let mut out = Vec::new();
        let err = rw.feed(input, &mut out, &mut set_to(b"X", 0)).unwrap_err();
        assert_eq!(err, CopyError::RowTooLong { line: 1 });
        let mut rw = CopyRewriter::new(CopyFormat::text(), vec![0], max).unwrap();
        let err = input
            .chunks(1)
            .try_for_each(|c| rw.feed(c, &mut out, &mut set_to(b"X", 0)))
            .unwrap_err();
        assert_eq!(err, CopyError::RowTooLong { line: 1 });
        assert!(rw.feed(b"", &mut out, &mut set_to(b"X", 0)).is_err());
    }
    let mut rw = CopyRewriter::new(CopyFormat::text(), vec![0], 13).unwrap();
    let mut out = Vec::new();
    rw.feed(input, &mut out, &mut set_to(b"X", 0)).unwrap();
    assert_eq!(out, b"X\tk\n");
}

#[test]
fn invalid_formats_are_refused() {
    let mut f = CopyFormat::text();
    f.delimiter = b'n';
    assert!(CopyRewriter::new(f, vec![], 10).is_err());
    let mut f = CopyFormat::csv();
    f.quote = b',';
    assert!(CopyRewriter::new(f, vec![], 10).is_err());
    let mut f = CopyFormat::csv();
    f.null = b"a,b".to_vec();
    assert!(f.validate().is_err());
}

// ---- CSV format ----

#[test]
fn csv_decodes_quotes_and_nulls() {
    let input = b"a,\"b,c\",\"d\"\"e\",,\"\",x\"y,z\"w,\"multi\nline\"\n";
    let rows = decode_all(&CopyFormat::csv(), input).unwrap();
    assert_eq!(
        rows,
        vec![vec![
            v(b"a"),
            v(b"b,c"),
            v(b"d\"e"),
            None,
            v(b""),
            v(b"xy,zw"),
            v(b"multi\nline"),
        ]]
    );
}

#[test]
fn csv_escape_distinct_from_quote() {
    let mut f = CopyFormat::csv();
    f.escape = b'\\';
    let rows = decode_all(&f, b"\"a\\\"b\\\\c\\d\",\"\\\\\"\n").unwrap();
    assert_eq!(rows, vec![vec![v(b"a\"b\\c\\d"), v(b"\\")]]);
    let mut out = Vec::new();
    encode_field(&f, Some(b"q\"e\\"), &mut out).unwrap();
    assert_eq!(out, b"\"q\\\"e\\\\\"");
}

#[test]
fn csv_encoding_quotes_only_when_needed() {
    let f = CopyFormat::csv();
    let cases: &[(&[u8], &[u8])] = &[
        (b"plain", b"plain"),
        (b"", b"\"\""),
        (b"a,b", b"\"a,b\""),
        (b"a\"b", b"\"a\"\"b\""),
        (b"a\nb", b"\"a\nb\""),
        (b"a\rb", b"\"a\rb\""),
        (b"\\.", b"\"\\.\""),
        (b"\\x", b"\\x"),
    ];
    for (value, expected) in cases {
        let mut out = Vec::new();
        encode_field(&f, Some(value), &mut out).unwrap();
        assert_eq!(&out, expected);
    }
    let mut custom = f.clone();
    custom.null = b"NULL".to_vec();
    let mut out = Vec::new();
    encode_field(&custom, Some(b"NULL"), &mut out).unwrap();
    encode_field(&custom, Some(b""), &mut out).unwrap();
    encode_field(&custom, None, &mut out).unwrap();
    assert_eq!(out, b"\"NULL\"NULL");
}

#[test]
fn csv_rewrite_keeps_other_fields_byte_exact() {
    let input = b"\"a\"\"\",  \"x\"y , \"sec\nret\",,\r\n";
    let out = run(
        &CopyFormat::csv(),
        &[2, 3],
        &[input],
        &mut |row: &mut CopyRow<'_>| {
            assert_eq!(row.get(2).unwrap().as_deref(), Some(&b" sec\nret"[..]));
            row.set(2, Some(b"E,1".to_vec()));
            row.set(3, Some(b"E2".to_vec()));
            Ok::<_, Infallible>(())
        },
    )
    .unwrap();
    assert_eq!(out, b"\"a\"\"\",  \"x\"y ,\"E,1\",E2,\r\n");
}

#[test]
fn csv_marker_line_passes_through_and_later_rows_are_processed() {
    let out = run(
        &CopyFormat::csv(),
        &[0],
        &[b"a\n\\.\nb\n\"\\.\"\n"],
        &mut set_to(b"X", 0),
    )
    .unwrap();
    assert_eq!(out, b"X\n\\.\nX\nX\n");
}

#[test]
fn csv_unterminated_quote_fails_at_finish() {
    let f = CopyFormat::csv();
    let mut rw = CopyRewriter::new(f, vec![0], MAX_ROW).unwrap();
    let mut out = Vec::new();
    rw.feed(b"a\n\"open\n", &mut out, &mut set_to(b"X", 0))
        .unwrap();
    assert_eq!(out, b"X\n");
    let err = rw.finish(&mut out, &mut set_to(b"X", 0)).unwrap_err();
    assert_eq!(
        err,
        CopyError::Malformed {
            line: 2,
            what: "unterminated CSV quoted field"
        }
    );
}

// ---- chunking ----

fn sample(kind: CopyFormatKind) -> (CopyFormat, &'static [u8]) {
    match kind {
        CopyFormatKind::Text => (
            CopyFormat::text(),
            b"1\tal\\\\ice\\n\t\\N\r\n2\t\\x41\\101\tb\\\nob\n\n3\t\xff\xfe\tz\n\\.\nafter\n",
        ),
        CopyFormatKind::Csv => (
            CopyFormat::csv(),
            b"1,\"al,ice\"\"\n\",\r\n2,,\"\"\n3,x\"y\nz\"w,\"q\"\n\\.\n4,\xff,\n5,a",
        ),
    }
}

#[test]
fn every_split_point_gives_the_same_output() {
    for kind in [CopyFormatKind::Text, CopyFormatKind::Csv] {
        let (f, input) = sample(kind);
        let whole = run(
            &f,
            &[1, 2],
            &[input],
            &mut rewrite_with(vec![1, 2], transform),
        )
        .unwrap();
        assert_ne!(whole, input);
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let chunks = [&input[..a], &input[a..b], &input[b..]];
                let out = run(
                    &f,
                    &[1, 2],
                    &chunks,
                    &mut rewrite_with(vec![1, 2], transform),
                )
                .unwrap();
                assert_eq!(out, whole, "split at {a}, {b}");
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let out = run(
            &f,
            &[1, 2],
            &bytes,
            &mut rewrite_with(vec![1, 2], transform),
        )
        .unwrap();
        assert_eq!(out, whole);
    }
}

// ---- properties ----

/// A test-side reference encoder, independent of the codec's own encoder: text escapes
/// everything special as `\ooo`; CSV quotes every non-NULL value.
fn reference_encode(format: &CopyFormat, table: &[Vec<Value>]) -> Vec<u8> {
    let mut out = Vec::new();
    for row in table {
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                out.push(format.delimiter);
            }
            let Some(value) = value else {
                out.extend_from_slice(&format.null);
                continue;
            };
            match format.kind {
                CopyFormatKind::Text => {
                    for &b in value {
                        // `N` too, so that no value reads back as a NULL string.
                        if b < 0x20 || b == b'\\' || b == b'N' || b == format.delimiter || b == 0x7f
                        {
                            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
                        } else {
                            out.push(b);
                        }
                    }
                }
                CopyFormatKind::Csv => {
                    out.push(format.quote);
                    for &b in value {
                        if b == format.quote || b == format.escape {
                            out.push(format.escape);
                        }
                        out.push(b);
                    }
                    out.push(format.quote);
                }
            }
        }
        out.push(b'\n');
    }
    out
}

fn formats() -> impl Strategy<Value = CopyFormat> {
    prop_oneof![
        Just(CopyFormat::text()),
        Just(CopyFormat::csv()),
        Just(CopyFormat {
            delimiter: b'|',
            null: b"NULL".to_vec(),
            ..CopyFormat::text()
        }),
        Just(CopyFormat {
            delimiter: b';',
            null: b"\\N".to_vec(),
            quote: b'\'',
            escape: b'\\',
            ..CopyFormat::csv()
        }),
    ]
}

/// Bytes biased towards the ones that matter to the formats.
fn nasty_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            3 => prop::sample::select(b"\t,;|\"'\\\n\r.Nx0a ".to_vec()),
            1 => any::<u8>(),
        ],
        0..max,
    )
}

fn tables() -> impl Strategy<Value = Vec<Vec<Value>>> {
    (1usize..5).prop_flat_map(|cols| {
        proptest::collection::vec(
            proptest::collection::vec(proptest::option::weighted(0.85, nasty_bytes(12)), cols),
            0..8,
        )
    })
}

fn identity(row: &mut CopyRow<'_>) -> Result<(), Infallible> {
    for i in 0..row.len() {
        let _ = row.get(i);
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_input_in_arbitrary_chunks_never_panics(
        f in formats(),
        input in nasty_bytes(300),
        points in proptest::collection::vec(any::<usize>(), 0..6),
        targets in proptest::collection::vec(0usize..4, 0..3),
        max_row in 0usize..100,
    ) {
        let mut one = CopyRewriter::new(f.clone(), targets.clone(), max_row).unwrap();
        let mut many = CopyRewriter::new(f, targets.clone(), max_row).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut cb = rewrite_with(targets.clone(), transform);
        let ra = one.feed(&input, &mut a, &mut cb).and_then(|()| one.finish(&mut a, &mut cb));
        let rb = split_at_points(&input, &points)
            .into_iter()
            .try_for_each(|c| many.feed(c, &mut b, &mut cb))
            .and_then(|()| many.finish(&mut b, &mut cb));
        prop_assert_eq!(&ra, &rb);
        if ra.is_ok() {
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn identity_callback_reproduces_input(
        f in formats(),
        table in tables(),
        noise in nasty_bytes(200),
        points in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let targets = vec![0, 1, 2, 3];
        let valid = reference_encode(&f, &table);
        let out = run(&f, &targets, &split_at_points(&valid, &points), &mut identity).unwrap();
        prop_assert_eq!(out, valid);
        if let Ok(out) = run(&f, &targets, &split_at_points(&noise, &points), &mut identity) {
            prop_assert_eq!(out, noise);
        }
    }

    #[test]
    fn rewriting_targets_changes_only_targets(
        f in formats(),
        table in tables(),
        targets in proptest::collection::btree_set(0usize..5, 0..3),
        points in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let targets: Vec<usize> = targets.into_iter().collect();
        let input = reference_encode(&f, &table);
        prop_assert_eq!(decode_all(&f, &input).unwrap(), table.clone());
        let out = run(
            &f,
            &targets,
            &split_at_points(&input, &points),
            &mut rewrite_with(targets.clone(), transform),
        )
        .unwrap();
        let expected: Vec<Vec<Value>> = table
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(i, x)| if targets.contains(&i) { transform(x.clone()) } else { x.clone() })
                    .collect()
            })
            .collect();
        prop_assert_eq!(decode_all(&f, &out).unwrap(), expected);
    }

    #[test]
    fn set_then_decode_round_trips(
        f in formats(),
        value in proptest::option::weighted(0.9, proptest::collection::vec(any::<u8>(), 0..40)),
        column in 0usize..3,
    ) {
        let row = reference_encode(&f, &[vec![v(b"a"), None, v(b"")]]);
        let set = value.clone();
        let out = run(&f, &[column], &[&row], &mut |r: &mut CopyRow<'_>| {
            r.set(column, set.clone());
            Ok::<_, Infallible>(())
        })
        .unwrap();
        let mut expected = vec![v(b"a"), None, v(b"")];
        expected[column] = value.clone();
        prop_assert_eq!(decode_all(&f, &out).unwrap(), vec![expected]);

        let mut field = Vec::new();
        encode_field(&f, value.as_deref(), &mut field).unwrap();
        let decoded = match f.kind {
            CopyFormatKind::Text => decode_text(&field, &f),
            CopyFormatKind::Csv => decode_csv(&field, &f),
        };
        prop_assert_eq!(decoded.map(|d| d.into_owned()), value);
    }
}
