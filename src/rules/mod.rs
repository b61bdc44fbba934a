//! Rule files: which columns of which tables hold `enc:v1` values (docs/configuration.md, rule files).
//!
//! ```toml
//! [[table]]
//! name = "public.vault_secrets"   # schema-qualified; unqualified means `public`
//! tenant_column = "org_id"        # optional: the column holding the row's organisation
//! row_key = "id"                  # optional: bind each value to its row (key in the AAD)
//! encrypt = ["value", { name = "email", id = "users-email", search = "equality" }]
//! ```
//!
//! * `encrypt` entries are a column name, or an inline table with `name`, an optional stable
//!   `id` (the [`ColumnId`] is then derived from the id instead of `schema.table.column`, so the
//!   column can be renamed without making its values undecryptable) and an optional `mode`:
//!   `"randomized"` (the default) or `"deterministic"` (reserved, rejected as not supported yet),
//!   and an optional `search`: `"equality"` or `"equality-ci"` makes the column searchable
//!   (values carry a search term, [`crate::crypto::search`]).
//! * `row_key` names a column whose value identifies the row (its primary key, say): values are
//!   then sealed with that key in their AAD and open only in the row they were written to.
//! * Unknown keys, duplicate tables (also across files), duplicate columns, a tenant column or
//!   row key that is also encrypted, a table with no encrypted column, and two columns with the same
//!   [`ColumnId`] are errors. Every error names the file, the line and the key ([`RulesError`]).
//! * Names are matched as PostgreSQL stores them in its catalog: unquoted parts are folded to
//!   lower case, `"Quoted"` parts keep their case (details in [`ident`]). Lookups take names in
//!   that stored form, e.g. from `pg_class`/`pg_attribute` or from an already-folded parsed
//!   statement.
//! * The column id of a column without a stable id is the SHA-256 prefix of
//!   `schema.table.column`, built from the stored (folded, unquoted) names joined with `.`.
//!
//! This module is pure: [`RuleSet::from_sources`] takes file names and contents. The only I/O is
//! in [`load`] ([`load_path`]), which reads the files and calls it. Nothing here logs.

pub mod error;
pub mod ident;
pub mod load;
mod raw;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use toml::Spanned;

use crate::crypto::{ColumnId, SearchMode};
pub use error::{Location, RulesError};
pub use ident::NameError;
pub use load::load_path;
use raw::{RawColumn, RawFile, RawMode, RawSearch, RawTable};

/// Schema assumed for an unqualified table name.
pub const DEFAULT_SCHEMA: &str = "public";

/// All rules, merged from any number of files, with constant-time lookups.
///
/// Invariant: table names are unique, column names are unique within a table, column ids are
/// unique across all tables, and no tenant column is encrypted.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    tables: Vec<TableRule>,
    /// schema -> table -> index into `tables`.
    by_name: HashMap<String, HashMap<String, usize>>,
    /// column id -> (table index, column index).
    by_id: HashMap<ColumnId, (usize, usize)>,
}

impl RuleSet {
    /// Parse and validate rule files given as `(name, contents)`, in the order given. `name` is
    /// only used in error messages and [`Location`]s.
    pub fn from_sources<P, S>(sources: &[(P, S)]) -> Result<Self, RulesError>
    where
        P: AsRef<Path>,
        S: AsRef<str>,
    {
        let mut set = Self::default();
        for (file, text) in sources {
            let (file, text): (Arc<Path>, _) = (file.as_ref().into(), text.as_ref());
            let raw: RawFile = toml::from_str(text).map_err(|e| syntax_error(&file, text, &e))?;
            for (index, table) in raw.table.into_iter().enumerate() {
                let span = table.span();
                let table =
                    TableRule::from_raw(&file, text, index, span.start, table.into_inner())?;
                set.insert(table)?;
            }
        }
        Ok(set)
    }

