#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

fn prot() -> Protected {
    Protected::new([
        ProtectedTable {
            schema: "public".into(),
            name: "secrets".into(),
            tenant_column: Some("org_id".into()),
            row_key: None,
            encrypted: vec!["value".into(), "note".into()],
            searchable: Vec::new(),
        },
        ProtectedTable {
            schema: "app".into(),
            name: "Users".into(),
            tenant_column: None,
            row_key: None,
            encrypted: vec!["email".into()],
            searchable: Vec::new(),
        },
        ProtectedTable {
            schema: "a".into(),
            name: "dup".into(),
            tenant_column: None,
            row_key: None,
            encrypted: vec!["x".into()],
            searchable: Vec::new(),
        },
        ProtectedTable {
            schema: "b".into(),
            name: "dup".into(),
            tenant_column: None,
            row_key: None,
            encrypted: vec!["x".into()],
            searchable: Vec::new(),
        },
    ])
}

fn ok(sql: &str) -> Analysis {
    let a = analyze(sql, &prot());
    assert!(a.rejection.is_none(), "{sql}: {:?}", a.rejection);
    a
}

fn rejected(sql: &str) -> Rejection {
    let a = analyze(sql, &prot());
    let r = a.rejection.unwrap_or_else(|| panic!("not rejected: {sql}"));
    assert!(r.message().starts_with("pgenvelope: "), "{}", r.message());
    r
}

fn rejected_col(sql: &str, col: &str) {
    let r = rejected(sql);
    let c = r.column.as_ref().map(ToString::to_string);
    assert_eq!(c.as_deref(), Some(col), "{sql}: {}", r.message());
    assert!(r.message().contains(col), "{}", r.message());
}

fn value_col() -> ColumnRef {
    ColumnRef {
        schema: "public".into(),
        table: "secrets".into(),
        column: "value".into(),
    }
}

fn text_at(sql: &str, l: &LiteralSite) -> String {
    sql[l.range.clone()].to_owned()
}

// ---- might_touch ----

#[test]
fn might_touch_finds_names_case_insensitively() {
    let p = prot();
    assert!(might_touch("select * from SECRETS", &p));
    assert!(might_touch("select * from \"Users\"", &p));
    assert!(might_touch("SET PGENVELOPE.tenant = 'a'", &p));
    assert!(might_touch("select set_config('x', 'y', false)", &p));
    assert!(!might_touch("select 1", &p));
    assert!(!might_touch("insert into other (a) values ('x')", &p));
}

#[test]
fn copy_of_a_query_naming_no_protected_table_is_scanned() {
    assert!(crate::sql::worth_analysing(
        "CoPy (select * from v) to stdout",
        &prot()
    ));
    assert!(!crate::sql::worth_analysing("select 1", &prot()));
    assert!(!might_touch("CoPy (select * from v) to stdout", &prot()));
    let a = analyze("COPY (SELECT a FROM some_view) TO STDOUT", &prot());
    assert!(a.rejection.is_none());
    assert!(!a.touches_protected);
    assert!(a.copy.as_ref().is_some_and(|c| c.table.is_none()));
    // Binary output is not scanned, and an unparsable text naming nothing protected is
    // relayed rather than refused.
    let a = analyze("COPY (SELECT a FROM some_view) TO STDOUT BINARY", &prot());
    assert!(a.copy.is_none() && a.rejection.is_none());
    let a = analyze("COPY ((( TO nowhere", &prot());
    assert!(a.rejection.is_none());
}

// ---- INSERT ----

#[test]
fn insert_literals_and_tenant() {
    let sql = "INSERT INTO secrets (org_id, value, note) VALUES ('acme', 'it''s', NULL), (42, E'a\\nb', DEFAULT)";
    let a = ok(sql);
    assert!(a.touches_protected);
    assert_eq!(a.literals.len(), 2);
    assert_eq!(a.literals[0].value, "it's");
    assert_eq!(text_at(sql, &a.literals[0]), "'it''s'");
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("acme".into()));
    assert_eq!(a.literals[0].column, value_col());
    assert_eq!(a.literals[1].value, "a\nb");
    assert_eq!(text_at(sql, &a.literals[1]), "E'a\\nb'");
    assert_eq!(a.literals[1].tenant, TenantSource::Literal("42".into()));
    assert_eq!(a.kinds, vec![StatementKind::Insert]);
}

#[test]
fn insert_columns_any_order_params() {
    let a = ok("insert into public.secrets (value, org_id, id) values ($2, $1, $3)");
    assert_eq!(a.params.len(), 1);
    assert_eq!(a.params[0].index, 2);
    assert_eq!(a.params[0].tenant, TenantSource::Param(1));
    assert!(a.literals.is_empty());
}

#[test]
fn insert_session_tenant_when_absent() {
    let a = ok("insert into secrets (value) values ('x')");
    assert_eq!(a.literals[0].tenant, TenantSource::Session);
    let a = ok("insert into secrets (org_id, value) values (NULL, 'x')");
    assert_eq!(a.literals[0].tenant, TenantSource::Session);
}

#[test]
fn insert_text_casts_allowed() {
    let sql = "insert into secrets (value, note) values ('a'::text, CAST($1 AS varchar))";
    let a = ok(sql);
    assert_eq!(a.literals.len(), 1);
    assert_eq!(text_at(sql, &a.literals[0]), "'a'");
    assert_eq!(a.params[0].index, 1);
    ok("insert into secrets (value) values ($1::character varying)");
    ok("insert into secrets (value) values ($1::bpchar)");
}

#[test]
fn insert_refused_values() {
    for v in [
        "upper('x')",
        "'a' || $1",
        "(select 'x')",
        "42",
        "'x'::int",
        "$1::bytea",
        "'x'::varchar(3)",
        "true",
        "B'101'",
        "X'ff'",
        "value",
    ] {
        rejected_col(
            &format!("insert into secrets (value) values ({v})"),
            "public.secrets.value",
        );
    }
}

#[test]
fn insert_without_column_list_refused() {
    let r = rejected("insert into secrets values (1, 'a', 'b')");
    assert!(r.message().contains("name the columns"), "{}", r.message());
    ok("insert into secrets default values");
    ok("insert into other values (1, 'x')");
}

#[test]
fn insert_select_refused() {
    rejected_col(
        "insert into secrets (value) select value from secrets",
        "public.secrets.value",
    );
    rejected_col(
        "insert into secrets (org_id, value) select 1, 'x'",
        "public.secrets.value",
    );
    ok("insert into secrets (org_id) select 1");
    ok("insert into other (a) select value from secrets");
}

#[test]
fn insert_tenant_expression_refused() {
    rejected("insert into secrets (org_id, value) values (current_setting('x'), 'v')");
    ok("insert into secrets (org_id, value) values (current_setting('x'), NULL)");
}

#[test]
fn insert_on_conflict() {
    // The existing row may be another organisation's: the proxy pins it to the inserted
    // row's organisation (`existing.org_id = EXCLUDED.org_id`).
    for sql in [
        "insert into secrets (org_id, value) values ($1, $2) on conflict (id) do update set value = excluded.value",
        "insert into secrets (org_id, value) values ($1, $2) on conflict (id) do update set value = excluded.value, org_id = excluded.org_id",
        "insert into secrets (org_id, value) values ($1, $2) on conflict (id) do update set value = excluded.value where secrets.id = 1 or secrets.org_id = excluded.org_id",
    ] {
        let a = ok(sql);
        assert_eq!(a.pins.len(), 1, "{sql}");
        assert_eq!(a.pins[0].value, PinValue::Excluded("excluded.\"org_id\"".into()));
    }
    // Moving the conflicting row to another organisation is still refused.
    rejected("insert into secrets (org_id, value) values ($1, $2) on conflict (id) do update set value = excluded.value, org_id = 'x'");
    ok("insert into secrets (org_id, value) values ($1, $2) on conflict (org_id, id) do update set value = excluded.value");
    ok("insert into secrets as s (org_id, value) values ($1, $2) on conflict on constraint k do update set value = excluded.value where s.org_id = excluded.org_id");
    ok("insert into secrets (org_id, value) values ($1, $2) on conflict (id) do update set name = excluded.name");
    let a = ok("insert into secrets (org_id, value) values ($1, $2) on conflict (id) do update set value = excluded.value where excluded.org_id = org_id");
    assert_eq!(a.params.len(), 1);
    let a = ok("insert into secrets (org_id, value) values ('o', $1) on conflict (org_id, id) do update set value = $1");
    assert_eq!(a.params.len(), 2);
    assert!(a
        .params
        .iter()
        .all(|p| p.tenant == TenantSource::Literal("o".into())));
    let sql = "insert into secrets (org_id, value) values ('o', 'a') on conflict (org_id, id) do update set note = 'b'";
    let a = ok(sql);
    assert_eq!(a.literals.len(), 2);
    assert_eq!(text_at(sql, &a.literals[1]), "'b'");
    ok("insert into secrets (org_id, value) values ('o', 'a') on conflict do nothing");
    rejected_col(
        "insert into secrets (value) values ('a') on conflict (id) do update set value = secrets.value || 'x'",
        "public.secrets.value",
    );
    rejected_col(
        "insert into secrets (value) values ('a') on conflict (id) do update set note = excluded.value",
        "public.secrets.note",
    );
    rejected_col(
        "insert into secrets (value) values ('a') on conflict (value) do nothing",
        "public.secrets.value",
    );
}

#[test]
fn insert_returning_is_a_read() {
    ok("insert into secrets (value) values ('a') returning id, value");
    rejected_col(
        "insert into secrets (value) values ('a') returning upper(value)",
        "public.secrets.value",
    );
}

#[test]
fn ambiguous_unqualified_write_refused() {
    let r = rejected("insert into dup (x) values ('a')");
    assert!(r.message().contains("qualify"), "{}", r.message());
    let a = ok("insert into b.dup (x) values ('a')");
    assert_eq!(a.literals[0].column.schema, "b");
}

// ---- parameter reuse ----

