#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

fn parse(text: &str) -> Result<RuleSet, RulesError> {
    RuleSet::from_sources(&[("rules/test.toml", text)])
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const VAULT: &str = r#"
# per-organisation secrets
[[table]]
name = "public.vault_secrets"
tenant_column = "org_id"
encrypt = ["value"]
"#;

#[test]
fn row_key_is_given_to_every_column() {
    let rules =
        parse("[[table]]\nname = \"t\"\nrow_key = \"Id\"\nencrypt = [\"a\", \"b\"]\n").unwrap();
    assert_eq!(rules.table("public", "t").unwrap().row_key(), Some("id"));
    assert_eq!(
        rules.column("public", "t", "b").unwrap().row_key(),
        Some("id")
    );
    let rules = parse(VAULT).unwrap();
    assert_eq!(
        rules
            .column("public", "vault_secrets", "value")
            .unwrap()
            .row_key(),
        None
    );
}

#[test]
fn vault_example() {
    let rules = parse(VAULT).unwrap();
    assert!(!rules.is_empty());
    assert_eq!(rules.len(), 1);
    let t = rules.table("public", "vault_secrets").unwrap();
    assert_eq!(t.schema(), "public");
    assert_eq!(t.name(), "vault_secrets");
    assert_eq!(t.qualified_name(), "public.vault_secrets");
    assert_eq!(t.tenant_column(), Some("org_id"));
    assert_eq!(t.location().line(), 3);
    let c = rules.column("public", "vault_secrets", "value").unwrap();
    assert_eq!(c.qualified_name(), "public.vault_secrets.value");
    assert_eq!(c.id(), ColumnId::from_name("public.vault_secrets.value"));
    assert_eq!(c.mode(), EncryptionMode::Randomized);
    assert_eq!(c.stable_id(), None);
    assert_eq!(
        (c.schema(), c.table(), c.column()),
        ("public", "vault_secrets", "value")
    );
    assert_eq!(rules.by_column_id(c.id()), Some(c));
    assert!(rules.column("public", "vault_secrets", "org_id").is_none());
    assert!(rules.table("other", "vault_secrets").is_none());
}

#[test]
fn empty_sources_and_files() {
    let none: [(&str, &str); 0] = [];
    assert!(RuleSet::from_sources(&none).unwrap().is_empty());
    assert!(parse("").unwrap().is_empty());
    assert!(parse("# only comments\n").unwrap().is_empty());
}

#[test]
fn detailed_columns_and_folding() {
    let rules = parse(
        r#"
[[table]]
name = 'Billing."Cards"'
encrypt = ["PAN", { name = '"CVC"', mode = "randomized" }, { name = "email", id = "users-email" }]

[[table]]
name = "Users"
encrypt = [{ name = "Notes" }]
"#,
    )
    .unwrap();
    let t = rules.table("billing", "Cards").unwrap();
    let cols: Vec<_> = t.columns().map(|c| c.column()).collect();
    assert_eq!(cols, ["pan", "CVC", "email"]);
    assert!(t.column("cvc").is_none());
    let email = t.column("email").unwrap();
    assert_eq!(email.stable_id(), Some("users-email"));
    assert_eq!(email.id(), ColumnId::from_name("users-email"));
    assert_eq!(
        t.column("pan").unwrap().id(),
        ColumnId::from_name("billing.Cards.pan")
    );
    assert!(rules.column("public", "users", "notes").is_some());
    let tables: Vec<_> = rules.tables().map(|t| t.qualified_name()).collect();
    assert_eq!(tables, ["billing.Cards", "public.users"]);
}

#[test]
fn unknown_keys_name_file_line_and_key() {
    let e = err("[[table]]\nname = \"t\"\nencrypt = [\"a\"]\ncolour = \"red\"\n");
    assert!(
        e.starts_with("rules/test.toml:4: `colour`: unknown field `colour`"),
        "{e}"
    );

    let e = err("[[table]]\nname = \"t\"\nencrypt = [\n  { name = \"a\", bogus = 1 },\n]\n");
    assert!(e.starts_with("rules/test.toml:4:"), "{e}");
    assert!(e.contains("unknown field `bogus`"), "{e}");

    let e = err("[[tables]]\nname = \"t\"\n");
    assert!(e.starts_with("rules/test.toml:1:"), "{e}");
    assert!(e.contains("unknown field `tables`"), "{e}");
}

#[test]
fn type_and_syntax_errors() {
    let e = err("[[table]]\nname = 3\nencrypt = [\"a\"]\n");
    assert!(e.starts_with("rules/test.toml:2: `name`:"), "{e}");

    let e = err("[[table]]\nname = \"t\"\n");
    assert!(e.contains("missing field `encrypt`"), "{e}");
    assert!(e.starts_with("rules/test.toml:1:"), "{e}");

    let e = err("[[table]]\nname = \"t\"\nencrypt = [\"a\"\n");
    assert!(e.starts_with("rules/test.toml:"), "{e}");

    let e = err("[[table]]\nname = \"t\"\nencrypt = [1]\n");
    assert!(e.starts_with("rules/test.toml:3: `encrypt`:"), "{e}");
    assert!(e.contains("column name"), "{e}");

    let e = err("[[table]]\nname = \"t\"\nencrypt = [{ name = \"a\", mode = \"fast\" }]\n");
    assert!(e.starts_with("rules/test.toml:3:"), "{e}");
    assert!(e.contains("unknown variant `fast`"), "{e}");
}

#[test]
fn deterministic_is_reserved() {
    let e = parse("[[table]]\nname = \"t\"\nencrypt = [\n  { name = \"email\", mode = \"deterministic\" },\n]\n")
        .unwrap_err();
    assert!(matches!(e, RulesError::DeterministicNotSupported { .. }));
    assert_eq!(
        e.to_string(),
        "rules/test.toml:4: `table[0].encrypt[0].mode`: mode \"deterministic\" for column public.t.email is not supported yet"
    );
}

#[test]
fn invalid_names() {
    let e = err("[[table]]\nname = \"a.b.c\"\nencrypt = [\"x\"]\n");
    assert!(
        e.starts_with("rules/test.toml:2: `table[0].name`: invalid name \"a.b.c\""),
        "{e}"
    );
    let e = err("[[table]]\nname = \"t\"\ntenant_column = \"org id\"\nencrypt = [\"x\"]\n");
    assert!(
        e.starts_with("rules/test.toml:3: `table[0].tenant_column`"),
        "{e}"
    );
    let e = err("[[table]]\nname = \"t\"\nencrypt = [\"ok\",\n \"x.y\"]\n");
    assert!(
        e.starts_with("rules/test.toml:4: `table[0].encrypt[1]`"),
        "{e}"
    );
    let e = err("[[table]]\nname = \"t\"\nencrypt = [{ name = \"\" }]\n");
    assert!(
        e.starts_with("rules/test.toml:3: `table[0].encrypt[0].name`"),
        "{e}"
    );
    let e = err("[[table]]\nname = \"t\"\nencrypt = [{ name = \"a\", id = \" x\" }]\n");
    assert!(
        e.starts_with("rules/test.toml:3: `table[0].encrypt[0].id`"),
        "{e}"
    );
}

#[test]
fn duplicates_and_conflicts() {
    let e = parse("[[table]]\nname = \"t\"\nencrypt = [\"a\"]\n[[table]]\nname = \"public.T\"\nencrypt = [\"b\"]\n")
        .unwrap_err();
    assert!(matches!(e, RulesError::DuplicateTable { .. }));
    assert_eq!(
        e.to_string(),
        "rules/test.toml:5: `table[1].name`: table public.t is already defined at rules/test.toml:2"
    );

    let e = err("[[table]]\nname = \"t\"\nencrypt = [\"a\",\n\"A\"]\n");
    assert_eq!(
        e,
        "rules/test.toml:4: `table[0].encrypt[1]`: column public.t.a is listed twice (first at rules/test.toml:3)"
    );

    let e = err("[[table]]\nname = \"t\"\ntenant_column = \"Org_Id\"\nencrypt = [\"org_id\"]\n");
    assert_eq!(
        e,
        "rules/test.toml:4: `table[0].encrypt[0]`: tenant column public.t.org_id cannot also be encrypted"
    );

    let e = err("[[table]]\nname = \"t\"\nrow_key = \"id\"\nencrypt = [\"id\"]\n");
    assert_eq!(
        e,
        "rules/test.toml:4: `table[0].encrypt[0]`: row key public.t.id cannot also be encrypted"
    );

    let e = err("[[table]]\nname = \"t\"\nencrypt = []\n");
    assert_eq!(
        e,
        "rules/test.toml:3: `table[0].encrypt`: table public.t must list at least one column to encrypt"
    );
}

#[test]
fn column_id_collisions() {
    // The same stable id on two columns.
    let e = parse(
        "[[table]]\nname = \"a\"\nencrypt = [{ name = \"x\", id = \"same\" }]\n\
         [[table]]\nname = \"b\"\nencrypt = [{ name = \"y\", id = \"same\" }]\n",
    )
    .unwrap_err();
    assert!(matches!(e, RulesError::ColumnIdCollision { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("rules/test.toml:6: `table[1].encrypt[0]`: column public.b.y"),
        "{msg}"
    );
    assert!(msg.contains("public.a.x at rules/test.toml:3"), "{msg}");

    // A stable id equal to another column's qualified name.
    let e = parse(
        "[[table]]\nname = \"a\"\nencrypt = [\"x\", { name = \"y\", id = \"public.a.x\" }]\n",
    )
    .unwrap_err();
    assert!(matches!(e, RulesError::ColumnIdCollision { .. }), "{e}");
}

#[test]
fn duplicates_across_sources() {
    let e = RuleSet::from_sources(&[
        ("one.toml", "[[table]]\nname = \"t\"\nencrypt = [\"a\"]\n"),
        (
            "two.toml",
            "[[table]]\nname = '\"public\".t'\nencrypt = [\"b\"]\n",
        ),
    ])
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "two.toml:2: `table[0].name`: table public.t is already defined at one.toml:2"
    );
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(s in any::<String>()) {
        let _ = parse(&s);
    }

    #[test]
    fn tomlish_text_never_panics(s in r#"(\[\[table\]\]\n|name = "[a-zA-Z."_ ]{0,12}"\n|tenant_column = "[a-z_]{0,5}"\n|encrypt = \[("[a-zA-Z_.]{0,4}"|\{ ?name = "[a-z]{0,3}"(, ?id = "[a-z ]{0,3}")?(, ?mode = "(randomized|deterministic|x)")? ?\})?\]\n|[a-z]{1,4} = 1\n){0,8}"#) {
        if let Err(e) = parse(&s) {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("rules/test.toml:"), "{}", msg);
        }
    }
}

#[test]
fn search_option_makes_a_column_searchable() {
    let rules = parse(
        "[[table]]\nname = \"customer\"\nencrypt = [\"notes\", { name = \"email\", search = \"equality\" }, { name = \"code\", search = \"equality-ci\" }]\n",
    )
    .unwrap();
    let col = |c: &str| rules.column("public", "customer", c).unwrap().search();
    assert_eq!(col("notes"), None);
    assert_eq!(col("email"), Some(SearchMode::Equality));
    assert_eq!(col("code"), Some(SearchMode::EqualityCi));
    let e = err("[[table]]\nname = \"t\"\nencrypt = [{ name = \"a\", search = \"prefix\" }]\n");
    assert!(e.contains("rules/test.toml:3"), "{e}");
    assert!(e.contains("equality"), "{e}");
}
