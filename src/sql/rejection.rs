//! Why a SQL text is refused: [`Rejection`] and its typed [`RejectionKind`].
//!
//! The analyser records what it refused and the names involved (columns, tables, parameter
//! numbers, operators), never prose; [`Rejection::message`] renders the text the client sees
//! (SQLSTATE 0A000). Pure: no I/O. A rejection never holds a data value, only names from the
//! statement and the rules.
//!
//! The analysis passes return a bare [`RejectionKind`]; the [`Rejection`] is built from it once,
//! through `From<RejectionKind>`, which sets [`Rejection::column`] to the encrypted column the
//! kind names ([`RejectionKind::encrypted_column`]).

use std::fmt;

use sqlparser::ast::{BinaryOperator, SetOperator, UnaryOperator};

use super::{ColumnRef, TableName, TENANT_SETTING};

/// Why a SQL text is refused. Sent to the client with SQLSTATE 0A000.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The encrypted column concerned, when there is one. Invariant: the one `kind` names.
    pub column: Option<ColumnRef>,
    /// What was refused.
    pub kind: RejectionKind,
}

/// What the analyser refused. Every variant carries the names it concerns, never a data value.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// The text does not parse (as a whole, nor piece by piece) and may touch a protected table.
    Unparsable,
    /// A string literal continued over several lines could not be joined into one literal (a
    /// continuation of `E''` holding an escaped quote).
    UnjoinableContinuation,
    /// A plain `'…'` literal holds a backslash while `standard_conforming_strings` is off or may
    /// be changing: PostgreSQL may split the text otherwise (see [`super::lexing_refusal`]).
    LexingUncertain,
    /// A statement or construct the analyser does not model, on a protected table.
    Unanalysable(Construct),
    /// A statement PostgreSQL does not accept either.
    Invalid(InvalidStatement),
    /// An unqualified write target names protected tables in several schemas.
    AmbiguousTable {
        /// The unqualified table name.
        name: String,
    },
    /// An operation that compares, orders or looks inside an encrypted value.
    Read {
        /// The encrypted column read.
        column: ColumnRef,
        /// The operation.
        op: ReadOp,
    },
    /// A write form that cannot seal the values of an encrypted column.
    Write {
        /// The encrypted column written.
        column: ColumnRef,
        /// The write form.
        op: WriteOp,
    },
    /// A value other than a string literal, a parameter, NULL or DEFAULT is written to an
    /// encrypted column (PostgreSQL would compute the stored value from plaintext).
    UnsupportedValue {
        /// The encrypted column written.
        column: ColumnRef,
    },
    /// A `$n` that feeds an encrypted column is also used elsewhere in the text (or feeds it
    /// with another column or tenant).
    ParamReusedElsewhere {
        /// 1-based parameter number.
        param: usize,
        /// The encrypted column it feeds.
        column: ColumnRef,
    },
    /// Two literals to seal overlap in the text.
    OverlappingLiteral {
        /// The column of the second literal.
        column: ColumnRef,
    },
    /// SQL-level `PREPARE` whose parameter feeds an encrypted column (EXECUTE binds it unseen).
    SqlPrepareParam {
        /// The encrypted column the parameter feeds.
        column: ColumnRef,
    },
    /// SQL-level `PREPARE` of a literal sealed for the session tenant of now; EXECUTE may run
    /// under another tenant.
    SqlPrepareSessionSealed {
        /// The encrypted column the literal is written to.
        column: ColumnRef,
    },
    /// SQL-level `EXECUTE` with arguments: they may feed encrypted columns.
    ExecuteWithArguments,
    /// The tenant setting changed in a form the proxy does not follow.
    TenantSetting(TenantSettingUse),
    /// The tenant column of a protected table is given in a form that does not say whose row
    /// the sealed values belong to.
    TenantColumn {
        /// The tenant column (not encrypted).
        column: ColumnRef,
        /// What is wrong with it.
        problem: TenantColumnUse,
    },
    /// ON CONFLICT DO UPDATE writing encrypted columns over VALUES rows of several tenants.
    OnConflictMixedTenants,
    /// ON CONFLICT DO UPDATE writing encrypted columns may update another organisation's row:
    /// the tenant is not in the conflict target nor pinned to `EXCLUDED`, or is reassigned.
    OnConflictOtherTenant {
        /// The tenant column of the target table.
        tenant_column: ColumnRef,
        /// The name the target table is visible under (alias or table name).
        target: String,
    },
    /// A value of a row-bound column is sealed but the statement does not give the row key.
    RowKeyMissing {
        /// The encrypted column written.
        column: ColumnRef,
        /// The row-key column of the same table.
        row_key: String,
    },
    /// RETURNING a row-bound column without its row key in the same list.
    RowKeyNotReturned {
        /// The encrypted column returned.
        column: ColumnRef,
        /// The row-key column of the same table.
        row_key: String,
    },
    /// An UPDATE assigns the row key of a row-bound table (its values are bound to it).
    RowKeyChanged {
        /// The row-key column.
        row_key: ColumnRef,
    },
    /// ON CONFLICT DO UPDATE of a row-bound table without the row key in the conflict target.
    OnConflictOtherRowKey {
        /// The row-key column.
        row_key: ColumnRef,
        /// The name the target table is visible under (alias or table name).
        target: String,
    },
    /// DDL on a protected table that must be run directly against PostgreSQL.
    TableDdl(TableDdlOp),
    /// DDL that would rename, retype, default or drop an encrypted column.
    ColumnDdl {
        /// The encrypted column.
        column: ColumnRef,
        /// The operation.
        op: ColumnDdlOp,
    },
    /// A COPY of a protected table that the proxy cannot transform.
    Copy(CopyRefusal),
}

