//! `check --against-db`: the rules against the catalog of the database holding the tables.
//!
//! Reads the catalog only; creates and changes nothing. For every rule it checks that the table
//! and columns exist, that encrypted columns are text-like without a DEFAULT, and that a row key
//! is the single-column primary key (problems: `check` exits 1). It also reports what does not
//! stop the proxy from storing and returning the right values but is still worth fixing
//! (warnings: the exit status is unchanged):
//!
//! - a searchable column without a *search index*, an index whose first column is exactly the
//!   term expression `left(column, 31)` the proxy's look-ups compare (without it a look-up
//!   reads the whole table); [`DbReport::ddl`] holds the `CREATE INDEX` statements that add
//!   the missing ones;
//! - a UNIQUE constraint or unique index on an encrypted column: it never rejects a duplicate,
//!   as equal plaintexts encrypt to different values;
//! - a `varchar(n)` or `char(n)` encrypted column: the longest plaintext whose ciphertext fits
//!   ([`max_plaintext`]), and the length plaintexts of `n` bytes need ([`encrypted_chars`]).

use std::collections::HashSet;

use anyhow::Context;
use sha2::Digest;

use crate::cli::common;
use crate::config::Config;
use crate::crypto::search::SEARCH_PART_LEN;
use crate::crypto::{SearchMode, ENC_V1_PREFIX, NONCE_LEN, SEARCH_PREFIX_CHARS, TAG_LEN};
use crate::rules::{ColumnRule, RuleSet, TableRule};

/// What `--against-db` found.
#[derive(Debug, Default)]
pub(super) struct DbReport {
    /// What was validated, one line each.
    pub(super) notes: Vec<String>,
    /// The rules do not fit the database: `check` fails.
    pub(super) problems: Vec<String>,
    /// Worth fixing, but values are still stored and returned correctly.
    pub(super) warnings: Vec<String>,
    /// SQL creating the missing search indexes: one statement (or `--` comment) per line.
    pub(super) ddl: Vec<String>,
}

/// Check every rule against the catalog of the database holding the tables.
pub(super) async fn check_against_db(config: &Config, rules: &RuleSet) -> anyhow::Result<DbReport> {
    let client = common::connect_data(config).await?;
    let mut report = DbReport::default();
    // Index names the DDL already uses, per schema: two columns must not get the same one.
    let mut planned: HashSet<(String, String)> = HashSet::new();
    for table in rules.tables() {
        check_table(&client, config, table, &mut planned, &mut report).await?;
    }
    Ok(report)
}

/// Types whose values can hold `enc:v1:` text.
const TEXT_LIKE: &[&str] = &["text", "character varying", "character", "citext", "name"];

/// Types a row key may have: their text form is what the proxy binds values to, and what it
/// reads back (also from binary results).
const ROW_KEY_TYPES: &[&str] = &[
    "smallint",
    "integer",
    "bigint",
    "text",
    "character varying",
    "uuid",
];

/// Index access methods whose indexes serve `left(column, 31) = '<term>'`.
const SEARCH_INDEX_METHODS: &[&str] = &["btree", "hash"];

/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// One column of a table, from `pg_attribute`.
struct Attribute {
    name: String,
    /// `format_type` without the type modifier: `character varying`, `text`, ...
    ty: String,
    has_default: bool,
    attnum: i16,
    /// The declared length of a `varchar(n)` or `char(n)`.
    max_chars: Option<i32>,
    collation: u32,
    /// The name as PostgreSQL's `quote_ident` writes it (and `pg_get_indexdef` prints it).
    quoted: String,
}

/// One index of a table, from `pg_index`.
struct Index {
    /// `schema.name`, quoted for SQL.
    qualified: String,
    name: String,
    unique: bool,
    /// `p` or `u` when a PRIMARY KEY or UNIQUE constraint owns the index.
    constraint: Option<String>,
    /// Valid and ready: a failed `CREATE INDEX CONCURRENTLY` leaves an index that is neither.
    usable: bool,
    partial: bool,
    method: String,
    /// The key columns' attribute numbers; 0 for an expression.
    keys: Vec<i16>,
    /// The first key column, when it is an expression, as PostgreSQL prints it.
    first_expression: Option<String>,
    first_collation: u32,
    /// Columns referenced by expressions (and not named as plain columns of the index).
    expression_columns: Vec<i16>,
}

