//! `check --against-db`: the rules against the catalog of the database holding the tables.
//!
//! Reads the catalog only; creates and changes nothing.

use anyhow::Context;

use crate::cli::common;
use crate::config::Config;
use crate::rules::RuleSet;

/// Types whose values can hold `enc:v1:` text.
const TEXT_LIKE: &[&str] = &["text", "character varying", "character", "citext", "name"];

/// Types a row key may have: their text form is what the proxy binds values to, and what it
/// reads back (also from binary results).
const ROW_KEY_TYPES: &[&str] = &[
    "smallint",
    "integer",
    "bigint",
    "text",
    "character varying",
    "uuid",
];

/// A row key must exist, have a type whose printed form is stable, and be the table's
/// single-column primary key (`reencrypt` walks and re-seals rows by it).
async fn check_row_key(
    client: &tokio_postgres::Client,
    table: &crate::rules::TableRule,
    key: &str,
    ty: Option<String>,
) -> anyhow::Result<Vec<String>> {
    let at = format!("{}.{key} ({})", table.qualified_name(), table.location());
    let Some(ty) = ty else {
        return Ok(vec![format!("{at}: row key column does not exist")]);
    };
    let mut problems = Vec::new();
    if !ROW_KEY_TYPES.contains(&ty.as_str()) {
        problems.push(format!(
            "{at}: row key type is {ty}; use an integer, text, varchar or uuid column"
        ));
    }
    let pk: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary",
            &[&table.schema(), &table.name()],
        )
        .await
        .context("reading the primary key")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if pk != [key] {
        problems.push(format!(
            "{at}: the row key must be the table's single-column primary key (it is {})",
            if pk.is_empty() {
                "none".to_owned()
            } else {
                pk.join(", ")
            }
        ));
    }
    Ok(problems)
}

pub(super) async fn check_against_db(
    config: &Config,
    rules: &RuleSet,
) -> anyhow::Result<Vec<String>> {
    let client = common::connect_data(config).await?;
    let mut problems = Vec::new();
    for table in rules.tables() {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL), a.atthasdef \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table.schema(), &table.name()],
            )
            .await
            .context("reading the catalog")?;
        if rows.is_empty() {
            problems.push(format!(
                "{} ({}): table {}",
                table.qualified_name(),
                table.location(),
                common::not_in_data_database(config)
            ));
            continue;
        }
        let find = |name: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == name)
                .map(|r| (r.get::<_, String>(1), r.get::<_, bool>(2)))
        };
        if let Some(tenant) = table.tenant_column() {
            if find(tenant).is_none() {
                problems.push(format!(
                    "{}.{tenant} ({}): tenant column does not exist",
                    table.qualified_name(),
                    table.location()
                ));
            }
        }
        if let Some(key) = table.row_key() {
            problems.extend(check_row_key(&client, table, key, find(key).map(|(ty, _)| ty)).await?);
        }
        for col in table.columns() {
            match find(col.column()) {
                None => problems.push(format!(
                    "{} ({}): column does not exist",
                    col.qualified_name(),
                    col.location()
                )),
                Some((ty, has_default)) => {
                    if !TEXT_LIKE.contains(&ty.as_str()) {
                        problems.push(format!(
                            "{} ({}): column type is {ty}, but encrypted columns must be text-like \
                             (text, varchar, char)",
                            col.qualified_name(),
                            col.location()
                        ));
                    }
                    if has_default {
                        problems.push(format!(
                            "{} ({}): column has a DEFAULT, which would store plaintext; drop it",
                            col.qualified_name(),
                            col.location()
                        ));
                    }
                }
            }
        }
    }
    Ok(problems)
}
