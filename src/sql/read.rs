//! Read-path checks: scopes, name resolution and the expressions allowed over encrypted columns.
//!
//! An expression is *encrypted* when it evaluates to an encrypted column's stored envelope. Such
//! a value may be projected, renamed, cast to a text type, counted and tested for NULL; anything
//! that looks inside it or compares it (operators, functions, ORDER BY, GROUP BY, DISTINCT, set
//! operations that remove duplicates, join keys) is refused, naming the column.

use sqlparser::ast::{
    DataType, Distinct, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    JoinConstraint, JoinOperator, ObjectName, OrderBy, OrderByExpr, OrderByKind, Query, Select,
    SelectItem, SelectItemQualifiedWildcardKind, SetExpr, SetOperator, SetQuantifier, Statement,
    TableAlias, TableFactor, TableWithJoins, Value, WindowType,
};

use super::analyzer::{fold, name_parts, Analyzer, Res};
use super::{
    ColumnRef, Construct, ReadOp, RejectionKind, TenantChange, TenantSettingUse, TENANT_SETTING,
};

/// One relation visible in a scope.
#[derive(Clone, Debug)]
pub(crate) struct Rel {
    /// Visible name: alias, or the table's own name.
    pub(crate) name: String,
    /// Schema qualifier, for base tables named with one.
    pub(crate) schema: Option<String>,
    pub(crate) kind: RelKind,
}

#[derive(Clone, Debug)]
pub(crate) enum RelKind {
    /// A protected base table (one index per schema it may resolve to).
    Protected(Vec<usize>),
    /// A derived table or CTE with known encrypted output columns (a `*` inside hides the
    /// others).
    Derived(Vec<OutCol>),
    /// A derived table or CTE whose every output column is known, in order.
    Known(Vec<OutCol>),
    /// Anything else: nothing encrypted.
    Plain,
}

/// One output column of a query.
#[derive(Clone, Debug)]
pub(crate) struct OutCol {
    pub(crate) name: Option<String>,
    pub(crate) enc: Option<ColumnRef>,
}

/// One projection item.
#[derive(Clone, Debug)]
pub(crate) enum OutItem {
    Col(OutCol),
    /// `*` or `t.*`: the encrypted columns it contains; other columns are unknown.
    Wild(Vec<OutCol>),
    /// `*` or `t.*` over relations whose columns are all known: those columns, in order.
    Known(Vec<OutCol>),
}

/// Whether every output column of `items` is known, in order (no `*` of unknown width).
fn complete(items: &[OutItem]) -> bool {
    items.iter().all(|i| !matches!(i, OutItem::Wild(_)))
}

pub(crate) type Frame = Vec<Rel>;

#[derive(Clone, Debug)]
pub(crate) struct Cte {
    pub(crate) name: String,
    pub(crate) cols: Vec<OutCol>,
    /// Whether `cols` lists every output column, in order.
    pub(crate) complete: bool,
}

/// Flattens projection items into columns (wildcards contribute their encrypted columns).
pub(crate) fn flatten(items: &[OutItem]) -> Vec<OutCol> {
    let mut v = Vec::new();
    for i in items {
        match i {
            OutItem::Col(c) => v.push(c.clone()),
            OutItem::Wild(cs) | OutItem::Known(cs) => v.extend(cs.iter().cloned()),
        }
    }
    v
}

fn first_encrypted(items: &[OutItem]) -> Option<ColumnRef> {
    flatten(items).into_iter().find_map(|c| c.enc)
}

impl<'a> Analyzer<'a> {
    /// Analyses a query as a read; returns its output columns.
    pub(crate) fn query(&mut self, q: &Query) -> Res<Vec<OutItem>> {
        let top = std::mem::take(&mut self.top_projection);
        let mut pushed = false;
        if let Some(with) = &q.with {
            self.ctes.push(Vec::new());
            pushed = true;
            for cte in &with.cte_tables {
                let name = fold(&cte.alias.name);
                if with.recursive {
                    // First pass to learn the output columns, then analyse with them visible.
                    let (lits, params, changes) = (
                        self.out.literals.len(),
                        self.out.params.len(),
                        self.out.tenant_changes.len(),
                    );
                    let first = self.setexpr_first_branch(&cte.query)?;
                    self.out.literals.truncate(lits);
                    self.out.params.truncate(params);
                    self.out.tenant_changes.truncate(changes);
                    let cols = rename(&first, &cte.alias)?;
                    self.push_cte(name.clone(), cols, complete(&first));
                }
                let items = self.query(&cte.query)?;
                let cols = rename(&items, &cte.alias)?;
                self.push_cte(name, cols, complete(&items));
            }
        }
        // A tenant `set_config` must run exactly once, as the proxy assumes: no clause that
        // could skip or repeat it.
        self.top_projection = top
            && q.with.is_none()
            && q.limit_clause.is_none()
            && q.fetch.is_none()
            && q.order_by.is_none()
            && q.locks.is_empty();
        let result = self.setexpr(&q.body, q.order_by.as_ref());
        self.top_projection = false;
        let items = result?;
        if let Some(limit) = &q.limit_clause {
            if self.mentions_sensitive(&limit.to_string()) {
                let _ = self.fallback_expr(&limit.to_string())?;
            }
        }
        if pushed {
            self.ctes.pop();
        }
        Ok(items)
    }

