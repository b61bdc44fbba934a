//! Result shapes: which result columns hold values of encrypted table columns, where their
//! row's tenant and row key are, and how fields that name a tenant or a key read as text.

use std::borrow::Cow;

use crate::proxy::catalog::TableMap;
use crate::proxy::error::ClientError;
use crate::rules::ColumnRule;
use crate::wire::backend::FieldDescription;
use crate::wire::encoding::ClientEncoding;

/// Type OIDs whose values may be text: text, varchar, bpchar, name, unknown.
pub(crate) const TEXTLIKE_OIDS: &[u32] = &[25, 1043, 1042, 19, 705];

/// One result column as the proxy sees it.
#[derive(Debug, Clone)]
pub(crate) struct ColumnShape {
    /// The rule of the table column this result column comes from, if any.
    pub(crate) rule: Option<ColumnRule>,
    /// Index (in the same result) of that table's tenant column, if it is in the result.
    pub(crate) tenant_index: Option<usize>,
    /// Index (in the same result) of that table's row key, if the table binds values to their
    /// row and the key is in the result.
    pub(crate) key_index: Option<usize>,
    /// Type OID reported in the RowDescription.
    pub(crate) type_oid: u32,
    /// Whether values may be text (so may hold enc:v1 values of unknown origin).
    pub(crate) textlike: bool,
    /// Format code reported in the RowDescription.
    pub(crate) format: i16,
}

/// The columns of a result set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    pub(crate) columns: Vec<ColumnShape>,
    /// Invariant: true iff no column has a rule or may hold text.
    inert: bool,
}

impl Shape {
    /// A shape from its columns.
    pub(crate) fn new(columns: Vec<ColumnShape>) -> Self {
        let inert = columns.iter().all(|c| c.rule.is_none() && !c.textlike);
        Self { columns, inert }
    }

    /// A result with no columns (NoData).
    pub(crate) fn empty() -> Self {
        Self::new(Vec::new())
    }

    /// Whether no column needs looking at: rows pass through untouched.
    pub(crate) fn is_inert(&self) -> bool {
        self.inert
    }

    /// The shape of a RowDescription's `fields`. `table` gives the encrypted columns of a
    /// table OID (`None` for a table without rules); a table it does not know yet is the
    /// error it returns.
    pub(crate) fn of<E>(
        fields: &[FieldDescription],
        mut table: impl FnMut(u32) -> Result<Option<std::sync::Arc<TableMap>>, E>,
    ) -> Result<Shape, E> {
        let mut columns = Vec::with_capacity(fields.len());
        for f in fields {
            let mut rule = None;
            let mut tenant_attnum = None;
            let mut key_attnum = None;
            if f.table_oid != 0 && f.attnum > 0 {
                if let Some(t) = table(f.table_oid)? {
                    rule = t.encrypted.get(&f.attnum).cloned();
                    tenant_attnum = t.tenant_attnum;
                    key_attnum = t.key_attnum;
                }
            }
            let tenant_index = match (rule.is_some(), tenant_attnum) {
                (true, Some(att)) => fields
                    .iter()
                    .position(|g| g.table_oid == f.table_oid && g.attnum == att),
                _ => None,
            };
            // The row key of the same row: with the key twice in the result (a self-join),
            // which one belongs to this value is unknown, and the read is refused.
            let key_index = match (rule.is_some(), key_attnum) {
                (true, Some(att)) => {
                    let mut same = fields
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| g.table_oid == f.table_oid && g.attnum == att)
                        .map(|(i, _)| i);
                    match (same.next(), same.next()) {
                        (Some(i), None) => Some(i),
                        _ => None,
                    }
                }
                _ => None,
            };
            columns.push(ColumnShape {
                rule,
                tenant_index,
                key_index,
                type_oid: f.type_oid,
                textlike: TEXTLIKE_OIDS.contains(&f.type_oid),
                format: f.format,
            });
        }
        Ok(Shape::new(columns))
    }
}

/// The text PostgreSQL prints for a binary-format value of an integer or UUID type (`None`
/// for other types or a malformed value): how parameters and result fields that name a
/// tenant or a row key are read when a client sends or asks for them in binary.
pub(crate) fn binary_as_text(type_oid: u32, raw: &[u8]) -> Option<String> {
    Some(match type_oid {
        21 => i16::from_be_bytes(raw.try_into().ok()?).to_string(),
        23 => i32::from_be_bytes(raw.try_into().ok()?).to_string(),
        20 => i64::from_be_bytes(raw.try_into().ok()?).to_string(),
        2950 => uuid::Uuid::from_slice(raw).ok()?.hyphenated().to_string(),
        _ => return None,
    })
}

/// A result field as PostgreSQL prints it (a row key, a row's tenant): the text of a
/// text-format field (borrowed from the row when it is UTF-8); a binary field is rendered for
/// integer, UUID and text types, and refused otherwise. `None` for NULL.
pub(crate) fn field_text<'a>(
    column: &ColumnShape,
    value: Option<&'a [u8]>,
    encoding: &ClientEncoding,
) -> Result<Option<Cow<'a, str>>, ClientError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if column.format == 0 || column.textlike {
        return encoding
            .decode(value)
            .map(Some)
            .map_err(|_| ClientError::BinaryKeyField);
    }
    binary_as_text(column.type_oid, value)
        .map(|t| Some(Cow::Owned(t)))
        .ok_or(ClientError::BinaryKeyField)
}
