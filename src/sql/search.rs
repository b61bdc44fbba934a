//! Equality look-ups on searchable encrypted columns (`search = "equality" | "equality-ci"`).
//!
//! A searchable value's stored text begins with a 31-character search term of its plaintext
//! (see `crypto::search`). A comparison whose one side is such a column and whose other side
//! is values the client gives is recorded as a [`SearchSite`]; the proxy then rewrites the
//! column side into `left(column, 31)` and each value into its term, so the comparison holds
//! exactly when the plaintexts are equal (for `equality-ci`: equal after case folding), and an
//! index on `left(column, 31)` serves it.
//!
//! Forms recognised (either side may be the column; parentheses and casts to unbounded text
//! types are looked through on both sides):
//!
//! * `col = v`, `col <> v` (`!=`), `col IS [NOT] DISTINCT FROM v`, `col [NOT] IN (v, …)`,
//!   `col = ANY(v)` with a text array parameter;
//! * `v` is a string literal, a `$n` parameter used nowhere else in the text, or NULL;
//! * for `equality-ci` columns the comparison must fold case on both sides with the same
//!   function: `lower(col) = lower(v)`, `upper(col::text) = upper(v)` (Django's `iexact`).
//!   A plain `col = v` on such a column, or a folded one on an `equality` column, is refused:
//!   it would not return the rows a plaintext column would;
//! * `a.col = b.col`, the same searchable column on both sides (a self-join): both sides are
//!   rewritten and no term is needed (values of different organisations never match).
//!
//! Anything else over a searchable column (ranges, LIKE, ordering, other functions) is refused
//! as for any encrypted column. The texts found around the column and the values are checked
//! character by character (parentheses, `::type`, `fn(`…`)`); a comment in between makes the
//! form unrecognised, and so refused.

use std::ops::Range;

use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    InTarget, Value,
};

use super::analyzer::{fold, name_parts, param_number, Analyzer, Res};
use super::read::is_text_type;
use super::{
    quote_ident, ColumnRef, PinPlace, PinValue, ReadOp, RejectionKind, SearchOperand, SearchSite,
    TenantPin, TenantSource,
};
use crate::crypto::SearchMode;

/// Case folding applied to both sides of a case-insensitive comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fold {
    Lower,
    Upper,
}

/// The column side of a comparison.
struct ColumnSide {
    column: ColumnRef,
    mode: SearchMode,
    range: Range<usize>,
    column_ref: Range<usize>,
    fold: Option<Fold>,
    qualifier: Option<String>,
}

