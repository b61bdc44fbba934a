//! Equality look-ups on searchable columns: the column side becomes `left(column, 31)` and each
//! value compared with it the search term of its plaintext, computed under the search key of
//! the organisation the look-up runs for (`sql::SearchSite`, `crypto::search`).
//!
//! The organisation is the tenant column's value in the same condition, else the session (or
//! default) tenant; with neither, the look-up is refused (42501): a term exists only per
//! organisation. Values are never logged and never reach PostgreSQL: only their terms do.

use std::ops::Range;

use crate::crypto::{OrgId, SEARCH_PREFIX_CHARS};
use crate::proxy::error::ClientError;
use crate::proxy::rules::RulesSnapshot;
use crate::rules::ColumnRule;
use crate::sql::{ArraySource, SearchOperand, SearchSite};

use super::values::{rule_for, BindValues, SealedParam};
use super::{Ctx, Fail};

impl Ctx<'_> {
    /// The text edits of one search site: the column side, and the literals' terms.
    pub(super) fn search_edits(
        &mut self,
        rules: &RulesSnapshot,
        text: &str,
        site: &SearchSite,
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Result<(), Fail> {
        let column = rule_for(rules, &site.column)?;
        let reference = text
            .get(site.column_ref.clone())
            .ok_or(ClientError::Rewrite)?;
        edits.push((
            site.column_range.clone(),
            format!("left({reference}, {SEARCH_PREFIX_CHARS})"),
        ));
        let mut org: Option<OrgId> = None;
        for operand in &site.operands {
            match operand {
                SearchOperand::Literal { range, value } => {
                    let org = match &org {
                        Some(o) => o.clone(),
                        None => {
                            let o = self.tenant_for(&site.tenant, column, None)?;
                            org = Some(o.clone());
                            o
                        }
                    };
                    let term = self.term_text(column, &org, value.as_bytes())?;
                    // Base64 and `enc:v1:`: safe in a plain literal whatever
                    // standard_conforming_strings says.
                    edits.push((range.clone(), format!("'{term}'")));
                }
                SearchOperand::Param { range, index } => {
                    edits.push((range.clone(), format!("${index}")));
                }
                SearchOperand::ArrayParam { .. } => {}
            }
        }
        Ok(())
    }

    /// The bound values of one search site's parameters, replaced by their terms.
    pub(super) fn search_params(
        &mut self,
        rules: &RulesSnapshot,
        site: &SearchSite,
        values: &BindValues<'_>,
        out: &mut Vec<SealedParam>,
    ) -> Result<(), Fail> {
        let column = rule_for(rules, &site.column)?;
        for operand in &site.operands {
            match operand {
                SearchOperand::Literal { .. } => {}
                SearchOperand::Param { index, .. } => {
                    let Some(value) = values.text(*index, &self.s.encoding)? else {
                        continue;
                    };
                    let org = self.tenant_for(&site.tenant, column, Some(values))?;
                    let term = self.term_text(column, &org, value.as_bytes())?;
                    out.push((index - 1, Some(self.s.encoding.encode(&term)?.into_owned())));
                }
                SearchOperand::ArrayParam { index, .. } => {
                    let source = ArraySource::Param(*index);
                    let Some(elements) = self.array_elements(&source, Some(values), column)? else {
                        continue;
                    };
                    let org = self.tenant_for(&site.tenant, column, Some(values))?;
                    let mut terms = Vec::with_capacity(elements.len());
                    for e in elements {
                        terms.push(match e {
                            Some(v) => Some(self.term_text(column, &org, v.as_bytes())?),
                            None => None,
                        });
                    }
                    let bytes = values.array_param(*index, &terms, &site.column)?;
                    out.push((index - 1, Some(bytes)));
                }
            }
        }
        Ok(())
    }

    /// The term of `plaintext` for `column` and `org`, as the text it is compared as.
    fn term_text(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
        plaintext: &[u8],
    ) -> Result<String, Fail> {
        let term = self
            .e
            .cipher
            .term(column, org, plaintext)?
            .ok_or(ClientError::Rewrite)?;
        Ok(term.prefix_text())
    }
}