#[test]
fn param_reuse_refused() {
    rejected_col(
        "insert into secrets (value, note) values ($1, $1)",
        "public.secrets.value",
    );
    rejected_col(
        "insert into secrets (value, org_id) values ($1, $1)",
        "public.secrets.value",
    );
    rejected_col(
        "update secrets set value = $1 where id = $1 and org_id = 'a'",
        "public.secrets.value",
    );
    ok("insert into secrets (value, note) values ($1, $2)");
}

// ---- UPDATE / DELETE ----

#[test]
fn update_tenant_from_where() {
    let sql = "UPDATE secrets SET value = 'new', note = NULL WHERE id = 3 AND org_id = 'acme'";
    let a = ok(sql);
    assert_eq!(a.literals.len(), 1);
    assert_eq!(text_at(sql, &a.literals[0]), "'new'");
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("acme".into()));
    let a = ok("update secrets s set value = $1 where s.org_id = $2");
    assert_eq!(a.params[0].tenant, TenantSource::Param(2));
    // No tenant conjunct: the values are sealed for the session tenant, and the statement is
    // pinned to it (see `update_by_primary_key_is_pinned_to_the_session_tenant`).
    let a = ok("update secrets set value = $1 where id = 1 or org_id = 'x'");
    assert_eq!(a.pins.len(), 1);
    assert_eq!(a.params[0].tenant, TenantSource::Session);
    let a = ok("update secrets set value = 'x' where id = 1");
    assert_eq!(a.pins.len(), 1);
    let a = ok("update secrets set value = DEFAULT, note = note where id = 1");
    assert!(a.pins.is_empty(), "nothing sealed, nothing pinned");
    ok("update secrets set name = 'n' where id = 1");
    // Moving a row without new values for its encrypted columns would leave it unreadable.
    rejected("update secrets set org_id = 5 where id = 1 returning value");
}

#[test]
fn update_refusals() {
    rejected_col(
        "update secrets set value = note where id = 1",
        "public.secrets.value",
    );
    rejected_col(
        "update secrets set value = lower($1)",
        "public.secrets.value",
    );
    rejected_col(
        "update secrets set (value, note) = ('a', 'b')",
        "public.secrets.value",
    );
    rejected_col(
        "update secrets set id = 1 where value = 'x'",
        "public.secrets.value",
    );
    rejected_col(
        "update secrets set id = 1 from other o where o.v = secrets.note",
        "public.secrets.note",
    );
    rejected_col(
        "update secrets set id = 1 returning length(value)",
        "public.secrets.value",
    );
}

#[test]
fn delete_rules() {
    ok("DELETE FROM secrets WHERE org_id = $1");
    ok("delete from secrets using other o where o.id = secrets.id returning value");
    rejected_col(
        "DELETE FROM secrets WHERE value = 'x'",
        "public.secrets.value",
    );
}

// ---- reads ----

#[test]
fn plain_projection_ok() {
    for sql in [
        "select value from secrets",
        "select value as v, s.note from secrets s",
        "select * from secrets",
        "select s.* from secrets s",
        "select public.secrets.value from public.secrets",
        "select count(value), count(*) from secrets",
        "select id from secrets where value is not null",
        "select value::text from secrets",
        "select value from secrets order by id limit 5",
        "select org_id, count(*) from secrets group by org_id",
        "select value from secrets where org_id in (select id from orgs)",
    ] {
        let a = ok(sql);
        assert!(a.touches_protected, "{sql}");
    }
}

#[test]
fn comparisons_refused() {
    for sql in [
        "select * from secrets where value = 'x'",
        "select * from secrets where value <> $1",
        "select * from secrets where 'x' < value",
        "select * from secrets where value like 'a%'",
        "select * from secrets where value ilike 'a%'",
        "select * from secrets where value similar to 'a%'",
        "select * from secrets where value ~ 'a'",
        "select * from secrets where value in ('a', 'b')",
        "select * from secrets where value in (select x from t)",
        "select * from secrets where value between 'a' and 'b'",
        "select * from secrets where value = any($1)",
        "select * from secrets where value is distinct from 'a'",
        "select * from secrets where id in (select value from secrets)",
        "select * from secrets s where exists (select 1 from t where t.x = s.value)",
    ] {
        rejected_col(sql, "public.secrets.value");
    }
}

#[test]
fn ordering_grouping_distinct_refused() {
    for sql in [
        "select value from secrets order by value",
        "select value from secrets order by 1",
        "select id, value v from secrets order by v",
        "select * from secrets order by 1",
        "select value from secrets group by value",
        "select value from secrets group by 1",
        "select distinct value from secrets",
        "select distinct * from secrets",
        "select distinct on (value) id from secrets",
        "select row_number() over (partition by value) from secrets",
        "select rank() over (order by value) from secrets",
        "select count(distinct value) from secrets",
        "select * from secrets join other using (value)",
        "select value from secrets union select value from secrets",
        "select id from other union all select value from secrets order by 1",
        "select value from secrets intersect all select 'x'",
    ] {
        rejected_col(sql, "public.secrets.value");
    }
    ok("select id, value from secrets order by 1");
    ok("select value from secrets union all select value from secrets");
}

#[test]
fn functions_refused() {
    for sql in [
        "select upper(value) from secrets",
        "select length(value) from secrets",
        "select coalesce(value, other) from secrets",
        "select value || 'x' from secrets",
        "select value::int from secrets",
        "select substring(value from 1 for 2) from secrets",
        "select case when id = 1 then value end from secrets",
        "select max(value) from secrets",
    ] {
        rejected_col(sql, "public.secrets.value");
    }
}

#[test]
fn aliases_ctes_derived_tables() {
    rejected_col(
        "select x.v from (select value as v from secrets) x where x.v = 'a'",
        "public.secrets.value",
    );
    rejected_col(
        "with c as (select value as v from secrets) select v from c order by v",
        "public.secrets.value",
    );
    rejected_col(
        "with c(w) as (select value from secrets) select * from c where w like 'a'",
        "public.secrets.value",
    );
    rejected_col(
        "select * from (select * from secrets) s where s.note = 'x'",
        "public.secrets.note",
    );
    rejected_col(
        "select u.v from (select id, 'x' as v from other union all select id, value from secrets) u where u.v = 'x'",
        "public.secrets.value",
    );
    ok("with c as (select value as v from secrets) select v from c");
    ok("select x.v from (select value as v from secrets) x where x.id = 1");
    ok("with recursive r as (select 1 as n union all select n + 1 from r where n < 3) select n from r");
}

#[test]
fn quoted_identifiers_and_case() {
    ok("select EMAIL from APP.\"Users\"");
    rejected_col(
        "select * from app.\"Users\" where EMAIL = 'x'",
        "app.Users.email",
    );
    // Unquoted Users folds to users, which is not protected.
    let a = ok("select * from app.Users where email = 'x'");
    assert!(!a.touches_protected);
    // A quoted column name keeps its case: "EMAIL" is not the encrypted column.
    ok("select * from app.\"Users\" where \"EMAIL\" = 'x'");
    let a = ok("insert into \"Users\" (\"email\") values ('a')");
    assert_eq!(a.literals[0].column.table, "Users");
}

#[test]
fn unqualified_column_resolution_is_conservative() {
    rejected_col(
        "select * from other o join secrets s on o.id = s.id where value = 'x'",
        "public.secrets.value",
    );
    ok("select * from other o where o.value = 'x'");
}

// ---- literal forms and byte ranges ----

#[test]
fn byte_ranges_with_multibyte_text() {
    let sql = "/* héllo wörld ☃ */ insert into secrets (note, value)\n values ('ünï''cödé ☃', $q$x'y☃$q$) -- é";
    let a = ok(sql);
    assert_eq!(a.literals.len(), 2);
    assert_eq!(text_at(sql, &a.literals[0]), "'ünï''cödé ☃'");
    assert_eq!(a.literals[0].value, "ünï'cödé ☃");
    assert_eq!(text_at(sql, &a.literals[1]), "$q$x'y☃$q$");
    assert_eq!(a.literals[1].value, "x'y☃");
}

#[test]
fn all_literal_forms() {
    let sql = "insert into secrets (value) values ($$a\\b'c$$), ($t$ $$ $t$), (E'\\x41\\101\\u00e9\\t'), (U&'d\\0061t\\+000061'), (N'nat'), ('')";
    let a = ok(sql);
    let vals: Vec<&str> = a.literals.iter().map(|l| l.value.as_str()).collect();
    assert_eq!(vals, ["a\\b'c", " $$ ", "AAé\t", "data", "nat", ""]);
    let raws: Vec<String> = a.literals.iter().map(|l| text_at(sql, l)).collect();
    assert_eq!(
        raws,
        [
            "$$a\\b'c$$",
            "$t$ $$ $t$",
            "E'\\x41\\101\\u00e9\\t'",
            "U&'d\\0061t\\+000061'",
            "N'nat'",
            "''"
        ]
    );
}

#[test]
fn standard_strings_keep_backslashes() {
    let sql = "insert into secrets (value) values ('a\\nb')";
    let a = ok(sql);
    assert_eq!(a.literals[0].value, "a\\nb");
}

#[test]
fn multi_statement_texts() {
    let sql = "BEGIN; SET LOCAL pgenvelope.tenant = 'ü'; insert into secrets (value) values ('é'); select 1; insert into secrets (note) values ('ñ'); COMMIT";
    let a = ok(sql);
    assert_eq!(a.statement_count, 6);
    assert_eq!(a.literals.len(), 2);
    assert!(a.literals[0].range.end <= a.literals[1].range.start);
    assert_eq!(text_at(sql, &a.literals[0]), "'é'");
    assert_eq!(text_at(sql, &a.literals[1]), "'ñ'");
    assert_eq!(
        a.tenant_changes,
        vec![TenantChange::Set {
            value: "ü".into(),
            local: true
        }]
    );
    assert_eq!(a.tx_controls, vec![TxControl::Begin, TxControl::Commit]);
    let r = rejected("select 1; select value from secrets order by value");
    assert_eq!(r.column, Some(value_col()));
}

// ---- tenant changes and transactions ----

