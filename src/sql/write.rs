//! Write-path checks: INSERT, UPDATE, DELETE and the values they write to encrypted columns.
//!
//! A value written to an encrypted column must be a string literal (encrypted in the text), a
//! `$n` parameter (encrypted in the Bind), NULL or DEFAULT, optionally cast to an unbounded text
//! type. Anything else would make PostgreSQL compute the stored value from plaintext, so it is
//! refused, naming the column.

use sqlparser::ast::{
    Assignment, AssignmentTarget, BinaryOperator, DataType, Delete, Expr, FromTable, Insert,
    ObjectName, OnConflictAction, OnInsert, SetExpr, TableFactor, TableObject, Update,
    UpdateTableFromKind, Value,
};

use super::analyzer::{fold, name_parts, param_number, Analyzer, Res};
use super::pins::{quote_ident, DrawShape, PinScope};
use super::read::{is_text_type, OutItem, Rel, RelKind};
use super::text::decode_literal;
use super::{
    ArraySite, ArraySource, ColumnRef, Construct, DrawEdit, DrawRows, InvalidStatement, KeyDraw,
    LiteralSite, ParamSite, PinValue, ProtectedTable, RejectionKind, RowKeySource, TenantColumnUse,
    TenantPin, TenantSource, WriteOp,
};

/// What an expression writes into an encrypted column.
enum WriteVal {
    Literal(std::ops::Range<usize>, String),
    Param(usize),
    /// NULL or DEFAULT: nothing to encrypt.
    Nothing,
    /// The same column of the same row (`SET enc = enc`, `EXCLUDED.enc`).
    Same,
    Refused,
}

impl<'a> Analyzer<'a> {
    /// The protected table a write target names, if any. Ambiguous unqualified names are refused.
    pub(crate) fn write_target(&mut self, name: &ObjectName) -> Res<Option<usize>> {
        let parts = name_parts(name).unwrap_or_default();
        // A write target is always a real table, even when a CTE has the same name.
        let idxs = self.resolve_table(&parts);
        match idxs.as_slice() {
            [] => Ok(None),
            [one] => {
                self.out.touches_protected = true;
                Ok(Some(*one))
            }
            _ => {
                self.out.touches_protected = true;
                Err(RejectionKind::AmbiguousTable {
                    name: parts.last().cloned().unwrap_or_default(),
                })
            }
        }
    }

    fn table_ref(&self, idx: usize) -> Option<ProtectedTable> {
        self.protected.table(idx).cloned()
    }

    pub(crate) fn insert(&mut self, ins: &Insert) -> Res<Vec<OutItem>> {
        let TableObject::TableName(name) = &ins.table else {
            if self.mentions_protected(&ins.to_string()) {
                return Err(RejectionKind::Unanalysable(
                    Construct::InsertIntoTableFunction,
                ));
            }
            return Ok(Vec::new());
        };
        let target = self.write_target(name)?;
        let visible = ins
            .table_alias
            .as_ref()
            .map(|a| fold(&a.alias))
            .or_else(|| name_parts(name).and_then(|p| p.last().cloned()))
            .unwrap_or_default();
        let Some(idx) = target.and_then(|i| self.table_ref(i).map(|t| (i, t))) else {
            // Not protected: the source and RETURNING are still reads.
            if let Some(src) = &ins.source {
                self.query(src)?;
            }
            self.frames.push(Vec::new());
            let mut frame = Vec::new();
            let r = self.base_table(name, None, &mut frame, false);
            self.frames.pop();
            r?;
            return self.insert_tail(ins, frame, None, &[], &[]);
        };
        let (idx, table) = idx;
        let columns: Vec<String> = ins
            .columns
            .iter()
            .map(|c| {
                name_parts(c)
                    .and_then(|p| p.last().cloned())
                    .unwrap_or_default()
            })
            .collect();
        let col_ref = |c: &str| ColumnRef {
            schema: table.schema.clone(),
            table: table.name.clone(),
            column: c.to_owned(),
        };
        let mut row_tenants: Vec<TenantSource> = Vec::new();
        let mut row_keys: Vec<RowKey> = Vec::new();
        if let Some(arrays) = ins
            .source
            .as_deref()
            .and_then(|q| unnest_arrays(q, columns.len()))
        {
            let per_row = self.unnest_insert(ins, &table, &columns, &arrays)?;
            // Rows whose tenants the arrays give: an upsert is pinned to each inserted row's
            // own tenant. `$0` names no parameter, so a new value in the DO UPDATE (which
            // would need one tenant for all rows) is refused when it is bound.
            row_tenants.push(if per_row {
                TenantSource::Param(0)
            } else {
                TenantSource::Session
            });
            let frame = vec![Rel {
                name: visible,
                schema: None,
                kind: RelKind::Protected(vec![idx]),
            }];
            let key = if table.row_key.is_some() {
                unknown_key(Some(&table))
            } else {
                RowKey::Unbound
            };
            return self.insert_tail(ins, frame, Some(&table), &row_tenants, &[key]);
        }
        match &ins.source {
            None => {
                if !ins.assignments.is_empty() {
                    return Err(RejectionKind::Invalid(InvalidStatement::InsertSet));
                }
            }
            Some(src) => {
                if columns.is_empty() && !table.encrypted.is_empty() {
                    return Err(write_refusal(
                        col_ref(&table.encrypted[0]),
                        WriteOp::InsertWithoutColumnList,
                    ));
                }
                let mut shape = DrawShape::Values;
                let values: Option<Vec<Vec<Expr>>> = match (
                    src.body.as_ref(),
                    &src.with,
                    &src.order_by,
                    &src.limit_clause,
                ) {
                    (SetExpr::Values(v), None, None, None) => {
                        Some(v.rows.iter().map(|r| r.content.clone()).collect())
                    }
                    _ => {
                        shape = DrawShape::SelectOverValues;
                        rows_of_select_over_values(src, columns.len())
                    }
                };
                match values {
                    Some(rows) => {
                        // A key left to its default is drawn by the proxy.
                        let draw = match self.drawable_key(ins, &table, &columns) {
                            Some(k) => {
                                self.key_draw(&table, &k, shape, DrawRows::Fixed(rows.len()))
                            }
                            None => None,
                        };
                        // A key written as DEFAULT is drawn in its place.
                        let in_place = match shape {
                            DrawShape::Values if draw.is_none() => {
                                self.default_keys_draw(ins, &table, &columns, &rows)
                            }
                            _ => None,
                        };
                        for (i, row) in rows.iter().enumerate() {
                            if row.len() != columns.len() {
                                return Err(RejectionKind::Invalid(
                                    InvalidStatement::InsertValueCount,
                                ));
                            }
                            let tenant = self.row_tenant(&table, &columns, row)?;
                            row_tenants.push(tenant.clone());
                            let key = match (draw, &in_place) {
                                (Some(draw), _) => {
                                    RowKey::Known(RowKeySource::Drawn { draw, row: i })
                                }
                                (None, Some((draw, drawn_rows))) => {
                                    match drawn_rows.iter().position(|r| *r == i) {
                                        Some(row) => {
                                            RowKey::Known(RowKeySource::Drawn { draw: *draw, row })
                                        }
                                        None => self.row_key_of(&table, &columns, row),
                                    }
                                }
                                (None, None) => self.row_key_of(&table, &columns, row),
                            };
                            row_keys.push(key.clone());
                            for (c, e) in columns.iter().zip(row) {
                                if table.encrypted.contains(c) {
                                    self.encrypted_value(e, &col_ref(c), &tenant, &key, None)?;
                                } else {
                                    self.frames.push(Vec::new());
                                    let r = self.expr(e);
                                    self.frames.pop();
                                    r?;
                                }
                            }
                        }
                    }
                    None => {
                        if let Some(c) = columns.iter().find(|c| table.encrypted.contains(c)) {
                            return Err(write_refusal(col_ref(c), WriteOp::InsertFromQuery));
                        }
                        self.query(src)?;
                    }
                }
            }
        }
        let frame = vec![Rel {
            name: visible,
            schema: None,
            kind: RelKind::Protected(vec![idx]),
        }];
        self.insert_tail(ins, frame, Some(&table), &row_tenants, &row_keys)
    }

