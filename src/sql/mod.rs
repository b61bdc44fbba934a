//! SQL statement analysis: which literals and parameters feed encrypted columns, and which
//! statements must be refused.
//!
//! This module is pure: no tokio, no I/O, no clocks. It parses with `sqlparser`
//! (`PostgreSqlDialect`) and walks the syntax tree. It never logs and never puts a data value in
//! an error message; the `Debug` output of every type here redacts literal values.
//!
//! # How the proxy uses it
//!
//! 1. [`might_touch`] is a cheap substring pre-check. When it returns `false` the statement is
//!    forwarded without parsing. It is deliberately generous (fail closed): it must be `true` for
//!    every statement that reads or writes a protected table or sets the tenant.
//! 2. [`analyze`] parses one SQL text (one or several `;`-separated statements) and returns an
//!    [`Analysis`]: the byte ranges of literals to encrypt ([`LiteralSite`]), the `$n` parameters
//!    to encrypt ([`ParamSite`]), tenant changes, transaction controls, a COPY plan, and the first
//!    reason to refuse the whole text ([`Rejection`], sent with SQLSTATE 0A000).
//! 3. [`rewrite_literals`] substitutes the ciphertexts into the text.
//!
//! # Reading the text as PostgreSQL does
//!
//! The analysis lexes as PostgreSQL does with `standard_conforming_strings = on`. With it off,
//! a backslash in a plain `'…'` literal escapes the next character, so the same text can split
//! into other statements; up to the first plain literal holding a backslash the two readings
//! agree, so [`Analysis::plain_backslash`] says whether they may differ and the proxy refuses
//! such texts (0A000: use `E'…'` or parameters) while the session's setting is off or may be
//! changing. The proxy follows the setting and `client_encoding` from ParameterStatus, and
//! treats both as uncertain while a statement that may change them is in flight; then
//! non-ASCII texts that may touch protected tables are refused too. Under a client encoding the
//! proxy cannot convert, the text is analysed in a view that follows PostgreSQL's multibyte
//! rules (a GBK or SJIS trailing byte `\` is no backslash): statements that carry no value
//! for an encrypted column pass, the others are refused. String continuation (`'ab'` newline
//! `'cd'`, one literal) is read as one literal.
//!
//! # Name resolution
//!
//! Identifiers are compared as PostgreSQL stores them: unquoted identifiers fold to lower case
//! (ASCII only, as PostgreSQL does for UTF-8 databases), quoted ones keep their case, and names
//! longer than 63 bytes are truncated to 63 bytes on a character boundary (NAMEDATALEN - 1), so
//! a long name that PostgreSQL truncates to a protected table or column is treated as it. The proxy
//! cannot know `search_path`, so an unqualified table name matches a protected table of that
//! name in *any* schema. When an unqualified name used as a write target matches protected
//! tables in more than one schema, the statement is refused (qualify the name). An unqualified
//! column name is treated as encrypted if any relation in scope has an encrypted column of that
//! name.
//!
//! # Write path
//!
//! A value written to an encrypted column (INSERT … VALUES, UPDATE … SET, ON CONFLICT DO UPDATE
//! SET) must be a string literal (`'…'`, `E'…'`, `U&'…'`, `N'…'`, `$tag$…$tag$`), a `$n`
//! parameter, NULL or DEFAULT, optionally cast to `text`, `varchar`, `character varying` or
//! `bpchar` (also `pg_catalog.`-qualified, and as typed literals `text 'x'`, `varchar 'x'`).
//! Casts with a length (`varchar(n)`, `char`) are refused: PostgreSQL's explicit cast
//! truncates silently and would corrupt the envelope. `SET enc = enc`, `SET enc = v.enc` where
//! `v` is the name the target is visible under (its alias once aliased, else its table name) and
//! `SET enc = EXCLUDED.enc` (same column) are allowed; a FROM item or CTE with another name, or
//! the table name once the target is aliased, is another relation and is refused. Everything else is refused, naming the column:
//! functions, operators, subqueries, numbers, other columns, INSERT … SELECT, INSERT without a
//! column list, multi-column `SET (…) = (…)` including an encrypted column, and a `$n` that feeds
//! an encrypted column and is used anywhere else in the text.
//!
//! The tenant of a written row is the tenant column's literal or parameter in the same VALUES row,
//! or in UPDATE the new value assigned to it, else a top-level `tenant_column = literal | $n`
//! conjunct of the WHERE clause, else [`TenantSource::Session`].
//!
//! Writes that could seal a value for another organisation than the row's own are refused:
//! an UPDATE writing encrypted values of a table with a tenant column must pin the tenant in its
//! WHERE clause; an UPDATE moving a row to another organisation must give every encrypted
//! column a new value (or NULL); an ON CONFLICT DO UPDATE writing encrypted columns must have
//! the tenant column in its conflict target or `WHERE target.tenant = EXCLUDED.tenant`, and may
//! not reassign the tenant. Tenant literals are looked at only through casts that keep their
//! text, and the proxy refuses tenant values stored in another form than written (surrounding
//! spaces, non-canonical numbers). A tenant `set_config` is accepted only in a SELECT that runs
//! it exactly once; with the setting name as a parameter the change is decided at Bind
//! ([`TenantChange::IfParamNamesTenant`]). A tenant change and a write sealed under the session
//! tenant may not share one query string, and in one query string no statement on a protected
//! table may come before a tenant change ([`Analysis::protected_before_tenant_change`]).
//!
//! # Read path
//!
//! SELECT, subqueries, CTEs, RETURNING, WHERE/HAVING/JOIN ON and `COPY (query)` are checked with
//! the rules in `read.rs`: projection, aliasing, text casts, `count(enc)` and `IS [NOT] NULL` are
//! fine; comparison, pattern matching, ordering, grouping, DISTINCT, UNION/INTERSECT/EXCEPT
//! without ALL, window partitioning, JOIN USING/NATURAL and any function or operator over an
//! encrypted value are refused. `coalesce(enc, fallback…)` with only string literals, NULL or
//! parameters as fallbacks is the column itself (decrypted on the way out, refused where the
//! column would be). A positional `ORDER BY n` is refused only when output column `n` is
//! encrypted, or when a `*` before it hides the width (a `*` over derived tables and CTEs whose
//! columns are all known keeps positions; over a base table it does not). Encryptedness follows columns through aliases, derived tables,
//! CTEs and set operations; where `*` hides positions, the analyser assumes the worst.
//!
//! # Other statements
//!
//! DDL and maintenance on protected tables (CREATE/ALTER/DROP TABLE, CREATE INDEX, TRUNCATE,
//! VACUUM, ANALYZE, GRANT, REVOKE, COMMENT, LOCK) pass, except DDL that could rewrite, rename,
//! retype or default an encrypted column or its guard, which is refused with a message to run it
//! directly and then `pgenvelope reencrypt`: renaming a protected table (or another table to a
//! protected name), renaming encrypted or tenant columns (or a column to an encrypted name),
//! adding a column named like an encrypted one (whatever its type: a domain may carry a default),
//! dropping, retyping (`USING`, `varchar(n)`), defaulting or generating an encrypted column,
//! dropping or renaming a `pgenvelope_enc_*` guard, INHERIT / ATTACH PARTITION / CREATE TABLE …
//! INHERITS / PARTITION OF involving a protected table, and ALTER TABLE operations the analyser
//! does not know. Statements that mention a protected table but cannot be analysed (MERGE, DO,
//! CREATE FUNCTION/PROCEDURE/TRIGGER/RULE/VIEW/POLICY, …) are refused, as are SQL-level PREPARE
//! whose parameters feed encrypted columns, and EXECUTE with arguments.
//!
//! When a text does not parse as a whole and [`might_touch`] is true, each `;`-separated
//! statement is parsed on its own. One that still does not parse (DO blocks, syntax sqlparser
//! lacks) is forwarded when none of its words, string or dollar-quoted bodies names a protected
//! table and it does not mention `pgenvelope`, `set_config`, `RESET`, `DISCARD` or `U&"`, and
//! does not start with EXECUTE; otherwise it is refused. COPY with `HEADER
//! off|0|false|on|1|true|match` and `COPY … FROM STDIN WHERE condition` are understood; the
//! condition is checked like a WHERE clause over the table (so it cannot compare encrypted
//! values). `ENCODING` sets the encoding of the COPY data.
//!
//! # Known gaps
//!
//! - Server-side code is opaque: a function or procedure (`SELECT f('x')`, `CALL p('x')` on a
//!   name that does not mention a protected table) that writes a protected table is not seen,
//!   nor is dynamic SQL that builds a protected table's name from pieces.
//! - Writes through views, partitions or inheritance children are protected only if those
//!   relations are themselves listed as protected.
//! - A tenant change pipelined in the extended protocol between the Parse of a statement with
//!   literals (sealed at Parse) and its Execute is not re-checked; reads are checked against
//!   the tenant in force when their rows arrive, not when they were sent.
//! - `SELECT * … ORDER BY n` is refused when `n` falls in the `*` (the analyser has no catalog).
//! - `ALTER DOMAIN … SET DEFAULT` on a domain already used by an encrypted column is not seen.
//! - Dynamic SQL in DO blocks that builds a protected table's name from pieces is not seen.
//! - `COPY … FROM STDIN;` followed by more lines in the same query text is refused (sqlparser
//!   reads those lines as inline COPY data).
//! - A change of `standard_conforming_strings` or `client_encoding` made by server-side code
//!   whose call does not name it (a function that runs `SET` inside, called as `SELECT f()`) is
//!   seen only when the server reports it; texts pipelined right behind such a call are read
//!   with the old setting. Texts that name either setting or say `names`, `set_config`,
//!   `reset`, `discard` or `u&`, and any FunctionCall message, make the settings uncertain
//!   until answered.
//!
//! # Invariants
//!
//! - [`Analysis::literals`] is sorted by position and non-overlapping, and each range lies on
//!   UTF-8 character boundaries of the analysed text.
//! - When [`Analysis::rejection`] is `Some`, the other fields are incomplete and must not be
//!   used: the whole text is refused.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use crate::crypto::SearchMode;