/// A statement or construct the analyser does not model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Construct {
    /// A statement kind the analyser does not know (functions, procedures, triggers, rules,
    /// views, MERGE, DO blocks) that mentions a protected table.
    Statement,
    /// A query body other than SELECT, VALUES, TABLE, set operations and DML.
    QueryForm,
    /// A join operator other than the inner, outer, cross, semi and anti joins.
    JoinForm,
    /// An UPDATE whose target is not a plain table.
    UpdateForm,
    /// An expression the analyser does not model, mentioning a protected table or an
    /// encrypted column name it cannot resolve.
    Expression,
    /// Column aliases (`AS t(a, b)`) on a protected table.
    ColumnAliases,
    /// INSERT into a table function.
    InsertIntoTableFunction,
    /// CALL with arguments that mentions a protected table.
    CallWithArguments,
    /// `BEGIN … END` blocks.
    BeginEndBlock,
    /// Sequelize's `findOrCreate` function on a table that binds values to their row.
    RowBoundInsertFunction,
}

/// A statement PostgreSQL does not accept either (other dialects' syntax, or inconsistent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidStatement {
    /// `INSERT … SET` (MySQL).
    InsertSet,
    /// `ON DUPLICATE KEY UPDATE` (MySQL).
    OnDuplicateKeyUpdate,
    /// `UPDATE … JOIN` (MySQL; PostgreSQL uses FROM).
    UpdateJoin,
    /// An INSERT VALUES row with another number of values than columns.
    InsertValueCount,
}

/// An operation that reads an encrypted value in a way only plaintext allows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadOp {
    /// A set operation that removes duplicates (`UNION`, `INTERSECT`, `EXCEPT` without ALL).
    SetOperation(SetOperator),
    /// `ORDER BY`.
    OrderBy,
    /// `ORDER BY ALL`.
    OrderByAll,
    /// `GROUP BY`.
    GroupBy,
    /// `GROUP BY ALL`.
    GroupByAll,
    /// `SELECT DISTINCT`.
    SelectDistinct,
    /// `SELECT DISTINCT ON (…)`.
    DistinctOn,
    /// A projection with several aliases.
    MultiAliasProjection,
    /// Field access (`(expr).*`).
    FieldAccess,
    /// `JOIN … USING (…)`.
    JoinUsing,
    /// `NATURAL JOIN`.
    NaturalJoin,
    /// A cast to a type other than an unbounded text type.
    NonTextCast,
    /// `COLLATE`.
    Collate,
    /// `IN (list)`.
    In,
    /// `IN (subquery)` over the subquery's output.
    InSubquery,
    /// A binary operator.
    BinaryOperator(BinaryOperator),
    /// A unary operator.
    UnaryOperator(UnaryOperator),
    /// `IS [NOT] DISTINCT FROM`.
    IsDistinctFrom,
    /// `LIKE`, `ILIKE`, `SIMILAR TO`.
    PatternMatching,
    /// `op ANY (…)`, `op ALL (…)`.
    AnyAll,
    /// `BETWEEN`.
    Between,
    /// `IS [NOT] TRUE | FALSE | UNKNOWN`.
    BooleanTest,
    /// `CASE`.
    Case,
    /// Row or array constructor.
    RowOrArray,
    /// An expression the analyser does not model, naming the column.
    UnmodelledExpression,
    /// Window `PARTITION BY`.
    WindowPartitionBy,
    /// Window `ORDER BY`.
    WindowOrderBy,
    /// `WITHIN GROUP (ORDER BY …)`.
    WithinGroup,
    /// A comparison over a searchable column in a form that cannot be searched (see
    /// `sql::search`): a range, a function, a value that is not a literal or parameter, or
    /// case folding on an `equality` column.
    SearchForm,
    /// A comparison over a case-insensitive searchable column that does not fold case on both
    /// sides with the same function (`lower(col) = lower($1)`, `upper(col) = upper($1)`).
    SearchFormCi,
    /// A function call.
    Function {
        /// The function name as PostgreSQL stores it (without schema).
        name: String,
    },
    /// An aggregate over distinct values (`f(DISTINCT …)`).
    DistinctAggregate {
        /// The function name as PostgreSQL stores it (without schema).
        name: String,
    },
    /// Column aliases over a `*` whose positions are unknown.
    ColumnAliasesOverWildcard,
}