    /// `INSERT INTO t (c…) SELECT * FROM UNNEST(a1, a2, …)`: array `i` holds column `i` of
    /// every row. Arrays for encrypted columns must be given as a literal or a parameter cast
    /// to an unbounded text array, and so must the tenant's and the row key's arrays (cast to
    /// their own types); their elements are sealed one by one.
    fn unnest_insert(
        &mut self,
        ins: &Insert,
        table: &ProtectedTable,
        columns: &[String],
        arrays: &[&Expr],
    ) -> Res<bool> {
        let col_ref = |c: &str| table_column(table, c);
        let writes_encrypted = columns.iter().any(|c| table.encrypted.contains(c));
        let given = |name: Option<&String>, refuse: RejectionKind| -> Res<Option<ArraySource>> {
            let Some(name) = name else { return Ok(None) };
            let Some(pos) = columns.iter().position(|c| c == name) else {
                return Ok(None);
            };
            match self.array_source(arrays[pos], false) {
                Some(a) => Ok(Some(a)),
                None if writes_encrypted => Err(refuse),
                None => Ok(None),
            }
        };
        let tenant = given(
            table.tenant_column.as_ref(),
            tenant_refusal(
                table,
                table.tenant_column.as_deref().unwrap_or_default(),
                TenantColumnUse::InsertedExpression,
            ),
        )?;
        let first = table.encrypted.first().map(|c| col_ref(c));
        let row_key = match &table.row_key {
            None => None,
            Some(k) => {
                let missing = RejectionKind::RowKeyMissing {
                    column: first.clone().unwrap_or_else(|| col_ref(k)),
                    row_key: k.clone(),
                };
                match given(Some(k), missing.clone())? {
                    Some(a) => Some(a),
                    None if writes_encrypted => {
                        // Left to its default: drawn, as many keys as the arrays have rows.
                        let sources: Option<Vec<ArraySource>> =
                            arrays.iter().map(|e| self.array_source(e, false)).collect();
                        let draw = match (sources, self.drawable_key(ins, table, columns)) {
                            (Some(sources), Some(k)) => self.key_draw(
                                table,
                                &k,
                                DrawShape::Unnest,
                                DrawRows::Longest(sources),
                            ),
                            _ => None,
                        };
                        Some(ArraySource::Drawn(draw.ok_or(missing)?))
                    }
                    None => None,
                }
            }
        };
        for (c, e) in columns.iter().zip(arrays) {
            if table.encrypted.contains(c) {
                let Some(value) = self.array_source(e, true) else {
                    if is_null_or_default(e) {
                        continue;
                    }
                    return Err(RejectionKind::UnsupportedValue { column: col_ref(c) });
                };
                self.out.arrays.push(ArraySite {
                    value,
                    column: col_ref(c),
                    tenant: tenant.clone(),
                    row_key: row_key.clone(),
                });
            } else {
                self.frames.push(Vec::new());
                let r = self.expr(e);
                self.frames.pop();
                r?;
            }
        }
        Ok(tenant.is_some())
    }