mod analyzer;
mod pins;
mod read;
mod rejection;
mod search;
mod sequelize;
mod text;
mod write;

pub(crate) use pins::quote_ident;
pub(crate) use text::canonical_uuid;
pub(crate) use text::Positions as Offsets;

pub use rejection::{
    ColumnDdlOp, Construct, CopyRefusal, InvalidStatement, ReadOp, Rejection, RejectionKind,
    TableDdlOp, TenantColumnUse, TenantSettingUse, WriteOp,
};

#[cfg(test)]
mod tests;

/// The setting that carries the session tenant.
pub const TENANT_SETTING: &str = "pgenvelope.tenant";

/// One protected table, as the rules describe it. Names are as PostgreSQL stores them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectedTable {
    /// Schema name, e.g. `public`.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Column that holds the row's organisation, if any.
    pub tenant_column: Option<String>,
    /// Column whose value every encrypted value is bound to (row binding), if any.
    pub row_key: Option<String>,
    /// Columns whose values are stored as `enc:v1:` envelopes.
    pub encrypted: Vec<String>,
    /// The searchable ones among them, with how they compare.
    pub searchable: Vec<(String, SearchMode)>,
}

/// The set of protected tables, with O(1) lookups by `(schema, table)` and by bare table name.
#[derive(Clone, Debug, Default)]
pub struct Protected {
    tables: Vec<ProtectedTable>,
    by_qualified: HashMap<(String, String), usize>,
    /// Invariant: every index is valid in `tables`; lists are never empty.
    by_name: HashMap<String, Vec<usize>>,
    /// Lower-cased search needles for [`might_touch`].
    needles: Vec<String>,
    /// Every encrypted column name of every table.
    encrypted_names: std::collections::HashSet<String>,
    /// Whether any column is searchable.
    any_searchable: bool,
}

