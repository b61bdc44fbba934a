//! Statement dispatch: parsing, SET/RESET, transaction control, COPY, DDL and the final checks.

use std::collections::HashMap;

use sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Expr, Ident,
    ObjectName, ObjectNamePart, Reset, Set, Statement, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::read::Frame;
use super::text::Positions;
use super::{
    might_touch, Analysis, ColumnDdlOp, Construct, CopyDirection, CopyFormat, CopyPlan,
    CopyRefusal, Protected, RejectionKind, StatementKind, TableDdlOp, TableName, TenantChange,
    TenantSettingUse, TenantSource, TxControl,
};

/// Result type of the analysis passes: the first refusal stops everything. Its
/// [`super::Rejection`] is built once, at the end.
pub(crate) type Res<T> = Result<T, RejectionKind>;

/// State of one [`super::analyze`] call.
pub(crate) struct Analyzer<'a> {
    pub(crate) protected: &'a Protected,
    pub(crate) pos: Positions<'a>,
    pub(crate) out: Analysis,
    /// How often each `$n` appears in the whole text.
    pub(crate) param_uses: HashMap<usize, usize>,
    /// Scope stack for column resolution (innermost last).
    pub(crate) frames: Vec<Frame>,
    /// CTE stack (innermost last).
    pub(crate) ctes: Vec<Vec<super::read::Cte>>,
    /// Whether the current expression is the top-level projection of a top-level SELECT (where
    /// `set_config('pgenvelope.tenant', …)` is understood).
    pub(crate) top_projection: bool,
    /// The text the parser reads, and the byte range of each top-level statement in it (empty
    /// when they could not be told apart: then no tenant pin can be placed).
    pub(crate) parsed: &'a str,
    pub(crate) pieces: Vec<std::ops::Range<usize>>,
    /// Index of the top-level statement being analysed.
    pub(crate) piece: usize,
    /// Functions defined earlier in the text that wrap one INSERT (Sequelize's
    /// `findOrCreate`, see `sequelize.rs`), by name.
    pub(crate) insert_functions: Vec<String>,
}

pub(crate) fn run(sql: &str, protected: &Protected) -> Analysis {
    let continued = super::text::continuations(sql);
    let (parsed, pos) = match &continued {
        Ok(Some(shadow)) => (
            shadow.text.as_str(),
            Positions::with_shadow(&shadow.text, sql, shadow.groups.clone()),
        ),
        _ => (sql, Positions::new(sql)),
    };
    let mut a = Analyzer {
        protected,
        pos,
        out: Analysis::default(),
        param_uses: HashMap::new(),
        frames: Vec::new(),
        ctes: Vec::new(),
        top_projection: false,
        parsed,
        pieces: Vec::new(),
        piece: 0,
        insert_functions: Vec::new(),
    };
    if continued.is_err() {
        if might_touch(sql, protected) {
            a.out.rejection = Some(RejectionKind::UnjoinableContinuation.into());
        }
        return a.out;
    }
    if let Err(r) = a.run(parsed) {
        a.out.rejection = Some(r.into());
    }
    a.out
}