impl Index {
    /// Whether the index's first key column is exactly the term expression of `column`, with
    /// its collation, so that `left(column, 31) = '<term>'` can use it.
    fn leads_with_term_of(&self, column: &Attribute) -> bool {
        self.keys.first() == Some(&0)
            && self
                .first_expression
                .as_deref()
                .is_some_and(|e| is_term_expression(e, &column.quoted))
            && self.first_collation == column.collation
            && !self.partial
            && SEARCH_INDEX_METHODS.contains(&self.method.as_str())
    }

    /// Whether `column` takes part in the values the index compares.
    fn covers(&self, column: &Attribute) -> bool {
        self.keys.contains(&column.attnum) || self.expression_columns.contains(&column.attnum)
    }

    fn kind(&self) -> &'static str {
        match self.constraint.as_deref() {
            Some("p") => "primary key",
            Some("u") => "UNIQUE constraint",
            _ => "unique index",
        }
    }
}

/// Whether `expression`, as `pg_get_indexdef` prints an index column, is `left(column, 31)`:
/// `"left"(email, 31)` for a `text` column, `"left"((email)::text, 31)` for one of another
/// text-like type, with the column quoted as PostgreSQL quotes it.
fn is_term_expression(expression: &str, quoted_column: &str) -> bool {
    expression == format!("\"left\"({quoted_column}, {SEARCH_PREFIX_CHARS})")
        || expression == format!("\"left\"(({quoted_column})::text, {SEARCH_PREFIX_CHARS})")
}

async fn check_table(
    client: &tokio_postgres::Client,
    config: &Config,
    table: &TableRule,
    planned: &mut HashSet<(String, String)>,
    report: &mut DbReport,
) -> anyhow::Result<()> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), a.atthasdef, a.attnum, \
                    CASE WHEN a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype) \
                          AND a.atttypmod >= 4 THEN a.atttypmod - 4 END, \
                    a.attcollation, quote_ident(a.attname) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.schema(), &table.name()],
        )
        .await
        .context("reading the catalog")?;
    if rows.is_empty() {
        report.problems.push(format!(
            "{} ({}): table {}",
            table.qualified_name(),
            table.location(),
            common::not_in_data_database(config)
        ));
        return Ok(());
    }
    let attributes: Vec<Attribute> = rows
        .iter()
        .map(|r| Attribute {
            name: r.get(0),
            ty: r.get(1),
            has_default: r.get(2),
            attnum: r.get(3),
            max_chars: r.get(4),
            collation: r.get(5),
            quoted: r.get(6),
        })
        .collect();
    let find = |name: &str| attributes.iter().find(|a| a.name == name);
    if let Some(tenant) = table.tenant_column() {
        if find(tenant).is_none() {
            report.problems.push(format!(
                "{}.{tenant} ({}): tenant column does not exist",
                table.qualified_name(),
                table.location()
            ));
        }
    }
    if let Some(key) = table.row_key() {
        let ty = find(key).map(|a| a.ty.clone());
        report
            .problems
            .extend(check_row_key(client, table, key, ty).await?);
    }
    let indexes = read_indexes(client, table).await?;
    for col in table.columns() {
        let Some(attribute) = find(col.column()) else {
            report.problems.push(format!(
                "{} ({}): column does not exist",
                col.qualified_name(),
                col.location()
            ));
            continue;
        };
        let at = format!("{} ({})", col.qualified_name(), col.location());
        let ty = &attribute.ty;
        let text_like = TEXT_LIKE.contains(&ty.as_str());
        if !text_like {
            report.problems.push(format!(
                "{at}: column type is {ty}, but encrypted columns must be text-like \
                 (text, varchar, char)"
            ));
        }
        if attribute.has_default {
            report.problems.push(format!(
                "{at}: column has a DEFAULT, which would store plaintext; drop it"
            ));
        }
        if !text_like {
            // Holds no `enc:v1` text yet: lengths, indexes and terms do not apply.
            continue;
        }
        if let Some(n) = attribute.max_chars.and_then(|n| usize::try_from(n).ok()) {
            let ty = if ty == "character" { "char" } else { "varchar" };
            report.warnings.push(format!(
                "{at}: {}",
                length_warning(ty, n, col.search().is_some())
            ));
        }
        for index in indexes.iter().filter(|i| i.unique && i.covers(attribute)) {
            if let Some(warning) = unique_warning(col, attribute, index) {
                report.warnings.push(format!("{at}: {warning}"));
            }
        }
        if let Some(mode) = col.search() {
            check_search_index(
                client, table, col, attribute, mode, &indexes, planned, report,
            )
            .await?;
        }
    }
    Ok(())
}