    /// True when no table has rules: the proxy then encrypts nothing.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Number of tables with rules.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// All tables, in file order and then in order of definition.
    pub fn tables(&self) -> impl ExactSizeIterator<Item = &TableRule> + '_ {
        self.tables.iter()
    }

    /// Rules for a table, by its stored schema and table name.
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableRule> {
        let &index = self.by_name.get(schema)?.get(name)?;
        self.tables.get(index)
    }

    /// Rule for a column, by its stored schema, table and column name.
    pub fn column(&self, schema: &str, table: &str, column: &str) -> Option<&ColumnRule> {
        self.table(schema, table)?.column(column)
    }

    /// Rule for the column a value's header names.
    pub fn by_column_id(&self, id: ColumnId) -> Option<&ColumnRule> {
        let &(t, c) = self.by_id.get(&id)?;
        self.tables.get(t)?.columns.get(c)
    }

    fn insert(&mut self, table: TableRule) -> Result<(), RulesError> {
        if let Some(first) = self.table(&table.schema, &table.name) {
            return Err(RulesError::DuplicateTable {
                at: table.name_location.clone(),
                key: format!("{}.name", table.key),
                table: table.qualified_name(),
                first: first.name_location.clone(),
            });
        }
        let table_index = self.tables.len();
        for (column_index, column) in table.columns.iter().enumerate() {
            let other = self.by_id.get(&column.id).and_then(|&(t, c)| {
                let columns = match self.tables.get(t) {
                    Some(other_table) => &other_table.columns,
                    None => &table.columns,
                };
                columns.get(c)
            });
            if let Some(other) = other {
                return Err(RulesError::ColumnIdCollision {
                    at: column.location.clone(),
                    key: column.key.clone(),
                    column: column.qualified.clone(),
                    id: column.id,
                    other: other.qualified.clone(),
                    other_at: other.location.clone(),
                });
            }
            self.by_id.insert(column.id, (table_index, column_index));
        }
        self.by_name
            .entry(table.schema.clone())
            .or_default()
            .insert(table.name.clone(), table_index);
        self.tables.push(table);
        Ok(())
    }
}

/// Rules for one table.
///
/// Invariant: `columns` is non-empty, its names are unique and none is `tenant_column`.
#[derive(Debug, Clone)]
pub struct TableRule {
    schema: String,
    name: String,
    tenant_column: Option<String>,
    row_key: Option<String>,
    columns: Vec<ColumnRule>,
    column_index: HashMap<String, usize>,
    location: Location,
    /// Where the table's `name` is.
    name_location: Location,
    /// Key path for error messages, e.g. `table[2]`.
    key: String,
}

impl TableRule {
    /// Schema, as stored by PostgreSQL.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Table name, as stored by PostgreSQL.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `schema.table`, unquoted.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The column that holds each row's organisation, if the rule names one.
    pub fn tenant_column(&self) -> Option<&str> {
        self.tenant_column.as_deref()
    }

    /// The column whose value every encrypted value of the table is bound to, if any.
    pub fn row_key(&self) -> Option<&str> {
        self.row_key.as_deref()
    }