#[test]
fn tenant_changes() {
    let a = ok("SET pgenvelope.tenant = 'acme'; SET SESSION pgenvelope.tenant TO 'b'; SET LOCAL pgenvelope.tenant TO DEFAULT; RESET pgenvelope.tenant; select set_config('pgenvelope.tenant', $1, true); SELECT set_config('pgenvelope.tenant', 'z', false)");
    assert_eq!(
        a.tenant_changes,
        vec![
            TenantChange::Set {
                value: "acme".into(),
                local: false
            },
            TenantChange::Set {
                value: "b".into(),
                local: false
            },
            TenantChange::Reset { local: true },
            TenantChange::Reset { local: false },
            TenantChange::SetParam {
                param: 1,
                local: true
            },
            TenantChange::Set {
                value: "z".into(),
                local: false
            },
        ]
    );
    let a = ok("set pgenvelope.tenant = 7");
    assert_eq!(
        a.tenant_changes,
        vec![TenantChange::Set {
            value: "7".into(),
            local: false
        }]
    );
    let a = ok("RESET ALL");
    assert_eq!(a.tenant_changes, vec![TenantChange::Reset { local: false }]);
    let a = ok("SET search_path = public; select set_config('search_path', 'x', false)");
    assert!(a.tenant_changes.is_empty()); // The setting name as a parameter: decided at Bind.
    let a = ok("select set_config($1, $2, false)");
    assert_eq!(
        a.tenant_changes,
        vec![TenantChange::IfParamNamesTenant {
            name: 1,
            change: Box::new(TenantChange::SetParam {
                param: 2,
                local: false
            })
        }]
    );
    rejected("select set_config($1, $2, false) where false");
    rejected("select 1 where set_config($1, 'a', false) is not null");
}

#[test]
fn tenant_set_in_odd_places_refused() {
    rejected("select 1 where set_config('pgenvelope.tenant', 'a', false) is not null");
    rejected("select set_config('pgenvelope.tenant', upper('a'), false)");
    rejected("select set_config('pgenvelope.tenant', 'a', $2)");
    // Clauses that could skip or repeat the call.
    rejected("select set_config('pgenvelope.tenant', 'a', false) where false");
    rejected("select set_config('pgenvelope.tenant', 'a', false) from generate_series(1, 2)");
    rejected("select set_config('pgenvelope.tenant', 'a', false) limit 0");
    rejected("with x as (select 1) select set_config('pgenvelope.tenant', 'a', false)");
    rejected("select distinct set_config('pgenvelope.tenant', 'a', false)");
    rejected("select set_config('pgenvelope.tenant', 'a', false) group by 1 having false");
}

#[test]
fn tenant_casts_that_change_the_text_are_no_tenant() {
    let a = ok("INSERT INTO secrets (org_id, value) VALUES ('7'::int, 'x'), ('acme'::text, 'y')");
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("7".into()));
    assert_eq!(a.literals[1].tenant, TenantSource::Literal("acme".into()));
    rejected("INSERT INTO secrets (org_id, value) VALUES ('acme'::varchar(2), 'x')");
    rejected("INSERT INTO secrets (org_id, value) VALUES ('1'::numeric, 'x')");
}

#[test]
fn tx_controls() {
    let a = ok("BEGIN; SAVEPOINT Sp1; ROLLBACK TO SAVEPOINT sp1; RELEASE \"X\"; ROLLBACK; START TRANSACTION; COMMIT; END");
    assert_eq!(
        a.tx_controls,
        vec![
            TxControl::Begin,
            TxControl::Savepoint("sp1".into()),
            TxControl::RollbackTo("sp1".into()),
            TxControl::Release("X".into()),
            TxControl::Rollback,
            TxControl::Begin,
            TxControl::Commit,
            TxControl::Commit,
        ]
    );
}

// ---- COPY ----

#[test]
fn copy_plans() {
    let a = ok("COPY secrets (org_id, value) FROM STDIN WITH (FORMAT csv, DELIMITER ';', NULL 'N', HEADER true, QUOTE '\"', ESCAPE '\\')");
    let p = a.copy.unwrap();
    assert_eq!(
        p.table,
        Some(TableName {
            schema: "public".into(),
            name: "secrets".into()
        })
    );
    assert_eq!(p.columns, ["org_id", "value"]);
    assert_eq!(p.direction, CopyDirection::FromStdin);
    assert_eq!(p.format, CopyFormat::Csv);
    assert_eq!(p.delimiter, Some(';'));
    assert_eq!(p.null.as_deref(), Some("N"));
    assert!(p.header);
    assert_eq!(p.quote, Some('"'));
    assert_eq!(p.escape, Some('\\'));

    let p = ok("copy public.secrets to stdout").copy.unwrap();
    assert_eq!(p.direction, CopyDirection::ToStdout);
    assert_eq!(p.format, CopyFormat::Text);
    assert!(p.columns.is_empty());

    let p = ok("copy secrets to stdout with csv header").copy.unwrap();
    assert_eq!(p.format, CopyFormat::Csv);
    assert!(p.header);

    let p = ok("copy (select id, value from secrets) to stdout")
        .copy
        .unwrap();
    assert_eq!(p.table, None);

    assert!(ok("copy other from stdin").copy.is_none());
    assert!(ok("copy secrets to '/tmp/x'").copy.is_none());
}

#[test]
fn copy_refusals() {
    rejected("copy secrets from '/tmp/x'");
    rejected("copy secrets from program 'cat x'");
    rejected("copy secrets from stdin with (format binary)");
    rejected("copy secrets to stdout with (format binary)");
    rejected("copy secrets to stdout binary");
    rejected("copy (select value from secrets) to stdout with (format binary)");
    rejected_col(
        "copy (select value from secrets order by value) to stdout",
        "public.secrets.value",
    );
    ok("copy other to stdout with (format binary)");
}

// ---- statements that cannot be analysed ----

#[test]
fn unanalysable_statements_refused() {
    rejected("insert into secrets (value values");
    rejected("merge into secrets s using other o on s.id = o.id when matched then delete");
    rejected("create view v as select value from secrets");
    rejected("create function f() returns void as $$ insert into secrets (value) values ('x') $$ language sql");
    rejected("prepare p as insert into secrets (value) values ($1)");
    rejected("execute p('secret')");
    rejected("select 1; explain analyze insert into secrets (value) select 'x'");
    ok("prepare p as select value from secrets where id = $1");
    ok("create view v as select 1");
    ok("execute p");
    // Parse errors without any protected name pass through.
    let a = analyze("selec 1 frm x", &prot());
    assert!(a.rejection.is_none());
}

#[test]
fn ddl_allowed() {
    for sql in [
        "create table secrets2 (id int)",
        "alter table secrets add column x text",
        "drop table secrets",
        "create index on secrets (org_id)",
        "truncate secrets",
        "vacuum secrets",
        "analyze secrets",
        "grant select on secrets to bob",
        "comment on table secrets is 'x'",
    ] {
        let a = ok(sql);
        assert_eq!(a.kinds, vec![StatementKind::Ddl], "{sql}");
    }
    assert!(ok("drop table secrets").touches_protected);
}

#[test]
fn explain_insert_literals_are_sites() {
    let sql = "explain analyze insert into secrets (value) values ('x')";
    let a = ok(sql);
    assert_eq!(text_at(sql, &a.literals[0]), "'x'");
}

// ---- Debug never prints values ----

#[test]
fn debug_redacts_values() {
    let a = ok("set pgenvelope.tenant = 'tenant-zz'; insert into secrets (org_id, value) values ('org-qq', 'sekrit-xyz')");
    let d = format!("{a:?}");
    for v in ["sekrit-xyz", "org-qq", "tenant-zz"] {
        assert!(!d.contains(v), "{d}");
    }
    let r = rejected("select * from secrets where value = 'sekrit-xyz'");
    assert!(!r.message().contains("sekrit"));
}

// ---- rewrite_literals ----

#[test]
fn rewrite_replaces_ranges() {
    let sql = "insert into secrets (value, note) values ('ä', E'b')";
    let a = ok(sql);
    let reps: Vec<_> = a
        .literals
        .iter()
        .map(|l| (l.range.clone(), "'enc:v1:AA=='".to_owned()))
        .collect();
    let out = rewrite_literals(sql, &reps).unwrap();
    assert_eq!(
        out,
        "insert into secrets (value, note) values ('enc:v1:AA==', 'enc:v1:AA==')"
    );
    assert!(analyze(&out, &prot()).rejection.is_none());
}