    fn push_cte(&mut self, name: String, cols: Vec<OutCol>, complete: bool) {
        if let Some(level) = self.ctes.last_mut() {
            level.retain(|c| c.name != name);
            level.push(Cte {
                name,
                cols,
                complete,
            });
        }
    }

    fn setexpr_first_branch(&mut self, q: &Query) -> Res<Vec<OutItem>> {
        let mut body = q.body.as_ref();
        while let SetExpr::SetOperation { left, .. } = body {
            body = left;
        }
        self.setexpr(body, None)
    }

    pub(crate) fn setexpr(
        &mut self,
        body: &SetExpr,
        order_by: Option<&OrderBy>,
    ) -> Res<Vec<OutItem>> {
        match body {
            SetExpr::Select(s) => self.select(s, order_by),
            SetExpr::Query(q) => {
                let items = self.query(q)?;
                self.order_by_outputs(order_by, &items)?;
                Ok(items)
            }
            SetExpr::SetOperation {
                left,
                op,
                set_quantifier,
                right,
            } => {
                let top = std::mem::take(&mut self.top_projection);
                let l = self.setexpr(left, None)?;
                let r = self.setexpr(right, None)?;
                self.top_projection = top;
                let (lf, rf) = (flatten(&l), flatten(&r));
                // With `*` in a branch, positions are unknown: encrypted columns lose their name,
                // which makes every name of the result resolve to them (fail closed).
                let wild = l.iter().chain(&r).any(|i| matches!(i, OutItem::Wild(_)));
                let n = lf.len().max(rf.len());
                let mut cols = Vec::with_capacity(n);
                for i in 0..n {
                    let a = lf.get(i);
                    let b = rf.get(i);
                    let enc = a
                        .and_then(|c| c.enc.clone())
                        .or_else(|| b.and_then(|c| c.enc.clone()));
                    let name = match (&enc, wild) {
                        (Some(_), true) => None,
                        _ => a.and_then(|c| c.name.clone()),
                    };
                    cols.push(OutCol { name, enc });
                }
                let dedup = !matches!(
                    set_quantifier,
                    SetQuantifier::All | SetQuantifier::AllByName
                ) || !matches!(op, SetOperator::Union);
                if dedup {
                    if let Some(c) = cols.iter().find_map(|c| c.enc.clone()) {
                        return Err(read_refusal(c, ReadOp::SetOperation(*op)));
                    }
                }
                // With `*` in a branch the positions are unknown too.
                let items: Vec<OutItem> = if wild {
                    vec![OutItem::Wild(cols)]
                } else {
                    cols.into_iter().map(OutItem::Col).collect()
                };
                self.order_by_outputs(order_by, &items)?;
                Ok(items)
            }
            SetExpr::Values(v) => {
                for row in &v.rows {
                    for e in &row.content {
                        self.expr(e)?;
                    }
                }
                Ok(Vec::new())
            }
            SetExpr::Insert(Statement::Insert(i)) => self.insert(i),
            SetExpr::Update(Statement::Update(u)) => self.update(u),
            SetExpr::Delete(Statement::Delete(d)) => self.delete(d),
            SetExpr::Table(t) => {
                let Some(name) = t.table_name.clone() else {
                    return Ok(Vec::new());
                };
                let object = ObjectName::from(
                    t.schema_name
                        .iter()
                        .cloned()
                        .chain(std::iter::once(name))
                        .collect::<Vec<_>>(),
                );
                let mut frame = Vec::new();
                self.base_table(&object, None, &mut frame, true)?;
                let items = vec![self.wildcard(&frame, None)];
                self.order_by_outputs(order_by, &items)?;
                Ok(items)
            }
            other => {
                if self.mentions_sensitive(&other.to_string()) {
                    self.out.touches_protected = true;
                    return Err(RejectionKind::Unanalysable(Construct::QueryForm));
                }
                Ok(Vec::new())
            }
        }
    }

