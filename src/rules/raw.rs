//! The rule file as written: serde types that mirror the TOML, with spans for error messages.
//!
//! Nothing here is validated beyond TOML types and known keys; `RuleSet::from_sources` turns
//! these into checked rules.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// One rule file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    #[serde(default)]
    pub(crate) table: Vec<Spanned<RawTable>>,
}

/// One `[[table]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTable {
    pub(crate) name: Spanned<String>,
    #[serde(default)]
    pub(crate) tenant_column: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) row_key: Option<Spanned<String>>,
    pub(crate) encrypt: Spanned<Vec<Spanned<RawColumn>>>,
}

/// One entry of `encrypt`: a bare column name or an inline table.
#[derive(Debug)]
pub(crate) enum RawColumn {
    Name(String),
    Detailed(RawColumnTable),
}

/// `{ name = "...", id = "...", mode = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawColumnTable {
    pub(crate) name: Spanned<String>,
    #[serde(default)]
    pub(crate) id: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) mode: Option<Spanned<RawMode>>,
    #[serde(default)]
    pub(crate) search: Option<Spanned<RawSearch>>,
}

/// `search` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum RawSearch {
    #[serde(rename = "equality")]
    Equality,
    #[serde(rename = "equality-ci")]
    EqualityCi,
}

/// `mode` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawMode {
    Randomized,
    Deterministic,
}

impl<'de> Deserialize<'de> for RawColumn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ColumnVisitor;

        impl<'de> Visitor<'de> for ColumnVisitor {
            type Value = RawColumn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a column name or a table { name = \"...\", id = \"...\", search = \"...\" }",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawColumn, E> {
                Ok(RawColumn::Name(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawColumn, A::Error> {
                RawColumnTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawColumn::Detailed)
            }
        }

        deserializer.deserialize_any(ColumnVisitor)
    }
}
