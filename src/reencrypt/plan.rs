//! One table's walk: its primary key from the catalog and the SQL text built from it.
//!
//! Every value crosses the wire as text: primary key columns are selected as `pk::text` and
//! bound back as `$n::text::<type>`, so any primary key type with a round-tripping text form
//! (integers, uuid, text, dates, numerics, …) and composite keys work without per-type code.
//! Identifiers are always quoted; nothing from the rules or the catalog is spliced unquoted.

use tokio_postgres::Client;

use crate::rules::{ColumnRule, TableRule};

use super::error::ReencryptError;

/// How to read and update one configured table.
///
/// Invariant: `pk` is non-empty and every SQL text was built from the quoted names of `pk`,
/// `tenant` and `columns`.
#[derive(Debug, Clone)]
pub(crate) struct TablePlan {
    /// `schema.table`, unquoted (for messages and the checkpoint row).
    pub(crate) name: String,
    pub(crate) pk: Vec<PkColumn>,
    pub(crate) columns: Vec<ColumnRule>,
    /// Rows of the first batch: `$1` = limit.
    pub(crate) select_first: String,
    /// Rows after a key: `$1..$k` = last key (text), `$k+1` = limit.
    pub(crate) select_after: String,
    /// The given rows, locked: `$1..$k` = text arrays of key columns.
    pub(crate) select_locked: String,
    /// Compare-and-set update; see [`TablePlan::update_params`] for the parameters.
    pub(crate) update: String,
    /// `count(*)` of the table.
    pub(crate) count: String,
}

/// One primary key column.
#[derive(Debug, Clone)]
pub(crate) struct PkColumn {
    pub(crate) name: String,
    /// `format_type` of the column, e.g. `integer` or `character varying(20)`.
    pub(crate) type_sql: String,
}

impl TablePlan {
    /// Look the table up in the catalog of `database` (the database `client` is connected to,
    /// for messages) and build its statements.
    pub(crate) async fn build(
        client: &Client,
        database: &str,
        rule: &TableRule,
    ) -> Result<Self, ReencryptError> {
        let name = rule.qualified_name();
        let relation = format!("{}.{}", quote(rule.schema()), quote(rule.name()));
        let rel_row = client
            .query_one("SELECT to_regclass($1)::oid", &[&relation])
            .await
            .map_err(|e| ReencryptError::db("look up table", Some(&name), e))?;
        let oid: Option<u32> = rel_row
            .try_get(0)
            .map_err(|e| ReencryptError::db("look up table", Some(&name), e))?;
        let Some(oid) = oid else {
            return Err(ReencryptError::NoSuchTable {
                table: name,
                database: database.to_owned(),
            });
        };
        let attrs: Vec<String> = client
            .query(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(|e| ReencryptError::db("read columns", Some(&name), e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let needed = rule
            .columns()
            .map(ColumnRule::column)
            .chain(rule.tenant_column());
        for column in needed {
            if !attrs.iter().any(|a| a == column) {
                return Err(ReencryptError::NoSuchColumn {
                    column: format!("{name}.{column}"),
                });
            }
        }
        let pk: Vec<PkColumn> = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&oid],
            )
            .await
            .map_err(|e| ReencryptError::db("read primary key", Some(&name), e))?
            .iter()
            .map(|r| PkColumn {
                name: r.get(0),
                type_sql: r.get(1),
            })
            .collect();
        if pk.is_empty() {
            return Err(ReencryptError::NoPrimaryKey { table: name });
        }
        if let Some(k) = rule.row_key() {
            if pk.len() != 1 || pk[0].name != k {
                return Err(ReencryptError::RowKeyNotPrimaryKey {
                    table: name,
                    column: k.to_owned(),
                });
            }
        }
        Ok(Self::with_key(
            name,
            &relation,
            pk,
            rule.tenant_column().map(str::to_owned),
            rule.columns().cloned().collect(),
        ))
    }

    fn with_key(
        name: String,
        relation: &str,
        pk: Vec<PkColumn>,
        tenant: Option<String>,
        columns: Vec<ColumnRule>,
    ) -> Self {
        let k = pk.len();
        let pk_cols = join(pk.iter().map(|p| format!("t.{}", quote(&p.name))));
        let pk_text = join(pk.iter().map(|p| format!("t.{}::text", quote(&p.name))));
        let tenant_text = match &tenant {
            Some(t) => format!("t.{}::text", quote(t)),
            None => "NULL::text".to_owned(),
        };
        let value_text = join(
            columns
                .iter()
                .map(|c| format!("t.{}::text", quote(c.column()))),
        );
        let select = format!("SELECT {pk_text}, {tenant_text}, {value_text} FROM {relation} AS t");
        let select_first = format!("{select} ORDER BY {pk_cols} LIMIT $1");
        let after = join(
            pk.iter()
                .enumerate()
                .map(|(i, p)| format!("${}::text::{}", i + 1, p.type_sql)),
        );
        let select_after = format!(
            "{select} WHERE ({pk_cols}) > ({after}) ORDER BY {pk_cols} LIMIT ${}",
            k + 1
        );
        let key_arrays = join((1..=k).map(|i| format!("${i}::text[]")));
        let key_names = join((1..=k).map(|i| format!("k{i}")));
        let key_match = pk
            .iter()
            .enumerate()
            .map(|(i, p)| format!("t.{} = v.k{}::{}", quote(&p.name), i + 1, p.type_sql))
            .collect::<Vec<_>>()
            .join(" AND ");
        let select_locked = format!(
            "{select} JOIN unnest({key_arrays}) AS v({key_names}) ON {key_match} \
             ORDER BY {pk_cols} FOR UPDATE OF t"
        );

        // Parameters: k key arrays, the tenant array, then (old, new) per column.
        let mut arrays = (1..=k + 1)
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>();
        let mut names = (1..=k).map(|i| format!("k{i}")).collect::<Vec<_>>();
        names.push("tn".to_owned());
        let mut sets = Vec::new();
        let mut checks = vec![key_match];
        if let Some(t) = &tenant {
            checks.push(format!("t.{}::text IS NOT DISTINCT FROM v.tn", quote(t)));
        }
        for (i, c) in columns.iter().enumerate() {
            let (old, new) = (k + 2 + 2 * i, k + 3 + 2 * i);
            arrays.push(format!("${old}::text[]"));
            arrays.push(format!("${new}::text[]"));
            names.push(format!("o{i}"));
            names.push(format!("n{i}"));
            let col = quote(c.column());
            sets.push(format!(
                "{col} = CASE WHEN v.n{i} IS NULL THEN t.{col} ELSE v.n{i} END"
            ));
            checks.push(format!(
                "(v.n{i} IS NULL OR t.{col}::text IS NOT DISTINCT FROM v.o{i})"
            ));
        }
        let update = format!(
            "UPDATE {relation} AS t SET {} FROM unnest({}) AS v({}) WHERE {} RETURNING {pk_text}",
            sets.join(", "),
            join(arrays),
            join(names),
            checks.join(" AND "),
        );
        let count = format!("SELECT count(*) FROM {relation}");
        Self {
            name,
            pk,
            columns,
            select_first,
            select_after,
            select_locked,
            update,
            count,
        }
    }

    /// Number of columns before the encrypted values in a selected row (key columns and the
    /// tenant).
    pub(crate) fn value_offset(&self) -> usize {
        self.pk.len() + 1
    }
}

/// `"name"` with embedded quotes doubled.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn join(parts: impl IntoIterator<Item = String>) -> String {
    parts.into_iter().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::rules::RuleSet;