impl Analyzer<'_> {
    /// Records `e` as a look-up on a searchable column when it is one of the forms above.
    /// `Ok(false)`: not such a form (the caller checks it as usual); `Err`: a form over a
    /// searchable column that cannot be searched this way.
    pub(crate) fn search(&mut self, e: &Expr) -> Res<bool> {
        match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            }
            | Expr::IsNotDistinctFrom(left, right) => self.search_pair(left, right, false),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::NotEq,
                right,
            }
            | Expr::IsDistinctFrom(left, right) => self.search_pair(left, right, true),
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => {
                let Some(side) = self.column_side(expr)? else {
                    return Ok(false);
                };
                let mut operands = Vec::with_capacity(list.len());
                for v in list {
                    match self.operand(v, side.fold, &side.column)? {
                        Some(Some(o)) => operands.push(o),
                        Some(None) => {}
                        None => return Err(form_refusal(&side)),
                    }
                }
                let whole = match list.last().and_then(|v| self.extent(v)) {
                    Some(r) => self
                        .close_paren_after(r.end)
                        .map(|end| side.range.start..end),
                    None => None,
                };
                let Some(whole) = whole else {
                    return Err(form_refusal(&side));
                };
                self.record(side, operands, negated.then_some(whole));
                Ok(true)
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } => {
                let Some(side) = self.column_side(left)? else {
                    return Ok(false);
                };
                if side.fold.is_some() {
                    return Err(form_refusal(&side));
                }
                let Some(index) = array_param(right) else {
                    return Err(form_refusal(&side));
                };
                let Some(range) = self.array_operand_range(right) else {
                    return Err(form_refusal(&side));
                };
                self.record(side, vec![SearchOperand::ArrayParam { range, index }], None);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Checks a search condition (WHERE, JOIN … ON, ON CONFLICT … WHERE) as [`Self::expr`]
    /// does; look-ups recorded directly in it (not in its subqueries) take their tenant from a
    /// `tenant_column = literal | $n` conjunct of the same condition, when it has one.
    pub(crate) fn condition(&mut self, e: &Expr) -> Res<Option<ColumnRef>> {
        let before = self.out.searches.len();
        let depth = self.frames.len();
        let found = self.expr(e)?;
        let protected = self.protected;
        for i in before..self.out.searches.len() {
            let site = &self.out.searches[i];
            if site.depth != depth || site.operands.is_empty() {
                continue;
            }
            let Some(table) = protected.get(&site.column.schema, &site.column.table) else {
                continue;
            };
            let visible = site.qualifier.clone().unwrap_or_else(|| table.name.clone());
            if let Some(t) = self.where_column(table, &visible, e, table.tenant_column.as_deref()) {
                if t != TenantSource::Session {
                    self.out.searches[i].tenant = t;
                }
            }
            let site = &self.out.searches[i];
            if let (TenantSource::Session, Some(whole), Some(tc)) =
                (&site.tenant, &site.negated, &table.tenant_column)
            {
                self.out.pins.push(TenantPin {
                    place: PinPlace::Wrap(whole.clone()),
                    column: format!("{}.{}", quote_ident(&visible), quote_ident(tc)),
                    value: PinValue::SessionTenant,
                    lookup: None,
                });
            }
        }
        Ok(found)
    }

    /// `a = b` or, `negated`, `a <> b` (and the DISTINCT FROM forms).
    fn search_pair(&mut self, a: &Expr, b: &Expr, negated: bool) -> Res<bool> {
        let (left, right) = (self.column_side(a)?, self.column_side(b)?);
        match (left, right) {
            (None, None) => Ok(false),
            (Some(l), Some(r)) => {
                // The same column of two rows: the terms compare as the plaintexts do.
                if l.column != r.column || l.mode != r.mode || l.fold != r.fold {
                    return Err(form_refusal(&l));
                }
                if l.mode == SearchMode::EqualityCi && l.fold.is_none() {
                    return Err(form_refusal(&l));
                }
                self.record(l, Vec::new(), None);
                self.record(r, Vec::new(), None);
                Ok(true)
            }
            (Some(side), None) => self.search_with(side, b, negated),
            (None, Some(side)) => self.search_with(side, a, negated),
        }
    }

    fn search_with(&mut self, side: ColumnSide, value: &Expr, negated: bool) -> Res<bool> {
        let Some(operand) = self.operand(value, side.fold, &side.column)? else {
            return Err(form_refusal(&side));
        };
        let whole = match self.extent(value) {
            Some(v) => side.range.start.min(v.start)..side.range.end.max(v.end),
            None => return Err(form_refusal(&side)),
        };
        self.record(
            side,
            operand.into_iter().collect(),
            negated.then_some(whole),
        );
        Ok(true)
    }

    /// `negated`: the whole comparison's text, for a form that holds for *unequal* values
    /// (`<>`, `NOT IN`, `IS DISTINCT FROM`): under the session tenant it is confined to the
    /// tenant's rows (other organisations' values have unrelated terms, so they would all
    /// compare unequal).
    fn record(
        &mut self,
        side: ColumnSide,
        operands: Vec<SearchOperand>,
        negated: Option<Range<usize>>,
    ) {
        self.out.touches_protected = true;
        self.out.searches.push(SearchSite {
            column: side.column,
            mode: side.mode,
            column_range: side.range,
            column_ref: side.column_ref,
            operands,
            tenant: TenantSource::Session,
            depth: self.frames.len(),
            qualifier: side.qualifier,
            negated,
        });
    }

    /// The searchable column `e` names, through parentheses, text casts and (once) `lower` /
    /// `upper`. `Ok(None)` when `e` is no searchable column (an unsearchable encrypted column
    /// included: the caller refuses it as before).
    fn column_side(&self, e: &Expr) -> Res<Option<ColumnSide>> {
        // Casts and parentheses around at most one `lower` / `upper`, which may hold more.
        let mut inner = strip_text_casts(e);
        let folding = match fold_of(inner) {
            Some((f, arg)) => {
                inner = strip_text_casts(arg);
                Some(f)
            }
            None => None,
        };
        let (parts, qualifier) = match inner {
            Expr::Identifier(id) => (vec![fold(id)], None),
            Expr::CompoundIdentifier(ids) => {
                let parts: Vec<String> = ids.iter().map(fold).collect();
                let q = parts.len().checked_sub(2).map(|i| parts[i].clone());
                (parts, q)
            }
            _ => return Ok(None),
        };
        let Some(column) = self.resolve(&parts) else {
            return Ok(None);
        };
        let Some(mode) = self
            .protected
            .get(&column.schema, &column.table)
            .and_then(|t| t.searchable.iter().find(|(c, _)| *c == column.column))
            .map(|(_, m)| *m)
        else {
            return Ok(None);
        };
        let side = |range, column_ref| ColumnSide {
            column: column.clone(),
            mode,
            range,
            column_ref,
            fold: folding,
            qualifier: qualifier.clone(),
        };
        let (Some(range), Some(column_ref)) = (self.extent(e), self.extent(inner)) else {
            return Err(form_refusal(&side(0..0, 0..0)));
        };
        let side = side(range, column_ref);
        // Case folding must match the column's comparison.
        if (mode == SearchMode::EqualityCi) != folding.is_some() {
            return Err(form_refusal(&side));
        }
        Ok(Some(side))
    }

    /// A value compared with a searchable column: `Some(Some(_))` a literal or parameter,
    /// `Some(None)` NULL (left as it is), `None` anything else. With `fold`, the value must be
    /// wrapped in the same function.
    fn operand(
        &self,
        e: &Expr,
        fold: Option<Fold>,
        column: &ColumnRef,
    ) -> Res<Option<Option<SearchOperand>>> {
        let Some(range) = self.extent(e) else {
            return Ok(None);
        };
        let mut inner = strip_text_casts(e);
        if let Some(f) = fold {
            match fold_of(inner) {
                Some((g, arg)) if g == f => inner = strip_text_casts(arg),
                _ => return Ok(None),
            }
        }
        let Expr::Value(v) = inner else {
            return Ok(None);
        };
        let operand = match &v.value {
            Value::Null => return Ok(Some(None)),
            Value::Placeholder(p) => match param_number(p) {
                Some(index) => {
                    if self.param_uses.get(&index).copied().unwrap_or(0) != 1 {
                        return Err(RejectionKind::ParamReusedElsewhere {
                            param: index,
                            column: column.clone(),
                        });
                    }
                    SearchOperand::Param { range, index }
                }
                None => return Ok(None),
            },
            Value::SingleQuotedString(_)
            | Value::EscapedStringLiteral(_)
            | Value::UnicodeStringLiteral(_)
            | Value::NationalStringLiteral(_)
            | Value::DollarQuotedString(_) => {
                let Some(lit) = self.pos.range(v.span) else {
                    return Ok(None);
                };
                let Some(raw) = self.pos.slice(lit.clone()) else {
                    return Ok(None);
                };
                let after = self.pos.rest(lit.end).trim_start();
                if after
                    .get(..7)
                    .is_some_and(|w| w.eq_ignore_ascii_case("uescape"))
                {
                    return Ok(None);
                }
                match super::text::decode_literal(raw) {
                    Some(value) => SearchOperand::Literal { range, value },
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(Some(operand)))
    }

    /// The text of the parameter inside `ANY(…)`'s argument (its casts are kept).
    fn array_operand_range(&self, e: &Expr) -> Option<Range<usize>> {
        match e {
            Expr::Nested(x) | Expr::Cast { expr: x, .. } => self.array_operand_range(x),
            Expr::Value(v) => self.pos.range(v.span),
            _ => None,
        }
    }

    /// The byte range of `e` in the text, for the forms a search site is made of:
    /// identifiers, values, parentheses, `::type` and `CAST(… AS type)` casts, and one-argument
    /// function calls. `None` for anything else, or when the text around does not read as
    /// expected (a comment in between, say).
    pub(crate) fn extent(&self, e: &Expr) -> Option<Range<usize>> {
        match e {
            Expr::Identifier(id) => self.pos.range(id.span),
            Expr::CompoundIdentifier(ids) => {
                let first = self.pos.range(ids.first()?.span)?;
                let last = self.pos.range(ids.last()?.span)?;
                Some(first.start..last.end)
            }
            Expr::Value(v) => self.pos.range(v.span),
            Expr::Nested(inner) => {
                let r = self.extent(inner)?;
                let start = self.open_paren_before(r.start)?;
                let end = self.close_paren_after(r.end)?;
                Some(start..end)
            }
            Expr::Cast {
                kind: CastKind::DoubleColon,
                expr,
                data_type,
                format: None,
            } => {
                let r = self.extent(expr)?;
                let after = self.pos.rest(r.end);
                let t = after.trim_start();
                let t2 = t.strip_prefix("::")?;
                let ty_start = r.end + (after.len() - t2.len());
                let ty_end = self.type_end(ty_start, data_type)?;
                Some(r.start..ty_end)
            }
            Expr::Cast {
                kind: CastKind::Cast,
                expr,
                data_type,
                format: None,
            } => {
                let r = self.extent(expr)?;
                let open = self.open_paren_before(r.start)?;
                let before = self.pos.slice(0..open)?.trim_end();
                let kw = before.len().checked_sub(4)?;
                if !before.get(kw..)?.eq_ignore_ascii_case("cast") {
                    return None;
                }
                let after = self.pos.rest(r.end);
                let t = after.trim_start();
                if !t.get(..2)?.eq_ignore_ascii_case("as") {
                    return None;
                }
                let ty_start = r.end + (after.len() - t.len()) + 2;
                let ty_end = self.type_end(ty_start, data_type)?;
                let end = self.close_paren_after(ty_end)?;
                Some(kw..end)
            }
            Expr::Function(f) => {
                let arg = one_arg(f)?;
                let first = f.name.0.first()?.as_ident()?;
                let start = self.pos.range(first.span)?.start;
                let r = self.extent(arg)?;
                let open = self.open_paren_before(r.start)?;
                let name_end = self.pos.range(f.name.0.last()?.as_ident()?.span)?.end;
                if !self.pos.slice(name_end..open)?.trim().is_empty() {
                    return None;
                }
                let end = self.close_paren_after(r.end)?;
                Some(start..end)
            }
            _ => None,
        }
    }

    /// The offset of the `(` just before `at` (only whitespace in between).
    fn open_paren_before(&self, at: usize) -> Option<usize> {
        let before = self.pos.slice(0..at)?.trim_end();
        before.ends_with('(').then(|| before.len() - 1)
    }

    /// The offset just past the `)` just after `at` (only whitespace in between).
    fn close_paren_after(&self, at: usize) -> Option<usize> {
        let after = self.pos.rest(at);
        let t = after.trim_start();
        t.starts_with(')').then(|| at + (after.len() - t.len()) + 1)
    }

    /// The end of a type name written from `start` that reads as `ty` (its words, in any
    /// case and with any spacing; quotes around a word allowed).
    fn type_end(&self, start: usize, ty: &DataType) -> Option<usize> {
        let expected = ty.to_string().to_ascii_lowercase();
        let want: Vec<&str> = expected
            .split(|c: char| c.is_whitespace() || c == '.')
            .filter(|w| !w.is_empty())
            .collect();
        let text = self.pos.rest(start);
        let mut at = 0;
        let mut words = Vec::new();
        while words.len() < want.len() {
            let rest = &text[at..];
            let trimmed = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '.');
            at += rest.len() - trimmed.len();
            let len = trimmed
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '"'))
                .unwrap_or(trimmed.len());
            if len == 0 {
                return None;
            }
            words.push(trimmed[..len].trim_matches('"').to_ascii_lowercase());
            at += len;
        }
        (words == want).then_some(start + at)
    }
}

