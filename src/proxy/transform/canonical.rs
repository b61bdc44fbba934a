//! Whether a tenant or row key written in a statement is stored exactly as written: the value
//! sealed for must be the one PostgreSQL stores, or the row would not open.

/// Whether a row's tenant value is certainly stored as written, whatever the tenant column's
/// type: no surrounding white space, and a number only in canonical form (an integer column
/// stores `007`, `+7` or `7.0` as `7`, which would not be the organisation the value was sealed
/// for).
pub(super) fn stores_as_written(v: &str) -> bool {
    if v.trim() != v {
        return false;
    }
    // A UUID (a `uuid` tenant column) is stored as PostgreSQL prints it: lower-case hex in
    // groups of 8-4-4-4-12. Written so, it is the same text in a text column too.
    if let Some(canonical) = uuid_like(v) {
        return canonical;
    }
    let digits = v.strip_prefix('-').unwrap_or(v);
    let numeric_start = digits
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.' || c == '+');
    if !numeric_start && !v.starts_with('+') {
        return true;
    }
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        // Canonical integer: no leading zero (except `0` itself), no `-0`.
        return (digits == "0" && !v.starts_with('-')) || !digits.starts_with('0');
    }
    // Starts like a number but is not a canonical integer (`+7`, `7.0`, `1e3`, `0x1F`): an
    // integer or numeric column could store it in another form.
    // Text such as `7days` is no number in any form and stays as written.
    v.parse::<f64>().is_err() && !v.starts_with('+') && !digits.starts_with('0')
}

/// Whether a row key is certainly stored as written: the same rules as a tenant (a UUID only
/// in PostgreSQL's output form).
pub(super) fn key_stores_as_written(v: &str) -> bool {
    stores_as_written(v)
}

/// `Some(canonical)` when `v` is something a `uuid` column reads as a UUID (32 hex digits with
/// any hyphens and braces around them), telling whether it is in PostgreSQL's output form
/// (lower-case hex in groups of 8-4-4-4-12); `None` for anything else.
fn uuid_like(v: &str) -> Option<bool> {
    let mut hex_digits = 0;
    for c in v.chars() {
        match c {
            '-' | '{' | '}' => {}
            c if c.is_ascii_hexdigit() => hex_digits += 1,
            _ => return None,
        }
    }
    if hex_digits != 32 {
        return None;
    }
    Some(
        v.len() == 36
            && v.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
            }),
    )
}

#[cfg(test)]
mod tests {
    use super::{key_stores_as_written, stores_as_written};

    #[test]
    fn only_canonical_row_keys_pass() {
        for ok in [
            "17",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "user-42",
            "deadbeef",
            "0a1b2c3d-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert!(key_stores_as_written(ok), "{ok}");
        }
        for bad in [
            "017",
            " 17",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert!(!key_stores_as_written(bad), "{bad}");
        }
    }

    #[test]
    fn only_canonical_tenants_pass() {
        for ok in [
            "acme",
            "42",
            "0",
            "-5",
            "org-7",
            "7days",
            "a b",
            // One organisation in sixteen has a UUID starting with 0.
            "0ed04a9b-9c0b-4ef8-bb6d-6bb9bd380a11",
            "d08f1c2e-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert!(stores_as_written(ok), "{ok}");
        }
        for bad in [
            "007",
            "+7",
            "7.0",
            "1e3",
            "-0",
            " acme",
            "acme ",
            "0x1F",
            ".5",
            "0ED04A9B-9C0B-4EF8-BB6D-6BB9BD380A11",
            "0ed04a9b9c0b4ef8bb6d6bb9bd380a11",
            "{0ed04a9b-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ] {
            assert!(!stores_as_written(bad), "{bad}");
        }
    }
}