    /// An array given as a literal or a parameter through array casts: to unbounded text
    /// arrays only (`text_only`, for values of encrypted columns), or to text, integer or
    /// uuid arrays (tenants and row keys).
    fn array_source(&self, e: &Expr, text_only: bool) -> Option<ArraySource> {
        match e {
            Expr::Nested(inner) => self.array_source(inner, text_only),
            Expr::Cast {
                expr,
                data_type: DataType::Array(def),
                format: None,
                ..
            } => {
                let element = match def {
                    sqlparser::ast::ArrayElemTypeDef::SquareBracket(t, None) => t.as_ref(),
                    _ => return None,
                };
                let keeps = is_text_type(element)
                    || (!text_only
                        && (is_uuid_type(element)
                            || matches!(
                                element,
                                DataType::Int(None)
                                    | DataType::Integer(None)
                                    | DataType::BigInt(None)
                                    | DataType::SmallInt(None)
                                    | DataType::Int2(None)
                                    | DataType::Int4(None)
                                    | DataType::Int8(None)
                            )));
                if !keeps {
                    return None;
                }
                let inner = self.array_source(expr, text_only)?;
                Some(match inner {
                    ArraySource::Literal { range, text, uuid } => ArraySource::Literal {
                        range,
                        text,
                        uuid: uuid || is_uuid_type(element),
                    },
                    param => param,
                })
            }
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) => param_number(p).map(ArraySource::Param),
                Value::SingleQuotedString(_) | Value::EscapedStringLiteral(_) => {
                    let range = self.pos.range(v.span)?;
                    let raw = self.pos.slice(range.clone())?;
                    let text = decode_literal(raw)?;
                    Some(ArraySource::Literal {
                        range,
                        text,
                        uuid: false,
                    })
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// ON CONFLICT and RETURNING of an INSERT.
    fn insert_tail(
        &mut self,
        ins: &Insert,
        frame: Vec<Rel>,
        table: Option<&ProtectedTable>,
        row_tenants: &[TenantSource],
        row_keys: &[RowKey],
    ) -> Res<Vec<OutItem>> {
        let mut frame = frame;
        if let Some(rel) = frame.first() {
            let mut excluded = rel.clone();
            excluded.name = "excluded".to_owned();
            frame.push(excluded);
        }
        self.frames.push(frame);
        let r = self.insert_tail_inner(ins, table, row_tenants, row_keys);
        self.frames.pop();
        r
    }

    fn insert_tail_inner(
        &mut self,
        ins: &Insert,
        table: Option<&ProtectedTable>,
        row_tenants: &[TenantSource],
        row_keys: &[RowKey],
    ) -> Res<Vec<OutItem>> {
        match &ins.on {
            Some(OnInsert::OnConflict(oc)) => {
                if let Some(target) = &oc.conflict_target {
                    if self.mentions_sensitive(&target.to_string()) {
                        let text = target.to_string();
                        if let Some(t) = table {
                            if let Some(c) = t
                                .encrypted
                                .iter()
                                .find(|c| text.to_lowercase().contains(c.to_lowercase().as_str()))
                            {
                                return Err(write_refusal(
                                    ColumnRef {
                                        schema: t.schema.clone(),
                                        table: t.name.clone(),
                                        column: c.clone(),
                                    },
                                    WriteOp::OnConflictTarget,
                                ));
                            }
                        }
                    }
                }
                if let OnConflictAction::DoUpdate(du) = &oc.action {
                    // New values in the DO UPDATE are sealed for one tenant; `EXCLUDED.col`
                    // carries each inserted row's own value.
                    let tenant = match row_tenants.split_first() {
                        Some((first, rest)) if rest.iter().all(|t| t == first) => first.clone(),
                        Some(_) => {
                            let mixed_with_session = row_tenants.contains(&TenantSource::Session);
                            if table.is_some_and(|t| {
                                mixed_with_session
                                    || writes_sealed_values(t, &du.assignments, false)
                            }) {
                                return Err(RejectionKind::OnConflictMixedTenants);
                            }
                            TenantSource::Session
                        }
                        None => TenantSource::Session,
                    };
                    let visible = ins
                        .table_alias
                        .as_ref()
                        .map(|a| fold(&a.alias))
                        .or_else(|| match &ins.table {
                            TableObject::TableName(n) => {
                                name_parts(n).and_then(|p| p.last().cloned())
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    // A value sealed for the inserted row's key lands in the conflicting row:
                    // the same key only when the conflict is on the key itself.
                    let key = match row_keys {
                        [one] => one.clone(),
                        _ => unknown_key(table),
                    };
                    self.assignments(
                        &du.assignments,
                        table,
                        &tenant,
                        &key,
                        &["excluded", visible.as_str()],
                    )?;
                    if let Some(t) = table {
                        let given = !row_tenants.is_empty()
                            && row_tenants.iter().all(|r| *r != TenantSource::Session);
                        let pin = same_tenant_on_conflict(
                            t,
                            oc.conflict_target.as_ref(),
                            du,
                            &visible,
                            given,
                        )?;
                        if let Some(value) = pin {
                            let refused = || RejectionKind::OnConflictOtherTenant {
                                tenant_column: table_column(
                                    t,
                                    t.tenant_column.as_deref().unwrap_or_default(),
                                ),
                                target: visible.clone(),
                            };
                            let place = self.pin_place(PinScope::DoUpdate).ok_or_else(refused)?;
                            let tc = t.tenant_column.as_deref().unwrap_or_default();
                            self.out.pins.push(TenantPin {
                                place,
                                column: format!("{}.{}", quote_ident(&visible), quote_ident(tc)),
                                value,
                                lookup: None,
                            });
                        }
                        same_key_on_conflict(t, oc.conflict_target.as_ref(), du, &visible)?;
                    }
                    if let Some(sel) = &du.selection {
                        self.condition(sel)?;
                    }
                }
            }
            Some(OnInsert::DuplicateKeyUpdate(_)) => {
                return Err(RejectionKind::Invalid(
                    InvalidStatement::OnDuplicateKeyUpdate,
                ));
            }
            Some(_) | None => {}
        }
        self.returning(ins.returning.as_deref())
    }

    fn returning(&mut self, items: Option<&[sqlparser::ast::SelectItem]>) -> Res<Vec<OutItem>> {
        let mut out = Vec::new();
        for item in items.unwrap_or_default() {
            out.push(self.select_item(item, false)?);
        }
        self.returns_row_keys(items.unwrap_or_default(), &out)?;
        Ok(out)
    }

    /// A value of a row-bound table opens only with its row key in the same result. A read
    /// without it is refused when its rows arrive; for RETURNING that would be after the
    /// write is done, so it is refused before.
    fn returns_row_keys(&self, items: &[sqlparser::ast::SelectItem], out: &[OutItem]) -> Res<()> {
        use sqlparser::ast::SelectItem;
        let encrypted = out.iter().flat_map(|item| match item {
            OutItem::Col(c) => std::slice::from_ref(c),
            OutItem::Wild(cs) | OutItem::Known(cs) => cs.as_slice(),
        });
        for col in encrypted.filter_map(|c| c.enc.as_ref()) {
            let Some(key) = self
                .protected
                .get(&col.schema, &col.table)
                .and_then(|t| t.row_key.as_ref())
            else {
                continue;
            };
            let names_key = |e: &Expr| match e {
                Expr::Identifier(id) => &fold(id) == key,
                Expr::CompoundIdentifier(ids) => ids.last().is_some_and(|id| &fold(id) == key),
                _ => false,
            };
            let has_key = items.iter().any(|item| match item {
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => true,
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    names_key(e)
                }
                _ => false,
            });
            if !has_key {
                return Err(RejectionKind::RowKeyNotReturned {
                    column: col.clone(),
                    row_key: key.clone(),
                });
            }
        }
        Ok(())
    }

    /// The tenant of one VALUES row.
    fn row_tenant(
        &mut self,
        table: &ProtectedTable,
        columns: &[String],
        row: &[Expr],
    ) -> Res<TenantSource> {
        let Some(tc) = &table.tenant_column else {
            return Ok(TenantSource::Session);
        };
        let Some(pos) = columns.iter().position(|c| c == tc) else {
            return Ok(TenantSource::Session);
        };
        let Some(e) = row.get(pos) else {
            return Ok(TenantSource::Session);
        };
        match self.tenant_value(e) {
            Some(t) => Ok(t),
            None => {
                let writes_encrypted = columns
                    .iter()
                    .zip(row)
                    .any(|(c, e)| table.encrypted.contains(c) && !is_null_or_default(e));
                if writes_encrypted {
                    return Err(tenant_refusal(
                        table,
                        tc,
                        TenantColumnUse::InsertedExpression,
                    ));
                }
                Ok(TenantSource::Session)
            }
        }
    }

    /// The row key of `table` when an INSERT with these columns leaves it to its default and
    /// writes an encrypted column: the proxy then draws the keys.
    fn drawable_key(
        &self,
        ins: &Insert,
        table: &ProtectedTable,
        columns: &[String],
    ) -> Option<String> {
        let k = table.row_key.as_ref()?;
        (ins.overriding.is_none()
            && !columns.contains(k)
            && columns.iter().any(|c| table.encrypted.contains(c)))
        .then(|| k.clone())
    }

    /// Records the drawing of keys in place of `DEFAULT` for the key column in the rows of an
    /// `INSERT … VALUES`: the draw's index and the rows whose key is drawn, in order; `None`
    /// when no row writes its key as DEFAULT (or where cannot be told for certain).
    fn default_keys_draw(
        &mut self,
        ins: &Insert,
        table: &ProtectedTable,
        columns: &[String],
        rows: &[Vec<Expr>],
    ) -> Option<(usize, Vec<usize>)> {
        let k = table.row_key.as_ref()?;
        let pos = columns.iter().position(|c| c == k)?;
        if ins.overriding.is_some() || !columns.iter().any(|c| table.encrypted.contains(c)) {
            return None;
        }
        let mut drawn = Vec::new();
        let mut edits = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if let Some(Expr::Identifier(id)) = row.get(pos) {
                if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") {
                    let range = self.pos.range(id.span)?;
                    edits.push((range, DrawEdit::KeyInPlace(drawn.len())));
                    drawn.push(i);
                }
            }
        }
        if drawn.is_empty() {
            return None;
        }
        let overriding = self
            .draw_edits(DrawShape::Values)?
            .into_iter()
            .find(|(_, e)| *e == DrawEdit::Overriding)?;
        edits.insert(0, overriding);
        self.out.draws.push(KeyDraw {
            table: format!(
                "{}.{}",
                quote_ident(&table.schema),
                quote_ident(&table.name)
            ),
            column: k.clone(),
            rows: DrawRows::Fixed(drawn.len()),
            edits,
        });
        Some((self.out.draws.len() - 1, drawn))
    }

    /// Records the drawing of keys for column `key` of `table` by the current INSERT, of
    /// `shape` (see [`KeyDraw`]); its index in [`Analysis::draws`], or `None` when where the
    /// keys go cannot be told for certain (the INSERT is then refused as without a key).
    fn key_draw(
        &mut self,
        table: &ProtectedTable,
        key: &str,
        shape: DrawShape,
        rows: DrawRows,
    ) -> Option<usize> {
        let edits = self.draw_edits(shape)?;
        let keys = edits
            .iter()
            .filter(|(_, e)| matches!(e, DrawEdit::Key(_)))
            .count();
        match &rows {
            DrawRows::Fixed(n) if keys != *n => return None,
            DrawRows::Longest(_) if keys != 0 => return None,
            _ => {}
        }
        self.out.draws.push(KeyDraw {
            table: format!(
                "{}.{}",
                quote_ident(&table.schema),
                quote_ident(&table.name)
            ),
            column: key.to_owned(),
            rows,
            edits,
        });
        Some(self.out.draws.len() - 1)
    }

    /// The row key of one VALUES row (row binding).
    fn row_key_of(&self, table: &ProtectedTable, columns: &[String], row: &[Expr]) -> RowKey {
        let Some(k) = &table.row_key else {
            return RowKey::Unbound;
        };
        let given = columns
            .iter()
            .position(|c| c == k)
            .and_then(|pos| row.get(pos))
            .and_then(|e| self.key_value(e));
        match given {
            Some(key) => RowKey::Known(key),
            None => RowKey::Unknown(k.clone()),
        }
    }

    /// A row key given as a literal or a parameter (through casts that keep the text).
    fn key_value(&self, e: &Expr) -> Option<RowKeySource> {
        self.tenant_value(e).and_then(key_source)
    }

    /// A tenant given as literal, parameter, NULL or DEFAULT; `None` for anything else.
    ///
    /// Only casts that cannot change the stored text are looked through (unbounded text types
    /// and integer types): `'acme'::varchar(2)` stores `ac`, so it is not a tenant literal.
    fn tenant_value(&self, e: &Expr) -> Option<TenantSource> {
        let inner = strip_tenant_casts(e)?;
        if is_null_or_default(inner) {
            return Some(TenantSource::Session);
        }
        if let Expr::Value(v) = inner {
            if let Value::Placeholder(p) = &v.value {
                return param_number(p).map(TenantSource::Param);
            }
        }
        let text = self.literal_text(inner)?;
        // Cast to `uuid`, the value is stored in its canonical form, whatever form it is
        // written in (Django writes UUIDs as 32 hex digits).
        let text = match casts_to_uuid(e).then(|| super::text::canonical_uuid(&text)) {
            Some(Some(canonical)) => canonical,
            _ => text,
        };
        Some(TenantSource::Literal(text))
    }

    /// Records a value written to encrypted column `col`, or refuses it.
    ///
    /// A `CASE WHEN key = x THEN value … [ELSE NULL] END` (Django's `bulk_update`) writes each
    /// THEN value to the row its WHEN names: each is a value of its own, bound to that row's
    /// key when the table binds values to their row.
    fn encrypted_value(
        &mut self,
        e: &Expr,
        col: &ColumnRef,
        tenant: &TenantSource,
        key: &RowKey,
        same_quals: Option<&[&str]>,
    ) -> Res<()> {
        if let Some((conditions, else_result)) = case_of(e) {
            for when in conditions {
                let row_key = match (key, self.row_key_in_condition(col, &when.condition)) {
                    (RowKey::Unbound, _) => RowKey::Unbound,
                    (_, Some(k)) => RowKey::Known(k),
                    (other, None) => other.clone(),
                };
                self.expr(&when.condition)?;
                self.encrypted_value(&when.result, col, tenant, &row_key, same_quals)?;
            }
            if let Some(other) = else_result {
                if !is_null_or_default(other) {
                    return Err(RejectionKind::UnsupportedValue {
                        column: col.clone(),
                    });
                }
            }
            return Ok(());
        }
        let val = self.write_val(e, col, same_quals);
        let row_key = match (&val, key) {
            (WriteVal::Literal(..) | WriteVal::Param(_), RowKey::Unknown(k)) => {
                return Err(RejectionKind::RowKeyMissing {
                    column: col.clone(),
                    row_key: k.clone(),
                })
            }
            (_, RowKey::Known(k)) => Some(k.clone()),
            _ => None,
        };
        match val {
            WriteVal::Literal(range, value) => {
                self.out.literals.push(LiteralSite {
                    range,
                    value,
                    column: col.clone(),
                    tenant: tenant.clone(),
                    row_key,
                });
                Ok(())
            }
            WriteVal::Param(index) => {
                self.out.params.push(ParamSite {
                    index,
                    column: col.clone(),
                    tenant: tenant.clone(),
                    row_key,
                });
                Ok(())
            }
            WriteVal::Nothing | WriteVal::Same => Ok(()),
            WriteVal::Refused => Err(RejectionKind::UnsupportedValue {
                column: col.clone(),
            }),
        }
    }

    /// The row key a `CASE WHEN` condition names: `key = literal | $n` (either side, through
    /// casts), for `col`'s table.
    fn row_key_in_condition(&self, col: &ColumnRef, cond: &Expr) -> Option<RowKeySource> {
        let table = self.protected.get(&col.schema, &col.table)?;
        let key = table.row_key.as_deref()?;
        let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = strip_nested(cond)
        else {
            return None;
        };
        for (c, v) in [(left, right), (right, left)] {
            let names_key = match strip_any_cast(c) {
                Expr::Identifier(id) => fold(id) == key,
                Expr::CompoundIdentifier(ids) => ids.last().is_some_and(|id| fold(id) == key),
                _ => false,
            };
            if names_key {
                return self.key_value(v);
            }
        }
        None
    }

    fn write_val(&self, e: &Expr, col: &ColumnRef, same_quals: Option<&[&str]>) -> WriteVal {
        match e {
            Expr::Nested(inner) => self.write_val(inner, col, same_quals),
            Expr::Cast {
                expr,
                data_type,
                format: None,
                ..
            } if is_text_type(data_type) => self.write_val(expr, col, same_quals),
            Expr::Identifier(id)
                if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") =>
            {
                WriteVal::Nothing
            }
            Expr::Identifier(id) if fold(id) == col.column && same_quals.is_some() => {
                WriteVal::Same
            }
            Expr::CompoundIdentifier(ids) => {
                let parts: Vec<String> = ids.iter().map(fold).collect();
                match parts.as_slice() {
                    // Only the name the target is visible under (its alias once aliased, else
                    // its table name) or EXCLUDED: a FROM item or CTE of another name is
                    // another relation.
                    [q, c]
                        if c == &col.column
                            && same_quals.is_some_and(|qs| qs.contains(&q.as_str())) =>
                    {
                        WriteVal::Same
                    }
                    _ => WriteVal::Refused,
                }
            }
            // `text 'x'`, `varchar 'x'`, `pg_catalog.text 'x'`: a literal of a text type.
            Expr::TypedString(ts) if is_text_type(&ts.data_type) => {
                self.write_val(&Expr::Value(ts.value.clone()), col, same_quals)
            }
            Expr::Value(v) => match &v.value {
                Value::Null => WriteVal::Nothing,
                Value::Placeholder(p) => param_number(p).map_or(WriteVal::Refused, WriteVal::Param),
                Value::SingleQuotedString(_)
                | Value::EscapedStringLiteral(_)
                | Value::UnicodeStringLiteral(_)
                | Value::NationalStringLiteral(_)
                | Value::DollarQuotedString(_) => {
                    let Some(range) = self.pos.range(v.span) else {
                        return WriteVal::Refused;
                    };
                    let Some(raw) = self.pos.slice(range.clone()) else {
                        return WriteVal::Refused;
                    };
                    let after = self.pos.rest(range.end).trim_start();
                    if after.len() >= 7
                        && after
                            .get(..7)
                            .is_some_and(|w| w.eq_ignore_ascii_case("uescape"))
                    {
                        return WriteVal::Refused;
                    }
                    match decode_literal(raw) {
                        Some(value) => WriteVal::Literal(range, value),
                        None => WriteVal::Refused,
                    }
                }
                _ => WriteVal::Refused,
            },
            _ => WriteVal::Refused,
        }
    }

    /// SET clauses of UPDATE and ON CONFLICT DO UPDATE.
    fn assignments(
        &mut self,
        assignments: &[Assignment],
        table: Option<&ProtectedTable>,
        tenant: &TenantSource,
        key: &RowKey,
        same_quals: &[&str],
    ) -> Res<()> {
        let same_quals = Some(same_quals);
        for a in assignments {
            let targets: Vec<&ObjectName> = match &a.target {
                AssignmentTarget::ColumnName(n) => vec![n],
                AssignmentTarget::Tuple(ns) => ns.iter().collect(),
            };
            let mut enc = None;
            for t in &targets {
                let col = name_parts(t)
                    .and_then(|p| p.last().cloned())
                    .unwrap_or_default();
                if let Some(tb) = table {
                    if tb.encrypted.contains(&col) {
                        enc = Some(ColumnRef {
                            schema: tb.schema.clone(),
                            table: tb.name.clone(),
                            column: col,
                        });
                        break;
                    }
                }
            }
            match enc {
                Some(col) if targets.len() > 1 => {
                    return Err(write_refusal(col, WriteOp::MultiColumnSet));
                }
                Some(col) => self.encrypted_value(&a.value, &col, tenant, key, same_quals)?,
                None => {
                    self.expr(&a.value)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn update(&mut self, up: &Update) -> Res<Vec<OutItem>> {
        let (name, alias) = match &up.table.relation {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => (name, alias),
            _ => {
                if self.mentions_sensitive(&up.to_string()) {
                    self.out.touches_protected = true;
                    return Err(RejectionKind::Unanalysable(Construct::UpdateForm));
                }
                return Ok(Vec::new());
            }
        };
        let target = self.write_target(name)?;
        let table = target.and_then(|i| self.table_ref(i));
        self.frames.push(Vec::new());
        let r = self.update_inner(up, name, alias.as_ref(), table.as_ref());
        self.frames.pop();
        r
    }

    fn update_inner(
        &mut self,
        up: &Update,
        name: &ObjectName,
        alias: Option<&sqlparser::ast::TableAlias>,
        table: Option<&ProtectedTable>,
    ) -> Res<Vec<OutItem>> {
        let mut frame = self.frames.pop().unwrap_or_default();
        let r = self.base_table(name, alias, &mut frame, false);
        self.frames.push(frame);
        r?;
        let visible = alias
            .map(|a| fold(&a.name))
            .or_else(|| name_parts(name).and_then(|p| p.last().cloned()))
            .unwrap_or_default();
        if !up.table.joins.is_empty() {
            return Err(RejectionKind::Invalid(InvalidStatement::UpdateJoin));
        }
        if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) = &up.from
        {
            for twj in f {
                self.table_with_joins(twj)?;
            }
        }
        let mut tenant = match (table, &up.selection) {
            (Some(t), Some(sel)) => self.where_tenant(t, &visible, sel),
            _ => TenantSource::Session,
        };
        if let Some(t) = table {
            if let Some(new_tenant) = self.assigned_tenant(t, &up.assignments)? {
                tenant = new_tenant;
            }
        }
        let key = match (table, &up.selection) {
            (Some(t), _) if t.row_key.is_none() => RowKey::Unbound,
            (Some(t), Some(sel)) => self
                .where_column(t, &visible, sel, t.row_key.as_deref())
                .and_then(key_source)
                .map_or_else(|| unknown_key(table), RowKey::Known),
            (Some(_), None) => unknown_key(table),
            (None, _) => RowKey::Unbound,
        };
        if let Some(t) = table {
            refuse_key_assignment(t, &up.assignments)?;
        }
        self.assignments(&up.assignments, table, &tenant, &key, &[visible.as_str()])?;
        if let Some(t) = table {
            // Sealing under the session tenant a row that may belong to another organisation
            // would leave it unreadable: the row must be the session tenant's. The proxy adds
            // that condition (`AND t.org_id = <tenant>`), so another organisation's row is
            // simply not updated.
            if let Some(tc) = &t.tenant_column {
                if tenant == TenantSource::Session
                    && writes_sealed_values(t, &up.assignments, false)
                {
                    let (place, lookup) = self
                        .pin_place_and_lookup(PinScope::Update)
                        .ok_or_else(|| tenant_refusal(t, tc, TenantColumnUse::NotPinned))?;
                    self.out.pins.push(TenantPin {
                        place,
                        column: format!("{}.{}", quote_ident(&visible), quote_ident(tc)),
                        value: PinValue::SessionTenant,
                        lookup,
                    });
                }
            }
        }
        if let Some(sel) = &up.selection {
            self.condition(sel)?;
        }
        self.returning(up.returning.as_deref())
    }

    /// The tenant an UPDATE moves the row to, when it assigns the tenant column. Refused when the
    /// new tenant is an expression and encrypted columns are written in the same statement.
    fn assigned_tenant(
        &self,
        table: &ProtectedTable,
        assignments: &[Assignment],
    ) -> Res<Option<TenantSource>> {
        let Some(tc) = &table.tenant_column else {
            return Ok(None);
        };
        let last = |n: &ObjectName| name_parts(n).and_then(|p| p.last().cloned());
        let mut found = None;
        let mut writes_encrypted = false;
        for a in assignments {
            match &a.target {
                AssignmentTarget::ColumnName(n) => {
                    let col = last(n).unwrap_or_default();
                    if &col == tc {
                        found = Some(&a.value);
                    } else if table.encrypted.contains(&col) && !is_null_or_default(&a.value) {
                        writes_encrypted = true;
                    }
                }
                AssignmentTarget::Tuple(ns) => {
                    if !table.encrypted.is_empty()
                        && ns.iter().any(|n| last(n).as_ref() == Some(tc))
                    {
                        return Err(tenant_refusal(table, tc, TenantColumnUse::MultiColumnSet));
                    }
                }
            }
        }
        let Some(value) = found else { return Ok(None) };
        // Moving a row to another organisation: every encrypted value must be sealed again
        // for it in the same statement, or the row becomes unreadable.
        let resealed = |c: &String| {
            assignments.iter().any(|a| match &a.target {
                AssignmentTarget::ColumnName(n) => {
                    last(n).as_ref() == Some(c) && is_new_value(&a.value)
                }
                AssignmentTarget::Tuple(_) => false,
            })
        };
        if let Some(c) = table.encrypted.iter().find(|c| !resealed(c)) {
            return Err(write_refusal(
                table_column(table, c),
                WriteOp::MoveWithoutNewValue,
            ));
        }
        match self.tenant_value(value) {
            Some(t) => Ok(Some(t)),
            None if writes_encrypted => Err(tenant_refusal(
                table,
                tc,
                TenantColumnUse::AssignedExpression,
            )),
            None => Ok(None),
        }
    }

    /// `tenant_column = literal | $n` among the top-level AND-ed conjuncts of a WHERE.
    fn where_tenant(&self, table: &ProtectedTable, visible: &str, sel: &Expr) -> TenantSource {
        self.where_column(table, visible, sel, table.tenant_column.as_deref())
            .unwrap_or(TenantSource::Session)
    }

    /// `column = literal | $n` among the top-level AND-ed conjuncts of a WHERE.
    pub(crate) fn where_column(
        &self,
        table: &ProtectedTable,
        visible: &str,
        sel: &Expr,
        column: Option<&str>,
    ) -> Option<TenantSource> {
        let tc = column?;
        let mut stack = vec![sel];
        while let Some(e) = stack.pop() {
            match e {
                Expr::Nested(inner) => stack.push(inner),
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::And,
                    right,
                } => {
                    stack.push(right);
                    stack.push(left);
                }
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => {
                    for (col, val) in [(left, right), (right, left)] {
                        let is_tc = match strip_any_cast(col) {
                            Expr::Identifier(id) => fold(id) == tc,
                            Expr::CompoundIdentifier(ids) => {
                                let p: Vec<String> = ids.iter().map(fold).collect();
                                matches!(p.as_slice(), [.., q, c] if c == tc && (q == visible || q == &table.name))
                            }
                            _ => false,
                        };
                        if is_tc {
                            if let Some(t) = self.tenant_value(val) {
                                if t != TenantSource::Session {
                                    return Some(t);
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }

    pub(crate) fn delete(&mut self, del: &Delete) -> Res<Vec<OutItem>> {
        let from = match &del.from {
            FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => f,
        };
        self.frames.push(Vec::new());
        let r = self.delete_inner(del, from);
        self.frames.pop();
        r
    }

    fn delete_inner(
        &mut self,
        del: &Delete,
        from: &[sqlparser::ast::TableWithJoins],
    ) -> Res<Vec<OutItem>> {
        for twj in from {
            if let TableFactor::Table { name, .. } = &twj.relation {
                self.write_target(name)?;
            }
            self.table_with_joins(twj)?;
        }
        for twj in del.using.iter().flatten() {
            self.table_with_joins(twj)?;
        }
        if let Some(sel) = &del.selection {
            self.condition(sel)?;
        }
        self.returning(del.returning.as_deref())
    }
}

fn is_null_or_default(e: &Expr) -> bool {
    match e {
        Expr::Nested(inner) => is_null_or_default(inner),
        Expr::Cast { expr, .. } => is_null_or_default(expr),
        Expr::Value(v) => matches!(v.value, Value::Null),
        Expr::Identifier(id) => {
            id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default")
        }
        _ => false,
    }
}

fn strip_nested(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip_nested(inner),
        other => other,
    }
}

/// The WHEN branches and ELSE of a searched `CASE` (through parentheses and text casts).
fn case_of(e: &Expr) -> Option<(&[sqlparser::ast::CaseWhen], Option<&Expr>)> {
    match e {
        Expr::Nested(inner) => case_of(inner),
        Expr::Cast {
            expr,
            data_type,
            format: None,
            ..
        } if is_text_type(data_type) => case_of(expr),
        Expr::Case {
            operand: None,
            conditions,
            else_result,
            ..
        } => Some((conditions.as_slice(), else_result.as_deref())),
        _ => None,
    }
}

/// SQLAlchemy's "insertmanyvalues" source: `SELECT p0::T, p1::T … FROM (VALUES (…), (…)) AS
/// a(p0, p1, …, sen_counter) [ORDER BY sen_counter]`. Each VALUES row is one inserted row;
/// returned as the values the SELECT list picks from it, in the INSERT's column order (with
/// the SELECT list's casts), or `None` when the source has any other shape.
fn rows_of_select_over_values(q: &sqlparser::ast::Query, ncols: usize) -> Option<Vec<Vec<Expr>>> {
    use sqlparser::ast::{GroupByExpr, OrderByKind, SelectItem};
    if q.with.is_some() || q.limit_clause.is_some() || q.fetch.is_some() {
        return None;
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    let plain = s.distinct.is_none()
        && s.top.is_none()
        && s.into.is_none()
        && s.lateral_views.is_empty()
        && s.prewhere.is_none()
        && s.selection.is_none()
        && s.connect_by.is_empty()
        && matches!(&s.group_by, GroupByExpr::Expressions(g, m) if g.is_empty() && m.is_empty())
        && s.cluster_by.is_empty()
        && s.distribute_by.is_empty()
        && s.sort_by.is_empty()
        && s.having.is_none()
        && s.named_window.is_empty()
        && s.qualify.is_none()
        && s.from.len() == 1
        && s.from[0].joins.is_empty();
    if !plain || s.projection.len() != ncols {
        return None;
    }
    let TableFactor::Derived {
        lateral: false,
        subquery,
        alias: Some(alias),
        sample: None,
    } = &s.from[0].relation
    else {
        return None;
    };
    if subquery.with.is_some() || subquery.order_by.is_some() || subquery.limit_clause.is_some() {
        return None;
    }
    let SetExpr::Values(values) = subquery.body.as_ref() else {
        return None;
    };
    let names: Vec<String> = alias.columns.iter().map(|c| fold(&c.name)).collect();
    let alias_name = fold(&alias.name);
    // Which VALUES column each SELECT item picks, and the cast around it.
    let mut picks = Vec::with_capacity(ncols);
    for item in &s.projection {
        let e = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => return None,
        };
        let (inner, cast) = match strip_nested(e) {
            Expr::Cast {
                expr,
                data_type,
                format: None,
                kind,
            } => (strip_nested(expr), Some((data_type.clone(), kind.clone()))),
            other => (other, None),
        };
        let name = match inner {
            Expr::Identifier(id) => fold(id),
            Expr::CompoundIdentifier(ids) => match ids.as_slice() {
                [q, c] if fold(q) == alias_name => fold(c),
                _ => return None,
            },
            _ => return None,
        };
        picks.push((names.iter().position(|n| *n == name)?, cast));
    }
    // Ordering by a column no value is taken from (the row counter) is all it may do.
    if let Some(order) = &q.order_by {
        let OrderByKind::Expressions(exprs) = &order.kind else {
            return None;
        };
        for o in exprs {
            let Expr::Identifier(id) = strip_nested(&o.expr) else {
                return None;
            };
            let k = names.iter().position(|n| *n == fold(id))?;
            if picks.iter().any(|(p, _)| *p == k) {
                return None;
            }
        }
    }
    values
        .rows
        .iter()
        .map(|row| {
            let row = &row.content;
            if row.len() != names.len() {
                return None;
            }
            Some(
                picks
                    .iter()
                    .map(|(k, cast)| match cast {
                        None => row[*k].clone(),
                        Some((data_type, kind)) => Expr::Cast {
                            kind: kind.clone(),
                            expr: Box::new(row[*k].clone()),
                            data_type: data_type.clone(),
                            format: None,
                        },
                    })
                    .collect(),
            )
        })
        .collect()
}

/// The arrays of `SELECT * FROM UNNEST(a1, …, an)` with one array per inserted column, or
/// `None` for any other source.
fn unnest_arrays(q: &sqlparser::ast::Query, ncols: usize) -> Option<Vec<&Expr>> {
    use sqlparser::ast::{GroupByExpr, SelectItem};
    if q.with.is_some() || q.limit_clause.is_some() || q.fetch.is_some() || q.order_by.is_some() {
        return None;
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    let plain = s.distinct.is_none()
        && s.top.is_none()
        && s.into.is_none()
        && s.selection.is_none()
        && matches!(&s.group_by, GroupByExpr::Expressions(g, m) if g.is_empty() && m.is_empty())
        && s.having.is_none()
        && s.qualify.is_none()
        && s.from.len() == 1
        && s.from[0].joins.is_empty()
        && matches!(s.projection.as_slice(), [SelectItem::Wildcard(_)]);
    if !plain {
        return None;
    }
    let TableFactor::UNNEST {
        alias: None,
        array_exprs,
        with_offset: false,
        with_offset_alias: None,
        with_ordinality: false,
    } = &s.from[0].relation
    else {
        return None;
    };
    (array_exprs.len() == ncols).then(|| array_exprs.iter().collect())
}

fn strip_any_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip_any_cast(inner),
        Expr::Cast { expr, .. } => strip_any_cast(expr),
        other => other,
    }
}

/// Whether `t` is `uuid` (a tenant or row key cast to it is stored in its canonical text
/// form, which the proxy requires the value to be written in).
fn is_uuid_type(t: &DataType) -> bool {
    match t {
        DataType::Uuid => true,
        DataType::Custom(name, mods) if mods.is_empty() => {
            matches!(
                name_parts(name).as_deref(),
                Some([n]) if n == "uuid"
            ) || matches!(
                name_parts(name).as_deref(),
                Some([schema, n]) if schema == "pg_catalog" && n == "uuid"
            )
        }
        _ => false,
    }
}

/// Removes parentheses and casts that keep a tenant's text as written; `None` for any other
/// cast (a length, or a type whose text form may differ from the literal). A cast to an
/// integer type or to `uuid` is looked through: the value must then be written as PostgreSQL
/// prints it (checked where it is sealed), or it would be stored in another form.
fn strip_tenant_casts(e: &Expr) -> Option<&Expr> {
    match e {
        Expr::Nested(inner) => strip_tenant_casts(inner),
        Expr::Cast {
            expr, data_type, ..
        } => {
            let keeps = is_text_type(data_type)
                || is_uuid_type(data_type)
                || matches!(
                    data_type,
                    DataType::Int(None)
                        | DataType::Integer(None)
                        | DataType::BigInt(None)
                        | DataType::SmallInt(None)
                        | DataType::Int2(None)
                        | DataType::Int4(None)
                        | DataType::Int8(None)
                );
            if keeps {
                strip_tenant_casts(expr)
            } else {
                None
            }
        }
        other => Some(other),
    }
}

/// Whether `e` is cast to `uuid` somewhere around its innermost value (`'…'::uuid`,
/// `('…'::uuid)::text`): what is stored is then the UUID's canonical text.
fn casts_to_uuid(e: &Expr) -> bool {
    match e {
        Expr::Nested(inner) => casts_to_uuid(inner),
        Expr::Cast {
            expr, data_type, ..
        } => is_uuid_type(data_type) || casts_to_uuid(expr),
        _ => false,
    }
}

/// A value that replaces a column's old one outright: a literal, a parameter, NULL or DEFAULT
/// (casts allowed). Not another column, not an expression over the old value.
fn is_new_value(e: &Expr) -> bool {
    if let Some((conditions, _)) = case_of(e) {
        return conditions.iter().any(|w| is_new_value(&w.result));
    }
    match strip_any_cast(e) {
        Expr::Value(_) | Expr::TypedString { .. } => true,
        other => is_null_or_default(other),
    }
}

/// The row key of a written row, for row binding.
#[derive(Clone, Debug)]
pub(crate) enum RowKey {
    /// The table does not bind values to their row.
    Unbound,
    /// Given in the statement.
    Known(RowKeySource),
    /// The table binds values to the row key (this column), which the statement does not give:
    /// sealing a value is refused.
    Unknown(String),
}

/// Column `column` of `table`.
fn table_column(table: &ProtectedTable, column: &str) -> ColumnRef {
    ColumnRef {
        schema: table.schema.clone(),
        table: table.name.clone(),
        column: column.to_owned(),
    }
}

/// The refusal of `op` writing encrypted column `column`.
fn write_refusal(column: ColumnRef, op: WriteOp) -> RejectionKind {
    RejectionKind::Write { column, op }
}

/// The refusal of the tenant column `tc` of `table` given as `problem`.
fn tenant_refusal(table: &ProtectedTable, tc: &str, problem: TenantColumnUse) -> RejectionKind {
    RejectionKind::TenantColumn {
        column: table_column(table, tc),
        problem,
    }
}

/// A value found where a row key is given (read like a tenant value), as a row key: only a
/// literal or a parameter.
fn key_source(value: TenantSource) -> Option<RowKeySource> {
    match value {
        TenantSource::Literal(v) => Some(RowKeySource::Literal(v)),
        TenantSource::Param(n) => Some(RowKeySource::Param(n)),
        TenantSource::Session => None,
    }
}

/// [`RowKey::Unknown`] for a table that binds values to their row, else [`RowKey::Unbound`].
fn unknown_key(table: Option<&ProtectedTable>) -> RowKey {
    match table.and_then(|t| t.row_key.clone()) {
        Some(k) => RowKey::Unknown(k),
        None => RowKey::Unbound,
    }
}

/// A row-bound table's row key may not be changed: every value of the row was sealed for it.
fn refuse_key_assignment(table: &ProtectedTable, assignments: &[Assignment]) -> Res<()> {
    let Some(k) = &table.row_key else {
        return Ok(());
    };
    let assigns_key = assignments.iter().any(|a| {
        let targets: Vec<&ObjectName> = match &a.target {
            AssignmentTarget::ColumnName(n) => vec![n],
            AssignmentTarget::Tuple(ns) => ns.iter().collect(),
        };
        targets
            .iter()
            .any(|n| name_parts(n).and_then(|p| p.last().cloned()).as_ref() == Some(k))
    });
    if assigns_key {
        return Err(RejectionKind::RowKeyChanged {
            row_key: table_column(table, k),
        });
    }
    Ok(())
}

/// ON CONFLICT DO UPDATE of a row-bound table writes values sealed for the inserted row's key
/// into the conflicting row: the conflict target must include the row key, so that both rows
/// have the same key.
fn same_key_on_conflict(
    table: &ProtectedTable,
    target: Option<&sqlparser::ast::ConflictTarget>,
    du: &sqlparser::ast::DoUpdate,
    visible: &str,
) -> Res<()> {
    let Some(k) = &table.row_key else {
        return Ok(());
    };
    let key_in_target = matches!(
        target,
        Some(sqlparser::ast::ConflictTarget::Columns { columns, .. })
            if columns.iter().any(|c| &fold(c) == k)
    );
    // With the key in the conflict target, `key = EXCLUDED.key` (Sequelize's and Knex's
    // upserts assign every column) leaves it as it is.
    let assignments: Vec<Assignment> = du
        .assignments
        .iter()
        .filter(|a| !(key_in_target && assigns_excluded(a, k)))
        .cloned()
        .collect();
    refuse_key_assignment(table, &assignments)?;
    if !writes_sealed_values(table, &du.assignments, true) || key_in_target {
        return Ok(());
    }
    Err(RejectionKind::OnConflictOtherRowKey {
        row_key: table_column(table, k),
        target: visible.to_owned(),
    })
}

/// Whether `a` is `column = EXCLUDED.column`.
fn assigns_excluded(a: &Assignment, column: &str) -> bool {
    let AssignmentTarget::ColumnName(n) = &a.target else {
        return false;
    };
    let target = name_parts(n).and_then(|p| p.last().cloned());
    let value = match strip_any_cast(&a.value) {
        Expr::CompoundIdentifier(ids) => ids.iter().map(fold).collect::<Vec<_>>(),
        _ => return false,
    };
    target.as_deref() == Some(column)
        && matches!(value.as_slice(), [q, c] if q == "excluded" && c == column)
}

/// Whether `assignments` write a value the proxy seals (a literal or parameter, not NULL or
/// DEFAULT) to an encrypted column; with `refs`, any non-NULL value (`EXCLUDED.col` carries a
/// value sealed for the inserted row).
fn writes_sealed_values(table: &ProtectedTable, assignments: &[Assignment], refs: bool) -> bool {
    assignments.iter().any(|a| match &a.target {
        AssignmentTarget::ColumnName(n) => name_parts(n)
            .and_then(|p| p.last().cloned())
            .is_some_and(|c| {
                table.encrypted.contains(&c)
                    && !is_null_or_default(&a.value)
                    && (refs || is_new_value(&a.value))
            }),
        AssignmentTarget::Tuple(_) => true,
    })
}

/// ON CONFLICT DO UPDATE seals with the inserted row's tenant; the existing row it updates must
/// belong to the same organisation. That is certain when the conflict target includes the
/// tenant column, or when the DO UPDATE's WHERE has a top-level
/// `target.tenant = EXCLUDED.tenant`. Otherwise the proxy pins it: `Some(value)` is what the
/// existing row's tenant must equal (the inserted row's, when every row gives its tenant, `given`;
/// else the session tenant). Assigning the tenant column anything but `EXCLUDED.tenant` (which
/// the condition makes a no-op) while writing encrypted columns is refused.
fn same_tenant_on_conflict(
    table: &ProtectedTable,
    target: Option<&sqlparser::ast::ConflictTarget>,
    du: &sqlparser::ast::DoUpdate,
    visible: &str,
    given: bool,
) -> Res<Option<PinValue>> {
    let Some(tc) = &table.tenant_column else {
        return Ok(None);
    };
    let is_excluded_tenant = |e: &Expr| match strip_any_cast(e) {
        Expr::CompoundIdentifier(ids) => {
            let p: Vec<String> = ids.iter().map(fold).collect();
            matches!(p.as_slice(), [q, c] if q == "excluded" && c == tc)
        }
        _ => false,
    };
    let mut assigns_tenant = false;
    let mut assigns_other_tenant = false;
    for a in &du.assignments {
        match &a.target {
            AssignmentTarget::ColumnName(n) => {
                if name_parts(n).and_then(|p| p.last().cloned()).as_ref() == Some(tc) {
                    assigns_tenant = true;
                    if !is_excluded_tenant(&a.value) {
                        assigns_other_tenant = true;
                    }
                }
            }
            AssignmentTarget::Tuple(_) => {
                assigns_tenant = true;
                assigns_other_tenant = true;
            }
        }
    }
    if !assigns_tenant && !writes_sealed_values(table, &du.assignments, true) {
        return Ok(None);
    }
    let refused = || RejectionKind::OnConflictOtherTenant {
        tenant_column: table_column(table, tc),
        target: visible.to_owned(),
    };
    if assigns_other_tenant {
        return Err(refused());
    }
    if let Some(sqlparser::ast::ConflictTarget::Columns { columns, .. }) = target {
        if columns.iter().any(|c| &fold(c) == tc) {
            return Ok(None);
        }
    }
    let pinned = du
        .selection
        .as_ref()
        .is_some_and(|w| pins_excluded_tenant(w, tc, visible, &table.name));
    if pinned {
        return Ok(None);
    }
    Ok(Some(if given {
        PinValue::Excluded(format!("excluded.{}", quote_ident(tc)))
    } else {
        PinValue::SessionTenant
    }))
}

/// A top-level `target.tc = EXCLUDED.tc` (either order) among the AND-ed conjuncts of `w`.
fn pins_excluded_tenant(w: &Expr, tc: &str, visible: &str, table: &str) -> bool {
    match w {
        Expr::Nested(inner) => pins_excluded_tenant(inner, tc, visible, table),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            pins_excluded_tenant(left, tc, visible, table)
                || pins_excluded_tenant(right, tc, visible, table)
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            let parts = |e: &Expr| -> Option<Vec<String>> {
                match strip_any_cast(e) {
                    Expr::Identifier(id) => Some(vec![fold(id)]),
                    Expr::CompoundIdentifier(ids) => Some(ids.iter().map(fold).collect()),
                    _ => None,
                }
            };
            let (Some(l), Some(r)) = (parts(left), parts(right)) else {
                return false;
            };
            let is_excluded = |p: &[String]| matches!(p, [q, c] if q == "excluded" && c == tc);
            let is_target = |p: &[String]| match p {
                [c] => c == tc,
                [q, c] => c == tc && (q == visible || q == table),
                _ => false,
            };
            (is_excluded(&l) && is_target(&r)) || (is_excluded(&r) && is_target(&l))
        }
        _ => false,
    }
}