/// A write form that cannot seal the values of an encrypted column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOp {
    /// INSERT without a column list into a table with encrypted columns.
    InsertWithoutColumnList,
    /// `INSERT … SELECT` (or a query other than VALUES) into an encrypted column.
    InsertFromQuery,
    /// An encrypted column in the ON CONFLICT target.
    OnConflictTarget,
    /// Multi-column `SET (…) = (…)` including an encrypted column.
    MultiColumnSet,
    /// An UPDATE moving a row to another organisation without a new value for every encrypted
    /// column.
    MoveWithoutNewValue,
}

/// A change of the tenant setting in a form the proxy does not follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantSettingUse {
    /// A statement other than SET, RESET or `SELECT set_config(…)` mentions the setting.
    OtherStatement,
    /// `SET pgenvelope.tenant` with several values.
    SetValueCount,
    /// `SET pgenvelope.tenant` with a value that is not a literal.
    SetNotLiteral,
    /// A SET form other than a single assignment mentions the setting.
    OtherSetForm,
    /// `set_config` of the setting elsewhere than as a top-level SELECT item, or with a setting
    /// name that is not a literal.
    SetConfigPlacement,
    /// `set_config` of the setting with a value that is not a literal or parameter, or an
    /// `is_local` that is not a literal.
    SetConfigArguments,
}

/// What is wrong with the tenant column of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantColumnUse {
    /// An INSERT gives it as an expression while writing encrypted columns.
    InsertedExpression,
    /// An UPDATE assigns it an expression while writing encrypted columns.
    AssignedExpression,
    /// A multi-column `SET (…) = (…)` assigns it.
    MultiColumnSet,
    /// An UPDATE writing encrypted columns does not pin it in its WHERE clause.
    NotPinned,
}

/// DDL on a protected table that must be run directly against PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableDdlOp {
    /// Renaming, INHERIT or ATTACH PARTITION involving a protected table.
    RenameOrAttach,
    /// Renaming the tenant column.
    RenameTenantColumn,
    /// Dropping a `pgenvelope_enc_*` guard constraint.
    DropGuard,
    /// Renaming a `pgenvelope_enc_*` guard constraint.
    RenameGuard,
    /// An ALTER TABLE operation the analyser does not know.
    UnknownAlterTable,
    /// CREATE TABLE … INHERITS / PARTITION OF a protected table (the new table is not
    /// protected itself).
    InheritsProtected,
}

/// DDL on an encrypted column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ColumnDdlOp {
    /// Adding a column named like an encrypted one with a default, a generation expression or
    /// a domain type (it would hold values no one sealed).
    AddNamedLike,
    /// Dropping it.
    Drop,
    /// Renaming it, or another column to its name.
    Rename,
    /// Changing its type to anything but `text` or `varchar` (`char(n)` pads; a `USING`
    /// expression may rewrite the values).
    ChangeType,
    /// CHANGE / MODIFY COLUMN.
    Change,
    /// `SET DEFAULT` (the default would be stored as plaintext).
    SetDefault,
    /// CREATE TABLE with a default, generation expression or domain type on it.
    DefaultOrDomain,
}

/// A COPY the proxy cannot transform.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyRefusal {
    /// A `FORMAT` other than text, csv and binary.
    UnknownFormat,
    /// A legacy COPY option the analyser does not know.
    UnsupportedOption,
    /// COPY FROM a file or program into a protected table.
    FromFileOrProgram {
        /// The protected table.
        table: TableName,
    },
    /// COPY of a protected table in binary format.
    Binary {
        /// The protected table.
        table: TableName,
    },
    /// COPY with FORCE_NULL or FORCE_NOT_NULL on a protected table.
    ForceNull {
        /// The protected table.
        table: TableName,
    },
    /// `COPY (query) TO STDOUT` in binary format over a protected table.
    QueryBinary,
    /// Statements after `COPY … FROM STDIN` in the same query text.
    StatementsAfterData,
}