impl Protected {
    /// Whether any column is searchable.
    pub fn has_searchable(&self) -> bool {
        self.any_searchable
    }

    /// Builds the lookup tables. Entries naming the same `(schema, table)` are merged.
    pub fn new(tables: impl IntoIterator<Item = ProtectedTable>) -> Self {
        let mut out = Protected::default();
        for t in tables {
            let key = (t.schema.clone(), t.name.clone());
            if let Some(&i) = out.by_qualified.get(&key) {
                let existing = &mut out.tables[i];
                for c in t.encrypted {
                    if !existing.encrypted.contains(&c) {
                        existing.encrypted.push(c);
                    }
                }
                for c in t.searchable {
                    if !existing.searchable.iter().any(|(n, _)| *n == c.0) {
                        existing.searchable.push(c);
                    }
                }
                if existing.tenant_column.is_none() {
                    existing.tenant_column = t.tenant_column;
                }
                if existing.row_key.is_none() {
                    existing.row_key = t.row_key;
                }
                continue;
            }
            let i = out.tables.len();
            out.by_qualified.insert(key, i);
            out.by_name.entry(t.name.clone()).or_default().push(i);
            out.tables.push(t);
        }
        out.any_searchable = out.tables.iter().any(|t| !t.searchable.is_empty());
        for t in &out.tables {
            out.encrypted_names.extend(t.encrypted.iter().cloned());
            let lower = t.name.to_lowercase();
            if !out.needles.contains(&lower) {
                out.needles.push(lower.clone());
            }
            if lower.contains('"') {
                let doubled = lower.replace('"', "\"\"");
                if !out.needles.contains(&doubled) {
                    out.needles.push(doubled);
                }
            }
        }
        out
    }