/// Report the search index of one searchable column, or what is wrong with it, and plan the
/// statement that creates or rebuilds it.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the arguments are the table walk's state"
)]
async fn check_search_index(
    client: &tokio_postgres::Client,
    table: &TableRule,
    col: &ColumnRule,
    column: &Attribute,
    mode: SearchMode,
    indexes: &[Index],
    planned: &mut HashSet<(String, String)>,
    report: &mut DbReport,
) -> anyhow::Result<()> {
    let at = format!("{} ({})", col.qualified_name(), col.location());
    let term = format!("left({}, {SEARCH_PREFIX_CHARS})", column.quoted);
    let serving: Vec<&Index> = indexes
        .iter()
        .filter(|i| i.leads_with_term_of(column))
        .collect();
    if let Some(index) = serving.iter().find(|i| i.usable) {
        let unique = if index.unique && index.keys.len() == 1 {
            " (unique: per-organisation uniqueness of plaintexts)"
        } else {
            ""
        };
        report.notes.push(format!(
            "search index ({}): {}{unique}",
            col.qualified_name(),
            index.name
        ));
        return Ok(());
    }
    if let Some(index) = serving.first() {
        report.warnings.push(format!(
            "{at}: search index {} is not valid (left by a failed CREATE INDEX CONCURRENTLY?), \
             so look-ups (search = \"{mode}\") read the whole table; rebuild it with \
             REINDEX INDEX {}",
            index.name, index.qualified
        ));
        report
            .ddl
            .push(format!("REINDEX INDEX {};", index.qualified));
        return Ok(());
    }
    report.warnings.push(format!(
        "{at}: no search index on {term}: look-ups (search = \"{mode}\") return the right rows \
         but read the whole table; `pgenvelope check --against-db --ddl | psql` creates it"
    ));
    let Some(name) = free_index_name(client, table, col, planned).await? else {
        report.warnings.push(format!(
            "{at}: no free name for the search index ({} and {} are taken); create it \
             yourself: CREATE INDEX <name> ON <table> ({term})",
            search_index_name(table.name(), col.column()),
            hashed_search_index_name(table.name(), col.column())
        ));
        return Ok(());
    };
    let on = format!("{name} ON {} ({term});", quoted_table(client, table).await?);
    report.ddl.push(format!("CREATE INDEX IF NOT EXISTS {on}"));
    report.ddl.push(format!(
        "-- for per-organisation uniqueness instead: CREATE UNIQUE INDEX IF NOT EXISTS {on}"
    ));
    Ok(())
}

/// What is wrong with a unique index that compares values of the encrypted `column`, if
/// anything: only a search column's term index compares plaintexts.
fn unique_warning(col: &ColumnRule, column: &Attribute, index: &Index) -> Option<String> {
    let term = format!("left({}, {SEARCH_PREFIX_CHARS})", column.quoted);
    let (kind, name) = (index.kind(), &index.name);
    let raw_key = index.keys.contains(&column.attnum);
    if !raw_key && index.leads_with_term_of(column) {
        if col.search().is_some() {
            return None;
        }
        return Some(format!(
            "{kind} {name} on {term} compares the values' data key ids, not plaintexts, as the \
             column is not searchable: it rejects the second value written under the same \
             data key; make the column searchable (search = \"equality\") or drop it"
        ));
    }
    let instead = if col.search().is_some() {
        format!(
            "use a UNIQUE index on {term} instead (`pgenvelope check --against-db --ddl` offers \
             it)"
        )
    } else {
        format!(
            "make the column searchable (search = \"equality\") and use a UNIQUE index on \
             {term}"
        )
    };
    Some(format!(
        "{kind} {name} never rejects a duplicate: equal plaintexts encrypt to different values \
         (random nonces); for uniqueness per organisation, {instead}"
    ))
}