    /// The encrypted columns, in the order listed.
    pub fn columns(&self) -> impl ExactSizeIterator<Item = &ColumnRule> + '_ {
        self.columns.iter()
    }

    /// Rule for one of this table's columns, by its stored name.
    pub fn column(&self, name: &str) -> Option<&ColumnRule> {
        let &index = self.column_index.get(name)?;
        self.columns.get(index)
    }

    /// Where the `[[table]]` entry starts.
    pub fn location(&self) -> &Location {
        &self.location
    }

    fn from_raw(
        file: &Arc<Path>,
        text: &str,
        index: usize,
        offset: usize,
        raw: RawTable,
    ) -> Result<Self, RulesError> {
        let key = format!("table[{index}]");
        let loc = |span: std::ops::Range<usize>| Location::at_offset(file, text, span.start);
        let location = Location::at_offset(file, text, offset);
        let name_at = loc(raw.name.span());
        let (schema, name) = match ident::parse_qualified(raw.name.get_ref()) {
            Ok(parts) => match <[String; 2]>::try_from(parts) {
                Ok([schema, name]) => (schema, name),
                Err(parts) if parts.len() == 1 => {
                    (DEFAULT_SCHEMA.to_owned(), parts.into_iter().collect())
                }
                Err(parts) => {
                    return Err(invalid_name(
                        name_at,
                        format!("{key}.name"),
                        &raw.name,
                        NameError::TooManyParts {
                            max: 2,
                            found: parts.len(),
                        },
                    ))
                }
            },
            Err(e) => return Err(invalid_name(name_at, format!("{key}.name"), &raw.name, e)),
        };

        let tenant_column = match &raw.tenant_column {
            None => None,
            Some(tc) => Some(ident::parse_single(tc.get_ref()).map_err(|e| {
                invalid_name(loc(tc.span()), format!("{key}.tenant_column"), tc, e)
            })?),
        };

        let row_key = match &raw.row_key {
            None => None,
            Some(rk) => Some(
                ident::parse_single(rk.get_ref())
                    .map_err(|e| invalid_name(loc(rk.span()), format!("{key}.row_key"), rk, e))?,
            ),
        };

        let mut table = Self {
            schema,
            name,
            tenant_column,
            row_key,
            columns: Vec::new(),
            column_index: HashMap::new(),
            location,
            name_location: name_at,
            key,
        };
        let encrypt_span = raw.encrypt.span();
        for (i, entry) in raw.encrypt.into_inner().into_iter().enumerate() {
            let column = table.column_from_raw(file, text, i, entry)?;
            if let Some(&first) = table.column_index.get(&column.column) {
                return Err(RulesError::DuplicateColumn {
                    at: column.location.clone(),
                    key: column.key.clone(),
                    column: column.qualified.clone(),
                    first: table.columns[first].location.clone(),
                });
            }
            if table.tenant_column.as_deref() == Some(column.column.as_str()) {
                return Err(RulesError::TenantColumnEncrypted {
                    at: column.location.clone(),
                    key: column.key.clone(),
                    column: column.qualified.clone(),
                });
            }
            if table.row_key.as_deref() == Some(column.column.as_str()) {
                return Err(RulesError::RowKeyEncrypted {
                    at: column.location.clone(),
                    key: column.key.clone(),
                    column: column.qualified.clone(),
                });
            }
            table
                .column_index
                .insert(column.column.clone(), table.columns.len());
            table.columns.push(column);
        }
        if table.columns.is_empty() {
            return Err(RulesError::NoColumns {
                at: loc(encrypt_span),
                key: format!("{}.encrypt", table.key),
                table: table.qualified_name(),
            });
        }
        Ok(table)
    }

    fn column_from_raw(
        &self,
        file: &Arc<Path>,
        text: &str,
        index: usize,
        entry: Spanned<RawColumn>,
    ) -> Result<ColumnRule, RulesError> {
        let key = format!("{}.encrypt[{index}]", self.key);
        let loc = |span: std::ops::Range<usize>| Location::at_offset(file, text, span.start);
        let location = loc(entry.span());
        let (name, stable_id, mode, search) = match entry.into_inner() {
            RawColumn::Name(name) => {
                let column = ident::parse_single(&name).map_err(|e| RulesError::InvalidName {
                    at: location.clone(),
                    key: key.clone(),
                    name: name.clone(),
                    source: e,
                })?;
                (column, None, None, None)
            }
            RawColumn::Detailed(t) => {
                let column = ident::parse_single(t.name.get_ref()).map_err(|e| {
                    invalid_name(loc(t.name.span()), format!("{key}.name"), &t.name, e)
                })?;
                (column, t.id, t.mode, t.search)
            }
        };
        let qualified = format!("{}.{}.{}", self.schema, self.name, name);

        let mode = match mode {
            None => EncryptionMode::Randomized,
            Some(m) => match m.get_ref() {
                RawMode::Randomized => EncryptionMode::Randomized,
                RawMode::Deterministic => {
                    return Err(RulesError::DeterministicNotSupported {
                        at: loc(m.span()),
                        key: format!("{key}.mode"),
                        column: qualified,
                    })
                }
            },
        };

        let stable_id = match stable_id {
            None => None,
            Some(id) => {
                let s = id.get_ref();
                if s.is_empty() || s.trim() != s {
                    return Err(RulesError::InvalidStableId {
                        at: loc(id.span()),
                        key: format!("{key}.id"),
                        id: s.clone(),
                    });
                }
                Some(id.into_inner())
            }
        };
        let id = ColumnId::from_name(stable_id.as_deref().unwrap_or(&qualified));

        Ok(ColumnRule {
            schema: self.schema.clone(),
            table: self.name.clone(),
            column: name,
            qualified,
            id,
            stable_id,
            mode,
            search: search.map(|s| match s.into_inner() {
                RawSearch::Equality => SearchMode::Equality,
                RawSearch::EqualityCi => SearchMode::EqualityCi,
            }),
            row_key: self.row_key.clone(),
            location,
            key,
        })
    }
}