impl<'a> Analyzer<'a> {
    fn run(&mut self, sql: &str) -> Res<()> {
        let dialect = PostgreSqlDialect {};
        let touch = might_touch(sql, self.protected);
        let tokens = match Tokenizer::new(&dialect, sql).tokenize() {
            Ok(t) => t,
            Err(_) if touch => return Err(RejectionKind::Unparsable),
            Err(_) => return Ok(()),
        };
        // Up to the first plain '…' literal holding a backslash, PostgreSQL splits the text
        // the same way under either standard_conforming_strings: the proxy decides per session.
        self.out.plain_backslash = tokens.iter().any(|t| {
            matches!(t, Token::SingleQuotedString(s) | Token::NationalStringLiteral(s) if s.contains('\\'))
        });
        for t in &tokens {
            if let Token::Placeholder(p) = t {
                if let Some(n) = param_number(p) {
                    *self.param_uses.entry(n).or_default() += 1;
                    self.out.max_param = self.out.max_param.max(n);
                }
            }
        }
        let statements = match Parser::new(&dialect)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements())
        {
            Ok(s) => s,
            Err(_) if touch => return self.run_pieces(sql),
            Err(_) => return Ok(()),
        };
        self.out.statement_count = statements.len();
        self.pieces = super::pins::statement_pieces(sql).unwrap_or_default();
        if self.pieces.len() != statements.len() {
            self.pieces.clear();
        }
        for (i, stmt) in statements.iter().enumerate() {
            self.piece = i;
            let kind = self.top_statement(stmt)?;
            self.out.kinds.push(kind);
        }
        self.finish()
    }

    /// One top-level statement of the text, noting a tenant change that follows a statement
    /// on a protected table.
    fn top_statement(&mut self, stmt: &Statement) -> Res<StatementKind> {
        let touched_before = self.out.touches_protected;
        let changes_before = self.out.tenant_changes.len();
        let kind = self.statement(stmt, true)?;
        if touched_before && self.out.tenant_changes.len() > changes_before {
            self.out.protected_before_tenant_change = true;
        }
        Ok(kind)
    }

    /// Fallback when the whole text does not parse: each `;`-separated piece is parsed on its
    /// own (with the rest of the text blanked out, so that positions stay those of `sql`). A
    /// piece that still does not parse is refused only if it could touch something protected
    /// (see [`Analyzer::unparsed`]); otherwise it is forwarded as is.
    fn run_pieces(&mut self, sql: &str) -> Res<()> {
        const MAX_PIECES: usize = 1000;
        let dialect = PostgreSqlDialect {};
        let tokens = Tokenizer::new(&dialect, sql)
            .tokenize_with_location()
            .map_err(|_| RejectionKind::Unparsable)?;
        // Offsets in `sql` itself (the parsed text, which `self.pos` maps to the original).
        let local = Positions::new(sql);
        let mut pieces = Vec::new();
        let mut start = 0;
        // A `;` inside parentheses (CREATE RULE … DO (…; …)) or a BEGIN ATOMIC body does not end
        // a statement: such texts are not split.
        let mut depth = 0usize;
        let mut previous_begin = false;
        for t in &tokens {
            match &t.token {
                Token::LParen => depth += 1,
                Token::RParen => depth = depth.saturating_sub(1),
                Token::Word(w) if w.quote_style.is_none() => {
                    if previous_begin && w.value.eq_ignore_ascii_case("atomic") {
                        return Err(RejectionKind::Unparsable);
                    }
                    previous_begin = w.value.eq_ignore_ascii_case("begin");
                    continue;
                }
                Token::Whitespace(_) => continue,
                _ => {}
            }
            previous_begin = false;
            if t.token == Token::SemiColon {
                if depth > 0 {
                    return Err(RejectionKind::Unparsable);
                }
                let end = local
                    .offset(t.span.start)
                    .ok_or(RejectionKind::Unparsable)?;
                pieces.push(start..end);
                start = end + 1;
            }
        }
        pieces.push(start..sql.len());
        if pieces.len() > MAX_PIECES {
            return Err(RejectionKind::Unparsable);
        }
        for range in pieces {
            let Some(piece) = sql.get(range.clone()) else {
                return Err(RejectionKind::Unparsable);
            };
            if piece.trim().is_empty() {
                continue;
            }
            let masked: String = sql
                .char_indices()
                .map(|(i, c)| {
                    if range.contains(&i) || c == '\n' {
                        c
                    } else {
                        ' '
                    }
                })
                .collect();
            match Parser::new(&dialect)
                .try_with_sql(&masked)
                .and_then(|mut p| p.parse_statements())
            {
                Ok(statements) => {
                    self.pieces = if statements.len() == 1 {
                        vec![range.clone()]
                    } else {
                        Vec::new()
                    };
                    for stmt in &statements {
                        self.piece = 0;
                        self.out.statement_count += 1;
                        let kind = self.top_statement(stmt)?;
                        self.out.kinds.push(kind);
                    }
                }
                Err(_) => {
                    self.out.statement_count += 1;
                    let kind = self.unparsed(piece).ok_or(RejectionKind::Unparsable)??;
                    self.out.kinds.push(kind);
                }
            }
        }
        self.finish()
    }

    /// A statement sqlparser cannot read. COPY with options it does not know is rewritten to a
    /// form it does; anything else is forwarded only when it names no protected table (in its
    /// words or in its string and dollar-quoted bodies) and no tenant machinery. `None`: refuse
    /// as unparsable.
    fn unparsed(&mut self, piece: &str) -> Option<Res<StatementKind>> {
        let lower = piece.to_lowercase();
        let first = lower.split_whitespace().next().unwrap_or_default();
        if first == "copy" {
            return self.copy_fallback(piece);
        }
        const TENANT: [&str; 5] = ["pgenvelope", "set_config", "u&\"", "discard", "reset"];
        if first == "execute" || TENANT.iter().any(|n| lower.contains(n)) {
            return None;
        }
        if self.mentions_protected(piece) {
            self.out.touches_protected = true;
            return None;
        }
        Some(Ok(StatementKind::Other))
    }

    /// COPY with PostgreSQL syntax sqlparser lacks: `HEADER off|0|no|false|on|1|yes|true|match`
    /// and a trailing `WHERE condition` (COPY FROM). The options are normalised; the condition is
    /// checked as the WHERE clause of a query over the table (so it cannot compare encrypted
    /// values).
    fn copy_fallback(&mut self, piece: &str) -> Option<Res<StatementKind>> {
        let dialect = PostgreSqlDialect {};
        let tokens = Tokenizer::new(&dialect, piece)
            .tokenize_with_location()
            .ok()?;
        let pos = Positions::new(piece);
        let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
        let mut where_at = None;
        let mut depth = 0usize;
        let significant: Vec<_> = tokens
            .iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .collect();
        for (i, t) in significant.iter().enumerate() {
            match &t.token {
                Token::LParen => depth += 1,
                Token::RParen => depth = depth.saturating_sub(1),
                Token::Word(w) if w.quote_style.is_none() => {
                    let v = w.value.to_ascii_lowercase();
                    if depth == 0 && v == "where" {
                        where_at = Some(pos.offset(t.span.start)?);
                        break;
                    }
                    let Some(next) = significant.get(i + 1) else {
                        continue;
                    };
                    if depth != 1 || v != "header" {
                        continue;
                    }
                    let value = match &next.token {
                        Token::Word(v) if v.quote_style.is_none() => v.value.to_ascii_lowercase(),
                        Token::Number(n, _) => n.clone(),
                        Token::SingleQuotedString(s) => s.to_ascii_lowercase(),
                        _ => continue,
                    };
                    let on = match value.as_str() {
                        "on" | "1" | "yes" | "true" | "match" => true,
                        "off" | "0" | "no" | "false" => false,
                        _ => continue,
                    };
                    let start = pos.offset(t.span.start)?;
                    let end = pos.offset(next.span.end)?;
                    edits.push((start..end, format!("HEADER {on}")));
                }
                _ => {}
            }
        }
        let head = piece.get(..where_at.unwrap_or(piece.len()))?;
        let copy_text = super::rewrite_literals(head, &edits).ok()?;
        let mut statements = Parser::new(&dialect)
            .try_with_sql(&copy_text)
            .and_then(|mut p| p.parse_statements())
            .ok()?;
        let (Some(stmt), None) = (statements.pop(), statements.pop()) else {
            return None;
        };
        let Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            payload,
        } = &stmt
        else {
            return None;
        };
        if payload.is_some() {
            return None;
        }
        if let Some(at) = where_at {
            let CopySource::Table { table_name, .. } = source else {
                return None;
            };
            let condition = piece.get(at + "where".len()..)?;
            let query = format!("SELECT 1 FROM {table_name} WHERE {condition}");
            let mut parsed = Parser::new(&dialect)
                .try_with_sql(&query)
                .and_then(|mut p| p.parse_statements())
                .ok()?;
            let (Some(Statement::Query(q)), None) = (parsed.pop(), parsed.pop()) else {
                return None;
            };
            if let Err(r) = self.query(&q) {
                return Some(Err(r));
            }
        }
        Some(
            self.copy(source, *to, target, options, legacy_options)
                .map(|()| StatementKind::Copy),
        )
    }

    /// Final cross-statement checks: parameter reuse, ordering of literal sites.
    fn finish(&mut self) -> Res<()> {
        let mut per_param: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, p) in self.out.params.iter().enumerate() {
            per_param.entry(p.index).or_default().push(i);
        }
        for (n, sites) in per_param {
            let first = &self.out.params[sites[0]];
            let uses = self.param_uses.get(&n).copied().unwrap_or(0);
            let consistent = sites.iter().all(|&i| {
                self.out.params[i].column == first.column
                    && self.out.params[i].tenant == first.tenant
            });
            if !consistent || uses != sites.len() {
                return Err(RejectionKind::ParamReusedElsewhere {
                    param: n,
                    column: first.column.clone(),
                });
            }
        }
        self.out.literals.sort_by_key(|l| l.range.start);
        for w in self.out.literals.windows(2) {
            if w[0].range.end > w[1].range.start {
                return Err(RejectionKind::OverlappingLiteral {
                    column: w[1].column.clone(),
                });
            }
        }
        Ok(())
    }

    /// Analyses one statement. `top` is false inside EXPLAIN / PREPARE.
    pub(crate) fn statement(&mut self, stmt: &Statement, top: bool) -> Res<StatementKind> {
        Ok(match stmt {
            Statement::Query(q) if top && self.sequelize_select(q) => {
                self.out.touches_protected = true;
                StatementKind::Query
            }
            Statement::CreateFunction(_) if top && self.mentions_protected(&stmt.to_string()) => {
                self.out.touches_protected = true;
                match self.sequelize_function() {
                    Some(kind) => kind?,
                    None => return Err(RejectionKind::Unanalysable(Construct::Statement)),
                }
            }
            Statement::Query(q) => {
                self.top_projection = top;
                let r = self.query(q);
                self.top_projection = false;
                r?;
                StatementKind::Query
            }
            Statement::Insert(i) => {
                self.insert(i)?;
                StatementKind::Insert
            }
            Statement::Update(u) => {
                self.update(u)?;
                StatementKind::Update
            }
            Statement::Delete(d) => {
                self.delete(d)?;
                StatementKind::Delete
            }
            Statement::Set(s) => {
                self.set(s)?;
                StatementKind::Set
            }
            Statement::Reset(r) => {
                let tenant = match &r.reset {
                    Reset::ALL => true,
                    Reset::ConfigurationParameter(name) => is_tenant_setting(name),
                    Reset::SessionAuthorization => false,
                };
                if tenant {
                    self.out
                        .tenant_changes
                        .push(TenantChange::Reset { local: false });
                }
                StatementKind::Set
            }
            Statement::Discard { object_type } => {
                if object_type.to_string().eq_ignore_ascii_case("ALL") {
                    self.out
                        .tenant_changes
                        .push(TenantChange::Reset { local: false });
                }
                StatementKind::Set
            }
            Statement::StartTransaction { statements, .. } => {
                if !statements.is_empty() {
                    return Err(RejectionKind::Unanalysable(Construct::BeginEndBlock));
                }
                self.out.tx_controls.push(TxControl::Begin);
                StatementKind::Transaction
            }
            Statement::Commit { chain, .. } => {
                self.out.tx_controls.push(TxControl::Commit);
                if *chain {
                    self.out.tx_controls.push(TxControl::Begin);
                }
                StatementKind::Transaction
            }
            Statement::Rollback { savepoint, chain } => {
                self.out.tx_controls.push(match savepoint {
                    Some(name) => TxControl::RollbackTo(fold(name)),
                    None => TxControl::Rollback,
                });
                if *chain && savepoint.is_none() {
                    self.out.tx_controls.push(TxControl::Begin);
                }
                StatementKind::Transaction
            }
            Statement::Savepoint { name } => {
                self.out.tx_controls.push(TxControl::Savepoint(fold(name)));
                StatementKind::Transaction
            }
            Statement::ReleaseSavepoint { name } => {
                self.out.tx_controls.push(TxControl::Release(fold(name)));
                StatementKind::Transaction
            }
            Statement::Copy {
                source,
                to,
                target,
                options,
                legacy_options,
                payload,
            } => {
                self.copy(source, *to, target, options, legacy_options)?;
                if payload.as_ref().is_some_and(|p| !p.data.trim().is_empty()) {
                    return Err(RejectionKind::Copy(CopyRefusal::StatementsAfterData));
                }
                StatementKind::Copy
            }
            Statement::Explain { statement, .. } => self.statement(statement, false)?,
            Statement::Prepare { statement, .. } => {
                let before = self.out.params.len();
                let literals_before = self.out.literals.len();
                self.statement(statement, false)?;
                if let Some(p) = self.out.params.get(before) {
                    return Err(RejectionKind::SqlPrepareParam {
                        column: p.column.clone(),
                    });
                }
                // Its literals are sealed now, for the session tenant of now; EXECUTE may come
                // under another one.
                let session_sealed = self.out.literals[literals_before..]
                    .iter()
                    .find(|l| l.tenant == TenantSource::Session);
                if let Some(l) = session_sealed {
                    return Err(RejectionKind::SqlPrepareSessionSealed {
                        column: l.column.clone(),
                    });
                }
                StatementKind::Other
            }
            Statement::Execute { parameters, .. } => {
                if !parameters.is_empty() {
                    return Err(RejectionKind::ExecuteWithArguments);
                }
                StatementKind::Other
            }
            Statement::Call(f) => {
                let has_args = !matches!(&f.args, sqlparser::ast::FunctionArguments::None)
                    && !f
                        .args
                        .to_string()
                        .trim_matches(|c| c == '(' || c == ')')
                        .trim()
                        .is_empty();
                if has_args && self.mentions_protected(&stmt.to_string()) {
                    return Err(RejectionKind::Unanalysable(Construct::CallWithArguments));
                }
                StatementKind::Other
            }
            Statement::Declare { stmts, .. } => {
                for d in stmts {
                    if let Some(q) = &d.for_query {
                        self.query(q)?;
                    }
                }
                StatementKind::Other
            }
            Statement::CreateTable(ct) => {
                self.note_mentions(&ct.name.to_string());
                self.create_protected_table(ct)?;
                let parents = ct.inherits.iter().flatten().chain(ct.partition_of.as_ref());
                for parent in parents {
                    if !self
                        .resolve_table(&name_parts(parent).unwrap_or_default())
                        .is_empty()
                    {
                        self.out.touches_protected = true;
                        return Err(RejectionKind::TableDdl(TableDdlOp::InheritsProtected));
                    }
                }
                if let Some(q) = &ct.query {
                    self.query(q)?;
                }
                StatementKind::Ddl
            }
            Statement::AlterTable(at) => {
                self.alter_table(at)?;
                StatementKind::Ddl
            }
            Statement::Drop { .. }
            | Statement::CreateIndex(_)
            | Statement::AlterIndex { .. }
            | Statement::Truncate(_)
            | Statement::Vacuum(_)
            | Statement::Analyze(_)
            | Statement::Grant(_)
            | Statement::Revoke(_)
            | Statement::Comment { .. }
            | Statement::CreateSchema { .. }
            | Statement::CreateSequence { .. }
            | Statement::CreateExtension(_)
            | Statement::DropExtension(_)
            | Statement::Lock(_) => {
                self.note_mentions(&stmt.to_string());
                StatementKind::Ddl
            }
            Statement::Fetch { .. }
            | Statement::Close { .. }
            | Statement::Deallocate { .. }
            | Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. }
            | Statement::NOTIFY { .. }
            | Statement::ShowVariable { .. } => StatementKind::Other,
            other => {
                let text = other.to_string();
                if self.mentions_protected(&text) {
                    self.out.touches_protected = true;
                    return Err(RejectionKind::Unanalysable(Construct::Statement));
                }
                if mentions_tenant(&text) {
                    return Err(RejectionKind::TenantSetting(
                        TenantSettingUse::OtherStatement,
                    ));
                }
                StatementKind::Other
            }
        })
    }

    fn note_mentions(&mut self, text: &str) {
        if self.mentions_protected(text) {
            self.out.touches_protected = true;
        }
    }

    /// Whether any word of `text` (tokenized as SQL) names a protected table.
    pub(crate) fn mentions_protected(&self, text: &str) -> bool {
        let dialect = PostgreSqlDialect {};
        let Ok(tokens) = Tokenizer::new(&dialect, text).tokenize() else {
            // Not SQL (sqlparser does not always print what it parsed back as valid SQL, e.g.
            // quoted identifiers holding `"`; string bodies may be prose): any occurrence of a
            // protected table's name counts.
            return self.contains_protected_name(text);
        };
        tokens.iter().any(|t| match t {
            Token::Word(w) => {
                let name = fold_word(&w.value, w.quote_style);
                !self.protected.indexes_by_name(&name).is_empty()
            }
            Token::DollarQuotedString(s) => self.mentions_protected(&s.value),
            Token::SingleQuotedString(s) | Token::EscapedStringLiteral(s) => {
                s.len() < text.len() && self.mentions_protected(s)
            }
            _ => false,
        })
    }

    /// Whether `text` contains a protected table's name anywhere (case-insensitive substring).
    fn contains_protected_name(&self, text: &str) -> bool {
        let lower = text.to_lowercase();
        self.protected
            .needles
            .iter()
            .any(|n| lower.contains(n.as_str()))
    }

    /// Whether any word of `text` names an encrypted column or a protected table.
    pub(crate) fn mentions_sensitive(&self, text: &str) -> bool {
        let dialect = PostgreSqlDialect {};
        let Ok(tokens) = Tokenizer::new(&dialect, text).tokenize() else {
            let lower = text.to_lowercase();
            return self.contains_protected_name(text)
                || self
                    .protected
                    .encrypted_names
                    .iter()
                    .any(|c| lower.contains(&c.to_lowercase()));
        };
        tokens.iter().any(|t| match t {
            Token::Word(w) => {
                let name = fold_word(&w.value, w.quote_style);
                self.protected.is_encrypted_name(&name)
                    || !self.protected.indexes_by_name(&name).is_empty()
            }
            _ => false,
        })
    }

    /// ALTER TABLE on a protected table is allowed when it leaves the encrypted columns, their
    /// guards and the table's name alone. Refused (run it directly, then `pgenvelope
    /// reencrypt`): renaming the table, or renaming a table to a protected name; renaming an
    /// encrypted or tenant column, or renaming a column to an encrypted name; adding a column
    /// named like an encrypted one (its type may be a domain with a default); dropping an
    /// encrypted column; a default, a new type (`USING`, `varchar(n)` truncation) or generation
    /// on an encrypted column; dropping or renaming a `pgenvelope_enc_*` guard; INHERIT and
    /// ATTACH PARTITION involving a protected table; and any operation the analyser does not
    /// know.
    fn alter_table(&mut self, at: &sqlparser::ast::AlterTable) -> Res<()> {
        use sqlparser::ast::{AlterColumnOperation as Col, AlterTableOperation as Op};
        let parts = name_parts(&at.name).unwrap_or_default();
        let idxs = self.resolve_table(&parts);
        let names_protected = |a: &Self, n: &ObjectName| {
            !a.resolve_table(&name_parts(n).unwrap_or_default())
                .is_empty()
        };
        for op in &at.operations {
            let other = match op {
                Op::RenameTable {
                    table_name:
                        sqlparser::ast::RenameTableNameKind::As(n)
                        | sqlparser::ast::RenameTableNameKind::To(n),
                } => n,
                Op::Inherit { parent: n } | Op::AttachPartitionOf { partition: n, .. } => n,
                _ => continue,
            };
            if !idxs.is_empty() || names_protected(self, other) {
                self.out.touches_protected = true;
                return Err(RejectionKind::TableDdl(TableDdlOp::RenameOrAttach));
            }
        }
        if idxs.is_empty() {
            return Ok(());
        }
        self.out.touches_protected = true;
        let enc = |a: &Self, c: &Ident| idxs.iter().find_map(|&i| a.enc_column(i, &fold(c)));
        let is_tenant = |a: &Self, c: &Ident| {
            let name = fold(c);
            idxs.iter().any(|&i| {
                a.protected
                    .table(i)
                    .is_some_and(|t| t.tenant_column.as_deref() == Some(name.as_str()))
            })
        };
        let is_guard = |n: &Ident| fold(n).starts_with("pgenvelope_enc_");
        let column_refusal =
            |column: super::ColumnRef, op: ColumnDdlOp| RejectionKind::ColumnDdl { column, op };
        for op in &at.operations {
            match op {
                Op::AddColumn { column_def, .. } => {
                    // A new encrypted column with no default and a built-in type starts out
                    // NULL in every row: nothing is written to it but through the proxy.
                    if let Some(c) = enc(self, &column_def.name) {
                        if !plain_column_def(column_def) {
                            return Err(column_refusal(c, ColumnDdlOp::AddNamedLike));
                        }
                    }
                }
                Op::DropColumn { column_names, .. } => {
                    if let Some(c) = column_names.iter().find_map(|n| enc(self, n)) {
                        return Err(column_refusal(c, ColumnDdlOp::Drop));
                    }
                }
                Op::RenameColumn {
                    old_column_name,
                    new_column_name,
                } => {
                    if let Some(c) =
                        enc(self, old_column_name).or_else(|| enc(self, new_column_name))
                    {
                        return Err(column_refusal(c, ColumnDdlOp::Rename));
                    }
                    if is_tenant(self, old_column_name) {
                        return Err(RejectionKind::TableDdl(TableDdlOp::RenameTenantColumn));
                    }
                }
                Op::AlterColumn { column_name, op } => {
                    if let Some(c) = enc(self, column_name) {
                        match op {
                            Col::SetNotNull | Col::DropNotNull | Col::DropDefault => {}
                            Col::SetDefault { .. } => {
                                return Err(column_refusal(c, ColumnDdlOp::SetDefault))
                            }
                            Col::SetDataType {
                                data_type, using, ..
                            } if widens_text(data_type, true)
                                && using.as_ref().is_none_or(|u| is_cast_of(u, column_name)) => {}
                            _ => return Err(column_refusal(c, ColumnDdlOp::ChangeType)),
                        }
                    }
                }
                Op::ChangeColumn { old_name: n, .. } | Op::ModifyColumn { col_name: n, .. } => {
                    if let Some(c) = enc(self, n) {
                        return Err(column_refusal(c, ColumnDdlOp::Change));
                    }
                }
                Op::DropConstraint { name, .. } => {
                    if is_guard(name) {
                        return Err(RejectionKind::TableDdl(TableDdlOp::DropGuard));
                    }
                }
                Op::RenameConstraint { old_name, new_name } => {
                    if is_guard(old_name) || is_guard(new_name) {
                        return Err(RejectionKind::TableDdl(TableDdlOp::RenameGuard));
                    }
                }
                Op::AddConstraint { .. }
                | Op::ValidateConstraint { .. }
                | Op::DisableRowLevelSecurity
                | Op::EnableRowLevelSecurity
                | Op::ForceRowLevelSecurity
                | Op::NoForceRowLevelSecurity
                | Op::DisableRule { .. }
                | Op::DisableTrigger { .. }
                | Op::EnableAlwaysRule { .. }
                | Op::EnableAlwaysTrigger { .. }
                | Op::EnableReplicaRule { .. }
                | Op::EnableReplicaTrigger { .. }
                | Op::EnableRule { .. }
                | Op::EnableTrigger { .. }
                | Op::ReplicaIdentity { .. }
                | Op::OwnerTo { .. }
                | Op::SetLogged
                | Op::SetUnlogged
                | Op::SetOptionsParens { .. }
                | Op::ResetOptions { .. }
                | Op::DetachPartitionOf { .. }
                | Op::NoInherit { .. } => {}
                _ => return Err(RejectionKind::TableDdl(TableDdlOp::UnknownAlterTable)),
            }
        }
        Ok(())
    }

    /// CREATE TABLE of a protected table: an encrypted column may not have a default or a
    /// generation expression (stored as plaintext by later INSERTs that omit it), nor a type
    /// other than a built-in one (a domain may carry a default).
    fn create_protected_table(&mut self, ct: &sqlparser::ast::CreateTable) -> Res<()> {
        let idxs = self.resolve_table(&name_parts(&ct.name).unwrap_or_default());
        if idxs.is_empty() {
            return Ok(());
        }
        self.out.touches_protected = true;
        for col in &ct.columns {
            let Some(c) = idxs
                .iter()
                .find_map(|&i| self.enc_column(i, &fold(&col.name)))
            else {
                continue;
            };
            if !plain_column_def(col) {
                return Err(RejectionKind::ColumnDdl {
                    column: c,
                    op: ColumnDdlOp::DefaultOrDomain,
                });
            }
        }
        Ok(())
    }

    /// The first word of `text` that resolves to an encrypted column in the current scopes.
    pub(crate) fn mentioned_encrypted(&self, text: &str) -> Option<super::ColumnRef> {
        let dialect = PostgreSqlDialect {};
        let tokens = Tokenizer::new(&dialect, text).tokenize().ok()?;
        tokens.iter().find_map(|t| match t {
            Token::Word(w) => self.resolve(&[fold_word(&w.value, w.quote_style)]),
            _ => None,
        })
    }

    fn set(&mut self, s: &Set) -> Res<()> {
        match s {
            Set::SingleAssignment {
                scope,
                variable,
                values,
                ..
            } => {
                if !is_tenant_setting(variable) {
                    return Ok(());
                }
                let local = matches!(scope, Some(sqlparser::ast::ContextModifier::Local));
                let [value] = values.as_slice() else {
                    return Err(RejectionKind::TenantSetting(
                        TenantSettingUse::SetValueCount,
                    ));
                };
                let change = match value {
                    Expr::Identifier(id)
                        if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") =>
                    {
                        TenantChange::Reset { local }
                    }
                    Expr::Identifier(id) => TenantChange::Set {
                        value: fold(id),
                        local,
                    },
                    other => match self.literal_text(other) {
                        Some(value) => TenantChange::Set { value, local },
                        None => {
                            return Err(RejectionKind::TenantSetting(
                                TenantSettingUse::SetNotLiteral,
                            ))
                        }
                    },
                };
                self.out.tenant_changes.push(change);
                Ok(())
            }
            other => {
                if mentions_tenant(&other.to_string()) {
                    return Err(RejectionKind::TenantSetting(TenantSettingUse::OtherSetForm));
                }
                Ok(())
            }
        }
    }

    /// The text of a string or number literal, as PostgreSQL reads it.
    pub(crate) fn literal_text(&self, e: &Expr) -> Option<String> {
        match e {
            Expr::Nested(inner) => self.literal_text(inner),
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(n.clone()),
                Value::SingleQuotedString(_)
                | Value::EscapedStringLiteral(_)
                | Value::UnicodeStringLiteral(_)
                | Value::NationalStringLiteral(_)
                | Value::DollarQuotedString(_) => {
                    let range = self.pos.range(v.span)?;
                    super::text::decode_literal(self.pos.slice(range)?)
                }
                _ => None,
            },
            Expr::UnaryOp {
                op: sqlparser::ast::UnaryOperator::Minus,
                expr,
            } => match expr.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => Some(format!("-{n}")),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        }
    }

    fn copy(
        &mut self,
        source: &CopySource,
        to: bool,
        target: &CopyTarget,
        options: &[CopyOption],
        legacy: &[CopyLegacyOption],
    ) -> Res<()> {
        let mut plan = CopyPlan {
            table: None,
            columns: Vec::new(),
            direction: if to {
                CopyDirection::ToStdout
            } else {
                CopyDirection::FromStdin
            },
            format: CopyFormat::Text,
            delimiter: None,
            null: None,
            quote: None,
            escape: None,
            header: false,
            encoding: None,
        };
        // FORCE_NULL / FORCE_NOT_NULL change which fields are NULL in a way the proxy's row
        // codec does not model: refused on protected tables.
        let mut forces_nulls = false;
        for o in options {
            match o {
                CopyOption::Format(f) => {
                    plan.format = match fold(f).as_str() {
                        "text" => CopyFormat::Text,
                        "csv" => CopyFormat::Csv,
                        "binary" => CopyFormat::Binary,
                        _ => return Err(RejectionKind::Copy(CopyRefusal::UnknownFormat)),
                    }
                }
                CopyOption::Delimiter(c) => plan.delimiter = Some(*c),
                CopyOption::Null(s) => plan.null = Some(s.clone()),
                CopyOption::Header(h) => plan.header = *h,
                CopyOption::Quote(c) => plan.quote = Some(*c),
                CopyOption::Escape(c) => plan.escape = Some(*c),
                CopyOption::Encoding(e) => plan.encoding = Some(e.clone()),
                CopyOption::ForceNotNull(_) | CopyOption::ForceNull(_) => forces_nulls = true,
                CopyOption::Freeze(_) | CopyOption::ForceQuote(_) => {}
            }
        }
        for o in legacy {
            match o {
                CopyLegacyOption::Binary => plan.format = CopyFormat::Binary,
                CopyLegacyOption::Delimiter(c) => plan.delimiter = Some(*c),
                CopyLegacyOption::Null(s) => plan.null = Some(s.clone()),
                CopyLegacyOption::Header => plan.header = true,
                CopyLegacyOption::Csv(opts) => {
                    plan.format = CopyFormat::Csv;
                    for c in opts {
                        match c {
                            CopyLegacyCsvOption::Header => plan.header = true,
                            CopyLegacyCsvOption::Quote(q) => plan.quote = Some(*q),
                            CopyLegacyCsvOption::Escape(e) => plan.escape = Some(*e),
                            CopyLegacyCsvOption::ForceNotNull(_) => forces_nulls = true,
                            CopyLegacyCsvOption::ForceQuote(_) => {}
                        }
                    }
                }
                _ => return Err(RejectionKind::Copy(CopyRefusal::UnsupportedOption)),
            }
        }
        match source {
            CopySource::Table {
                table_name,
                columns,
            } => {
                let Some(idx) = self.write_target(table_name)? else {
                    return Ok(());
                };
                self.out.touches_protected = true;
                let Some(t) = self.protected.table(idx) else {
                    return Ok(());
                };
                let table = TableName {
                    schema: t.schema.clone(),
                    name: t.name.clone(),
                };
                if !to && !matches!(target, CopyTarget::Stdin) {
                    return Err(RejectionKind::Copy(CopyRefusal::FromFileOrProgram {
                        table,
                    }));
                }
                if plan.format == CopyFormat::Binary
                    && (matches!(target, CopyTarget::Stdin | CopyTarget::Stdout))
                {
                    return Err(RejectionKind::Copy(CopyRefusal::Binary { table }));
                }
                if !matches!(target, CopyTarget::Stdin | CopyTarget::Stdout) {
                    return Ok(());
                }
                if forces_nulls {
                    return Err(RejectionKind::Copy(CopyRefusal::ForceNull { table }));
                }
                plan.table = Some(table);
                plan.columns = columns.iter().map(fold).collect();
                self.out.copy = Some(plan);
                Ok(())
            }
            CopySource::Query(q) => {
                let before = self.out.touches_protected;
                self.out.touches_protected = false;
                self.query(q)?;
                let touched = self.out.touches_protected;
                self.out.touches_protected |= before;
                if !touched {
                    // The query may still read protected tables through views or functions
                    // the analyser cannot see: text and CSV output is scanned for enc:v1
                    // values of known columns all the same (binary passes through as is).
                    if plan.format != CopyFormat::Binary && matches!(target, CopyTarget::Stdout) {
                        self.out.copy = Some(plan);
                    }
                    return Ok(());
                }
                if plan.format == CopyFormat::Binary {
                    return Err(RejectionKind::Copy(CopyRefusal::QueryBinary));
                }
                if matches!(target, CopyTarget::Stdout) {
                    self.out.copy = Some(plan);
                }
                Ok(())
            }
        }
    }
}