    /// ORDER BY over the output of a set operation or nested query: names and positions only.
    fn order_by_outputs(&mut self, order_by: Option<&OrderBy>, items: &[OutItem]) -> Res<()> {
        let Some(ob) = order_by else { return Ok(()) };
        match &ob.kind {
            OrderByKind::All(_) => {
                if let Some(c) = first_encrypted(items) {
                    return Err(read_refusal(c, ReadOp::OrderByAll));
                }
            }
            OrderByKind::Expressions(exprs) => {
                for o in exprs {
                    if let Some(c) = self.output_reference(&o.expr, items)? {
                        return Err(read_refusal(c, ReadOp::OrderBy));
                    }
                    self.frames.push(Vec::new());
                    let r = self.expr(&o.expr);
                    self.frames.pop();
                    if let Some(c) = r? {
                        return Err(read_refusal(c, ReadOp::OrderBy));
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolves a positional number or an output-column name against projection items.
    fn output_reference(&self, e: &Expr, items: &[OutItem]) -> Res<Option<ColumnRef>> {
        match e {
            Expr::Value(v) => {
                let Value::Number(n, _) = &v.value else {
                    return Ok(None);
                };
                let Ok(pos) = n.parse::<usize>() else {
                    return Ok(None);
                };
                let mut i = 0;
                for (idx, item) in items.iter().enumerate() {
                    match item {
                        OutItem::Col(c) => {
                            i += 1;
                            if i == pos {
                                return Ok(c.enc.clone());
                            }
                        }
                        OutItem::Known(cs) => {
                            if let Some(c) = cs.get(pos.wrapping_sub(i + 1)) {
                                return Ok(c.enc.clone());
                            }
                            i += cs.len();
                        }
                        OutItem::Wild(_) => {
                            // Unknown width: any encrypted column from here on may be `pos`.
                            return Ok(first_encrypted(&items[idx..]));
                        }
                    }
                }
                Ok(None)
            }
            Expr::Identifier(id) => {
                let name = fold(id);
                Ok(flatten(items)
                    .into_iter()
                    .find(|c| c.name.as_deref() == Some(name.as_str()) && c.enc.is_some())
                    .and_then(|c| c.enc))
            }
            _ => Ok(None),
        }
    }

    fn select(&mut self, s: &Select, order_by: Option<&OrderBy>) -> Res<Vec<OutItem>> {
        let top = std::mem::take(&mut self.top_projection);
        self.frames.push(Vec::new());
        let r = self.select_inner(s, order_by, top);
        self.frames.pop();
        r
    }

    fn select_inner(
        &mut self,
        s: &Select,
        order_by: Option<&OrderBy>,
        top: bool,
    ) -> Res<Vec<OutItem>> {
        // Only `SELECT set_config(…)` with no FROM, WHERE, GROUP BY, HAVING, DISTINCT, … runs
        // its projection exactly once; elsewhere a tenant set_config is refused.
        let no_groups = match &s.group_by {
            sqlparser::ast::GroupByExpr::Expressions(e, m) => e.is_empty() && m.is_empty(),
            sqlparser::ast::GroupByExpr::All(_) => false,
        };
        let top = top
            && s.from.is_empty()
            && s.selection.is_none()
            && s.prewhere.is_none()
            && s.having.is_none()
            && s.qualify.is_none()
            && s.distinct.is_none()
            && s.top.is_none()
            && s.named_window.is_empty()
            && no_groups;
        for twj in &s.from {
            self.table_with_joins(twj)?;
        }
        if let Some(w) = &s.selection {
            self.condition(w)?;
        }
        if let Some(p) = &s.prewhere {
            self.expr(p)?;
        }
        let mut items = Vec::with_capacity(s.projection.len());
        for item in &s.projection {
            items.push(self.select_item(item, top)?);
        }
        match &s.group_by {
            GroupByExpr::All(_) => {
                if let Some(c) = first_encrypted(&items) {
                    return Err(read_refusal(c, ReadOp::GroupByAll));
                }
            }
            GroupByExpr::Expressions(exprs, _) => {
                for e in exprs {
                    if let Some(c) = self.output_reference(e, &items)? {
                        return Err(read_refusal(c, ReadOp::GroupBy));
                    }
                    if let Some(c) = self.expr(e)? {
                        return Err(read_refusal(c, ReadOp::GroupBy));
                    }
                }
            }
        }
        if let Some(h) = &s.having {
            self.expr(h)?;
        }
        if let Some(q) = &s.qualify {
            self.expr(q)?;
        }
        for w in &s.named_window {
            if self.mentions_sensitive(&w.to_string()) {
                self.fallback_expr(&w.to_string())?;
            }
        }
        match &s.distinct {
            Some(Distinct::Distinct) => {
                if let Some(c) = first_encrypted(&items) {
                    return Err(read_refusal(c, ReadOp::SelectDistinct));
                }
            }
            Some(Distinct::On(exprs)) => {
                for e in exprs {
                    if let Some(c) = self.output_reference(e, &items)? {
                        return Err(read_refusal(c, ReadOp::DistinctOn));
                    }
                    if let Some(c) = self.expr(e)? {
                        return Err(read_refusal(c, ReadOp::DistinctOn));
                    }
                }
            }
            Some(Distinct::All) | None => {}
        }
        if let Some(ob) = order_by {
            match &ob.kind {
                OrderByKind::All(_) => {
                    if let Some(c) = first_encrypted(&items) {
                        return Err(read_refusal(c, ReadOp::OrderByAll));
                    }
                }
                OrderByKind::Expressions(exprs) => {
                    self.order_exprs(exprs, &items, ReadOp::OrderBy)?
                }
            }
        }
        Ok(items)
    }

    fn order_exprs(&mut self, exprs: &[OrderByExpr], items: &[OutItem], op: ReadOp) -> Res<()> {
        for o in exprs {
            if let Some(c) = self.output_reference(&o.expr, items)? {
                return Err(read_refusal(c, op));
            }
            if let Some(c) = self.expr(&o.expr)? {
                return Err(read_refusal(c, op));
            }
        }
        Ok(())
    }

    pub(crate) fn select_item(&mut self, item: &SelectItem, top: bool) -> Res<OutItem> {
        Ok(match item {
            SelectItem::UnnamedExpr(e) => {
                if top {
                    if let Some(()) = self.top_set_config(e)? {
                        return Ok(OutItem::Col(OutCol {
                            name: None,
                            enc: None,
                        }));
                    }
                }
                let enc = self.expr(e)?;
                let name = match e {
                    Expr::Identifier(id) => Some(fold(id)),
                    Expr::CompoundIdentifier(ids) => ids.last().map(fold),
                    _ => None,
                };
                OutItem::Col(OutCol { name, enc })
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                if top {
                    if let Some(()) = self.top_set_config(expr)? {
                        return Ok(OutItem::Col(OutCol {
                            name: Some(fold(alias)),
                            enc: None,
                        }));
                    }
                }
                OutItem::Col(OutCol {
                    name: Some(fold(alias)),
                    enc: self.expr(expr)?,
                })
            }
            SelectItem::ExprWithAliases { expr, .. } => {
                if let Some(c) = self.expr(expr)? {
                    return Err(read_refusal(c, ReadOp::MultiAliasProjection));
                }
                OutItem::Col(OutCol {
                    name: None,
                    enc: None,
                })
            }
            SelectItem::Wildcard(_) => {
                let frame = self.frames.last().cloned().unwrap_or_default();
                self.wildcard(&frame, None)
            }
            SelectItem::QualifiedWildcard(kind, _) => match kind {
                SelectItemQualifiedWildcardKind::ObjectName(name) => {
                    let parts = name_parts(name).unwrap_or_default();
                    let frame = self.frames.last().cloned().unwrap_or_default();
                    self.wildcard(&frame, Some(&parts))
                }
                SelectItemQualifiedWildcardKind::Expr(e) => {
                    if let Some(c) = self.expr(e)? {
                        return Err(read_refusal(c, ReadOp::FieldAccess));
                    }
                    OutItem::Wild(Vec::new())
                }
            },
        })
    }

    /// `*` or `qualifier.*` over a frame.
    fn wildcard(&self, frame: &[Rel], qualifier: Option<&[String]>) -> OutItem {
        let mut cols = Vec::new();
        let mut known = Some(Vec::new());
        for rel in frame {
            if let Some(q) = qualifier {
                let matches = match q {
                    [t] => &rel.name == t,
                    [.., s, t] => &rel.name == t && rel.schema.as_deref().is_none_or(|rs| rs == s),
                    [] => false,
                };
                if !matches {
                    continue;
                }
            }
            match (&rel.kind, known.as_mut()) {
                (RelKind::Known(cs), Some(k)) => k.extend(cs.iter().cloned()),
                _ => known = None,
            }
            match &rel.kind {
                RelKind::Protected(idxs) => {
                    for &i in idxs {
                        if let Some(t) = self.protected.table(i) {
                            for c in &t.encrypted {
                                cols.push(OutCol {
                                    name: Some(c.clone()),
                                    enc: Some(ColumnRef {
                                        schema: t.schema.clone(),
                                        table: t.name.clone(),
                                        column: c.clone(),
                                    }),
                                });
                            }
                        }
                    }
                }
                RelKind::Derived(cs) | RelKind::Known(cs) => {
                    cols.extend(cs.iter().filter(|c| c.enc.is_some()).cloned())
                }
                RelKind::Plain => {}
            }
        }
        match known {
            Some(k) if !k.is_empty() => OutItem::Known(k),
            _ => OutItem::Wild(cols),
        }
    }

    pub(crate) fn table_with_joins(&mut self, twj: &TableWithJoins) -> Res<()> {
        self.table_factor(&twj.relation)?;
        for j in &twj.joins {
            self.table_factor(&j.relation)?;
            let constraint = match &j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c)
                | JoinOperator::Semi(c)
                | JoinOperator::LeftSemi(c)
                | JoinOperator::RightSemi(c)
                | JoinOperator::Anti(c)
                | JoinOperator::LeftAnti(c)
                | JoinOperator::RightAnti(c)
                | JoinOperator::StraightJoin(c) => c,
                _ => {
                    if self.out.touches_protected {
                        return Err(RejectionKind::Unanalysable(Construct::JoinForm));
                    }
                    continue;
                }
            };
            match constraint {
                JoinConstraint::On(e) => {
                    self.condition(e)?;
                }
                JoinConstraint::Using(cols) | JoinConstraint::UsingAlias(cols, _) => {
                    for c in cols {
                        let Some(parts) = name_parts(c) else { continue };
                        if let Some(last) = parts.last() {
                            if let Some(col) = self.resolve(std::slice::from_ref(last)) {
                                return Err(read_refusal(col, ReadOp::JoinUsing));
                            }
                        }
                    }
                }
                JoinConstraint::Natural => {
                    let frame = self.frames.last().cloned().unwrap_or_default();
                    if let OutItem::Wild(cs) | OutItem::Known(cs) = self.wildcard(&frame, None) {
                        if let Some(c) = cs.into_iter().find_map(|c| c.enc) {
                            return Err(read_refusal(c, ReadOp::NaturalJoin));
                        }
                    }
                }
                JoinConstraint::None => {}
            }
        }
        Ok(())
    }

    fn table_factor(&mut self, tf: &TableFactor) -> Res<()> {
        let mut frame = self.frames.pop().unwrap_or_default();
        let r = self.table_factor_into(tf, &mut frame);
        self.frames.push(frame);
        r
    }

    fn table_factor_into(&mut self, tf: &TableFactor, frame: &mut Frame) -> Res<()> {
        match tf {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                if args.is_some() {
                    let text = tf.to_string();
                    self.fallback_expr(&text)?;
                    frame.push(Rel {
                        name: alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default(),
                        schema: None,
                        kind: RelKind::Plain,
                    });
                    return Ok(());
                }
                self.base_table(name, alias.as_ref(), frame, true)
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                // Sibling relations stay visible (LATERAL); seeing more is the safe direction.
                self.frames.push(frame.clone());
                let r = self.query(subquery);
                self.frames.pop();
                let items = r?;
                let cols = match alias {
                    Some(a) => rename(&items, a)?,
                    None => flatten(&items),
                };
                frame.push(Rel {
                    name: alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default(),
                    schema: None,
                    kind: if complete(&items) {
                        RelKind::Known(cols)
                    } else {
                        RelKind::Derived(cols)
                    },
                });
                Ok(())
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => {
                self.frames.push(std::mem::take(frame));
                let r = self.table_with_joins(table_with_joins);
                *frame = self.frames.pop().unwrap_or_default();
                r
            }
            other => {
                self.fallback_expr(&other.to_string())?;
                frame.push(Rel {
                    name: String::new(),
                    schema: None,
                    kind: RelKind::Plain,
                });
                Ok(())
            }
        }
    }

    /// Adds a base table (or, when `cte_ok`, a CTE reference) to `frame`.
    pub(crate) fn base_table(
        &mut self,
        name: &ObjectName,
        alias: Option<&TableAlias>,
        frame: &mut Frame,
        cte_ok: bool,
    ) -> Res<()> {
        let parts = name_parts(name).unwrap_or_default();
        let visible = alias
            .map(|a| fold(&a.name))
            .or_else(|| parts.last().cloned())
            .unwrap_or_default();
        if let (true, [single]) = (cte_ok, parts.as_slice()) {
            let cte = self
                .ctes
                .iter()
                .rev()
                .flat_map(|l| l.iter())
                .find(|c| &c.name == single)
                .cloned();
            if let Some(cte) = cte {
                let items: Vec<OutItem> = if cte.complete {
                    cte.cols.into_iter().map(OutItem::Col).collect()
                } else {
                    vec![OutItem::Wild(cte.cols)]
                };
                let cols = match alias {
                    Some(a) => rename(&items, a)?,
                    None => flatten(&items),
                };
                frame.push(Rel {
                    name: visible,
                    schema: None,
                    kind: if cte.complete {
                        RelKind::Known(cols)
                    } else {
                        RelKind::Derived(cols)
                    },
                });
                return Ok(());
            }
        }
        let idxs = self.resolve_table(&parts);
        let schema = match parts.as_slice() {
            [.., s, _] => Some(s.clone()),
            _ => None,
        };
        let kind = if idxs.is_empty() {
            RelKind::Plain
        } else {
            self.out.touches_protected = true;
            if let Some(a) = alias {
                if !a.columns.is_empty() {
                    return Err(RejectionKind::Unanalysable(Construct::ColumnAliases));
                }
            }
            RelKind::Protected(idxs)
        };
        frame.push(Rel {
            name: visible,
            schema,
            kind,
        });
        Ok(())
    }

    /// Protected tables a (folded) table name may refer to.
    pub(crate) fn resolve_table(&self, parts: &[String]) -> Vec<usize> {
        match parts {
            [t] => self.protected.indexes_by_name(t).to_vec(),
            [.., s, t] => self.protected.index_qualified(s, t).into_iter().collect(),
            [] => Vec::new(),
        }
    }

    /// Resolves a (folded) column reference to an encrypted column, searching all scopes.
    pub(crate) fn resolve(&self, parts: &[String]) -> Option<ColumnRef> {
        let (qual, col): (&[String], &String) = match parts.split_last() {
            Some((c, q)) => (q, c),
            None => return None,
        };
        let qual = if qual.len() > 2 {
            &qual[qual.len() - 2..]
        } else {
            qual
        };
        for frame in self.frames.iter().rev() {
            for rel in frame {
                let matches = match qual {
                    [] => true,
                    [t] => &rel.name == t,
                    [s, t] => &rel.name == t && rel.schema.as_deref().is_none_or(|rs| rs == s),
                    _ => false,
                };
                if !matches {
                    continue;
                }
                if let Some(c) = self.rel_column(rel, col) {
                    return Some(c);
                }
            }
        }
        if qual.is_empty() {
            return None;
        }
        // A qualifier not in scope: check protected tables of that name (fail closed).
        self.resolve_table(qual)
            .into_iter()
            .find_map(|i| self.enc_column(i, col))
    }

    fn rel_column(&self, rel: &Rel, col: &str) -> Option<ColumnRef> {
        match &rel.kind {
            RelKind::Protected(idxs) => idxs.iter().find_map(|&i| self.enc_column(i, col)),
            // An encrypted column whose name is unknown matches every name.
            RelKind::Derived(cols) | RelKind::Known(cols) => cols
                .iter()
                .find(|c| c.enc.is_some() && c.name.as_deref().is_none_or(|n| n == col))
                .and_then(|c| c.enc.clone()),
            RelKind::Plain => None,
        }
    }

    pub(crate) fn enc_column(&self, table: usize, col: &str) -> Option<ColumnRef> {
        let t = self.protected.table(table)?;
        t.encrypted.iter().any(|c| c == col).then(|| ColumnRef {
            schema: t.schema.clone(),
            table: t.name.clone(),
            column: col.to_owned(),
        })
    }

    /// Checks an expression; returns the encrypted column it evaluates to, if any.
    pub(crate) fn expr(&mut self, e: &Expr) -> Res<Option<ColumnRef>> {
        let refuse = |c: ColumnRef, op: ReadOp| Err(read_refusal(c, op));
        if self.protected.has_searchable()
            && matches!(
                e,
                Expr::BinaryOp { .. }
                    | Expr::IsDistinctFrom(..)
                    | Expr::IsNotDistinctFrom(..)
                    | Expr::In { .. }
                    | Expr::AnyOp { .. }
            )
            && self.search(e)?
        {
            return Ok(None);
        }
        match e {
            Expr::Identifier(id) => Ok(self.resolve(&[fold(id)])),
            Expr::CompoundIdentifier(ids) => {
                let parts: Vec<String> = ids.iter().map(fold).collect();
                Ok(self.resolve(&parts))
            }
            Expr::Nested(inner) => self.expr(inner),
            Expr::Value(_) | Expr::TypedString(_) => Ok(None),
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
                self.expr(inner)?;
                Ok(None)
            }
            Expr::Cast {
                expr, data_type, ..
            } => match self.expr(expr)? {
                Some(c) if is_text_type(data_type) => Ok(Some(c)),
                Some(c) => refuse(c, ReadOp::NonTextCast),
                None => Ok(None),
            },
            Expr::Collate { expr, .. } => match self.expr(expr)? {
                Some(c) => refuse(c, ReadOp::Collate),
                None => Ok(None),
            },
            Expr::Function(f) => self.function(f),
            Expr::Subquery(q) => {
                let items = self.query(q)?;
                Ok(first_encrypted(&items))
            }
            Expr::Exists { subquery, .. } => {
                self.query(subquery)?;
                Ok(None)
            }
            Expr::In { expr, target, .. } => {
                if let Some(c) = self.expr(expr)? {
                    return refuse(c, ReadOp::In);
                }
                match target {
                    sqlparser::ast::InTarget::List(list) => {
                        for x in list {
                            if let Some(c) = self.expr(x)? {
                                return refuse(c, ReadOp::In);
                            }
                        }
                    }
                    sqlparser::ast::InTarget::Subquery(q) => {
                        let items = self.query(q)?;
                        if let Some(c) = first_encrypted(&items) {
                            return refuse(c, ReadOp::InSubquery);
                        }
                    }
                    other => {
                        self.fallback_expr(&other.to_string())?;
                    }
                }
                Ok(None)
            }
            Expr::BinaryOp { left, right, op } => {
                for x in [left, right] {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::BinaryOperator(op.clone()));
                    }
                }
                Ok(None)
            }
            Expr::IsDistinctFrom(a, b) | Expr::IsNotDistinctFrom(a, b) => {
                for x in [a, b] {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::IsDistinctFrom);
                    }
                }
                Ok(None)
            }
            Expr::Like {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::SimilarTo {
                expr,
                pattern,
                escape_char,
                ..
            } => {
                for x in [Some(expr), Some(pattern), escape_char.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::PatternMatching);
                    }
                }
                Ok(None)
            }
            Expr::AnyOp { left, right, .. } | Expr::AllOp { left, right, .. } => {
                for x in [left, right] {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::AnyAll);
                    }
                }
                Ok(None)
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                for x in [expr, low, high] {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::Between);
                    }
                }
                Ok(None)
            }
            Expr::UnaryOp { expr, op } => match self.expr(expr)? {
                Some(c) => refuse(c, ReadOp::UnaryOperator(*op)),
                None => Ok(None),
            },
            Expr::IsTrue(x)
            | Expr::IsNotTrue(x)
            | Expr::IsFalse(x)
            | Expr::IsNotFalse(x)
            | Expr::IsUnknown(x)
            | Expr::IsNotUnknown(x) => match self.expr(x)? {
                Some(c) => refuse(c, ReadOp::BooleanTest),
                None => Ok(None),
            },
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let all = operand
                    .iter()
                    .map(|b| b.as_ref())
                    .chain(conditions.iter().flat_map(|w| [&w.condition, &w.result]))
                    .chain(else_result.iter().map(|b| b.as_ref()));
                for x in all {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::Case);
                    }
                }
                Ok(None)
            }
            Expr::Tuple(xs) | Expr::Array(sqlparser::ast::Array { elem: xs, .. }) => {
                for x in xs {
                    if let Some(c) = self.expr(x)? {
                        return refuse(c, ReadOp::RowOrArray);
                    }
                }
                Ok(None)
            }
            Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => Ok(None),
            other => self.fallback_expr(&other.to_string()),
        }
    }

    /// Expressions this module does not model: refuse if they mention anything protected.
    pub(crate) fn fallback_expr(&mut self, text: &str) -> Res<Option<ColumnRef>> {
        if let Some(c) = self.mentioned_encrypted(text) {
            return Err(read_refusal(c, ReadOp::UnmodelledExpression));
        }
        if self.mentions_sensitive(text) {
            self.out.touches_protected = true;
            return Err(RejectionKind::Unanalysable(Construct::Expression));
        }
        Ok(None)
    }

    fn function(&mut self, f: &sqlparser::ast::Function) -> Res<Option<ColumnRef>> {
        let fname = name_parts(&f.name)
            .and_then(|p| p.last().cloned())
            .unwrap_or_default();
        if fname == "set_config" {
            let first = match &f.args {
                FunctionArguments::List(l) => l.args.first(),
                _ => None,
            };
            let setting = first.and_then(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => self.literal_text(e),
                _ => None,
            });
            match setting {
                Some(s) if !s.eq_ignore_ascii_case(TENANT_SETTING) => {}
                _ => {
                    return Err(RejectionKind::TenantSetting(
                        TenantSettingUse::SetConfigPlacement,
                    ))
                }
            }
        }
        if let Some(pass_through) = self.coalesce_pass_through(f)? {
            return Ok(pass_through);
        }
        if let Some(w) = &f.over {
            match w {
                WindowType::WindowSpec(spec) => {
                    for p in &spec.partition_by {
                        if let Some(c) = self.expr(p)? {
                            return Err(read_refusal(c, ReadOp::WindowPartitionBy));
                        }
                    }
                    self.order_exprs(&spec.order_by, &[], ReadOp::WindowOrderBy)?;
                }
                WindowType::NamedWindow(_) => {}
            }
        }
        if let Some(filter) = &f.filter {
            self.expr(filter)?;
        }
        self.order_exprs(&f.within_group, &[], ReadOp::WithinGroup)?;
        match &f.args {
            FunctionArguments::None => {}
            FunctionArguments::Subquery(q) => {
                let items = self.query(q)?;
                if let Some(c) = first_encrypted(&items) {
                    return Err(read_refusal(c, ReadOp::Function { name: fname }));
                }
            }
            FunctionArguments::List(list) => {
                let distinct = matches!(
                    list.duplicate_treatment,
                    Some(sqlparser::ast::DuplicateTreatment::Distinct)
                );
                if !list.clauses.is_empty() && self.mentions_sensitive(&f.to_string()) {
                    return self.fallback_expr(&f.to_string());
                }
                let count = fname == "count" && list.args.len() == 1 && !distinct;
                for a in &list.args {
                    let e = match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e))
                        | FunctionArg::Named {
                            arg: FunctionArgExpr::Expr(e),
                            ..
                        }
                        | FunctionArg::ExprNamed {
                            arg: FunctionArgExpr::Expr(e),
                            ..
                        } => e,
                        _ => continue,
                    };
                    if let Some(c) = self.expr(e)? {
                        if !count {
                            let op = if distinct {
                                ReadOp::DistinctAggregate { name: fname }
                            } else {
                                ReadOp::Function { name: fname }
                            };
                            return Err(read_refusal(c, op));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// `coalesce(x, fallback…)` where every fallback is a string literal, NULL or a parameter:
    /// the result is `x` itself or a value the client wrote, so it is `x`'s column (decrypted on
    /// the way out, refused where `x` would be). `Ok(None)`: not this form.
    fn coalesce_pass_through(
        &mut self,
        f: &sqlparser::ast::Function,
    ) -> Res<Option<Option<ColumnRef>>> {
        let is_coalesce = matches!(name_parts(&f.name).as_deref(), Some([n]) if n == "coalesce");
        let FunctionArguments::List(list) = &f.args else {
            return Ok(None);
        };
        if !is_coalesce
            || f.over.is_some()
            || f.filter.is_some()
            || !f.within_group.is_empty()
            || list.duplicate_treatment.is_some()
            || !list.clauses.is_empty()
        {
            return Ok(None);
        }
        let args: Option<Vec<&Expr>> = list
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })
            .collect();
        let Some((first, rest)) = args.as_deref().and_then(<[&Expr]>::split_first) else {
            return Ok(None);
        };
        let plain = |e: &Expr| match strip_casts(e) {
            Expr::Value(v) => matches!(
                v.value,
                Value::Null
                    | Value::Placeholder(_)
                    | Value::SingleQuotedString(_)
                    | Value::EscapedStringLiteral(_)
                    | Value::DollarQuotedString(_)
            ),
            _ => false,
        };
        if !rest.iter().all(|e| plain(e)) {
            return Ok(None);
        }
        self.expr(first).map(Some)
    }

    /// `SELECT set_config('pgenvelope.tenant', value, is_local)` as a top-level item.
    /// `Ok(Some(()))` when recognised and recorded.
    fn top_set_config(&mut self, e: &Expr) -> Res<Option<()>> {
        let Expr::Function(f) = e else {
            return Ok(None);
        };
        let fname = name_parts(&f.name).and_then(|p| p.last().cloned());
        if fname.as_deref() != Some("set_config") || f.over.is_some() || f.filter.is_some() {
            return Ok(None);
        }
        let FunctionArguments::List(list) = &f.args else {
            return Ok(None);
        };
        let args: Vec<&Expr> = list
            .args
            .iter()
            .filter_map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })
            .collect();
        let [name, value, local] = args.as_slice() else {
            return Ok(None);
        };
        // A parameter as the name may name the tenant: decided when it is bound.
        let name_param = match strip_casts(name) {
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) => super::analyzer::param_number(p),
                _ => None,
            },
            _ => None,
        };
        if name_param.is_none() {
            let Some(setting) = self.literal_text(name) else {
                return Ok(None);
            };
            if !setting.eq_ignore_ascii_case(TENANT_SETTING) {
                return Ok(None);
            }
        }
        let bad = || RejectionKind::TenantSetting(TenantSettingUse::SetConfigArguments);
        let local = match strip_casts(local) {
            Expr::Value(v) => match &v.value {
                Value::Boolean(b) => *b,
                _ => match self
                    .literal_text(local)
                    .map(|s| s.to_ascii_lowercase())
                    .as_deref()
                {
                    Some("true" | "t" | "on" | "yes" | "1") => true,
                    Some("false" | "f" | "off" | "no" | "0") => false,
                    _ => return Err(bad()),
                },
            },
            _ => return Err(bad()),
        };
        let change = match strip_casts(value) {
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) => match super::analyzer::param_number(p) {
                    Some(param) => TenantChange::SetParam { param, local },
                    None => return Err(bad()),
                },
                Value::Null => TenantChange::Reset { local },
                _ => match self.literal_text(value) {
                    Some(value) => TenantChange::Set { value, local },
                    None => return Err(bad()),
                },
            },
            _ => return Err(bad()),
        };
        let change = match name_param {
            Some(name) => TenantChange::IfParamNamesTenant {
                name,
                change: Box::new(change),
            },
            None => change,
        };
        self.out.tenant_changes.push(change);
        Ok(Some(()))
    }
}

