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
use super::{DrawEdit, PinLookup, PinPlace};

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
pub(super) struct Tok<'t> {
    pub(super) token: &'t Token,
    pub(super) depth: usize,
    pub(super) range: Range<usize>,
}

impl Tok<'_> {
    /// Whether this is the unquoted keyword `kw` at depth 0.
    pub(super) fn is(&self, kw: &str) -> bool {
        self.is_at(kw, 0)
    }

    /// Whether this is the unquoted keyword `kw` at depth `depth`.
    fn is_at(&self, kw: &str, depth: usize) -> bool {
        self.depth == depth
            && matches!(self.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(kw))
    }

    /// Whether this is an opening (`open`) or closing parenthesis at depth `depth`.
    fn paren(&self, open: bool, depth: usize) -> bool {
        self.depth == depth && *self.token == if open { Token::LParen } else { Token::RParen }
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

/// The INSERT forms whose row keys the proxy can draw (see [`KeyDraw`](super::KeyDraw)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DrawShape {
    /// `INSERT INTO t (c…) VALUES (…), …`
    Values,
    /// `INSERT INTO t (c…) SELECT p0, … FROM (VALUES (…), …) AS a(p0, …) …`
    SelectOverValues,
    /// `INSERT INTO t (c…) SELECT * FROM UNNEST(a0, …)`
    Unnest,
}

impl Analyzer<'_> {
    /// Where drawn row keys go in the current top-level statement, an INSERT of `shape`:
    /// the edits in text order. `None` when the text is not of that form.
    pub(crate) fn draw_edits(&self, shape: DrawShape) -> Option<Vec<(Range<usize>, DrawEdit)>> {
        let piece = self.pieces.get(self.piece)?.clone();
        let text = self.parsed.get(piece.clone())?;
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
            .tokenize_with_location()
            .ok()?;
        let toks = significant(&tokens, &Positions::new(text), piece.start)?;
        let into = toks.iter().position(|t| t.is("into"))?;
        let open = into + toks[into..].iter().position(|t| t.paren(true, 0))?;
        let close = closing(&toks, open)?;
        let at_ = |i: usize| i..i;
        let mut edits = vec![
            (at_(toks[close].range.start), DrawEdit::Column),
            (at_(toks[close].range.end), DrawEdit::Overriding),
        ];
        let at = close + 1;
        match shape {
            DrawShape::Values => {
                if !toks.get(at)?.is("values") {
                    return None;
                }
                let rows = rows_at(&toks, at + 1, 0)?;
                edits.extend(
                    rows.iter()
                        .enumerate()
                        .map(|(i, &(_, end))| (at_(toks[end].range.start), DrawEdit::Key(i))),
                );
            }
            DrawShape::SelectOverValues => {
                if !toks.get(at)?.is("select") {
                    return None;
                }
                let from = at + toks[at..].iter().position(|t| t.is("from"))?;
                edits.push((at_(toks.get(from - 1)?.range.end), DrawEdit::Name));
                let sub = from + 1;
                if !toks.get(sub)?.paren(true, 0) || !toks.get(sub + 1)?.is_at("values", 1) {
                    return None;
                }
                let rows = rows_at(&toks, sub + 2, 1)?;
                edits.extend(
                    rows.iter()
                        .enumerate()
                        .map(|(i, &(_, end))| (at_(toks[end].range.start), DrawEdit::Key(i))),
                );
                let sub_close = closing(&toks, sub)?;
                // `AS a(p0, …)`: the alias's column list.
                let mut a = sub_close + 1;
                if toks.get(a)?.is("as") {
                    a += 1;
                }
                if !matches!(toks.get(a)?.token, Token::Word(_)) || !toks.get(a + 1)?.paren(true, 0)
                {
                    return None;
                }
                let names_close = closing(&toks, a + 1)?;
                edits.push((at_(toks[names_close].range.start), DrawEdit::Name));
            }
            DrawShape::Unnest => {
                let [select, star, from, unnest, paren] = [at, at + 1, at + 2, at + 3, at + 4];
                if !toks.get(select)?.is("select")
                    || toks.get(star)?.token != &Token::Mul
                    || !toks.get(from)?.is("from")
                    || !toks.get(unnest)?.is("unnest")
                    || !toks.get(paren)?.paren(true, 0)
                {
                    return None;
                }
                let end = closing(&toks, paren)?;
                edits.push((at_(toks[end].range.start), DrawEdit::Keys));
            }
        }
        edits.sort_by_key(|(r, _)| (r.start, r.end));
        Some(edits)
    }
}

/// The parenthesised rows of a VALUES list starting at `at`, at depth `depth`: the index of
/// each row's opening and closing parenthesis.
fn rows_at(toks: &[Tok<'_>], mut at: usize, depth: usize) -> Option<Vec<(usize, usize)>> {
    let mut rows = Vec::new();
    loop {
        if !toks.get(at)?.paren(true, depth) {
            return None;
        }
        let end = closing(toks, at)?;
        rows.push((at, end));
        match toks.get(end + 1) {
            Some(t) if t.depth == depth && t.token == &Token::Comma => at = end + 2,
            _ => return Some(rows),
        }
    }
}

/// The index of the parenthesis closing the one at `open`.
fn closing(toks: &[Tok<'_>], open: usize) -> Option<usize> {
    let depth = toks.get(open)?.depth;
    toks[open + 1..]
        .iter()
        .position(|t| t.paren(false, depth))
        .map(|i| open + 1 + i)
}

/// The non-white-space tokens of a statement with their depth and byte range (offsets in the
/// whole text: `base` is where the statement starts).
pub(super) fn significant<'t>(
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
