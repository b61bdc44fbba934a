//! Sequelize's `findOrCreate`: an INSERT wrapped in a temporary PL/pgSQL function, so that a
//! unique violation is caught inside it, then read back through the function's OUT parameter.
//! Sequelize 6 sends this fixed text (one simple query):
//!
//! ```text
//! CREATE OR REPLACE FUNCTION pg_temp.testfunc(OUT response "t", OUT sequelize_caught_exception text)
//!   RETURNS RECORD AS $func_<hex>$ BEGIN INSERT INTO "t" (…) VALUES (…) RETURNING * INTO response;
//!   EXCEPTION WHEN unique_violation THEN GET STACKED DIAGNOSTICS sequelize_caught_exception =
//!   PG_EXCEPTION_DETAIL; END $func_<hex>$ LANGUAGE plpgsql;
//! SELECT (testfunc.response)."id", …, testfunc.sequelize_caught_exception FROM pg_temp.testfunc();
//! DROP FUNCTION IF EXISTS pg_temp.testfunc();
//! ```
//!
//! The function is accepted only in exactly this form: its body is one INSERT (analysed as any
//! other, its literals sealed where they stand in the body) and the exception handler that
//! catches a unique violation. The SELECT that calls it in the same text is accepted when it
//! only picks the OUT parameters' fields; its values are opened by the ciphertext's own header
//! (the result's columns come from no table). On a table that binds values to their row the
//! function is refused: its result carries no row key the proxy could open the values with.
//! Any other function mentioning a protected table is refused as before.