/// The refusal of `op` over encrypted column `column`.
fn read_refusal(column: ColumnRef, op: ReadOp) -> RejectionKind {
    RejectionKind::Read { column, op }
}

/// Removes casts to text types and parentheses.
pub(crate) fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip_casts(inner),
        Expr::Cast {
            expr, data_type, ..
        } if is_text_type(data_type) || matches!(data_type, DataType::Boolean) => strip_casts(expr),
        other => other,
    }
}

/// Text types a value can be cast to without changing it. Lengths are refused: an explicit cast
/// to `varchar(n)` truncates silently and would corrupt an envelope.
pub(crate) fn is_text_type(t: &DataType) -> bool {
    match t {
        DataType::Text | DataType::String(None) => true,
        DataType::Varchar(None) | DataType::CharacterVarying(None) => true,
        DataType::Custom(name, mods) if mods.is_empty() => {
            let unbounded = |n: &str| n == "bpchar" || n == "text" || n == "varchar";
            match name_parts(name).as_deref() {
                Some([n]) => unbounded(n),
                Some([schema, n]) => schema == "pg_catalog" && unbounded(n),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Applies a table alias's column list to query output, positionally.
pub(crate) fn rename(items: &[OutItem], alias: &TableAlias) -> Res<Vec<OutCol>> {
    if alias.columns.is_empty() {
        return Ok(flatten(items));
    }
    let mut out = Vec::new();
    let mut names = alias.columns.iter();
    let mut positions_known = true;
    let expanded: Vec<OutItem> = items
        .iter()
        .flat_map(|i| match i {
            OutItem::Known(cs) => cs.iter().cloned().map(OutItem::Col).collect(),
            other => vec![other.clone()],
        })
        .collect();
    for item in &expanded {
        match item {
            OutItem::Col(c) if positions_known => out.push(OutCol {
                name: names
                    .next()
                    .map(|n| fold(&n.name))
                    .or_else(|| c.name.clone()),
                enc: c.enc.clone(),
            }),
            OutItem::Col(c) => {
                if c.enc.is_some() {
                    out.push(OutCol {
                        name: None,
                        enc: c.enc.clone(),
                    });
                }
            }
            OutItem::Wild(cs) => {
                if let Some(c) = cs.iter().find_map(|c| c.enc.clone()) {
                    return Err(read_refusal(c, ReadOp::ColumnAliasesOverWildcard));
                }
                // Unknown width: the remaining names cannot be matched to columns.
                positions_known = false;
            }
            OutItem::Known(_) => {}
        }
    }
    Ok(out)
}