/// `lower(x)` / `upper(x)` (also `pg_catalog.`-qualified) with one plain argument.
fn fold_of(e: &Expr) -> Option<(Fold, &Expr)> {
    let Expr::Function(f) = e else { return None };
    let parts = name_parts(&f.name)?;
    let name = match parts.as_slice() {
        [n] => n,
        [s, n] if s == "pg_catalog" => n,
        _ => return None,
    };
    let fold = match name.as_str() {
        "lower" => Fold::Lower,
        "upper" => Fold::Upper,
        _ => return None,
    };
    let arg = one_arg(f)?;
    Some((fold, arg))
}

/// The single unnamed argument of a plain call (no DISTINCT, FILTER, OVER, ORDER BY).
fn one_arg(f: &sqlparser::ast::Function) -> Option<&Expr> {
    if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
        return None;
    }
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => Some(e),
        _ => None,
    }
}

fn strip_text_casts(mut e: &Expr) -> &Expr {
    loop {
        match e {
            Expr::Nested(x) => e = x,
            Expr::Cast {
                kind: CastKind::DoubleColon | CastKind::Cast,
                expr,
                data_type,
                format: None,
            } if is_text_type(data_type) => e = expr,
            _ => return e,
        }
    }
}

/// `$n`, `$n::text[]`, `$n::varchar[]`, `($n)`: the parameter of `= ANY(…)`.
fn array_param(e: &Expr) -> Option<usize> {
    let mut e = e;
    loop {
        match e {
            Expr::Nested(x) => e = x,
            Expr::Cast {
                kind: CastKind::DoubleColon | CastKind::Cast,
                expr,
                data_type,
                format: None,
            } if is_text_array(data_type) => e = expr,
            Expr::Value(v) => {
                return match &v.value {
                    Value::Placeholder(p) => param_number(p),
                    _ => None,
                }
            }
            _ => return None,
        }
    }
}