#[test]
fn rewrite_rejects_bad_ranges() {
    let s = "aé";
    assert!(matches!(
        rewrite_literals(s, &[(0..9, String::new())]),
        Err(RewriteError::OutOfBounds { .. })
    ));
    assert!(matches!(
        rewrite_literals(s, &[(2..3, String::new())]),
        Err(RewriteError::NotCharBoundary { .. })
    ));
    assert!(matches!(
        rewrite_literals(s, &[(1..3, String::new()), (0..1, String::new())]),
        Err(RewriteError::Overlap { .. })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let r = rewrite_literals(s, &[(2..1, String::new())]);
    assert!(r.is_err());
    assert_eq!(rewrite_literals(s, &[]).unwrap(), s);
}

// ---- properties ----

const SEEDS: &[&str] = &[
    "insert into secrets (org_id, value) values ('a', 'ü'), ($1, $2)",
    "update secrets set value = E'x\\n' where org_id = 'o'",
    "select value from secrets s join other o on o.id = s.id where s.id = 1",
    "with c as (select * from secrets) select * from c",
    "copy secrets (value) from stdin with (format csv)",
    "set local pgenvelope.tenant = 'x'; begin; savepoint a",
    "select set_config('pgenvelope.tenant', $1, true)",
    "delete from secrets where org_id = $1 returning value",
];

proptest! {
    #[test]
    fn analyze_never_panics(s in "\\PC{0,200}") {
        let p = prot();
        let a = analyze(&s, &p);
        if a.touches_protected || !a.tenant_changes.is_empty() {
            prop_assert!(might_touch(&s, &p));
        }
        for l in &a.literals {
            prop_assert!(s.get(l.range.clone()).is_some());
        }
    }

    #[test]
    fn mutated_statements_never_panic(
        seed in 0..SEEDS.len(),
        edits in proptest::collection::vec((any::<usize>(), 0u8..3, "[\\PC]{0,3}"), 0..4),
    ) {
        let p = prot();
        let mut s = SEEDS[seed].to_owned();
        for (at, op, text) in edits {
            let mut pos = at % (s.len() + 1);
            while !s.is_char_boundary(pos) {
                pos -= 1;
            }
            match op {
                0 => s.insert_str(pos, &text),
                1 => {
                    let end = s[pos..].char_indices().nth(1).map_or(s.len(), |(i, _)| pos + i);
                    s.replace_range(pos..end, "");
                }
                _ => s.insert(pos, '\''),
            }
        }
        let a = analyze(&s, &p);
        if a.touches_protected || !a.tenant_changes.is_empty() {
            prop_assert!(might_touch(&s, &p));
        }
        let mut last = 0;
        for l in &a.literals {
            prop_assert!(l.range.start >= last);
            last = l.range.end;
            prop_assert!(s.get(l.range.clone()).is_some());
        }
    }
}

#[test]
fn data_modifying_ctes() {
    let sql = "with ins as (insert into secrets (org_id, value) values ('o', 'v') returning id) select id from ins";
    let a = ok(sql);
    assert_eq!(text_at(sql, &a.literals[0]), "'v'");
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("o".into()));
    rejected_col(
        "with u as (update secrets set note = 'n' where org_id = 'a' returning value) select * from u order by value",
        "public.secrets.value",
    );
}

#[test]
fn copy_followed_by_statements() {
    let a = ok("copy secrets from stdin; select 1");
    assert_eq!(a.kinds, vec![StatementKind::Copy, StatementKind::Query]);
    // sqlparser takes the lines after `FROM STDIN;` as inline data: refused, as they cannot
    // be analysed.
    rejected("copy secrets from stdin;\nselect value from secrets order by value");
}

#[test]
fn do_blocks_and_triggers_refused() {
    rejected("DO $$ begin insert into secrets (value) values ('x'); end $$");
    rejected("create trigger t before insert on secrets for each row execute function f()");
    rejected("create rule r as on insert to secrets do instead nothing");
    ok("DO $$ begin perform 1; end $$");
}

#[test]
fn misc_reads() {
    ok("select value, row_number() over (order by id) from secrets limit $1 offset $2");
    ok("select s.value, o.name from secrets s left join other o on o.id = s.org_id where s.org_id = $1 for update");
    ok("select (select value from secrets where id = 1) as v");
    rejected_col(
        "select (select value from secrets where id = 1) = 'x'",
        "public.secrets.value",
    );
    rejected_col("select value->>'a' from secrets", "public.secrets.value");
    rejected_col(
        "select * from secrets natural join other",
        "public.secrets.value",
    );
    rejected_col(
        "select s.id from secrets s group by s.id having max(s.note) > 'a'",
        "public.secrets.note",
    );
    ok("select count(*) from secrets having count(value) > 1");
    rejected("table secrets");
    ok("select 'value' from other");
    ok("select value from other");
}

#[test]
fn rejections_are_clone_and_analysis_is_clone() {
    let a = analyze("select upper(value) from secrets", &prot());
    let b = a.clone();
    assert_eq!(a.rejection, b.rejection);
    assert_eq!(
        b.rejection.unwrap().message(),
        "pgenvelope: function upper over encrypted column public.secrets.value is not supported"
    );
}

#[test]
fn protected_lookups() {
    let p = prot();
    assert!(p.get("public", "secrets").is_some());
    assert!(p.get("public", "Users").is_none());
    assert_eq!(p.by_name("dup").count(), 2);
    assert!(!p.is_empty());
    let merged = Protected::new([
        ProtectedTable {
            schema: "s".into(),
            name: "t".into(),
            tenant_column: None,
            row_key: None,
            encrypted: vec!["a".into()],
            searchable: Vec::new(),
        },
        ProtectedTable {
            schema: "s".into(),
            name: "t".into(),
            tenant_column: Some("o".into()),
            row_key: None,
            encrypted: vec!["b".into(), "a".into()],
            searchable: Vec::new(),
        },
    ]);
    assert_eq!(merged.tables().len(), 1);
    assert_eq!(merged.tables()[0].encrypted, ["a", "b"]);
    assert_eq!(merged.tables()[0].tenant_column.as_deref(), Some("o"));
}

#[test]
fn decode_literal_edge_cases() {
    use super::text::decode_literal;
    assert_eq!(decode_literal("'a''b'").as_deref(), Some("a'b"));
    assert_eq!(decode_literal("e'\\''").as_deref(), Some("'"));
    assert_eq!(decode_literal("E'\\q'").as_deref(), Some("q"));
    assert_eq!(decode_literal("E'\\0'"), None);
    assert_eq!(decode_literal("E'\\xZZ'"), None);
    assert_eq!(decode_literal("E'\\303\\251'").as_deref(), Some("é"));
    assert_eq!(decode_literal("E'\\377'"), None);
    assert_eq!(decode_literal("u&'\\\\'").as_deref(), Some("\\"));
    assert_eq!(decode_literal("U&'\\0000'"), None);
    assert_eq!(decode_literal("$a$$b$a$").as_deref(), Some("$b"));
    assert_eq!(decode_literal("$a$x$b$"), None);
    assert_eq!(decode_literal("$$"), None);
    assert_eq!(decode_literal("x"), None);
}

#[test]
fn cte_named_like_a_protected_table_does_not_hide_writes() {
    let sql = "with secrets as (select 1) insert into secrets (value) values ('x')";
    let a = ok(sql);
    assert_eq!(text_at(sql, &a.literals[0]), "'x'");
    rejected_col(
        "with secrets as (select 1) update secrets set value = upper('x')",
        "public.secrets.value",
    );
    // As a read source the CTE does shadow the table.
    ok("with secrets as (select 'a' as value) select * from secrets where value = 'a'");
}

#[test]
fn alter_table_default_on_encrypted_column_refused() {
    rejected_col(
        "alter table secrets alter column value set default 'plain'",
        "public.secrets.value",
    );
    ok("alter table secrets alter column org_id set default 1");
    ok("alter table secrets add column extra text default 'x'");
    rejected_col(
        "alter table secrets drop column value",
        "public.secrets.value",
    );
}

#[test]
fn wildcards_of_unknown_width_are_conservative() {
    rejected_col(
        "select o.*, s.value from other o, secrets s order by 2",
        "public.secrets.value",
    );
    rejected_col(
        "select x.c from (select o.*, s.value from other o, secrets s) as x(a, b, c) where x.c = 'v'",
        "public.secrets.value",
    );
    rejected_col(
        "select u.id from (select * from other union all select value from secrets) u where u.id = 'v'",
        "public.secrets.value",
    );
    ok("select o.*, s.value from other o, secrets s order by o.id");
}

#[test]
fn update_moving_the_row_to_another_tenant() {
    let a = ok("update secrets set org_id = 'b', value = 'x', note = NULL where org_id = 'a'");
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("b".into()));
    let a = ok("update secrets set value = $1, note = $4, org_id = $2 where org_id = $3");
    assert_eq!(a.params[0].tenant, TenantSource::Param(2));
    // Every encrypted column needs a new value, sealed for the new organisation.
    rejected("update secrets set org_id = 'b', value = 'x' where org_id = 'a'");
    rejected("update secrets set org_id = 'b', value = 'x', note = note where org_id = 'a'");
    rejected("update secrets set org_id = other_col, value = 'x'");
    rejected("update secrets set org_id = other_col, value = NULL");
    ok("update secrets set org_id = other_col, value = NULL, note = NULL");
}

#[test]
fn literals_spanning_lines_and_crlf() {
    let sql = "insert into secrets\r\n (value, note)\r\n values ('a\r\nß\n☃', $x$\n\t€\n$x$)\r\n";
    let a = ok(sql);
    assert_eq!(text_at(sql, &a.literals[0]), "'a\r\nß\n☃'");
    assert_eq!(a.literals[0].value, "a\r\nß\n☃");
    assert_eq!(text_at(sql, &a.literals[1]), "$x$\n\t€\n$x$");
    assert_eq!(a.literals[1].value, "\n\t€\n");
}

#[test]
fn long_single_line_bulk_insert() {
    let rows: Vec<String> = (0..5000).map(|i| format!("({i}, 'välue {i}')")).collect();
    let sql = format!(
        "insert into secrets (org_id, value) values {}",
        rows.join(", ")
    );
    let a = ok(&sql);
    assert_eq!(a.literals.len(), 5000);
    assert_eq!(text_at(&sql, &a.literals[4999]), "'välue 4999'");
    assert_eq!(
        a.literals[4999].tenant,
        TenantSource::Literal("4999".into())
    );
}

#[test]
fn chained_transactions_and_abort() {
    let a = ok("BEGIN ISOLATION LEVEL SERIALIZABLE; ABORT; commit and chain; rollback and chain; rollback to sp");
    assert_eq!(
        a.tx_controls,
        vec![
            TxControl::Begin,
            TxControl::Rollback,
            TxControl::Commit,
            TxControl::Begin,
            TxControl::Rollback,
            TxControl::Begin,
            TxControl::RollbackTo("sp".into()),
        ]
    );
    let a = ok("discard all");
    assert_eq!(a.tenant_changes, vec![TenantChange::Reset { local: false }]);
}

#[test]
fn copy_force_null_options_are_refused_on_protected_tables() {
    for sql in [
        "COPY secrets (org_id, value) FROM STDIN WITH (FORMAT csv, FORCE_NULL (value))",
        "COPY secrets (org_id, value) FROM STDIN WITH (FORMAT csv, FORCE_NOT_NULL (value))",
    ] {
        let r = rejected(sql);
        assert!(r.message().contains("FORCE_NULL"), "{sql}: {}", r.message());
    }
    ok("COPY unrelated (a) FROM STDIN WITH (FORMAT csv, FORCE_NULL (a))");
}