impl Rejection {
    /// What was refused and why, as the client reads it after the proxy's `pgenvelope: `
    /// prefix (added where client errors are built): names the column or table concerned,
    /// never contains data values.
    pub fn reason(&self) -> String {
        use RejectionKind as K;
        const DIRECTLY: &str = "run such DDL directly against PostgreSQL";
        const REENCRYPT: &str = "is not supported through the proxy; run such DDL directly \
            against PostgreSQL, then run `pgenvelope reencrypt`";
        let body = match &self.kind {
            K::Unparsable => "statement could not be parsed; statements that may touch \
                encrypted columns must be analysable"
                .to_owned(),
            K::UnjoinableContinuation => "a string literal continued over several lines could \
                not be analysed (a continuation of E'' holding an escaped quote); write it as one \
                literal"
                .to_owned(),
            K::LexingUncertain => "a '...' string literal holds a backslash while \
                standard_conforming_strings is off or may be changing, so PostgreSQL may read \
                the statement differently; use E'...' strings or parameters"
                .to_owned(),
            K::Unanalysable(c) => match c {
                Construct::Statement => format!(
                    "this statement mentions a protected table and cannot be analysed \
                     (functions, procedures, triggers, rules, views, MERGE, DO blocks); {DIRECTLY}"
                ),
                Construct::QueryForm => {
                    "this statement form cannot be analysed on a protected table".to_owned()
                }
                Construct::JoinForm => {
                    "this join form cannot be analysed on a protected table".to_owned()
                }
                Construct::UpdateForm => {
                    "this UPDATE form cannot be analysed on a protected table".to_owned()
                }
                Construct::Expression => "expression over a protected table or encrypted column \
                    cannot be analysed"
                    .to_owned(),
                Construct::ColumnAliases => {
                    "column aliases on a protected table are not supported".to_owned()
                }
                Construct::InsertIntoTableFunction => {
                    "INSERT into a table function is not supported".to_owned()
                }
                Construct::CallWithArguments => {
                    "CALL with arguments that mentions a protected table is not supported"
                        .to_owned()
                }
                Construct::BeginEndBlock => "BEGIN … END blocks are not supported".to_owned(),
                Construct::RowBoundInsertFunction => "an INSERT wrapped in a function \
                    (Sequelize's findOrCreate) on a table that binds values to their row is not \
                    supported: its result carries no row key to open the values with; use \
                    findOne and create"
                    .to_owned(),
            },
            K::Invalid(i) => match i {
                InvalidStatement::InsertSet => "INSERT … SET is not PostgreSQL syntax",
                InvalidStatement::OnDuplicateKeyUpdate => {
                    "ON DUPLICATE KEY UPDATE is not PostgreSQL syntax"
                }
                InvalidStatement::UpdateJoin => {
                    "UPDATE with JOIN is not PostgreSQL syntax; use FROM"
                }
                InvalidStatement::InsertValueCount => {
                    "INSERT has a different number of values and columns"
                }
            }
            .to_owned(),
            K::AmbiguousTable { name } => format!(
                "several protected tables are named {name}; qualify the table name with its schema"
            ),
            K::Read { column, op } => format!("{op} encrypted column {column} is not supported"),
            K::Write { column, op } => format!("{op} encrypted column {column} is not supported"),
            K::UnsupportedValue { column } => format!(
                "only a string literal, a parameter, NULL or DEFAULT can be written to encrypted \
                 column {column}"
            ),
            K::ParamReusedElsewhere { param, column } => format!(
                "parameter ${param} feeds encrypted column {column} and is also used elsewhere; \
                 bind a separate parameter"
            ),
            K::OverlappingLiteral { column } => {
                format!("overlapping literal for encrypted column {column} is not supported")
            }
            K::SqlPrepareParam { column } => format!(
                "SQL-level PREPARE with a parameter feeding encrypted column {column} is not \
                 supported"
            ),
            K::SqlPrepareSessionSealed { column } => format!(
                "SQL-level PREPARE of a value sealed for the session tenant, written to \
                 encrypted column {column} is not supported"
            ),
            K::ExecuteWithArguments => "EXECUTE with arguments is not supported: its parameters \
                may feed encrypted columns; use the extended protocol"
                .to_owned(),
            K::TenantSetting(t) => match t {
                TenantSettingUse::OtherStatement => format!(
                    "{TENANT_SETTING} can only be changed with SET, RESET or SELECT set_config(…)"
                ),
                TenantSettingUse::SetValueCount => {
                    format!("SET {TENANT_SETTING} takes exactly one value")
                }
                TenantSettingUse::SetNotLiteral => {
                    format!("SET {TENANT_SETTING} needs a literal value")
                }
                TenantSettingUse::OtherSetForm => {
                    format!("set {TENANT_SETTING} with a single SET statement")
                }
                TenantSettingUse::SetConfigPlacement => format!(
                    "set_config({TENANT_SETTING}, …) is only supported as a top-level SELECT item \
                     with a literal setting name"
                ),
                TenantSettingUse::SetConfigArguments => format!(
                    "set_config('{TENANT_SETTING}', …) needs a literal or parameter value and a \
                     literal is_local"
                ),
            },
            K::TenantColumn { column, problem } => match problem {
                TenantColumnUse::InsertedExpression => format!(
                    "the tenant column {column} must be a literal or a parameter when encrypted \
                     columns are written"
                ),
                TenantColumnUse::AssignedExpression => format!(
                    "the tenant column {column} must be set to a literal or a parameter when \
                     encrypted columns are written"
                ),
                TenantColumnUse::MultiColumnSet => {
                    format!("multi-column SET of the tenant column {column} is not supported")
                }
                TenantColumnUse::NotPinned => format!(
                    "an UPDATE writing encrypted columns of {}.{} must name the row's \
                     organisation: add `AND {} = …` to its WHERE clause",
                    column.schema, column.table, column.column
                ),
            },
            K::OnConflictMixedTenants => "ON CONFLICT DO UPDATE writing encrypted columns needs \
                all rows to have the same tenant"
                .to_owned(),
            K::OnConflictOtherTenant {
                tenant_column: c,
                target,
            } => format!(
                "ON CONFLICT DO UPDATE writing encrypted columns of {}.{} may update another \
                 organisation's row: include {tc} in the conflict target or add \
                 `WHERE {target}.{tc} = EXCLUDED.{tc}`, and do not reassign {tc}",
                c.schema,
                c.table,
                tc = c.column
            ),
            K::RowKeyMissing { column, row_key: k } => format!(
                "values of {column} are bound to their row: the statement must give the row key \
                 {k} (a literal or parameter in the INSERT, or `AND {k} = …` in the WHERE clause \
                 of an UPDATE)"
            ),
            K::RowKeyNotReturned { column, row_key } => format!(
                "values of {column} are bound to their row: RETURNING them needs the row key \
                 {row_key} in the same RETURNING list"
            ),
            K::RowKeyChanged { row_key: k } => format!(
                "changing the row key {} of {}.{} would leave the row's encrypted values \
                 unreadable (they are bound to it): insert the row under the new key instead",
                k.column, k.schema, k.table
            ),
            K::OnConflictOtherRowKey { row_key: k, target } => format!(
                "ON CONFLICT DO UPDATE writing encrypted columns of {}.{} (bound to their row) \
                 needs the row key {key} in the conflict target: ON CONFLICT ({key}) … (target \
                 {target})",
                k.schema,
                k.table,
                key = k.column
            ),
            K::TableDdl(op) => match op {
                TableDdlOp::RenameOrAttach => format!(
                    "renaming, INHERIT or ATTACH PARTITION involving a protected table {REENCRYPT}"
                ),
                TableDdlOp::RenameTenantColumn => {
                    format!("renaming the tenant column of a protected table {REENCRYPT}")
                }
                TableDdlOp::DropGuard => {
                    format!("dropping a pgenvelope_enc_* guard constraint {REENCRYPT}")
                }
                TableDdlOp::RenameGuard => {
                    format!("renaming a pgenvelope_enc_* guard constraint {REENCRYPT}")
                }
                TableDdlOp::UnknownAlterTable => {
                    format!("this ALTER TABLE operation on a protected table {REENCRYPT}")
                }
                TableDdlOp::InheritsProtected => format!(
                    "a table inheriting from, or a partition of, a protected table is not \
                     protected itself; {DIRECTLY} and list the new table in the rules"
                ),
            },
            K::ColumnDdl { column, op } => match op {
                ColumnDdlOp::AddNamedLike => {
                    format!(
                        "adding encrypted column {column} with a default, a generation expression or a domain type {REENCRYPT}"
                    )
                }
                ColumnDdlOp::Drop => format!("dropping encrypted column {column} {REENCRYPT}"),
                ColumnDdlOp::Rename => {
                    format!("renaming to or from encrypted column {column} {REENCRYPT}")
                }
                ColumnDdlOp::ChangeType => {
                    format!(
                        "changing the type of encrypted column {column} to anything but text or varchar, or with a USING expression, {REENCRYPT}"
                    )
                }
                ColumnDdlOp::Change => format!("changing encrypted column {column} {REENCRYPT}"),
                ColumnDdlOp::DefaultOrDomain => format!(
                    "a default, generation expression or domain type on encrypted column \
                     {column} {REENCRYPT}"
                ),
                ColumnDdlOp::SetDefault => format!(
                    "a column default on encrypted column {column} would be stored as \
                     plaintext; {DIRECTLY}"
                ),
            },
            K::Copy(c) => match c {
                CopyRefusal::UnknownFormat => "unknown COPY format".to_owned(),
                CopyRefusal::UnsupportedOption => "unsupported COPY option".to_owned(),
                CopyRefusal::FromFileOrProgram { table } => format!(
                    "COPY FROM a file or program into protected table {table} is not supported; \
                     use COPY FROM STDIN"
                ),
                CopyRefusal::Binary { table } => format!(
                    "COPY in BINARY format of protected table {table} is not supported; use text \
                     or csv"
                ),
                CopyRefusal::ForceNull { table } => format!(
                    "COPY with FORCE_NULL or FORCE_NOT_NULL on protected table {table} is not \
                     supported"
                ),
                CopyRefusal::QueryBinary => "COPY … TO STDOUT in BINARY format of a query over a \
                    protected table is not supported; use text or csv"
                    .to_owned(),
                CopyRefusal::StatementsAfterData => "statements after COPY … FROM STDIN in the \
                    same query are not supported"
                    .to_owned(),
            },
        };
        body
    }