/// Bytes an `enc:v1` value holds besides its plaintext (design.md §1.1): the algorithm byte,
/// the DEK id (16), the column id (4), the nonce and the GCM tag.
const ENVELOPE_OVERHEAD: usize = 1 + 16 + 4 + NONCE_LEN + TAG_LEN;

/// Characters of the `enc:v1` text of a value with `plaintext` bytes: `enc:v1:` and the base64
/// of the envelope, which for a searchable value starts with its search part.
pub(super) fn encrypted_chars(plaintext: usize, searchable: bool) -> usize {
    let search = if searchable { SEARCH_PART_LEN } else { 0 };
    ENC_V1_PREFIX.len() + 4 * (ENVELOPE_OVERHEAD + search + plaintext).div_ceil(3)
}

/// The longest plaintext, in bytes, whose `enc:v1` text fits in `chars` characters; `None`
/// when not even an empty one does.
pub(super) fn max_plaintext(chars: usize, searchable: bool) -> Option<usize> {
    let search = if searchable { SEARCH_PART_LEN } else { 0 };
    let groups = chars.checked_sub(ENC_V1_PREFIX.len())? / 4;
    (3 * groups).checked_sub(ENVELOPE_OVERHEAD + search)
}

/// The warning for an encrypted `varchar(n)` (or `char(n)`, as `ty`) column.
fn length_warning(ty: &str, n: usize, searchable: bool) -> String {
    let values = if searchable {
        "encrypted as searchable values"
    } else {
        "encrypted"
    };
    match max_plaintext(n, searchable) {
        Some(max) => format!(
            "{ty}({n}) holds plaintexts of up to {max} bytes once {values} (a longer one fails \
             with SQLSTATE 22001); plaintexts of up to {n} bytes need {ty}({}); use text",
            encrypted_chars(n, searchable)
        ),
        None => format!(
            "{ty}({n}) holds no value once {values} (an empty plaintext needs {ty}({})); use text",
            encrypted_chars(0, searchable)
        ),
    }
}

/// The table's indexes, with what the search-index and unique checks need.
async fn read_indexes(
    client: &tokio_postgres::Client,
    table: &TableRule,
) -> anyhow::Result<Vec<Index>> {
    let rows = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(ic.relname), ic.relname::text, \
                    i.indisunique, \
                    (SELECT con.contype::text FROM pg_constraint con \
                      WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid \
                        AND con.contype IN ('p', 'u') LIMIT 1), \
                    i.indisvalid AND i.indisready, i.indpred IS NOT NULL, am.amname::text, \
                    ARRAY(SELECT k FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS u(k, o) \
                           WHERE u.o <= i.indnkeyatts ORDER BY u.o), \
                    CASE WHEN i.indkey[0] = 0 THEN pg_get_indexdef(i.indexrelid, 1, false) END, \
                    i.indcollation[0], \
                    ARRAY(SELECT d.refobjsubid::int2 FROM pg_depend d \
                           WHERE i.indexprs IS NOT NULL AND i.indpred IS NULL \
                             AND d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid \
                             AND d.refclassid = 'pg_class'::regclass \
                             AND d.refobjid = i.indrelid AND d.refobjsubid > 0 \
                             AND d.refobjsubid <> ALL (i.indkey::int2[])) \
             FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_am am ON am.oid = ic.relam \
             WHERE n.nspname = $1 AND c.relname = $2 \
             ORDER BY ic.relname",
            &[&table.schema(), &table.name()],
        )
        .await
        .context("reading the table's indexes")?;
    Ok(rows
        .iter()
        .map(|r| Index {
            qualified: r.get(0),
            name: r.get(1),
            unique: r.get(2),
            constraint: r.get(3),
            usable: r.get(4),
            partial: r.get(5),
            method: r.get(6),
            keys: r.get(7),
            first_expression: r.get(8),
            first_collation: r.get(9),
            expression_columns: r.get(10),
        })
        .collect())
}

