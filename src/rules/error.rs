//! Errors from loading and validating rule files. Each names the file, the line and the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::ColumnId;
use crate::rules::ident::NameError;

/// A place in a rule file: its path (as given to the loader) and a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    file: Arc<Path>,
    line: usize,
}

impl Location {
    /// Location at `line` (1-based) of `file`.
    pub fn new(file: impl Into<Arc<Path>>, line: usize) -> Self {
        Self {
            file: file.into(),
            line,
        }
    }

    /// Location of byte `offset` of `source`, read from `file`.
    pub(crate) fn at_offset(file: &Arc<Path>, source: &str, offset: usize) -> Self {
        let end = offset.min(source.len());
        let line = 1 + source.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Self::new(Arc::clone(file), line)
    }

    /// The rule file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The 1-based line.
    pub fn line(&self) -> usize {
        self.line
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Why a set of rule files was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// A rule file or directory could not be read (including: the path does not exist).
    #[error("{}: cannot read rule files: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, a missing key or a value of the wrong
    /// type. `message` comes from the TOML parser and names the offending key where it can.
    #[error("{at}: {}{message}", key.as_deref().map(|k| format!("`{k}`: ")).unwrap_or_default())]
    Syntax {
        /// Where.
        at: Location,
        /// The key on that line, when one can be identified.
        key: Option<String>,
        /// The parser's description.
        message: String,
    },
    /// A table or column name is not a valid identifier.
    #[error("{at}: `{key}`: invalid name {name:?}: {source}")]
    InvalidName {
        /// Where.
        at: Location,
        /// The key, e.g. `table[0].encrypt[1].name`.
        key: String,
        /// The name as written.
        name: String,
        /// What is wrong with it.
        #[source]
        source: NameError,
    },
    /// A stable column `id` is empty or has leading or trailing whitespace.
    #[error(
        "{at}: `{key}`: stable id {id:?} must be non-empty and not start or end with whitespace"
    )]
    InvalidStableId {
        /// Where.
        at: Location,
        /// The key, e.g. `table[0].encrypt[0].id`.
        key: String,
        /// The id as written.
        id: String,
    },
    /// `mode = "deterministic"` is reserved for equality search and not implemented.
    #[error("{at}: `{key}`: mode \"deterministic\" for column {column} is not supported yet")]
    DeterministicNotSupported {
        /// Where.
        at: Location,
        /// The key, e.g. `table[0].encrypt[0].mode`.
        key: String,
        /// Qualified column name.
        column: String,
    },
    /// A table lists no column to encrypt.
    #[error("{at}: `{key}`: table {table} must list at least one column to encrypt")]
    NoColumns {
        /// Where.
        at: Location,
        /// The key, e.g. `table[0].encrypt`.
        key: String,
        /// Qualified table name.
        table: String,
    },
    /// The same table has two `[[table]]` entries (in one file or across files).
    #[error("{at}: `{key}`: table {table} is already defined at {first}")]
    DuplicateTable {
        /// Where the second definition is.
        at: Location,
        /// The key, e.g. `table[3].name`.
        key: String,
        /// Qualified table name.
        table: String,
        /// Where the first definition is.
        first: Location,
    },
    /// A column is listed twice in one table's `encrypt`.
    #[error("{at}: `{key}`: column {column} is listed twice (first at {first})")]
    DuplicateColumn {
        /// Where the second entry is.
        at: Location,
        /// The key, e.g. `table[0].encrypt[2]`.
        key: String,
        /// Qualified column name.
        column: String,
        /// Where the first entry is.
        first: Location,
    },
    /// The tenant column is also listed for encryption; the proxy must read it in plaintext.
    #[error("{at}: `{key}`: tenant column {column} cannot also be encrypted")]
    TenantColumnEncrypted {
        /// Where the encrypted entry is.
        at: Location,
        /// The key, e.g. `table[0].encrypt[0]`.
        key: String,
        /// Qualified column name.
        column: String,
    },
    /// The row key is also listed for encryption; the proxy must read it in plaintext.
    #[error("{at}: `{key}`: row key {column} cannot also be encrypted")]
    RowKeyEncrypted {
        /// Where the encrypted entry is.
        at: Location,
        /// The key, e.g. `table[0].encrypt[0]`.
        key: String,
        /// Qualified column name.
        column: String,
    },
    /// Two columns have the same [`ColumnId`] (a SHA-256 prefix collision, or the same stable
    /// id given twice); values of one would be accepted as the other's.
    #[error("{at}: `{key}`: column {column} has column id {id}, which {other} at {other_at} already has; give one of them a distinct stable `id`")]
    ColumnIdCollision {
        /// Where the second column is.
        at: Location,
        /// The key, e.g. `table[1].encrypt[0]`.
        key: String,
        /// Qualified name of the second column.
        column: String,
        /// The shared id.
        id: ColumnId,
        /// Qualified name of the first column.
        other: String,
        /// Where the first column is.
        other_at: Location,
    },
}