    fn plan(rules: &str, pk: &[(&str, &str)]) -> TablePlan {
        let set = RuleSet::from_sources(&[("r.toml", rules)]).unwrap();
        let rule = set.tables().next().unwrap();
        TablePlan::with_key(
            rule.qualified_name(),
            &format!("{}.{}", quote(rule.schema()), quote(rule.name())),
            pk.iter()
                .map(|(n, t)| PkColumn {
                    name: (*n).to_owned(),
                    type_sql: (*t).to_owned(),
                })
                .collect(),
            rule.tenant_column().map(str::to_owned),
            rule.columns().cloned().collect(),
        )
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        let p = plan(
            "[[table]]\nname = '\"We\"\"ird\".\"T\"'\nencrypt = ['\"V a\"']\n",
            &[("id", "integer")],
        );
        assert!(p.select_first.contains("FROM \"We\"\"ird\".\"T\" AS t"));
        assert!(p.update.contains("\"V a\" = CASE"));
    }

    #[test]
    fn composite_keys_page_and_match_on_every_column() {
        let p = plan(
            "[[table]]\nname = 'vault'\ntenant_column = 'org'\nencrypt = ['a', 'b']\n",
            &[("org", "text"), ("n", "bigint")],
        );
        assert_eq!(p.value_offset(), 3);
        assert!(
            p.select_after
                .contains("WHERE (t.\"org\", t.\"n\") > ($1::text::text, $2::text::bigint)"),
            "{}",
            p.select_after
        );
        assert!(p.select_after.ends_with("LIMIT $3"));
        assert!(p
            .update
            .contains("unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])"));
        assert!(p
            .update
            .contains("t.\"org\" = v.k1::text AND t.\"n\" = v.k2::bigint"));
        assert!(p
            .update
            .contains("t.\"org\"::text IS NOT DISTINCT FROM v.tn"));
        assert!(p
            .update
            .contains("(v.n1 IS NULL OR t.\"b\"::text IS NOT DISTINCT FROM v.o1)"));
        assert!(p.select_locked.ends_with("FOR UPDATE OF t"));
    }
}
