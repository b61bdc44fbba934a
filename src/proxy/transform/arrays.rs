//! Arrays of values for encrypted columns (Django's `bulk_create`: `INSERT … SELECT * FROM
//! UNNEST($1::text[], …)`): read from a literal or a parameter (text or binary), sealed
//! element by element, each for its own row's tenant and row key.

use crate::proxy::error::{ClientError, ValueSite};
use crate::proxy::rules::RulesSnapshot;
use crate::rules::ColumnRule;
use crate::sql::{ArraySite, ArraySource};
use crate::wire::frontend as fe;

use super::canonical::key_stores_as_written;
use super::shape::binary_as_text;
use super::values::{rule_for, BindValues, TEXT_OIDS};
use super::{Ctx, Fail, Need};

/// OID of `uuid[]`.
const UUID_ARRAY_OID: u32 = 2951;

impl Ctx<'_> {
    /// Seal the elements of an array site: `value`, `tenants` and `keys` are the arrays read
    /// (element `i` of each is row `i`'s). Returns the sealed elements, in order.
    fn seal_elements(
        &mut self,
        rules: &RulesSnapshot,
        column: &ColumnRule,
        value: Vec<Option<String>>,
        tenants: Option<Vec<Option<String>>>,
        keys: Option<Vec<Option<String>>>,
    ) -> Result<Vec<Option<String>>, Fail> {
        let n = value.len();
        if tenants.as_ref().is_some_and(|t| t.len() != n)
            || keys.as_ref().is_some_and(|k| k.len() != n)
        {
            return Err(ClientError::ArrayLengths {
                column: column.qualified_name().to_owned(),
            }
            .into());
        }
        // Every key the rows need, fetched in one round (`bulk_create` of many organisations'
        // rows).
        let mut needs = Vec::new();
        let mut orgs = Vec::with_capacity(n);
        for (i, v) in value.iter().enumerate() {
            let org = match (v, tenants.as_ref().and_then(|t| t[i].clone())) {
                (None, _) => None,
                (Some(_), Some(t)) => Some(self.row_tenant(t, column)?),
                (Some(_), None) => Some(self.session_tenant(column)?),
            };
            if let Some(org) = &org {
                self.missing_keys(column, org, &mut needs)?;
            }
            orgs.push(org);
        }
        if !needs.is_empty() {
            return Err(Fail::Need(Need::Keys(needs)));
        }
        let mut out = Vec::with_capacity(n);
        for ((i, v), org) in value.into_iter().enumerate().zip(orgs) {
            let (Some(v), Some(org)) = (v, org) else {
                out.push(None);
                continue;
            };
            if v.contains('\0') {
                return Err(ClientError::Nul {
                    site: ValueSite::Literal,
                    column: column.qualified_name().to_owned(),
                }
                .into());
            }
            let key = match &keys {
                None => None,
                Some(k) => {
                    let key = k[i].clone().ok_or_else(|| ClientError::NullRowKey {
                        column: column.qualified_name().to_owned(),
                        key: column.row_key().unwrap_or_default().to_owned(),
                    })?;
                    if !key_stores_as_written(&key) {
                        return Err(ClientError::NonCanonicalRowKey {
                            column: column.qualified_name().to_owned(),
                            key: column.row_key().unwrap_or_default().to_owned(),
                        }
                        .into());
                    }
                    Some(key)
                }
            };
            let sealed = self.seal_value(rules, column, &org, key.as_deref(), v.as_bytes())?;
            out.push(Some(sealed.unwrap_or(v)));
        }
        Ok(out)
    }

    /// An array given as a literal, or as a parameter of `bind` (text or binary format), as
    /// its elements' text.
    pub(super) fn array_elements(
        &self,
        source: &ArraySource,
        bind: Option<&BindValues<'_>>,
        column: &ColumnRule,
    ) -> Result<Option<Vec<Option<String>>>, ClientError> {
        let bad = || ClientError::ArrayUnreadable {
            column: column.qualified_name().to_owned(),
        };
        match source {
            ArraySource::Literal { text, uuid, .. } => crate::wire::array::parse_text(text)
                .map(|elements| Some(if *uuid { as_uuids(elements) } else { elements }))
                .map_err(|_| bad()),
            ArraySource::Drawn(n) => match self.drawn_keys(*n) {
                Some(keys) if keys.iter().all(Option::is_some) => Ok(Some(keys.to_vec())),
                _ => Err(ClientError::NoKeySequence {
                    table: column.table().to_owned(),
                    key: column.row_key().unwrap_or_default().to_owned(),
                }),
            },
            ArraySource::Param(n) => {
                let Some(bind) = bind else {
                    return Err(ClientError::LiteralWithTenantParam {
                        column: column.qualified_name().to_owned(),
                        param: *n,
                    });
                };
                let Some(Some(raw)) = n
                    .checked_sub(1)
                    .and_then(|i| bind.bind.params.get(i))
                    .copied()
                else {
                    return Ok(None);
                };
                if bind.bind.param_format(n - 1) == fe::FORMAT_TEXT {
                    let text = self.s.encoding.decode(raw).map_err(|_| bad())?;
                    let uuid = bind.types.get(n - 1) == Some(&UUID_ARRAY_OID);
                    return crate::wire::array::parse_text(&text)
                        .map(|elements| Some(if uuid { as_uuids(elements) } else { elements }))
                        .map_err(|_| bad());
                }
                let array = crate::wire::array::BinaryArray::decode(raw).map_err(|_| bad())?;
                let ty = array.element_type;
                array
                    .elements
                    .iter()
                    .map(|e| match e {
                        None => Ok(None),
                        Some(b) if TEXT_OIDS.contains(&ty) || ty == 19 => self
                            .s
                            .encoding
                            .decode(b)
                            .map(|t| Some(t.into_owned()))
                            .map_err(|_| bad()),
                        Some(b) => binary_as_text(ty, b).map(Some).ok_or_else(bad),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
        }
    }

    /// Seal one array site; `Ok(None)` when its array is NULL.
    pub(super) fn seal_array(
        &mut self,
        rules: &RulesSnapshot,
        site: &ArraySite,
        bind: Option<&BindValues<'_>>,
    ) -> Result<Option<Vec<Option<String>>>, Fail> {
        let column = rule_for(rules, &site.column)?;
        let Some(value) = self.array_elements(&site.value, bind, column)? else {
            return Ok(None);
        };
        let tenants = match &site.tenant {
            None => None,
            Some(t) => self.array_elements(t, bind, column)?,
        };
        let keys = match &site.row_key {
            None => None,
            Some(k) => Some(self.array_elements(k, bind, column)?.ok_or_else(|| {
                ClientError::NullRowKey {
                    column: column.qualified_name().to_owned(),
                    key: column.row_key().unwrap_or_default().to_owned(),
                }
            })?),
        };
        self.seal_elements(rules, column, value, tenants, keys)
            .map(Some)
    }
}

/// Elements of an array cast to `uuid[]`: each as PostgreSQL stores it.
fn as_uuids(elements: Vec<Option<String>>) -> Vec<Option<String>> {
    elements
        .into_iter()
        .map(|e| e.map(|v| crate::sql::canonical_uuid(&v).unwrap_or(v)))
        .collect()
}