fn is_text_array(t: &DataType) -> bool {
    match t {
        DataType::Array(sqlparser::ast::ArrayElemTypeDef::SquareBracket(inner, None))
        | DataType::Array(sqlparser::ast::ArrayElemTypeDef::AngleBracket(inner)) => {
            is_text_type(inner)
        }
        _ => false,
    }
}

/// Refusal of a comparison over a searchable column that cannot be searched as written.
fn form_refusal(side: &ColumnSide) -> RejectionKind {
    RejectionKind::Read {
        column: side.column.clone(),
        op: match side.mode {
            SearchMode::Equality => ReadOp::SearchForm,
            SearchMode::EqualityCi => ReadOp::SearchFormCi,
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::{analyze, Analysis, Protected, ProtectedTable};
    use super::*;

    fn prot() -> Protected {
        Protected::new([ProtectedTable {
            schema: "public".into(),
            name: "customer".into(),
            tenant_column: Some("org_id".into()),
            row_key: None,
            encrypted: vec!["email".into(), "code".into(), "notes".into()],
            searchable: vec![
                ("email".into(), SearchMode::Equality),
                ("code".into(), SearchMode::EqualityCi),
            ],
        }])
    }

    /// The text as the proxy would rewrite it, with `T(value)` for a literal's term.
    fn rewritten(sql: &str) -> (String, Analysis) {
        let a = analyze(sql, &prot());
        assert!(a.rejection.is_none(), "{sql}: {:?}", a.rejection);
        let mut edits: Vec<(Range<usize>, String)> = Vec::new();
        for s in &a.searches {
            edits.push((
                s.column_range.clone(),
                format!("left({}, 31)", &sql[s.column_ref.clone()]),
            ));
            for o in &s.operands {
                match o {
                    SearchOperand::Literal { range, value } => {
                        edits.push((range.clone(), format!("T({value})")))
                    }
                    SearchOperand::Param { range, index } => {
                        edits.push((range.clone(), format!("${index}")))
                    }
                    SearchOperand::ArrayParam { .. } => {}
                }
            }
        }
        edits.sort_by_key(|(r, _)| r.start);
        (super::super::rewrite_literals(sql, &edits).unwrap(), a)
    }

    fn refused(sql: &str) -> String {
        let a = analyze(sql, &prot());
        a.rejection
            .unwrap_or_else(|| panic!("not refused: {sql}"))
            .message()
    }

    #[test]
    fn equality_forms_are_rewritten_to_terms() {
        for (sql, want) in [
            (
                "SELECT id FROM customer WHERE email = 'a@x'",
                "SELECT id FROM customer WHERE left(email, 31) = T(a@x)",
            ),
            (
                "SELECT id FROM customer WHERE $1 = \"customer\".\"email\"",
                "SELECT id FROM customer WHERE $1 = left(\"customer\".\"email\", 31)",
            ),
            (
                "SELECT id FROM customer c WHERE c.email <> $1::VARCHAR",
                "SELECT id FROM customer c WHERE left(c.email, 31) <> $1",
            ),
            (
                "SELECT id FROM customer WHERE email IN ('a', E'b\\'c', NULL)",
                "SELECT id FROM customer WHERE left(email, 31) IN (T(a), T(b'c), NULL)",
            ),
            (
                "SELECT id FROM customer WHERE email IS NOT DISTINCT FROM CAST($2 AS text)",
                "SELECT id FROM customer WHERE left(email, 31) IS NOT DISTINCT FROM $2",
            ),
            (
                "SELECT id FROM customer WHERE (email) = ANY($1::text[])",
                "SELECT id FROM customer WHERE left(email, 31) = ANY($1::text[])",
            ),
            (
                "SELECT id FROM customer WHERE UPPER(\"customer\".\"code\"::text) = UPPER('Ab')",
                "SELECT id FROM customer WHERE left(\"customer\".\"code\", 31) = T(Ab)",
            ),
            (
                "SELECT id FROM customer WHERE lower(code) = lower( $1 )",
                "SELECT id FROM customer WHERE left(code, 31) = $1",
            ),
            (
                "UPDATE customer SET notes = $1 WHERE email = $2 AND org_id = $3",
                "UPDATE customer SET notes = $1 WHERE left(email, 31) = $2 AND org_id = $3",
            ),
            (
                "DELETE FROM customer WHERE email = 'x'",
                "DELETE FROM customer WHERE left(email, 31) = T(x)",
            ),
            (
                "SELECT a.id FROM customer a JOIN customer b ON a.email = b.email",
                "SELECT a.id FROM customer a JOIN customer b ON left(a.email, 31) = left(b.email, 31)",
            ),
        ] {
            assert_eq!(rewritten(sql).0, want);
        }
    }

    #[test]
    fn tenant_comes_from_the_same_condition() {
        let (_, a) = rewritten("SELECT * FROM customer WHERE org_id = 'acme' AND email = 'x'");
        assert_eq!(a.searches[0].tenant, TenantSource::Literal("acme".into()));
        let (_, a) = rewritten("SELECT * FROM customer WHERE email = $1 AND customer.org_id = $2");
        assert_eq!(a.searches[0].tenant, TenantSource::Param(2));
        let (_, a) = rewritten("SELECT * FROM customer WHERE email = $1 OR org_id = 'a'");
        assert_eq!(a.searches[0].tenant, TenantSource::Session);
        // A subquery's look-up does not take the outer condition's tenant.
        let (_, a) = rewritten(
            "SELECT * FROM customer WHERE org_id = 'a' AND id IN (SELECT id FROM customer WHERE email = 'x')",
        );
        assert_eq!(a.searches[0].tenant, TenantSource::Session);
        assert!(a.pins.is_empty());
        // Unequal forms under the session tenant are confined to its rows.
        let sql = "SELECT * FROM customer c WHERE c.email <> 'x' AND id > 3";
        let (_, a) = rewritten(sql);
        assert_eq!(a.pins.len(), 1);
        assert_eq!(a.pins[0].column, "\"c\".\"org_id\"");
        let PinPlace::Wrap(r) = &a.pins[0].place else {
            panic!("{:?}", a.pins[0].place)
        };
        assert_eq!(&sql[r.clone()], "c.email <> 'x'");
        let sql = "SELECT * FROM customer WHERE email NOT IN ('a', $1)";
        let (_, a) = rewritten(sql);
        let PinPlace::Wrap(r) = &a.pins[0].place else {
            panic!()
        };
        assert_eq!(&sql[r.clone()], "email NOT IN ('a', $1)");
        let (_, a) = rewritten("SELECT * FROM customer WHERE org_id = 'a' AND email <> 'x'");
        assert!(a.pins.is_empty());
    }

    #[test]
    fn other_forms_stay_refused() {
        for sql in [
            "SELECT * FROM customer WHERE email < 'x'",
            "SELECT * FROM customer WHERE email LIKE 'x%'",
            "SELECT * FROM customer ORDER BY email",
            "SELECT * FROM customer WHERE email = notes",
            "SELECT * FROM customer WHERE email = lower('x')",
            "SELECT * FROM customer WHERE lower(email) = lower('x')",
            "SELECT * FROM customer WHERE email = 'a' || 'b'",
            "SELECT * FROM customer WHERE notes = 'x'",
            "SELECT * FROM customer WHERE email = 'x' /* c */ ::text",
            "SELECT * FROM customer WHERE lower(code /* c */) = lower('x')",
        ] {
            refused(sql);
        }
        let m = refused("SELECT * FROM customer WHERE code = 'x'");
        assert!(m.contains("lower(col) = lower("), "{m}");
        let m = refused("SELECT * FROM customer WHERE lower(code) = upper('x')");
        assert!(m.contains("public.customer.code"), "{m}");
        let m = refused("SELECT * FROM customer WHERE email = $1 AND notes = $1");
        assert!(m.contains("$1"), "{m}");
    }
}