/// `schema.table` quoted as PostgreSQL quotes names.
async fn quoted_table(
    client: &tokio_postgres::Client,
    table: &TableRule,
) -> anyhow::Result<String> {
    Ok(client
        .query_one(
            "SELECT quote_ident($1) || '.' || quote_ident($2)",
            &[&table.schema(), &table.name()],
        )
        .await
        .context("quoting the table name")?
        .get(0))
}

/// A name for the search index of `col` that no relation of the schema has and no other
/// statement of this run uses, quoted for SQL: [`search_index_name`], else
/// [`hashed_search_index_name`]; `None` when both are taken.
async fn free_index_name(
    client: &tokio_postgres::Client,
    table: &TableRule,
    col: &ColumnRule,
    planned: &mut HashSet<(String, String)>,
) -> anyhow::Result<Option<String>> {
    for name in [
        search_index_name(table.name(), col.column()),
        hashed_search_index_name(table.name(), col.column()),
    ] {
        let key = (table.schema().to_owned(), name.clone());
        if planned.contains(&key) {
            continue;
        }
        let row = client
            .query_one(
                "SELECT quote_ident($2), EXISTS (SELECT 1 FROM pg_class c \
                   JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = $1 AND c.relname = $2)",
                &[&table.schema(), &name],
            )
            .await
            .context("looking for a free index name")?;
        if !row.get::<_, bool>(1) {
            planned.insert(key);
            return Ok(Some(row.get(0)));
        }
    }
    Ok(None)
}

/// The search index's name: `<table>_<column>_search`, or when that is longer than
/// PostgreSQL's 63 bytes, [`hashed_search_index_name`].
pub(super) fn search_index_name(table: &str, column: &str) -> String {
    let name = format!("{table}_{column}_search");
    if name.len() <= MAX_IDENTIFIER_BYTES {
        return name;
    }
    hashed_search_index_name(table, column)
}

/// `<table>_<column>` cut to fit on a character boundary, then `_<8 hex digits of
/// SHA-256(table.column)>_search`: at most 63 bytes, and distinct for columns whose long names
/// share the kept part.
pub(super) fn hashed_search_index_name(table: &str, column: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{table}.{column}").as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let suffix = format!("_{hex}_search");
    let mut stem = format!("{table}_{column}");
    let mut cut = MAX_IDENTIFIER_BYTES - suffix.len();
    while cut < stem.len() && !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    stem.truncate(cut.min(stem.len()));
    stem + &suffix
}