#[test]
fn plain_literals_with_backslashes_are_flagged() {
    assert!(
        ok("SELECT 'a\\' /* '; INSERT INTO secrets (org_id, value) VALUES ('o', 'p'); -- */")
            .plain_backslash
    );
    assert!(ok("INSERT INTO secrets (org_id, value) VALUES ('o', N'a\\b')").plain_backslash);
    assert!(!ok("INSERT INTO secrets (org_id, value) VALUES ('o', E'a\\\\b')").plain_backslash);
    assert!(!ok("SELECT $x$a\\b$x$, 1 FROM secrets -- \\ 'a\\'").plain_backslash);
}

#[test]
fn continued_literals_are_one_literal() {
    let sql = "INSERT INTO secrets (org_id, value, note) VALUES ('o'\n'1', 'sec' -- c\n  're''t', E'x\\''\n'y\\n')";
    let a = ok(sql);
    let values: Vec<(&str, &str)> = a
        .literals
        .iter()
        .map(|l| (&sql[l.range.clone()], l.value.as_str()))
        .collect();
    assert_eq!(
        values,
        vec![
            ("'sec' -- c\n  're''t'", "secre't"),
            ("E'x\\''\n'y\\n'", "x'y\n"),
        ]
    );
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("o1".into()));
    // Not continued: on one line (PostgreSQL refuses it), or across a block comment.
    rejected("INSERT INTO secrets (org_id, value) VALUES ('o', 'a' 'b')");
    rejected("INSERT INTO secrets (org_id, value) VALUES ('o', 'a' /* c */\n'b')");
    // A continuation of E'' that sqlparser would end early is refused.
    rejected("SELECT E'a'\n'b\\' ; INSERT INTO secrets (org_id, value) VALUES ('o', 'p'); --'");
    assert!(text::separator_continues(" \t-- x\n\x0b "));
    assert!(!text::separator_continues("\x0b\n"));
    assert!(!text::separator_continues("  "));
}

#[test]
fn update_same_column_only_through_the_visible_target_name() {
    ok("UPDATE secrets SET value = value");
    ok("UPDATE secrets SET value = secrets.value");
    ok("UPDATE secrets v SET value = v.value");
    rejected_col(
        "UPDATE secrets v SET value = t.value FROM (SELECT 'x' AS value) AS t",
        "public.secrets.value",
    );
    rejected_col(
        "UPDATE secrets v SET value = secrets.value FROM (SELECT 'x' AS value) AS secrets",
        "public.secrets.value",
    );
    rejected_col(
        "WITH secrets AS (SELECT 'x' AS value) UPDATE secrets AS v SET value = secrets.value FROM secrets",
        "public.secrets.value",
    );
    ok("INSERT INTO secrets AS v (org_id, value) VALUES ('a', 'b') ON CONFLICT (org_id) DO UPDATE SET value = v.value");
    ok("INSERT INTO secrets (org_id, value) VALUES ('a', 'b') ON CONFLICT (org_id) DO UPDATE SET value = secrets.value, note = EXCLUDED.note");
    rejected_col(
        "INSERT INTO secrets AS v (org_id, value) VALUES ('a', 'b') ON CONFLICT (org_id) DO UPDATE SET value = v.note",
        "public.secrets.value",
    );
}

#[test]
fn typed_literals_and_qualified_text_types_are_literals() {
    for sql in [
        "INSERT INTO secrets (org_id, value) VALUES ('a', text 'x')",
        "INSERT INTO secrets (org_id, value) VALUES ('a', varchar 'x')",
        "INSERT INTO secrets (org_id, value) VALUES ('a', 'x'::pg_catalog.text)",
        "INSERT INTO secrets (org_id, value) VALUES ('a', CAST('x' AS pg_catalog.varchar))",
        "UPDATE secrets SET value = text 'x' WHERE org_id = 'a'",
    ] {
        let a = ok(sql);
        assert_eq!(a.literals.len(), 1, "{sql}");
        assert_eq!(a.literals[0].value, "x", "{sql}");
        assert_eq!(&sql[a.literals[0].range.clone()], "'x'", "{sql}");
    }
    rejected_col(
        "INSERT INTO secrets (org_id, value) VALUES ('a', varchar(3) 'xyzw')",
        "public.secrets.value",
    );
    rejected_col(
        "INSERT INTO secrets (org_id, value) VALUES ('a', 'x'::other.text)",
        "public.secrets.value",
    );
}

#[test]
fn identifiers_are_truncated_to_63_bytes() {
    let long = "s".repeat(63);
    let p = Protected::new([ProtectedTable {
        schema: "public".into(),
        name: long.clone(),
        tenant_column: None,
        row_key: None,
        encrypted: vec![format!("{}é", "v".repeat(61))],
        searchable: Vec::new(),
    }]);
    let a = analyze(&format!("INSERT INTO {long}extra (x) VALUES ('a')"), &p);
    assert!(a.touches_protected);
    // 61 + 'é' (2 bytes) = 63 bytes: a longer quoted name truncates to it.
    let col = format!("\"{}éé\"", "v".repeat(61));
    let a = analyze(&format!("INSERT INTO \"{long}zz\" ({col}) VALUES (1)"), &p);
    assert!(a.rejection.is_some());
    let a = analyze(
        &format!("INSERT INTO \"{long}zz\" ({col}) VALUES ('p')"),
        &p,
    );
    assert!(a.rejection.is_none(), "{:?}", a.rejection);
    assert_eq!(a.literals.len(), 1);
    // A multi-byte character straddling byte 63 is dropped whole.
    assert_eq!(
        analyzer_truncate(format!("{}é", "a".repeat(62))),
        "a".repeat(62)
    );
}

fn analyzer_truncate(s: String) -> String {
    super::analyzer::truncate_identifier(s)
}

#[test]
fn alter_table_refuses_ddl_that_rewrites_encrypted_columns() {
    for sql in [
        "ALTER TABLE secrets ALTER COLUMN value TYPE text USING 'plain'",
        "ALTER TABLE secrets ALTER value TYPE char(80)",
        "ALTER TABLE secrets ALTER value TYPE int",
        "ALTER TABLE secrets ALTER value TYPE text USING value || ''",
        "ALTER TABLE secrets ALTER value TYPE text USING other::text",
        "ALTER TABLE secrets ALTER value TYPE text USING value::varchar(5)",
        "ALTER TABLE secrets ALTER value TYPE text USING lower(value)",
        "ALTER TABLE secrets RENAME COLUMN value TO v2",
        "ALTER TABLE secrets RENAME COLUMN other TO note",
        "ALTER TABLE secrets RENAME COLUMN org_id TO org",
        "ALTER TABLE secrets RENAME TO s2",
        "ALTER TABLE plain RENAME TO secrets",
        "ALTER TABLE secrets ALTER COLUMN value SET DEFAULT 'x'",
        "ALTER TABLE secrets DROP COLUMN note",
        "ALTER TABLE secrets ADD COLUMN note text DEFAULT 'x'",
        "ALTER TABLE secrets ADD COLUMN note text DEFAULT 'x' NULL",
        "ALTER TABLE secrets ADD COLUMN note text GENERATED ALWAYS AS (other) STORED",
        "ALTER TABLE secrets ADD COLUMN note my_domain",
        "ALTER TABLE secrets DROP CONSTRAINT pgenvelope_enc_value",
        "ALTER TABLE secrets RENAME CONSTRAINT pgenvelope_enc_value TO x",
        "ALTER TABLE plain INHERIT secrets",
        "ALTER TABLE secrets INHERIT plain",
        "ALTER TABLE secrets ATTACH PARTITION plain DEFAULT",
        "CREATE TABLE child () INHERITS (secrets)",
        "CREATE TABLE part PARTITION OF secrets DEFAULT",
    ] {
        let r = rejected(sql);
        assert!(r.message().contains("directly"), "{sql}: {}", r.message());
    }
    // Not understood by the parser: refused as unanalysable.
    rejected("ALTER TABLE secrets SET SCHEMA other");
    for sql in [
        "ALTER TABLE secrets ADD COLUMN extra int DEFAULT 1",
        "ALTER TABLE secrets ALTER COLUMN other SET DEFAULT 'x'",
        "ALTER TABLE secrets ALTER COLUMN value SET NOT NULL",
        "ALTER TABLE secrets ALTER COLUMN value DROP DEFAULT",
        "ALTER TABLE secrets RENAME COLUMN a TO b",
        "ALTER TABLE secrets ADD CONSTRAINT pgenvelope_enc_value CHECK (value IS NULL OR value LIKE 'enc:v1:%') NOT VALID",
        "ALTER TABLE secrets VALIDATE CONSTRAINT pgenvelope_enc_value",
        "ALTER TABLE secrets DROP CONSTRAINT other_check",
        "ALTER TABLE plain RENAME TO plain2",
        "ALTER TABLE plain ALTER COLUMN value TYPE int USING 1",
        // Migrations that cannot write plaintext: a new encrypted column starts out NULL; a
        // text type keeps every ciphertext as it is (varchar(n) fails on a value too long,
        // it does not truncate).
        "ALTER TABLE secrets ADD COLUMN note text",
        r#"ALTER TABLE "secrets" ADD COLUMN "note" text NULL"#,
        "ALTER TABLE secrets ADD COLUMN IF NOT EXISTS note varchar(200)",
        "ALTER TABLE secrets ALTER value TYPE varchar(10)",
        "ALTER TABLE secrets ALTER COLUMN value TYPE text",
        r#"ALTER TABLE "secrets" ALTER COLUMN "value" TYPE text USING "value"::text"#,
        r#"alter table "secrets" alter column "value" drop default, alter column "value" drop not null, alter column "value" type text using ("value"::text)"#,
        "ALTER TABLE secrets ALTER COLUMN value SET DATA TYPE character varying(300)",
    ] {
        ok(sql);
    }
}

#[test]
fn unparsable_statements_naming_nothing_protected_pass() {
    ok("DO $$ BEGIN EXECUTE 'select 1'; END $$");
    ok("BEGIN; CREATE USER \"u6\\\"\"\"; RESET ROLE; ROLLBACK");
    let a = ok("BEGIN; DO $$ BEGIN PERFORM 1; END $$; INSERT INTO secrets (org_id, value) VALUES ('a', 'x'); COMMIT");
    assert_eq!(a.literals.len(), 1);
    assert_eq!(a.tx_controls, vec![TxControl::Begin, TxControl::Commit]);
    assert_eq!(a.statement_count, 4);
    rejected("DO $$ BEGIN EXECUTE 'insert into secrets (value) values (''x'')'; END $$");
    rejected("DO $$ BEGIN INSERT INTO secrets (value) VALUES ('x'); END $$");
    rejected("DO $$ BEGIN PERFORM set_config('pgenvelope.tenant', 'x', false); END $$");
    rejected("DO $$ BEGIN RESET ALL; END $$");
}