    /// All protected tables.
    pub fn tables(&self) -> &[ProtectedTable] {
        &self.tables
    }

    /// Whether every schema, table and column name of the rules is ASCII: then a non-ASCII
    /// character of a statement can never be part of a protected name.
    pub fn ascii_names(&self) -> bool {
        self.tables.iter().all(|t| {
            t.schema.is_ascii()
                && t.name.is_ascii()
                && t.tenant_column.as_deref().is_none_or(str::is_ascii)
                && t.encrypted.iter().all(|c| c.is_ascii())
        })
    }

    /// Whether no table is protected.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The table `schema.name`, if protected.
    pub fn get(&self, schema: &str, name: &str) -> Option<&ProtectedTable> {
        self.by_qualified
            .get(&(schema.to_owned(), name.to_owned()))
            .and_then(|&i| self.tables.get(i))
    }

    /// Every protected table named `name`, in any schema.
    pub fn by_name(&self, name: &str) -> impl Iterator<Item = &ProtectedTable> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.tables.get(i))
    }

    pub(crate) fn index_qualified(&self, schema: &str, name: &str) -> Option<usize> {
        self.by_qualified
            .get(&(schema.to_owned(), name.to_owned()))
            .copied()
    }

    pub(crate) fn indexes_by_name(&self, name: &str) -> &[usize] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    pub(crate) fn table(&self, i: usize) -> Option<&ProtectedTable> {
        self.tables.get(i)
    }

    pub(crate) fn is_encrypted_name(&self, column: &str) -> bool {
        self.encrypted_names.contains(column)
    }
}

/// A column of a protected table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ColumnRef {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Column name.
    pub column: String,
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// Where the tenant of a written value comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// The row's tenant column is given as this literal (numbers as their text).
    Literal(String),
    /// The row's tenant column is given as parameter `$n` (1-based).
    Param(usize),
    /// The tenant column is absent, NULL or DEFAULT: use the session tenant.
    Session,
}

impl fmt::Debug for TenantSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TenantSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            TenantSource::Param(n) => write!(f, "Param(${n})"),
            TenantSource::Session => f.write_str("Session"),
        }
    }
}

/// A literal in the SQL text whose value must be encrypted.
#[derive(Clone, PartialEq, Eq)]
pub struct LiteralSite {
    /// Byte range in the SQL text of the whole literal token, quotes and prefix included.
    pub range: Range<usize>,
    /// The literal's value as PostgreSQL reads it.
    pub value: String,
    /// The column the value is written to.
    pub column: ColumnRef,
    /// The tenant of the row.
    pub tenant: TenantSource,
    /// The row key, when the table binds values to their row.
    pub row_key: Option<RowKeySource>,
}

/// The key of a written row, for tables that bind values to their row (`row_key` rule).
#[derive(Clone, PartialEq, Eq)]
pub enum RowKeySource {
    /// Given as this literal (numbers as their text).
    Literal(String),
    /// Given as parameter `$n` (1-based).
    Param(usize),
    /// Drawn by the proxy from the key column's sequence: row `row` of [`Analysis::draws`]
    /// entry `draw` (an INSERT that leaves a serial or identity key to its default).
    Drawn {
        /// Index in [`Analysis::draws`].
        draw: usize,
        /// The row of that INSERT's VALUES list.
        row: usize,
    },
}

impl fmt::Debug for RowKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowKeySource::Literal(_) => f.write_str("Literal(<redacted>)"),
            RowKeySource::Param(n) => write!(f, "Param(${n})"),
            RowKeySource::Drawn { draw, row } => write!(f, "Drawn({draw}, {row})"),
        }
    }
}

impl fmt::Debug for LiteralSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiteralSite")
            .field("range", &self.range)
            .field("value", &"<redacted>")
            .field("column", &self.column)
            .field("tenant", &self.tenant)
            .field("row_key", &self.row_key)
            .finish()
    }
}

/// A `$n` parameter whose bound value must be encrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSite {
    /// 1-based parameter number.
    pub index: usize,
    /// The column the value is written to.
    pub column: ColumnRef,
    /// The tenant of the row.
    pub tenant: TenantSource,
    /// The row key, when the table binds values to their row.
    pub row_key: Option<RowKeySource>,
}