/// `$n` → n (1-based).
pub(crate) fn param_number(p: &str) -> Option<usize> {
    let n: usize = p.strip_prefix('$')?.parse().ok()?;
    (n >= 1).then_some(n)
}

/// An identifier as PostgreSQL stores it.
pub(crate) fn fold(id: &Ident) -> String {
    fold_word(&id.value, id.quote_style)
}

/// PostgreSQL keeps at most `NAMEDATALEN - 1` bytes of an identifier.
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 63;

pub(crate) fn fold_word(value: &str, quote: Option<char>) -> String {
    let folded = match quote {
        Some(_) => value.to_owned(),
        None => value.to_ascii_lowercase(),
    };
    truncate_identifier(folded)
}

/// Truncates an identifier as PostgreSQL's scanner does: to 63 bytes, on a character boundary.
pub(crate) fn truncate_identifier(mut name: String) -> String {
    if name.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// Folded identifier parts of an object name; `None` for function-style parts.
pub(crate) fn name_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(fold(id)),
            ObjectNamePart::Function(_) => None,
        })
        .collect()
}

/// Whether `name` is the tenant setting. PostgreSQL compares setting names ignoring ASCII case,
/// quoted or not (`SET "PGENVELOPE"."TENANT"` is the same setting).
fn is_tenant_setting(name: &ObjectName) -> bool {
    matches!(name_parts(name).as_deref(), Some([a, b])
        if a.eq_ignore_ascii_case("pgenvelope") && b.eq_ignore_ascii_case("tenant"))
}