#[test]
fn copy_header_values_and_where() {
    for (opts, header) in [
        ("(FORMAT csv, HEADER off)", false),
        ("(FORMAT csv, HEADER 0)", false),
        ("(FORMAT csv, HEADER no)", false),
        ("(FORMAT csv, HEADER false)", false),
        ("(FORMAT csv, HEADER MATCH)", true),
        ("(FORMAT csv, HEADER on)", true),
        ("(FORMAT csv, HEADER)", true),
        ("(ENCODING 'UTF8')", false),
    ] {
        let a = ok(&format!(
            "COPY secrets (org_id, value) FROM STDIN WITH {opts}"
        ));
        let plan = a.copy.unwrap();
        assert_eq!(plan.header, header, "{opts}");
    }
    let a = ok("COPY secrets (org_id, value) FROM STDIN WITH (FORMAT csv, HEADER match) WHERE org_id = 'a'");
    assert!(a.copy.unwrap().header);
    ok("COPY secrets (org_id, value) FROM STDIN WHERE org_id = 'a'");
    rejected_col(
        "COPY secrets (org_id, value) FROM STDIN WHERE value = 'a'",
        "public.secrets.value",
    );
    rejected("COPY secrets FROM STDIN WHERE (SELECT 1) = 1 AND note LIKE 'x%'");
}

#[test]
fn coalesce_with_literal_fallbacks_passes_the_column_through() {
    ok("SELECT coalesce(value, '') FROM secrets");
    ok("SELECT coalesce(value, NULL, $1) AS v FROM secrets");
    rejected_col(
        "SELECT 1 FROM secrets WHERE coalesce(value, '') = 'x'",
        "public.secrets.value",
    );
    rejected_col(
        "SELECT coalesce(value, other) FROM secrets",
        "public.secrets.value",
    );
    rejected_col(
        "SELECT coalesce(value, '') FROM secrets ORDER BY 1",
        "public.secrets.value",
    );
}

#[test]
fn statement_splitting_fallback_is_conservative() {
    // Prose in a string body that is not SQL: only the protected names matter.
    ok("DO $$ BEGIN RAISE NOTICE 'it''s'; END $$");
    rejected("DO $$ BEGIN RAISE NOTICE 'it''s secrets'; EXECUTE 'select 1'; END $$");
    // Statement bodies with inner semicolons are not split.
    rejected(
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; DO $$ BEGIN END $$; RESET ROLE",
    );
    rejected(
        "CREATE RULE r AS ON INSERT TO t DO ALSO (SELECT 1; SELECT 2); DO $$ BEGIN END $$; RESET ROLE",
    );
}

#[test]
fn create_protected_table_refuses_defaults_on_encrypted_columns() {
    ok("CREATE TABLE secrets (id int, org_id text DEFAULT 'o', value text NOT NULL, note varchar(200))");
    ok("CREATE TABLE other (value text DEFAULT 'x', note my_domain)");
    for sql in [
        "CREATE TABLE secrets (org_id text, value text DEFAULT 'plain')",
        "CREATE TABLE secrets (org_id text, value text GENERATED ALWAYS AS (org_id) STORED)",
        "CREATE TABLE secrets (org_id text, note my_domain)",
    ] {
        let r = rejected(sql);
        assert!(r.message().contains("directly"), "{sql}: {}", r.message());
        assert!(r.column.is_some(), "{sql}");
    }
}

#[test]
fn positional_order_by_through_stars_of_known_width() {
    ok("SELECT * FROM (SELECT org_id, value FROM secrets) s ORDER BY 1");
    ok("WITH x AS (SELECT org_id, value FROM secrets) SELECT * FROM x ORDER BY 1");
    ok("SELECT s.* FROM (SELECT org_id, value FROM secrets) s(a, b) ORDER BY 1, a");
    ok("SELECT org_id, value FROM secrets UNION ALL SELECT org_id, value FROM secrets ORDER BY 1");
    for sql in [
        "SELECT * FROM (SELECT org_id, value FROM secrets) s ORDER BY 2",
        "WITH x AS (SELECT org_id, value FROM secrets) SELECT x.* FROM x ORDER BY 2",
        "SELECT * FROM (SELECT org_id, value FROM secrets) s(a, b) ORDER BY b",
        "SELECT * FROM (SELECT * FROM secrets) s ORDER BY 1",
        "WITH x AS (SELECT * FROM secrets) SELECT * FROM x ORDER BY 1",
        "SELECT * FROM (SELECT org_id FROM secrets) s, secrets ORDER BY 1",
        "SELECT id, * FROM secrets UNION ALL SELECT id, * FROM secrets ORDER BY 5",
    ] {
        rejected_col(sql, "public.secrets.value");
    }
}

#[test]
fn unterminated_dollar_quotes_in_unparsable_pieces_do_not_recurse() {
    // Found by the differential fuzz: the fallback's name search once recursed between the
    // whole text and a string body that does not tokenize, without end.
    let a = analyze("SELECT 0, 'x'\n'\n'E'$q$' FROM secrets", &prot());
    assert!(a.rejection.is_some());
}

// ---- row binding ----

fn bound() -> Protected {
    Protected::new([ProtectedTable {
        schema: "public".into(),
        name: "vault".into(),
        tenant_column: Some("org_id".into()),
        row_key: Some("id".into()),
        encrypted: vec!["value".into()],
        searchable: Vec::new(),
    }])
}

fn bound_ok(sql: &str) -> Analysis {
    let a = analyze(sql, &bound());
    assert!(a.rejection.is_none(), "{sql}: {:?}", a.rejection);
    a
}

fn bound_rejected(sql: &str) -> String {
    let a = analyze(sql, &bound());
    a.rejection
        .unwrap_or_else(|| panic!("not rejected: {sql}"))
        .message()
}

#[test]
fn row_keys_of_written_values() {
    let a =
        bound_ok("INSERT INTO vault (id, org_id, value) VALUES (7, 'acme', 'x'), ($1, 'acme', $2)");
    assert_eq!(
        a.literals[0].row_key,
        Some(RowKeySource::Literal("7".into()))
    );
    assert_eq!(a.params[0].row_key, Some(RowKeySource::Param(1)));
    let a = bound_ok("UPDATE vault SET value = $1 WHERE id = $2 AND org_id = $3");
    assert_eq!(a.params[0].row_key, Some(RowKeySource::Param(2)));
    let a = bound_ok("UPDATE vault v SET value = 'y' WHERE v.id = '9'::text AND org_id = 'acme'");
    assert_eq!(
        a.literals[0].row_key,
        Some(RowKeySource::Literal("9".into()))
    );
    // Conflict on the key: EXCLUDED carries values sealed for the same key.
    bound_ok("INSERT INTO vault (id, org_id, value) VALUES ($1, $2, $3) ON CONFLICT (id, org_id) DO UPDATE SET value = EXCLUDED.value");
    // NULL values need no key; unbound tables carry none.
    bound_ok("INSERT INTO vault (org_id, value) VALUES ('acme', NULL)");
    let a = ok("INSERT INTO secrets (org_id, value) VALUES ('acme', 'x')");
    assert_eq!(a.literals[0].row_key, None);
}

/// The text `sql` becomes with the draw's edits made (keys written as `K<n>`).
fn with_draw_edits(sql: &str, draw: &crate::sql::KeyDraw) -> String {
    use crate::sql::DrawEdit;
    let mut out = String::new();
    let mut at = 0;
    for (range, edit) in &draw.edits {
        out.push_str(&sql[at..range.start]);
        out.push_str(&match edit {
            DrawEdit::Column => ", \"id\"".to_owned(),
            DrawEdit::Overriding => " OVERRIDING SYSTEM VALUE".to_owned(),
            DrawEdit::Key(n) => format!(", K{n}"),
            DrawEdit::KeyInPlace(n) => format!("K{n}"),
            DrawEdit::Keys => ", KEYS".to_owned(),
            DrawEdit::Name => ", pgenvelope_key".to_owned(),
        });
        at = range.end;
    }
    out.push_str(&sql[at..]);
    out
}