use sqlparser::ast::{
    AccessExpr, Expr, Insert, Query, SelectItem, SetExpr, Statement, TableFactor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::analyzer::{fold, name_parts, Analyzer, Res};
use super::pins::{significant, Tok};
use super::text::Positions;
use super::{Construct, RejectionKind, StatementKind};

/// The handler after the INSERT, as Sequelize writes it (words and punctuation, any case and
/// spacing).
const HANDLER: &[&str] = &[
    "into",
    "response",
    ";",
    "exception",
    "when",
    "unique_violation",
    "then",
    "get",
    "stacked",
    "diagnostics",
    "sequelize_caught_exception",
    "=",
    "pg_exception_detail",
    ";",
    "end",
];

impl Analyzer<'_> {
    /// The current top-level statement, when it is Sequelize's `findOrCreate` function:
    /// `None` when it is not (the caller refuses it as any function), else the analysis of
    /// the INSERT it wraps.
    pub(crate) fn sequelize_function(&mut self) -> Option<Res<StatementKind>> {
        let piece = self.pieces.get(self.piece)?.clone();
        let text = self.parsed.get(piece.clone())?;
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
            .tokenize_with_location()
            .ok()?;
        let toks = significant(&tokens, &Positions::new(text), piece.start)?;
        // CREATE [OR REPLACE] FUNCTION pg_temp.<name>(OUT response <table>, OUT
        // sequelize_caught_exception text) RETURNS RECORD AS $tag$…$tag$ LANGUAGE plpgsql
        let mut at = 0;
        let expect = |words: &[&str], at: &mut usize| -> Option<()> {
            for w in words {
                if !is_word_or_punct(toks.get(*at)?, w) {
                    return None;
                }
                *at += 1;
            }
            Some(())
        };
        expect(&["create"], &mut at)?;
        if toks.get(at)?.is("or") {
            expect(&["or", "replace"], &mut at)?;
        }
        expect(&["function", "pg_temp", "."], &mut at)?;
        let name = match toks.get(at)?.token {
            Token::Word(w) => fold_word(w),
            _ => return None,
        };
        at += 1;
        expect(&["(", "out", "response"], &mut at)?;
        let type_start = at;
        while !is_word_or_punct(toks.get(at)?, ",") {
            at += 1;
        }
        let type_parts: Vec<String> = toks[type_start..at]
            .iter()
            .filter_map(|t| match t.token {
                Token::Word(w) => Some(fold_word(w)),
                Token::Period => None,
                _ => Some(String::new()),
            })
            .collect();
        expect(
            &[
                ",",
                "out",
                "sequelize_caught_exception",
                "text",
                ")",
                "returns",
                "record",
                "as",
            ],
            &mut at,
        )?;
        let body_tok = toks.get(at)?;
        let Token::DollarQuotedString(body) = body_tok.token else {
            return None;
        };
        at += 1;
        expect(&["language", "plpgsql"], &mut at)?;
        if at != toks.len() {
            return None;
        }
        // The body: BEGIN <INSERT … RETURNING *> INTO response; EXCEPTION … END
        let tag_len = body.tag.as_ref().map_or(0, String::len) + 2;
        let body_start = body_tok.range.start + tag_len;
        let body_tokens = Tokenizer::new(&PostgreSqlDialect {}, &body.value)
            .tokenize_with_location()
            .ok()?;
        let inner = significant(&body_tokens, &Positions::new(&body.value), body_start)?;
        if inner
            .iter()
            .any(|t| matches!(t.token, Token::Placeholder(_)))
        {
            return None;
        }
        let first = inner.first()?;
        if !first.is("begin") || inner.len() < HANDLER.len() + 4 {
            return None;
        }
        let handler_at = inner.len() - HANDLER.len();
        let handler_ok = inner[handler_at..]
            .iter()
            .zip(HANDLER)
            .all(|(t, w)| is_word_or_punct(t, w));
        let insert = &inner[1..handler_at];
        if !handler_ok
            || !insert.first()?.is("insert")
            || insert.last().is_none_or(|t| t.token != &Token::Mul)
            || !insert[insert.len() - 2].is("returning")
            || insert.iter().any(|t| t.token == &Token::SemiColon)
        {
            return None;
        }
        let range = insert.first()?.range.start..insert.last()?.range.end;
        // Backslashes in the body's literals split the text differently when
        // standard_conforming_strings is off, as anywhere else.
        if inner.iter().any(|t| {
            matches!(t.token, Token::SingleQuotedString(s) | Token::NationalStringLiteral(s) if s.contains('\\'))
        }) {
            self.out.plain_backslash = true;
        }
        Some(self.function_insert(range, &type_parts, name))
    }

    /// The INSERT at `range` of the text, wrapped in function `name` whose OUT parameter
    /// `response` is of table type `type_parts`.
    fn function_insert(
        &mut self,
        range: std::ops::Range<usize>,
        type_parts: &[String],
        name: String,
    ) -> Res<StatementKind> {
        let refused = || RejectionKind::Unanalysable(Construct::Statement);
        // The INSERT alone, at its place: everything else blanked (lines kept), so that its
        // positions are those of the whole text.
        let masked: String = self
            .parsed
            .char_indices()
            .map(|(i, c)| {
                if range.contains(&i) || c == '\n' {
                    c
                } else {
                    ' '
                }
            })
            .collect();
        let statements = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&masked)
            .and_then(|mut p| p.parse_statements())
            .map_err(|_| refused())?;
        let [Statement::Insert(ins)] = statements.as_slice() else {
            return Err(refused());
        };
        let target = match &ins.table {
            sqlparser::ast::TableObject::TableName(n) => {
                self.resolve_table(&name_parts(n).unwrap_or_default())
            }
            _ => Vec::new(),
        };
        let response = self.resolve_table(type_parts);
        if target.len() != 1 || response != target {
            return Err(refused());
        }
        if self
            .protected
            .table(target[0])
            .is_some_and(|t| t.row_key.is_some())
        {
            return Err(RejectionKind::Unanalysable(
                Construct::RowBoundInsertFunction,
            ));
        }
        self.out.touches_protected = true;
        // Pins and key draws look at the INSERT's own text.
        let (pieces, piece) = (std::mem::replace(&mut self.pieces, vec![range]), self.piece);
        self.piece = 0;
        let r = self.function_body_insert(ins);
        self.pieces = pieces;
        self.piece = piece;
        r?;
        self.insert_functions.push(name);
        Ok(StatementKind::Ddl)
    }

    fn function_body_insert(&mut self, ins: &Insert) -> Res<()> {
        self.insert(ins).map(|_| ())
    }

    /// A SELECT that only picks the fields of an INSERT function's OUT parameters, from a
    /// call of it (`FROM pg_temp.f()`), after its definition in the same text.
    pub(crate) fn sequelize_select(&self, q: &Query) -> bool {
        if self.insert_functions.is_empty() || q.with.is_some() || q.order_by.is_some() {
            return false;
        }
        let SetExpr::Select(s) = q.body.as_ref() else {
            return false;
        };
        let [from] = s.from.as_slice() else {
            return false;
        };
        if !from.joins.is_empty() || s.selection.is_some() {
            return false;
        }
        let TableFactor::Table {
            name,
            args: Some(args),
            alias: None,
            ..
        } = &from.relation
        else {
            return false;
        };
        let parts = name_parts(name).unwrap_or_default();
        let [schema, f] = parts.as_slice() else {
            return false;
        };
        if schema != "pg_temp" || !self.insert_functions.contains(f) || !args.args.is_empty() {
            return false;
        }
        s.projection.iter().all(|item| {
            let SelectItem::UnnamedExpr(e) = item else {
                return false;
            };
            match e {
                // (f.response)."column"
                Expr::CompoundFieldAccess { root, access_chain } => {
                    let root_ok = matches!(
                        root.as_ref(),
                        Expr::Nested(inner) if matches!(inner.as_ref(),
                            Expr::CompoundIdentifier(ids)
                                if ids.iter().map(fold).collect::<Vec<_>>() == [f.as_str(), "response"])
                    );
                    root_ok
                        && matches!(
                            access_chain.as_slice(),
                            [AccessExpr::Dot(Expr::Identifier(_))]
                        )
                }
                // f.sequelize_caught_exception
                Expr::CompoundIdentifier(ids) => {
                    ids.iter().map(fold).collect::<Vec<_>>()
                        == [f.as_str(), "sequelize_caught_exception"]
                }
                _ => false,
            }
        })
    }
}

/// Whether `t` is the word (unquoted, any case) or punctuation `w`.
fn is_word_or_punct(t: &Tok<'_>, w: &str) -> bool {
    match t.token {
        Token::Word(word) => word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w),
        other => other.to_string() == w,
    }
}

/// A word as PostgreSQL folds it.
fn fold_word(w: &sqlparser::tokenizer::Word) -> String {
    super::analyzer::fold_word(&w.value, w.quote_style)
}