/// Rule for one encrypted column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRule {
    schema: String,
    table: String,
    column: String,
    qualified: String,
    id: ColumnId,
    stable_id: Option<String>,
    mode: EncryptionMode,
    /// Equality search on the column, if any.
    search: Option<SearchMode>,
    /// The table's row key: values are bound to their row.
    row_key: Option<String>,
    location: Location,
    /// Key path for error messages, e.g. `table[0].encrypt[1]`.
    key: String,
}

impl ColumnRule {
    /// Schema, as stored by PostgreSQL.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Table name, as stored by PostgreSQL.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Column name, as stored by PostgreSQL.
    pub fn column(&self) -> &str {
        &self.column
    }

    /// `schema.table.column`, unquoted: for messages, and the column id's input when the rule
    /// has no stable id.
    pub fn qualified_name(&self) -> &str {
        &self.qualified
    }

    /// The id written into every `enc:v1` value of this column.
    pub fn id(&self) -> ColumnId {
        self.id
    }

    /// The rule's stable `id`, if it has one.
    pub fn stable_id(&self) -> Option<&str> {
        self.stable_id.as_deref()
    }

    /// The table's row key, when values of this column are bound to their row.
    pub fn row_key(&self) -> Option<&str> {
        self.row_key.as_deref()
    }

    /// How values are encrypted.
    pub fn mode(&self) -> EncryptionMode {
        self.mode
    }

    /// How the column is searched, when it is searchable (`search = …` in its entry).
    pub fn search(&self) -> Option<SearchMode> {
        self.search
    }

    /// Where the column's entry is.
    pub fn location(&self) -> &Location {
        &self.location
    }
}

/// How a column's values are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum EncryptionMode {
    /// AES-256-GCM with a random nonce (`enc:v1` algorithm `0x01`): equal plaintexts give
    /// different ciphertexts.
    #[default]
    Randomized,
}

impl fmt::Display for EncryptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Randomized => f.write_str("randomized"),
        }
    }
}

fn invalid_name(
    at: Location,
    key: String,
    name: &Spanned<String>,
    source: NameError,
) -> RulesError {
    RulesError::InvalidName {
        at,
        key,
        name: name.get_ref().clone(),
        source,
    }
}

/// Turn a TOML parse or schema error into one naming file, line and (when the line has one)
/// the key.
fn syntax_error(file: &Arc<Path>, text: &str, err: &toml::de::Error) -> RulesError {
    let start = err.span().map_or(0, |s| s.start);
    let at = Location::at_offset(file, text, start);
    let key = line_key(text, start);
    RulesError::Syntax {
        at,
        key,
        message: err.message().trim_end().replace('\n', "; "),
    }
}

/// The `key` of a `key = value` line containing byte `offset`, if the line looks like one.
fn line_key(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text.as_bytes()[..offset]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\''));
    plain.then(|| key.to_owned())
}

#[cfg(test)]
mod tests;