/// A row key must exist, have a type whose printed form is stable, and be the table's
/// single-column primary key (`reencrypt` walks and re-seals rows by it).
async fn check_row_key(
    client: &tokio_postgres::Client,
    table: &TableRule,
    key: &str,
    ty: Option<String>,
) -> anyhow::Result<Vec<String>> {
    let at = format!("{}.{key} ({})", table.qualified_name(), table.location());
    let Some(ty) = ty else {
        return Ok(vec![format!("{at}: row key column does not exist")]);
    };
    let mut problems = Vec::new();
    if !ROW_KEY_TYPES.contains(&ty.as_str()) {
        problems.push(format!(
            "{at}: row key type is {ty}; use an integer, text, varchar or uuid column"
        ));
    }
    let pk: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary",
            &[&table.schema(), &table.name()],
        )
        .await
        .context("reading the primary key")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if pk != [key] {
        problems.push(format!(
            "{at}: the row key must be the table's single-column primary key (it is {})",
            if pk.is_empty() {
                "none".to_owned()
            } else {
                pk.join(", ")
            }
        ));
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_expressions_as_postgresql_prints_them() {
        assert!(is_term_expression("\"left\"(email, 31)", "email"));
        assert!(is_term_expression("\"left\"((email)::text, 31)", "email"));
        assert!(is_term_expression(
            "\"left\"((\"eMail\")::text, 31)",
            "\"eMail\""
        ));
        assert!(!is_term_expression("\"left\"(email, 7)", "email"));
        assert!(!is_term_expression("lower(email)", "email"));
        assert!(!is_term_expression("\"left\"(\"eMail\", 31)", "email"));
    }

    #[test]
    fn lengths_match_sealed_values() {
        use crate::crypto::{ColumnId, ColumnKey, DataKey, DekId, NonceSource, OrgId, TermKey};
        let column = ColumnId::from_name("public.t.c");
        let key = ColumnKey::derive(&DataKey::generate(), DekId::new_random(), column);
        let terms = TermKey::derive(
            &DataKey::generate(),
            DekId::new_random(),
            column,
            SearchMode::EqualityCi,
        );
        let org = OrgId::new("acme").unwrap();
        let mut nonces = NonceSource::from_os_rng();
        for len in (0..70).chain([137, 138, 255, 1000, 4096]) {
            let plaintext = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let plaintext = plaintext.as_bytes();
            let term = terms.term(plaintext);
            for (row_key, searchable) in [
                (None, false),
                (Some(&b"42"[..]), false),
                (None, true),
                (Some(&b"42"[..]), true),
            ] {
                let mut out = String::new();
                match (row_key, searchable) {
                    (None, false) => key.seal_into(&org, plaintext, &mut nonces, &mut out),
                    (Some(k), false) => {
                        key.seal_for_row_into(&org, k, plaintext, &mut nonces, &mut out)
                    }
                    (k, true) => {
                        key.seal_searchable_into(&org, k, &term, plaintext, &mut nonces, &mut out)
                    }
                }
                .unwrap();
                assert_eq!(
                    out.len(),
                    encrypted_chars(plaintext.len(), searchable),
                    "{len} bytes, row key {row_key:?}, searchable {searchable}"
                );
            }
        }
    }

    #[test]
    fn max_plaintext_is_the_longest_that_fits() {
        for searchable in [false, true] {
            for chars in 0..700 {
                let fits = (0..chars)
                    .filter(|&p| encrypted_chars(p, searchable) <= chars)
                    .max();
                assert_eq!(
                    max_plaintext(chars, searchable),
                    fits,
                    "{chars} {searchable}"
                );
            }
        }
        assert_eq!(max_plaintext(255, false), Some(137));
        assert_eq!(encrypted_chars(137, false), 255);
        assert_eq!(encrypted_chars(138, false), 259);
        assert_eq!(encrypted_chars(255, false), 415);
        assert_eq!(max_plaintext(255, true), Some(119));
        assert_eq!(encrypted_chars(255, true), 439);
        assert_eq!(max_plaintext(74, false), None);
        assert_eq!(max_plaintext(75, false), Some(2));
        assert_eq!(max_plaintext(98, true), None);
        assert_eq!(max_plaintext(99, true), Some(2));
    }

    #[test]
    fn length_warnings_give_both_numbers() {
        assert_eq!(
            length_warning("varchar", 255, false),
            "varchar(255) holds plaintexts of up to 137 bytes once encrypted (a longer one \
             fails with SQLSTATE 22001); plaintexts of up to 255 bytes need varchar(415); use \
             text"
        );
        assert!(length_warning("varchar", 255, true).contains(
            "up to 119 bytes once encrypted as searchable values (a longer one fails with \
             SQLSTATE 22001); plaintexts of up to 255 bytes need varchar(439)"
        ));
        assert_eq!(
            length_warning("char", 40, false),
            "char(40) holds no value once encrypted (an empty plaintext needs char(75)); use text"
        );
    }

    #[test]
    fn search_index_names_fit_and_stay_distinct() {
        assert_eq!(search_index_name("users", "email"), "users_email_search");
        assert_eq!(search_index_name("Users", "eMail"), "Users_eMail_search");
        let long = "t".repeat(40);
        let a = search_index_name(&long, &"a".repeat(30));
        let b = search_index_name(&long, &format!("{}b", "a".repeat(29)));
        assert!(a.len() <= MAX_IDENTIFIER_BYTES && b.len() <= MAX_IDENTIFIER_BYTES);
        assert_ne!(a, b);
        assert!(a.starts_with(&long) && a.ends_with("_search"), "{a}");
        // Multi-byte characters are never split.
        let wide = search_index_name(&"é".repeat(40), "c");
        assert!(wide.len() <= MAX_IDENTIFIER_BYTES, "{wide}");
        assert!(wide.ends_with("_search"));
        // Exactly 63 bytes is kept as it is.
        let t = "t".repeat(63 - "_c_search".len());
        assert_eq!(search_index_name(&t, "c"), format!("{t}_c_search"));
        assert_eq!(search_index_name(&t, "c").len(), MAX_IDENTIFIER_BYTES);
    }
}