fn mentions_tenant(text: &str) -> bool {
    text.to_ascii_lowercase().contains("pgenvelope")
}

/// Whether a column definition for an encrypted column cannot put a value in it by itself: no
/// default, generation expression or identity, and a built-in type (a domain may carry a
/// default).
fn plain_column_def(col: &sqlparser::ast::ColumnDef) -> bool {
    use sqlparser::ast::{ColumnOption as O, DataType};
    let plain_options = col.options.iter().all(|o| {
        matches!(
            o.option,
            O::Null
                | O::NotNull
                | O::PrimaryKey(_)
                | O::Unique(_)
                | O::Check(_)
                | O::Collation(_)
                | O::Comment(_)
        )
    });
    let builtin =
        !matches!(col.data_type, DataType::Custom(..)) || super::read::is_text_type(&col.data_type);
    plain_options && builtin
}

/// Whether `t` is a type an encrypted column's ciphertext keeps its exact text in: `text`,
/// `varchar` or, with `bounded`, `varchar(n)` (as the column's new type, a value too long for
/// `n` makes the ALTER fail; it is never truncated, as an explicit cast would). Not `char(n)`,
/// which pads with spaces, nor any non-text type.
fn widens_text(t: &sqlparser::ast::DataType, bounded: bool) -> bool {
    use sqlparser::ast::DataType;
    match t {
        DataType::Text => true,
        DataType::Varchar(n) | DataType::CharacterVarying(n) => bounded || n.is_none(),
        DataType::Custom(name, mods) => {
            let n = name_parts(name).unwrap_or_default();
            let unqualified = match n.as_slice() {
                [n] => Some(n.as_str()),
                [schema, n] if schema == "pg_catalog" => Some(n.as_str()),
                _ => None,
            };
            match unqualified {
                Some("text") => mods.is_empty(),
                Some("varchar") => mods.is_empty() || (bounded && mods.len() == 1),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether `using` is the column itself, or cast to an unbounded text type (`"name"::text`,
/// Django's and Knex's `USING` for a type change), which converts no value.
fn is_cast_of(using: &Expr, column: &Ident) -> bool {
    match using {
        Expr::Nested(inner) => is_cast_of(inner, column),
        Expr::Cast {
            expr, data_type, ..
        } => {
            widens_text(data_type, false)
                && match expr.as_ref() {
                    Expr::Identifier(i) => fold(i) == fold(column),
                    Expr::Nested(_) | Expr::Cast { .. } => is_cast_of(expr, column),
                    _ => false,
                }
        }
        Expr::Identifier(i) => fold(i) == fold(column),
        _ => false,
    }
}