#[test]
fn keys_left_to_their_default_are_drawn() {
    use crate::sql::DrawRows;
    let sql = "INSERT INTO vault (org_id, value) VALUES ('acme', 'x'), ($1, $2) RETURNING vault.id";
    let a = bound_ok(sql);
    assert_eq!(a.draws.len(), 1);
    let d = &a.draws[0];
    assert_eq!(d.table, r#""public"."vault""#);
    assert_eq!(d.column, "id");
    assert_eq!(d.rows, DrawRows::Fixed(2));
    assert_eq!(d.params(), 2);
    assert_eq!(
        with_draw_edits(sql, d),
        "INSERT INTO vault (org_id, value, \"id\") OVERRIDING SYSTEM VALUE VALUES ('acme', 'x', K0), ($1, $2, K1) RETURNING vault.id"
    );
    assert_eq!(
        a.literals[0].row_key,
        Some(RowKeySource::Drawn { draw: 0, row: 0 })
    );
    assert_eq!(
        a.params[0].row_key,
        Some(RowKeySource::Drawn { draw: 0, row: 1 })
    );
    // Nested parentheses and casts inside rows; one draw per INSERT of a text.
    let sql = "INSERT INTO vault (org_id, value) VALUES (('acme'), ($1)::text); INSERT INTO \"vault\" (\"org_id\", \"value\") VALUES ('b', 'y')";
    let a = bound_ok(sql);
    assert_eq!(a.draws.len(), 2);
    assert_eq!(
        with_draw_edits(sql, &a.draws[0]),
        "INSERT INTO vault (org_id, value, \"id\") OVERRIDING SYSTEM VALUE VALUES (('acme'), ($1)::text, K0); INSERT INTO \"vault\" (\"org_id\", \"value\") VALUES ('b', 'y')"
    );
    assert_eq!(
        a.literals[0].row_key,
        Some(RowKeySource::Drawn { draw: 1, row: 0 })
    );
    // SQLAlchemy's insertmanyvalues.
    let sql = "INSERT INTO vault (org_id, value) SELECT p0::VARCHAR, p1::VARCHAR FROM (VALUES ($1::VARCHAR, $2::VARCHAR, 0), ($3::VARCHAR, $4::VARCHAR, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING vault.id, vault.id AS id__1";
    let a = bound_ok(sql);
    assert_eq!(a.draws[0].params(), 2);
    assert_eq!(
        with_draw_edits(sql, &a.draws[0]),
        "INSERT INTO vault (org_id, value, \"id\") OVERRIDING SYSTEM VALUE SELECT p0::VARCHAR, p1::VARCHAR, pgenvelope_key FROM (VALUES ($1::VARCHAR, $2::VARCHAR, 0, K0), ($3::VARCHAR, $4::VARCHAR, 1, K1)) AS imp_sen(p0, p1, sen_counter, pgenvelope_key) ORDER BY sen_counter RETURNING vault.id, vault.id AS id__1"
    );
    assert_eq!(
        a.params[1].row_key,
        Some(RowKeySource::Drawn { draw: 0, row: 1 })
    );
    // Django's bulk_create.
    let sql = r#"INSERT INTO "vault" ("org_id", "value") SELECT * FROM UNNEST(($1)::varchar[], ($2)::text[]) RETURNING "vault"."id""#;
    let a = bound_ok(sql);
    assert_eq!(a.draws[0].params(), 1);
    assert!(matches!(&a.draws[0].rows, DrawRows::Longest(arrays) if arrays.len() == 2));
    assert_eq!(
        with_draw_edits(sql, &a.draws[0]),
        r#"INSERT INTO "vault" ("org_id", "value", "id") OVERRIDING SYSTEM VALUE SELECT * FROM UNNEST(($1)::varchar[], ($2)::text[], KEYS) RETURNING "vault"."id""#
    );
    assert_eq!(a.arrays[0].row_key, Some(crate::sql::ArraySource::Drawn(0)));
    // Sequelize: the key column written as DEFAULT.
    let sql = r#"INSERT INTO "vault" ("id","org_id","value") VALUES (DEFAULT,$1,$2),(7,'a','b'),(default,'c','d') RETURNING "id","value";"#;
    let a = bound_ok(sql);
    assert_eq!(a.draws[0].params(), 2);
    assert_eq!(
        with_draw_edits(sql, &a.draws[0]),
        r#"INSERT INTO "vault" ("id","org_id","value") OVERRIDING SYSTEM VALUE VALUES (K0,$1,$2),(7,'a','b'),(K1,'c','d') RETURNING "id","value";"#
    );
    assert_eq!(
        a.params[0].row_key,
        Some(RowKeySource::Drawn { draw: 0, row: 0 })
    );
    assert_eq!(
        a.literals[0].row_key,
        Some(RowKeySource::Literal("7".into()))
    );
    assert_eq!(
        a.literals[1].row_key,
        Some(RowKeySource::Drawn { draw: 0, row: 1 })
    );
    // Nothing encrypted written, or the key given: nothing drawn.
    assert!(bound_ok("INSERT INTO vault (org_id, n) VALUES ('acme', 1)")
        .draws
        .is_empty());
    assert!(
        bound_ok("INSERT INTO vault (id, org_id, value) VALUES (1, 'acme', 'x')")
            .draws
            .is_empty()
    );
}

#[test]
fn writes_without_the_row_key_are_refused() {
    for sql in [
        "INSERT INTO vault (org_id, value) OVERRIDING USER VALUE VALUES ('acme', 'x')",
        "INSERT INTO vault (id, org_id, value) VALUES (nextval('s'), 'acme', 'x')",
        "UPDATE vault SET value = $1 WHERE org_id = 'acme'",
        "UPDATE vault SET value = $1 WHERE (id = 1 OR id = 2) AND org_id = 'acme'",
    ] {
        let m = bound_rejected(sql);
        assert!(m.contains("bound to their row"), "{sql}: {m}");
    }
    for sql in [
        "UPDATE vault SET id = 8 WHERE id = 7 AND org_id = 'acme'",
        "UPDATE vault SET (id, n) = (8, 1) WHERE id = 7 AND org_id = 'acme'",
        "INSERT INTO vault (id, org_id, value) VALUES (1, 'a', 'x') ON CONFLICT (id, org_id) DO UPDATE SET id = 2",
    ] {
        let m = bound_rejected(sql);
        assert!(m.contains("row key id"), "{sql}: {m}");
    }
    let m = bound_rejected("INSERT INTO vault (id, org_id, value) VALUES (1, 'a', 'x') ON CONFLICT (org_id) DO UPDATE SET value = EXCLUDED.value");
    assert!(m.contains("conflict target"), "{m}");
    for sql in [
        "INSERT INTO vault (id, org_id, value) VALUES (1, 'a', 'x') RETURNING value",
        "UPDATE vault SET value = 'y' WHERE id = 1 AND org_id = 'a' RETURNING org_id, value",
        "DELETE FROM vault WHERE id = 1 RETURNING value",
    ] {
        let m = bound_rejected(sql);
        assert!(m.contains("RETURNING them"), "{sql}: {m}");
    }
    bound_ok("INSERT INTO vault (id, org_id, value) VALUES (1, 'a', 'x') RETURNING id, value");
    bound_ok("DELETE FROM vault v WHERE id = 1 RETURNING v.id AS k, value");
    bound_ok("DELETE FROM vault WHERE id = 1 RETURNING *");
    // Two rows: a literal in DO UPDATE cannot be sealed for both keys.
    let m = bound_rejected("INSERT INTO vault (id, org_id, value) VALUES (1, 'a', 'x'), (2, 'a', 'y') ON CONFLICT (id) DO UPDATE SET value = 'z'");
    assert!(m.contains("bound to their row"), "{m}");
}

#[test]
fn sql_level_prepare_of_session_sealed_values_is_refused() {
    let p = Protected::new([ProtectedTable {
        schema: "public".into(),
        name: "notes".into(),
        tenant_column: None,
        row_key: None,
        encrypted: vec!["body".into()],
        searchable: Vec::new(),
    }]);
    let a = analyze("PREPARE p AS INSERT INTO notes (body) VALUES ('x')", &p);
    let r = a.rejection.expect("refused");
    assert!(r.message().contains("SQL-level PREPARE"), "{}", r.message());
    // The row's own tenant column seals it: fine.
    ok("PREPARE p AS INSERT INTO secrets (org_id, value) VALUES ('acme', 'x')");
}

/// The text `sql` becomes with its pins, the session tenant written as `'T'`.
fn pinned(sql: &str) -> String {
    let a = ok(sql);
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for p in &a.pins {
        let value = match &p.value {
            PinValue::SessionTenant => "'T'".to_owned(),
            PinValue::Excluded(e) => e.clone(),
        };
        match &p.place {
            PinPlace::Wrap(r) => {
                edits.push((r.start..r.start, "(".into()));
                edits.push((r.end..r.end, format!(") AND {} = {value}", p.column)));
            }
            PinPlace::Add(at) => edits.push((*at..*at, format!(" WHERE {} = {value}", p.column))),
        }
    }
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    rewrite_literals(sql, &edits).unwrap()
}

#[test]
fn update_by_primary_key_is_pinned_to_the_session_tenant() {
    // Django and SQLAlchemy unit-of-work shapes.
    assert_eq!(
        pinned(r#"UPDATE "secrets" SET "value" = 'vip' WHERE "secrets"."id" = 1"#),
        r#"UPDATE "secrets" SET "value" = 'vip' WHERE ("secrets"."id" = 1) AND "secrets"."org_id" = 'T'"#
    );
    assert_eq!(
        pinned("UPDATE secrets SET value=$1::VARCHAR WHERE secrets.id = $2::BIGINT"),
        "UPDATE secrets SET value=$1::VARCHAR WHERE (secrets.id = $2::BIGINT) AND \"secrets\".\"org_id\" = 'T'"
    );
    // The whole condition is wrapped: `AND` must not bind to the last disjunct only.
    assert_eq!(
        pinned("update secrets s set value = $1 where s.id = 1 or s.id = 2 returning id"),
        "update secrets s set value = $1 where (s.id = 1 or s.id = 2) AND \"s\".\"org_id\" = 'T' returning id"
    );
    // No WHERE clause; a trailing comment stays after the condition.
    assert_eq!(
        pinned("update secrets set value = 'x' -- all rows\n"),
        "update secrets set value = 'x' WHERE \"secrets\".\"org_id\" = 'T' -- all rows\n"
    );
    // Subqueries and CTEs keep their own WHERE clauses.
    assert_eq!(
        pinned("with c as (select 1 where true) update secrets set value = 'x', name = (select 'n' where true) from c where id in (select 1 where false)"),
        "with c as (select 1 where true) update secrets set value = 'x', name = (select 'n' where true) from c where (id in (select 1 where false)) AND \"secrets\".\"org_id\" = 'T'"
    );
    // Several statements: each is pinned in its own text.
    assert_eq!(
        pinned("update secrets set value = 'a' where id = 1; update secrets set note = 'b' where id = 2"),
        "update secrets set value = 'a' where (id = 1) AND \"secrets\".\"org_id\" = 'T'; update secrets set note = 'b' where (id = 2) AND \"secrets\".\"org_id\" = 'T'"
    );
    // WHERE CURRENT OF takes no other condition: refused as before.
    rejected("update secrets set value = 'x' where current of c");
}

#[test]
fn upserts_are_pinned_to_the_inserted_rows_organisation() {
    // SQLAlchemy's on_conflict_do_update and Sequelize's upsert.
    assert_eq!(
        pinned("INSERT INTO secrets (id, org_id, value) VALUES ($1::BIGINT, $2::BIGINT, $3::VARCHAR) ON CONFLICT (id) DO UPDATE SET value = excluded.value"),
        "INSERT INTO secrets (id, org_id, value) VALUES ($1::BIGINT, $2::BIGINT, $3::VARCHAR) ON CONFLICT (id) DO UPDATE SET value = excluded.value WHERE \"secrets\".\"org_id\" = excluded.\"org_id\""
    );
    assert_eq!(
        pinned(
            r#"INSERT INTO "secrets" ("id","value","org_id") VALUES ($1,$2,$3) ON CONFLICT ("id") DO UPDATE SET "id"=EXCLUDED."id","value"=EXCLUDED."value","org_id"=EXCLUDED."org_id" RETURNING "id","value","org_id";"#
        ),
        r#"INSERT INTO "secrets" ("id","value","org_id") VALUES ($1,$2,$3) ON CONFLICT ("id") DO UPDATE SET "id"=EXCLUDED."id","value"=EXCLUDED."value","org_id"=EXCLUDED."org_id" WHERE "secrets"."org_id" = excluded."org_id" RETURNING "id","value","org_id";"#
    );
    // The inserted row names no tenant: the session tenant.
    assert_eq!(
        pinned("insert into secrets as s (id, value) values (1, 'a') on conflict (id) do update set value = excluded.value where s.value is not null"),
        "insert into secrets as s (id, value) values (1, 'a') on conflict (id) do update set value = excluded.value where (s.value is not null) AND \"s\".\"org_id\" = 'T'"
    );
    // Rows of several organisations: each conflict compares with its own inserted row.
    let a = ok("insert into secrets (id, org_id, value) values (1, 'a', 'x'), (2, 'b', 'y') on conflict (id) do update set value = excluded.value");
    assert_eq!(a.pins.len(), 1);
    // ... but a new value in the DO UPDATE could only be sealed for one of them.
    rejected("insert into secrets (id, org_id, value) values (1, 'a', 'x'), (2, 'b', 'y') on conflict (id) do update set value = 'z'");
}

#[test]
fn sqlalchemy_insertmanyvalues_rows_are_values_rows() {
    let sql = "INSERT INTO secrets (org_id, name, value) SELECT p0::BIGINT, p1::VARCHAR, p2::VARCHAR FROM (VALUES ($1::BIGINT, $2::VARCHAR, $3::VARCHAR, 0), ($4::BIGINT, $5::VARCHAR, $6::VARCHAR, 1)) AS imp_sen(p0, p1, p2, sen_counter) ORDER BY sen_counter RETURNING secrets.id, secrets.id AS id__1";
    let a = ok(sql);
    let sites: Vec<(usize, TenantSource)> = a
        .params
        .iter()
        .map(|p| (p.index, p.tenant.clone()))
        .collect();
    assert_eq!(
        sites,
        [(3, TenantSource::Param(1)), (6, TenantSource::Param(4))],
        "each row's value, with its own row's tenant"
    );
    let sql = "INSERT INTO secrets (org_id, value) SELECT p0, p1 FROM (VALUES ('a', 'x', 0), ('b', 'y', 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter";
    let a = ok(sql);
    assert_eq!(a.literals.len(), 2);
    assert_eq!(a.literals[1].tenant, TenantSource::Literal("b".into()));
    assert_eq!(text_at(sql, &a.literals[1]), "'y'");
    // Any other source query is still a query: values computed by it are refused.
    rejected("INSERT INTO secrets (org_id, value) SELECT p0, upper(p1) FROM (VALUES ('a', 'x')) AS v(p0, p1)");
    rejected("INSERT INTO secrets (org_id, value) SELECT p0, p1 FROM (VALUES ('a', 'x')) AS v(p0, p1) WHERE p0 = 'a'");
    rejected("INSERT INTO secrets (org_id, value) SELECT p0, p1 FROM (VALUES ('a', 'x')) AS v(p0, p1) ORDER BY p1");
    rejected("INSERT INTO secrets (org_id, value) SELECT p0, p1::varchar(5) FROM (VALUES ('a', 'x')) AS v(p0, p1)");
}

#[test]
fn django_bulk_update_writes_each_then_value_to_its_row() {
    let sql = r#"UPDATE "secrets" SET "note" = (CASE WHEN ("secrets"."id" = $1) THEN $2 WHEN ("secrets"."id" = $3) THEN $4 ELSE NULL END)::text, "value" = (CASE WHEN ("secrets"."id" = $5) THEN $6 WHEN ("secrets"."id" = $7) THEN $8 ELSE NULL END)::text WHERE "secrets"."id" IN ($9, $10)"#;
    let a = ok(sql);
    let params: Vec<usize> = a.params.iter().map(|p| p.index).collect();
    assert_eq!(params, [2, 4, 6, 8]);
    assert!(a.params.iter().all(|p| p.tenant == TenantSource::Session));
    assert_eq!(a.pins.len(), 1, "pinned to the session tenant");
    let sql = r#"UPDATE "secrets" SET "value" = (CASE WHEN ("secrets"."id" = 2) THEN 'a' WHEN ("secrets"."id" = 3) THEN 'b' ELSE NULL END)::text WHERE "secrets"."id" IN (2, 3) AND org_id = 'o'"#;
    let a = ok(sql);
    assert_eq!(a.literals.len(), 2);
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("o".into()));
    assert!(a.pins.is_empty());
    // Only values and NULL: anything else computes the stored value.
    rejected("update secrets set value = (case when id = 1 then upper($1) end) where org_id = 'o'");
    rejected(
        "update secrets set value = (case when id = 1 then $1 else value end) where org_id = 'o'",
    );
}

#[test]
fn django_bulk_create_arrays_are_sealed_element_by_element() {
    let sql = r#"INSERT INTO "secrets" ("org_id", "name", "value", "note") SELECT * FROM UNNEST(('{1001,1001}'::int8[])::bigint[], ('{b0,b1}')::text[], ('{b0@acme.example,b1@acme.example}')::text[], ('{NULL,NULL}')::text[]) RETURNING "secrets"."id""#;
    let a = ok(sql);
    assert_eq!(a.arrays.len(), 2);
    let ArraySource::Literal { text, range, .. } = &a.arrays[0].value else {
        panic!("a literal");
    };
    assert_eq!(text, "{b0@acme.example,b1@acme.example}");
    assert_eq!(&sql[range.clone()], "'{b0@acme.example,b1@acme.example}'");
    assert!(
        matches!(&a.arrays[0].tenant, Some(ArraySource::Literal { text, .. }) if text == "{1001,1001}")
    );
    // Server-side binding: parameters.
    let a = ok(
        r#"INSERT INTO "secrets" ("org_id", "name", "value") SELECT * FROM UNNEST(($1)::bigint[], ($2)::text[], ($3)::text[]) RETURNING "secrets"."id""#,
    );
    assert_eq!(a.arrays[0].value, ArraySource::Param(3));
    assert_eq!(a.arrays[0].tenant, Some(ArraySource::Param(1)));
    // No tenant column: the session tenant.
    let a = ok("insert into secrets (name, value) select * from unnest($1::text[], $2::text[])");
    assert_eq!(a.arrays[0].tenant, None);
    // Bounded element types could not hold the ciphertext; computed arrays are refused.
    rejected(
        "insert into secrets (name, value) select * from unnest($1::text[], $2::varchar(254)[])",
    );
    rejected("insert into secrets (name, value) select * from unnest($1::text[], array[$2])");
    rejected("insert into secrets (org_id, value) select * from unnest(array[$1], $2::text[])");
}

/// Sequelize's findOrCreate: the INSERT in its function is sealed where it stands; the SELECT
/// of the function's result is accepted after it; anything else around it is refused.
#[test]
fn sequelize_find_or_create_function() {
    let create = |body: &str| {
        format!(
            r#"CREATE OR REPLACE FUNCTION pg_temp.testfunc(OUT response "secrets", OUT sequelize_caught_exception text) RETURNS RECORD AS $func_8487$ {body} $func_8487$ LANGUAGE plpgsql"#
        )
    };
    let insert =
        r#"INSERT INTO "secrets" ("id","org_id","value") VALUES (DEFAULT,'acme','z') RETURNING *"#;
    let handler = "INTO response; EXCEPTION WHEN unique_violation THEN GET STACKED DIAGNOSTICS sequelize_caught_exception = PG_EXCEPTION_DETAIL; END";
    let select = r#"SELECT (testfunc.response)."id", (testfunc.response)."org_id", (testfunc.response)."value", testfunc.sequelize_caught_exception FROM pg_temp.testfunc()"#;
    let sql = format!(
        "{}; {select}; DROP FUNCTION IF EXISTS pg_temp.testfunc();",
        create(&format!("BEGIN {insert} {handler}"))
    );
    let a = ok(&sql);
    assert_eq!(a.literals.len(), 1);
    assert_eq!(&sql[a.literals[0].range.clone()], "'z'");
    assert_eq!(a.literals[0].value, "z");
    assert_eq!(a.literals[0].tenant, TenantSource::Literal("acme".into()));
    assert!(a.touches_protected);
    // The SELECT alone, or over another function: refused.
    rejected(select);
    // Other bodies: refused.
    for body in [
        format!("BEGIN {insert} INTO response; END"),
        format!("BEGIN UPDATE secrets SET value = 'x' RETURNING * {handler}"),
        format!("BEGIN {insert} {handler}; PERFORM 1; END"),
        format!(
            r#"BEGIN INSERT INTO "secrets" ("org_id","value") VALUES ('a','b'); INSERT INTO "secrets" ("org_id","value") VALUES ('a','b') RETURNING * {handler}"#
        ),
        format!(
            r#"BEGIN INSERT INTO "secrets" ("org_id","value") VALUES ('a', response) RETURNING * {handler}"#
        ),
        format!(
            r#"BEGIN INSERT INTO "secrets" ("org_id","value") VALUES ('a', $1) RETURNING * {handler}"#
        ),
    ] {
        rejected(&create(&body));
    }
    // Another OUT type than the INSERT's table: refused.
    rejected(
        &create(&format!("BEGIN {insert} {handler}"))
            .replace(r#"OUT response "secrets""#, "OUT response plain"),
    );
}