/// A change of the session tenant, in statement order.
#[derive(Clone, PartialEq, Eq)]
pub enum TenantChange {
    /// `SET [LOCAL] pgenvelope.tenant = 'x'` or `set_config('pgenvelope.tenant', 'x', local)`.
    Set {
        /// The new tenant.
        value: String,
        /// Transaction-scoped (`SET LOCAL`, `set_config(…, true)`).
        local: bool,
    },
    /// `SELECT set_config('pgenvelope.tenant', $n, local)`.
    SetParam {
        /// 1-based parameter number holding the tenant.
        param: usize,
        /// Transaction-scoped.
        local: bool,
    },
    /// `SELECT set_config($n, value, local)`: `change` if the bound parameter `$n` names
    /// `pgenvelope.tenant` (in any case), no change otherwise.
    IfParamNamesTenant {
        /// 1-based parameter number holding the setting name.
        name: usize,
        /// The change made when it names the tenant (never another `IfParamNamesTenant`).
        change: Box<TenantChange>,
    },
    /// `RESET pgenvelope.tenant`, `RESET ALL`, `DISCARD ALL`, `SET pgenvelope.tenant TO DEFAULT`.
    Reset {
        /// Transaction-scoped (`SET LOCAL … TO DEFAULT`).
        local: bool,
    },
}

impl fmt::Debug for TenantChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TenantChange::Set { local, .. } => f
                .debug_struct("Set")
                .field("value", &"<redacted>")
                .field("local", local)
                .finish(),
            TenantChange::SetParam { param, local } => f
                .debug_struct("SetParam")
                .field("param", param)
                .field("local", local)
                .finish(),
            TenantChange::IfParamNamesTenant { name, change } => f
                .debug_struct("IfParamNamesTenant")
                .field("name", name)
                .field("change", change)
                .finish(),
            TenantChange::Reset { local } => f.debug_struct("Reset").field("local", local).finish(),
        }
    }
}

/// A transaction control statement, as seen. `COMMIT AND CHAIN` is reported as `Commit`
/// followed by `Begin` (likewise `ROLLBACK AND CHAIN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxControl {
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK` / `ABORT`.
    Rollback,
    /// `SAVEPOINT name` (name folded as PostgreSQL does).
    Savepoint(String),
    /// `ROLLBACK TO [SAVEPOINT] name`.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`.
    Release(String),
}

/// Direction of a COPY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDirection {
    /// `COPY … FROM STDIN`: rows come from the client and must be encrypted.
    FromStdin,
    /// `COPY … TO STDOUT`: rows go to the client and must be decrypted.
    ToStdout,
}

/// Data format of a COPY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    /// PostgreSQL's text format.
    Text,
    /// CSV.
    Csv,
    /// Binary (never planned for protected tables: such COPYs are refused).
    Binary,
}

/// A schema-qualified table name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// What the proxy needs to transform the data of a COPY that touches a protected table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    /// The protected table; `None` for `COPY (query) TO STDOUT`.
    pub table: Option<TableName>,
    /// The explicit column list; empty means all columns in table order.
    pub columns: Vec<String>,
    /// Direction.
    pub direction: CopyDirection,
    /// Format.
    pub format: CopyFormat,
    /// `DELIMITER`, when given.
    pub delimiter: Option<char>,
    /// `NULL` string, when given.
    pub null: Option<String>,
    /// `QUOTE` (CSV), when given.
    pub quote: Option<char>,
    /// `ESCAPE` (CSV), when given.
    pub escape: Option<char>,
    /// `HEADER`.
    pub header: bool,
    /// `ENCODING`, when given.
    pub encoding: Option<String>,
}

/// The kind of one statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementKind {
    /// SELECT, VALUES, TABLE and other queries.
    Query,
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// COPY.
    Copy,
    /// SET / RESET / DISCARD.
    Set,
    /// Transaction control.
    Transaction,
    /// DDL and maintenance.
    Ddl,
    /// Anything else.
    Other,
}

/// Where an array of values comes from: a literal of the text (its byte range and the array's
/// text form) or a parameter.
#[derive(Clone, PartialEq, Eq)]
pub enum ArraySource {
    /// A string literal holding the array's text form.
    Literal {
        /// Byte range of the literal token, quotes included.
        range: Range<usize>,
        /// The literal's value: the array's text form.
        text: String,
        /// Cast to `uuid[]`: each element is stored in its canonical UUID form.
        uuid: bool,
    },
    /// Parameter `$n` (1-based).
    Param(usize),
    /// The row keys of [`Analysis::draws`] entry `n` (row keys only).
    Drawn(usize),
}

