//! Where a tenant pin goes: the WHERE clause of an UPDATE or of an upsert's DO UPDATE, found by
//! scanning the statement's tokens at parenthesis depth 0 (so WHERE clauses of subqueries,
//! CTEs and function arguments are never taken for it).
//!
//! A condition is wrapped whole (`(` … `) AND pin`): appending `AND pin` to `a OR b` would bind
//! to `b` only. Comments and white space after the condition stay after the inserted text, so
//! a trailing `-- comment` can never swallow it.

use std::ops::Range;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use super::analyzer::Analyzer;
use super::text::Positions;
use super::{PinLookup, PinPlace};

/// Which clause a pin belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PinScope {
    /// The WHERE clause of an UPDATE.
    Update,
    /// The WHERE clause of `ON CONFLICT … DO UPDATE SET …`.
    DoUpdate,
}

/// Byte ranges of the top-level statements of `sql` (split at `;` outside parentheses), empty
/// ones left out. `None` when the text does not tokenize.
pub(crate) fn statement_pieces(sql: &str) -> Option<Vec<Range<usize>>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let pos = Positions::new(sql);
    let mut pieces = Vec::new();
    let (mut start, mut depth, mut significant) = (0, 0usize, false);
    for t in &tokens {
        match &t.token {
            Token::Whitespace(_) => continue,
            Token::LParen => depth += 1,
            Token::RParen => depth = depth.saturating_sub(1),
            Token::SemiColon if depth == 0 => {
                let end = pos.offset(t.span.start)?;
                if significant {
                    pieces.push(start..end);
                }
                start = end + 1;
                significant = false;
                continue;
            }
            _ => {}
        }
        significant = true;
    }
    if significant {
        pieces.push(start..sql.len());
    }
    Some(pieces)
}

/// A significant token of a statement, at its parenthesis depth, with its byte range.
struct Tok<'t> {
    token: &'t Token,
    depth: usize,
    range: Range<usize>,
}

impl Tok<'_> {
    /// Whether this is the unquoted keyword `kw` at depth 0.
    fn is(&self, kw: &str) -> bool {
        self.depth == 0
            && matches!(self.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(kw))
    }
}

impl Analyzer<'_> {
    /// Where a pin goes in the current top-level statement, or `None` when that cannot be told
    /// for certain (the caller then refuses as without pins).
    pub(crate) fn pin_place(&self, scope: PinScope) -> Option<PinPlace> {
        self.pin_place_and_lookup(scope).map(|(p, _)| p)
    }

    /// [`Analyzer::pin_place`], and for an UPDATE the parts of its text that find its rows.
    pub(crate) fn pin_place_and_lookup(
        &self,
        scope: PinScope,
    ) -> Option<(PinPlace, Option<PinLookup>)> {
        let piece = self.pieces.get(self.piece)?.clone();
        let text = self.parsed.get(piece.clone())?;
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
            .tokenize_with_location()
            .ok()?;
        let toks = significant(&tokens, &Positions::new(text), piece.start)?;
        // Where the clause holding the pin starts.
        let from = match scope {
            PinScope::Update => {
                let at = toks.iter().position(|t| t.is("update"))?;
                at + 1
            }
            PinScope::DoUpdate => {
                let on = toks
                    .windows(2)
                    .position(|w| w[0].is("on") && w[1].is("conflict"))?;
                let d = toks[on..]
                    .windows(2)
                    .position(|w| w[0].is("do") && w[1].is("update"))?;
                on + d + 2
            }
        };
        let rest = &toks[from..];
        let end = rest
            .iter()
            .position(|t| t.is("returning"))
            .unwrap_or(rest.len());
        let clause = &rest[..end];
        let last = clause.last()?;
        let where_at = clause.iter().position(|t| t.is("where"));
        let (place, cond) = match where_at {
            Some(w) => {
                let cond = &clause[w + 1..];
                // `WHERE CURRENT OF cursor` takes no other condition.
                if cond.first().is_some_and(|t| t.is("current")) {
                    return None;
                }
                let range = cond.first()?.range.start..last.range.end;
                (PinPlace::Wrap(range.clone()), Some(range))
            }
            None => (PinPlace::Add(last.range.end), None),
        };
        let lookup = match scope {
            PinScope::DoUpdate => None,
            PinScope::Update => {
                let before_where = &clause[..where_at.unwrap_or(clause.len())];
                let set = before_where.iter().position(|t| t.is("set"))?;
                let target = &before_where[..set];
                let from = before_where[set..]
                    .iter()
                    .position(|t| t.is("from"))
                    .map(|f| &before_where[set + f + 1..]);
                Some(PinLookup {
                    target: target.first()?.range.start..target.last()?.range.end,
                    from: match from {
                        Some(f) => Some(f.first()?.range.start..f.last()?.range.end),
                        None => None,
                    },
                    cond,
                })
            }
        };
        Some((place, lookup))
    }
}

/// The non-white-space tokens of a statement with their depth and byte range (offsets in the
/// whole text: `base` is where the statement starts).
fn significant<'t>(
    tokens: &'t [TokenWithSpan],
    pos: &Positions<'_>,
    base: usize,
) -> Option<Vec<Tok<'t>>> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    for t in tokens {
        if matches!(t.token, Token::Whitespace(_)) {
            continue;
        }
        if t.token == Token::RParen {
            depth = depth.checked_sub(1)?;
        }
        let start = pos.offset(t.span.start)?;
        let end = pos.offset(t.span.end)?;
        out.push(Tok {
            token: &t.token,
            depth,
            range: base + start..base + end,
        });
        if t.token == Token::LParen {
            depth += 1;
        }
    }
    Some(out)
}

/// `name` as a quoted identifier (`"c"`, inner quotes doubled): it reads back as exactly this
/// name whatever its case.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