    /// The whole message a client sees for this refusal (for tests of the analyser; the
    /// proxy adds the prefix itself).
    #[cfg(test)]
    pub(crate) fn message(&self) -> String {
        format!("pgenvelope: {}", self.reason())
    }
}

impl From<RejectionKind> for Rejection {
    fn from(kind: RejectionKind) -> Self {
        Rejection {
            column: kind.encrypted_column().cloned(),
            kind,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

impl RejectionKind {
    /// The encrypted column this kind names, if any (tenant and row-key columns are not
    /// encrypted).
    pub fn encrypted_column(&self) -> Option<&ColumnRef> {
        use RejectionKind as K;
        match self {
            K::Read { column, .. }
            | K::Write { column, .. }
            | K::UnsupportedValue { column }
            | K::ParamReusedElsewhere { column, .. }
            | K::OverlappingLiteral { column }
            | K::SqlPrepareParam { column }
            | K::SqlPrepareSessionSealed { column }
            | K::RowKeyMissing { column, .. }
            | K::RowKeyNotReturned { column, .. }
            | K::ColumnDdl { column, .. } => Some(column),
            K::Unparsable
            | K::UnjoinableContinuation
            | K::LexingUncertain
            | K::Unanalysable(_)
            | K::Invalid(_)
            | K::AmbiguousTable { .. }
            | K::ExecuteWithArguments
            | K::TenantSetting(_)
            | K::TenantColumn { .. }
            | K::OnConflictMixedTenants
            | K::OnConflictOtherTenant { .. }
            | K::RowKeyChanged { .. }
            | K::OnConflictOtherRowKey { .. }
            | K::TableDdl(_)
            | K::Copy(_) => None,
        }
    }
}

/// The phrase put before "encrypted column …" in the message.
impl fmt::Display for ReadOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phrase = match self {
            ReadOp::SetOperation(op) => return write!(f, "{op} without ALL (compares rows) over"),
            ReadOp::BinaryOperator(op) => return write!(f, "operator {op} on"),
            ReadOp::UnaryOperator(op) => return write!(f, "operator {op} on"),
            ReadOp::Function { name } => return write!(f, "function {name} over"),
            ReadOp::DistinctAggregate { name } => return write!(f, "{name}(DISTINCT …) over"),
            ReadOp::OrderBy => "ORDER BY on",
            ReadOp::OrderByAll => "ORDER BY ALL over",
            ReadOp::GroupBy => "GROUP BY on",
            ReadOp::GroupByAll => "GROUP BY ALL over",
            ReadOp::SelectDistinct => "SELECT DISTINCT over",
            ReadOp::DistinctOn => "DISTINCT ON",
            ReadOp::MultiAliasProjection => "multi-alias projection of",
            ReadOp::FieldAccess => "field access on",
            ReadOp::JoinUsing => "JOIN … USING on",
            ReadOp::NaturalJoin => "NATURAL JOIN over",
            ReadOp::NonTextCast => "cast to a non-text type of",
            ReadOp::Collate => "COLLATE on",
            ReadOp::In => "IN on",
            ReadOp::InSubquery => "IN (subquery) over",
            ReadOp::IsDistinctFrom => "IS DISTINCT FROM on",
            ReadOp::PatternMatching => "pattern matching on",
            ReadOp::AnyAll => "ANY/ALL comparison on",
            ReadOp::Between => "BETWEEN on",
            ReadOp::BooleanTest => "boolean test on",
            ReadOp::Case => "CASE over",
            ReadOp::RowOrArray => "row or array constructor over",
            ReadOp::UnmodelledExpression => "this expression over",
            ReadOp::WindowPartitionBy => "window PARTITION BY on",
            ReadOp::WindowOrderBy => "window ORDER BY on",
            ReadOp::WithinGroup => "WITHIN GROUP ordering on",
            ReadOp::ColumnAliasesOverWildcard => "column aliases over * including",
            ReadOp::SearchForm => {
                "a comparison other than = / <> / IN / = ANY / IS [NOT] DISTINCT FROM with a \
                 literal, parameter or the same column (search = \"equality\") on searchable"
            }
            ReadOp::SearchFormCi => {
                "a comparison that does not fold case on both sides alike (write lower(col) = \
                 lower(…) or upper(col) = upper(…); search = \"equality-ci\") on searchable"
            }
        };
        f.write_str(phrase)
    }
}

/// The phrase put before "encrypted column …" in the message.
impl fmt::Display for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteOp::InsertWithoutColumnList => {
                "INSERT without a column list (name the columns) into a table with"
            }
            WriteOp::InsertFromQuery => "INSERT … SELECT (or a query other than VALUES) into",
            WriteOp::OnConflictTarget => "ON CONFLICT target on",
            WriteOp::MultiColumnSet => "multi-column SET (…) = (…) on",
            WriteOp::MoveWithoutNewValue => {
                "moving a row to another organisation without a new value for"
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn col(column: &str) -> ColumnRef {
        ColumnRef {
            schema: "public".to_owned(),
            table: "secrets".to_owned(),
            column: column.to_owned(),
        }
    }

    fn table() -> TableName {
        TableName {
            schema: "public".to_owned(),
            name: "secrets".to_owned(),
        }
    }

    /// One kind per variant, sub-variants included.
    fn every_kind() -> Vec<RejectionKind> {
        use RejectionKind as K;
        let mut out = vec![
            K::Unparsable,
            K::UnjoinableContinuation,
            K::LexingUncertain,
            K::AmbiguousTable {
                name: "secrets".to_owned(),
            },
            K::UnsupportedValue {
                column: col("value"),
            },
            K::ParamReusedElsewhere {
                param: 3,
                column: col("value"),
            },
            K::OverlappingLiteral {
                column: col("value"),
            },
            K::SqlPrepareParam {
                column: col("value"),
            },
            K::SqlPrepareSessionSealed {
                column: col("value"),
            },
            K::ExecuteWithArguments,
            K::OnConflictMixedTenants,
            K::OnConflictOtherTenant {
                tenant_column: col("org"),
                target: "s".to_owned(),
            },
            K::RowKeyMissing {
                column: col("value"),
                row_key: "id".to_owned(),
            },
            K::RowKeyNotReturned {
                column: col("value"),
                row_key: "id".to_owned(),
            },
            K::RowKeyChanged { row_key: col("id") },
            K::OnConflictOtherRowKey {
                row_key: col("id"),
                target: "s".to_owned(),
            },
        ];
        out.extend(
            [
                Construct::Statement,
                Construct::QueryForm,
                Construct::JoinForm,
                Construct::UpdateForm,
                Construct::Expression,
                Construct::ColumnAliases,
                Construct::InsertIntoTableFunction,
                Construct::CallWithArguments,
                Construct::BeginEndBlock,
                Construct::RowBoundInsertFunction,
            ]
            .map(K::Unanalysable),
        );
        out.extend(
            [
                InvalidStatement::InsertSet,
                InvalidStatement::OnDuplicateKeyUpdate,
                InvalidStatement::UpdateJoin,
                InvalidStatement::InsertValueCount,
            ]
            .map(K::Invalid),
        );
        let read_ops = [
            ReadOp::SetOperation(SetOperator::Union),
            ReadOp::SetOperation(SetOperator::Except),
            ReadOp::OrderBy,
            ReadOp::OrderByAll,
            ReadOp::GroupBy,
            ReadOp::GroupByAll,
            ReadOp::SelectDistinct,
            ReadOp::DistinctOn,
            ReadOp::MultiAliasProjection,
            ReadOp::FieldAccess,
            ReadOp::JoinUsing,
            ReadOp::NaturalJoin,
            ReadOp::NonTextCast,
            ReadOp::Collate,
            ReadOp::In,
            ReadOp::InSubquery,
            ReadOp::BinaryOperator(BinaryOperator::Eq),
            ReadOp::BinaryOperator(BinaryOperator::StringConcat),
            ReadOp::UnaryOperator(UnaryOperator::Minus),
            ReadOp::IsDistinctFrom,
            ReadOp::PatternMatching,
            ReadOp::AnyAll,
            ReadOp::Between,
            ReadOp::BooleanTest,
            ReadOp::Case,
            ReadOp::RowOrArray,
            ReadOp::UnmodelledExpression,
            ReadOp::WindowPartitionBy,
            ReadOp::WindowOrderBy,
            ReadOp::WithinGroup,
            ReadOp::Function {
                name: "upper".to_owned(),
            },
            ReadOp::DistinctAggregate {
                name: "count".to_owned(),
            },
            ReadOp::ColumnAliasesOverWildcard,
            ReadOp::SearchForm,
            ReadOp::SearchFormCi,
        ];
        out.extend(read_ops.map(|op| K::Read {
            column: col("value"),
            op,
        }));
        let write_ops = [
            WriteOp::InsertWithoutColumnList,
            WriteOp::InsertFromQuery,
            WriteOp::OnConflictTarget,
            WriteOp::MultiColumnSet,
            WriteOp::MoveWithoutNewValue,
        ];
        out.extend(write_ops.map(|op| K::Write {
            column: col("value"),
            op,
        }));
        out.extend(
            [
                TenantSettingUse::OtherStatement,
                TenantSettingUse::SetValueCount,
                TenantSettingUse::SetNotLiteral,
                TenantSettingUse::OtherSetForm,
                TenantSettingUse::SetConfigPlacement,
                TenantSettingUse::SetConfigArguments,
            ]
            .map(K::TenantSetting),
        );
        let tenant_problems = [
            TenantColumnUse::InsertedExpression,
            TenantColumnUse::AssignedExpression,
            TenantColumnUse::MultiColumnSet,
            TenantColumnUse::NotPinned,
        ];
        out.extend(tenant_problems.map(|problem| K::TenantColumn {
            column: col("org"),
            problem,
        }));
        out.extend(
            [
                TableDdlOp::RenameOrAttach,
                TableDdlOp::RenameTenantColumn,
                TableDdlOp::DropGuard,
                TableDdlOp::RenameGuard,
                TableDdlOp::UnknownAlterTable,
                TableDdlOp::InheritsProtected,
            ]
            .map(K::TableDdl),
        );
        let column_ops = [
            ColumnDdlOp::AddNamedLike,
            ColumnDdlOp::Drop,
            ColumnDdlOp::Rename,
            ColumnDdlOp::ChangeType,
            ColumnDdlOp::Change,
            ColumnDdlOp::SetDefault,
            ColumnDdlOp::DefaultOrDomain,
        ];
        out.extend(column_ops.map(|op| K::ColumnDdl {
            column: col("value"),
            op,
        }));
        out.extend(
            [
                CopyRefusal::UnknownFormat,
                CopyRefusal::UnsupportedOption,
                CopyRefusal::FromFileOrProgram { table: table() },
                CopyRefusal::Binary { table: table() },
                CopyRefusal::ForceNull { table: table() },
                CopyRefusal::QueryBinary,
                CopyRefusal::StatementsAfterData,
            ]
            .map(K::Copy),
        );
        out
    }

    /// The variant of `kind`, sub-variant included (`Read/OrderBy`). The match is exhaustive,
    /// so that a new variant cannot be added without a look at [`every_kind`].
    fn variant(kind: &RejectionKind) -> String {
        use RejectionKind as K;
        let sub = match kind {
            K::Unanalysable(c) => format!("{c:?}"),
            K::Invalid(i) => format!("{i:?}"),
            K::Read { op, .. } => format!("{op:?}"),
            K::Write { op, .. } => format!("{op:?}"),
            K::TenantSetting(t) => format!("{t:?}"),
            K::TenantColumn { problem, .. } => format!("{problem:?}"),
            K::TableDdl(op) => format!("{op:?}"),
            K::ColumnDdl { op, .. } => format!("{op:?}"),
            K::Copy(c) => format!("{c:?}"),
            K::Unparsable
            | K::UnjoinableContinuation
            | K::LexingUncertain
            | K::AmbiguousTable { .. }
            | K::UnsupportedValue { .. }
            | K::ParamReusedElsewhere { .. }
            | K::OverlappingLiteral { .. }
            | K::SqlPrepareParam { .. }
            | K::SqlPrepareSessionSealed { .. }
            | K::ExecuteWithArguments
            | K::OnConflictMixedTenants
            | K::OnConflictOtherTenant { .. }
            | K::RowKeyMissing { .. }
            | K::RowKeyNotReturned { .. }
            | K::RowKeyChanged { .. }
            | K::OnConflictOtherRowKey { .. } => String::new(),
        };
        let name = |debug: &str| {
            debug
                .split(['(', ' '])
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        format!("{}/{}", name(&format!("{kind:?}")), name(&sub))
    }

    #[test]
    fn every_kind_renders_a_plain_message() {
        let kinds = every_kind();
        let variants: BTreeSet<String> = kinds.iter().map(variant).collect();
        // The top-level variants without sub-variants, then every sub-variant of the others.
        assert_eq!(variants.len(), 16 + 10 + 4 + 33 + 5 + 6 + 4 + 6 + 7 + 7);
        for kind in kinds {
            let r = Rejection::from(kind);
            let m = r.message();
            assert!(m.starts_with("pgenvelope: "), "{m}");
            assert!(m.len() > "pgenvelope: ".len(), "{m}");
            assert!(!m.chars().any(char::is_control), "{m:?}");
            assert_eq!(r.to_string(), r.reason());
            if let Some(c) = &r.column {
                assert!(m.contains(&c.to_string()), "{m}");
            }
        }
    }

    #[test]
    fn the_column_is_the_encrypted_column_named() {
        let r = Rejection::from(RejectionKind::Read {
            column: col("value"),
            op: ReadOp::OrderBy,
        });
        assert_eq!(r.column, Some(col("value")));
        assert_eq!(
            r.message(),
            "pgenvelope: ORDER BY on encrypted column public.secrets.value is not supported"
        );
        let r = Rejection::from(RejectionKind::TenantColumn {
            column: col("org"),
            problem: TenantColumnUse::MultiColumnSet,
        });
        assert_eq!(r.column, None);
    }
}