impl fmt::Debug for ArraySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArraySource::Literal { range, .. } => write!(f, "Literal({range:?}, <redacted>)"),
            ArraySource::Param(n) => write!(f, "Param(${n})"),
            ArraySource::Drawn(n) => write!(f, "Drawn({n})"),
        }
    }
}

/// An array whose elements are values for an encrypted column, element `i` belonging to row
/// `i` (Django's `bulk_create`: `INSERT … SELECT * FROM UNNEST($1::text[], …)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArraySite {
    /// The values.
    pub value: ArraySource,
    /// The column they are written to.
    pub column: ColumnRef,
    /// The tenant of each row, an array given the same way; `None`: the session tenant.
    pub tenant: Option<ArraySource>,
    /// The row key of each row, when the table binds values to their row.
    pub row_key: Option<ArraySource>,
}

/// Row keys the proxy draws for an INSERT into a table that binds values to their row, when
/// its column list leaves the key to its default (a `serial` or identity column, as every
/// ORM's INSERT does): one `nextval` of the key column's sequence per row, on the client's
/// session, written into the statement so that each value is sealed for the key its row gets.
///
/// Three shapes: `VALUES (…), …`; SQLAlchemy's `SELECT p0, … FROM (VALUES (…), …) AS a(p0, …)`;
/// Django's `SELECT * FROM UNNEST(a0, …)` (the keys as one more array).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDraw {
    /// The table, schema-qualified and quoted, as `pg_get_serial_sequence` reads it.
    pub table: String,
    /// The key column's name, as stored.
    pub column: String,
    /// How many keys to draw.
    pub rows: DrawRows,
    /// What goes where in the text: byte ranges (empty for an insertion), ascending.
    pub edits: Vec<(Range<usize>, DrawEdit)>,
}

/// How many keys a [`KeyDraw`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrawRows {
    /// One per VALUES row.
    Fixed(usize),
    /// As many as the longest of these arrays has elements (the rows of `UNNEST`).
    Longest(Vec<ArraySource>),
}

/// A piece of text a [`KeyDraw`] adds to the statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrawEdit {
    /// `, "key"` at the end of the INSERT's column list.
    Column,
    /// ` OVERRIDING SYSTEM VALUE` after the column list, so that an identity column
    /// `GENERATED ALWAYS` takes the drawn key too.
    Overriding,
    /// `, <key n>::int8` at the end of VALUES row `n`.
    Key(usize),
    /// `<key n>::int8` in place of a row's `DEFAULT` for the key (Sequelize writes the key
    /// column with `DEFAULT`).
    KeyInPlace(usize),
    /// `, <keys>::int8[]` at the end of UNNEST's arguments.
    Keys,
    /// `, pgenvelope_key` at the end of a SELECT list or of a VALUES alias's column list.
    Name,
}

impl KeyDraw {
    /// Number of parameters the keys take in a prepared statement: one per row, or one array.
    pub fn params(&self) -> usize {
        self.edits
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e,
                    DrawEdit::Key(_) | DrawEdit::KeyInPlace(_) | DrawEdit::Keys
                )
            })
            .count()
    }
}

/// A condition the proxy adds to a write so that it touches only rows of the organisation its
/// values are sealed for (an UPDATE by primary key alone, an upsert's DO UPDATE), as row-level
/// security would: another organisation's row is simply not written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantPin {
    /// Where the condition goes.
    pub place: PinPlace,
    /// The tenant column as the statement sees it, quoted (`"c"."org_id"`).
    pub column: String,
    /// What it must equal.
    pub value: PinValue,
    /// For an UPDATE: the parts of its text that find its rows, so that their organisation
    /// can be looked up when no tenant is known.
    pub lookup: Option<PinLookup>,
}

/// The parts of an UPDATE that say which rows it writes (byte ranges of the client's text):
/// `SELECT … FROM target[, from] [WHERE cond]` finds the same rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLookup {
    /// The target table, with its alias (`customer c`).
    pub target: Range<usize>,
    /// The FROM list after SET, if any.
    pub from: Option<Range<usize>>,
    /// The WHERE condition, if any.
    pub cond: Option<Range<usize>>,
}

/// Where a [`TenantPin`] goes in the text (byte offsets of the client's text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinPlace {
    /// The condition of an existing WHERE clause: it becomes `(` condition `) AND` pin.
    Wrap(Range<usize>),
    /// No WHERE clause: ` WHERE` pin is inserted at this offset.
    Add(usize),
}

/// What a pinned tenant column must equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinValue {
    /// The organisation the statement's values are sealed for under the session (or default)
    /// tenant, supplied by the proxy.
    SessionTenant,
    /// The inserted row's own tenant (`EXCLUDED."org_id"`, quoted), for ON CONFLICT DO UPDATE.
    Excluded(String),
}

/// An equality look-up on a searchable encrypted column (`email = $1`, `email IN (…)`,
/// `upper(code::text) = upper('x')`, …), to be rewritten into a comparison of search terms:
/// the column side becomes `left(column, 31)` and each operand the search term of its value.
#[derive(Clone, PartialEq, Eq)]
pub struct SearchSite {
    /// The column searched.
    pub column: ColumnRef,
    /// How it compares (its rule's `search`).
    pub mode: SearchMode,
    /// The column side, with its parentheses, casts and `lower`/`upper`: replaced by
    /// `left(<column reference>, 31)`.
    pub column_range: Range<usize>,
    /// The column reference itself (`"c"."email"`), inside `column_range`.
    pub column_ref: Range<usize>,
    /// The values compared with; empty when the other side is the same column of another row
    /// (`a.email = b.email`: both sides are rewritten, no term is needed).
    pub operands: Vec<SearchOperand>,
    /// The organisation whose search key computes the terms.
    pub tenant: TenantSource,
    /// Scope depth where the comparison stands (its WHERE's tenant conjunct applies only at
    /// the same depth).
    pub(crate) depth: usize,
    /// The qualifier the column was named with, if any.
    pub(crate) qualifier: Option<String>,
    /// For `<>`, `NOT IN`, `IS DISTINCT FROM`: the whole comparison (pinned to the session
    /// tenant's rows, see [`Analysis::pins`]).
    pub(crate) negated: Option<Range<usize>>,
}

impl fmt::Debug for SearchSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchSite")
            .field("column", &self.column)
            .field("mode", &self.mode)
            .field("column_range", &self.column_range)
            .field("operands", &self.operands)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// One value a searchable column is compared with.
#[derive(Clone, PartialEq, Eq)]
pub enum SearchOperand {
    /// A string literal: `range` (the operand with its casts and `lower`/`upper`) becomes the
    /// quoted term of `value`.
    Literal {
        /// The operand's text.
        range: Range<usize>,
        /// The literal's value as PostgreSQL reads it.
        value: String,
    },
    /// Parameter `$index` (1-based): `range` becomes `$index`, and the bound value its term.
    Param {
        /// The operand's text.
        range: Range<usize>,
        /// 1-based parameter number.
        index: usize,
    },
    /// `= ANY($index)`: a text array parameter whose every element becomes its term.
    ArrayParam {
        /// The operand's text (inside `ANY(…)`).
        range: Range<usize>,
        /// 1-based parameter number.
        index: usize,
    },
}

impl fmt::Debug for SearchOperand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Literal { range, .. } => write!(f, "Literal({range:?}, <redacted>)"),
            Self::Param { index, .. } => write!(f, "Param(${index})"),
            Self::ArrayParam { index, .. } => write!(f, "ArrayParam(${index})"),
        }
    }
}

/// The result of analysing one SQL text.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    /// Literals to encrypt. Invariant: sorted by position, non-overlapping.
    pub literals: Vec<LiteralSite>,
    /// Parameters to encrypt.
    pub params: Vec<ParamSite>,
    /// Arrays whose elements to encrypt (literals or parameters).
    pub arrays: Vec<ArraySite>,
    /// Tenant changes, in statement order.
    pub tenant_changes: Vec<TenantChange>,
    /// Transaction controls, in statement order.
    pub tx_controls: Vec<TxControl>,
    /// The COPY plan, for a COPY that touches a protected table.
    pub copy: Option<CopyPlan>,
    /// Conditions to add so that writes touch only their organisation's rows.
    pub pins: Vec<TenantPin>,
    /// Row keys to draw before the values of row-bound columns can be sealed.
    pub draws: Vec<KeyDraw>,
    /// Equality look-ups on searchable columns, to compare search terms.
    pub searches: Vec<SearchSite>,
    /// The highest `$n` the text uses (0: none).
    pub max_param: usize,
    /// Whether any statement reads, writes or mentions a protected table.
    pub touches_protected: bool,
    /// Whether a statement that touches a protected table comes before a tenant change in
    /// the text: its rows would be read under the tenant before the change, which the proxy
    /// does not track statement by statement (such texts are refused).
    pub protected_before_tenant_change: bool,
    /// Number of statements parsed.
    pub statement_count: usize,
    /// Kind of each statement.
    pub kinds: Vec<StatementKind>,
    /// The first reason to refuse the whole text.
    pub rejection: Option<Rejection>,
    /// Whether a plain `'…'` (or `N'…'`) string literal holds a backslash. The analysis reads
    /// text as PostgreSQL does with `standard_conforming_strings = on`; the two settings split
    /// a text the same way unless this is set, so the caller refuses such texts when the
    /// session's setting is off or uncertain.
    pub plain_backslash: bool,
}

/// Cheap pre-check without parsing: could `sql` read or write a protected table or set the
/// tenant?
///
/// Case-insensitive substring search for every protected table name, `pgenvelope`, `set_config`,
/// `execute`, `discard`, `reset` and Unicode-escaped identifiers (`U&"`). False positives only cost a parse.
pub fn might_touch(sql: &str, protected: &Protected) -> bool {
    touches(&sql.to_lowercase(), protected)
}

/// The proxy's pre-check: [`might_touch`], or a `COPY` (a `COPY (query) TO` may read
/// protected tables through views, so its output is scanned). One lower-casing for both.
pub fn worth_analysing(sql: &str, protected: &Protected) -> bool {
    let lower = sql.to_lowercase();
    touches(&lower, protected) || lower.contains("copy")
}

fn touches(lower: &str, protected: &Protected) -> bool {
    const ALWAYS: [&str; 9] = [
        "pgenvelope",
        "set_config",
        "execute",
        "u&\"",
        "discard",
        "reset",
        // Savepoint commands move the session tenant back and forth.
        "savepoint",
        "rollback",
        "release",
    ];
    ALWAYS.iter().any(|n| lower.contains(n))
        || protected.needles.iter().any(|n| lower.contains(n.as_str()))
}

/// Why a text the analysis accepted must still be refused in a session whose
/// `standard_conforming_strings` is off (`standard_strings == false`) or may be changing
/// (`uncertain`): PostgreSQL may split it differently (see [`Analysis::plain_backslash`]).
pub fn lexing_refusal(
    analysis: &Analysis,
    standard_strings: bool,
    uncertain: bool,
) -> Option<Rejection> {
    (analysis.plain_backslash && (!standard_strings || uncertain))
        .then(|| RejectionKind::LexingUncertain.into())
}

/// Analyses one SQL text (possibly several `;`-separated statements).
pub fn analyze(sql: &str, protected: &Protected) -> Analysis {
    analyzer::run(sql, protected)
}

/// Why [`rewrite_literals`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// A range ends past the text or starts after it ends.
    #[error("replacement range {start}..{end} is outside the text ({len} bytes)")]
    OutOfBounds {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Text length in bytes.
        len: usize,
    },
    /// A range does not lie on UTF-8 character boundaries.
    #[error("replacement range {start}..{end} splits a character")]
    NotCharBoundary {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
    },
    /// Ranges are not sorted or overlap.
    #[error("replacement range starting at {start} overlaps or precedes the previous one")]
    Overlap {
        /// Start of the offending range.
        start: usize,
    },
}

/// Replaces each range of `sql` with its text. Ranges must be sorted and non-overlapping.
pub fn rewrite_literals(
    sql: &str,
    replacements: &[(Range<usize>, String)],
) -> Result<String, RewriteError> {
    let mut out =
        String::with_capacity(sql.len() + replacements.iter().map(|(_, s)| s.len()).sum::<usize>());
    let mut pos = 0;
    for (range, text) in replacements {
        let (start, end) = (range.start, range.end);
        if start > end || end > sql.len() {
            return Err(RewriteError::OutOfBounds {
                start,
                end,
                len: sql.len(),
            });
        }
        if start < pos {
            return Err(RewriteError::Overlap { start });
        }
        let (Some(before), Some(_)) = (sql.get(pos..start), sql.get(start..end)) else {
            return Err(RewriteError::NotCharBoundary { start, end });
        };
        out.push_str(before);
        out.push_str(text);
        pos = end;
    }
    out.push_str(sql.get(pos..).unwrap_or_default());
    Ok(out)
}
