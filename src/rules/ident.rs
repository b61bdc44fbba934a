//! SQL identifiers in rule files, normalised to the form PostgreSQL stores in its catalog.
//!
//! Rules follow PostgreSQL's own folding (see "Identifiers and Key Words" in its manual):
//!
//! * An unquoted part is folded to lower case (ASCII letters only, as PostgreSQL does for UTF-8
//!   databases): `Public.Vault_Secrets` names `public.vault_secrets`. It must start with a letter
//!   or `_` and continue with letters, digits, `_` or `$`; non-ASCII characters count as letters.
//! * A part in double quotes keeps its case and may hold any character; `""` inside stands for
//!   one `"`: `'"Billing"."Card Numbers"'` names schema `Billing`, table `Card Numbers`.
//! * Parts are separated by `.`; no spaces around it.
//! * A part longer than 63 bytes is an error: PostgreSQL would silently truncate it, and the rule
//!   would then name a different identifier than the one in the file.

/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`).
pub const MAX_IDENT_LEN: usize = 63;

/// Why a name in a rule file is not a valid (possibly qualified) identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name, or one of its dot-separated parts, is empty.
    #[error("empty identifier")]
    Empty,
    /// A `"` opened a quoted identifier that never closes.
    #[error("unterminated quoted identifier")]
    UnterminatedQuote,
    /// A character that cannot appear at this position of an unquoted identifier.
    #[error("character {ch:?} is not allowed in an unquoted identifier (quote it with \"…\")")]
    InvalidChar {
        /// The offending character.
        ch: char,
    },
    /// A closing quote is followed by something other than `.` or the end.
    #[error("expected `.` or end after a quoted identifier, found {ch:?}")]
    AfterQuote {
        /// The character after the closing quote.
        ch: char,
    },
    /// A part is longer than PostgreSQL keeps.
    #[error("identifier is {len} bytes; PostgreSQL truncates identifiers to {max} bytes")]
    TooLong {
        /// Length of the part in bytes.
        len: usize,
        /// [`MAX_IDENT_LEN`].
        max: usize,
    },
    /// More dot-separated parts than allowed here.
    #[error("expected at most {max} dot-separated part(s), found {found}")]
    TooManyParts {
        /// Parts allowed.
        max: usize,
        /// Parts found.
        found: usize,
    },
}

/// Split `input` into its dot-separated parts, normalised as PostgreSQL stores them.
pub(crate) fn parse_qualified(input: &str) -> Result<Vec<String>, NameError> {
    let mut parts = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(NameError::UnterminatedQuote),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            }
            match chars.peek() {
                None | Some('.') => {}
                Some(&ch) => return Err(NameError::AfterQuote { ch }),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                let ok = if part.is_empty() {
                    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
                } else {
                    c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii()
                };
                if !ok {
                    return Err(NameError::InvalidChar { ch: c });
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(NameError::Empty);
        }
        if part.len() > MAX_IDENT_LEN {
            return Err(NameError::TooLong {
                len: part.len(),
                max: MAX_IDENT_LEN,
            });
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some(_dot) => continue,
        }
    }
}

/// One identifier (no dots outside quotes).
pub(crate) fn parse_single(input: &str) -> Result<String, NameError> {
    let mut parts = parse_qualified(input)?;
    if parts.len() != 1 {
        return Err(NameError::TooManyParts {
            max: 1,
            found: parts.len(),
        });
    }
    Ok(parts.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<String> {
        parse_qualified(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn folding_and_quoting() {
        assert_eq!(ok("public.vault_secrets"), ["public", "vault_secrets"]);
        assert_eq!(ok("Public.Vault_Secrets"), ["public", "vault_secrets"]);
        assert_eq!(
            ok("\"Billing\".\"Card Numbers\""),
            ["Billing", "Card Numbers"]
        );
        assert_eq!(ok("\"a.b\".c"), ["a.b", "c"]);
        assert_eq!(ok("\"say \"\"hi\"\"\""), ["say \"hi\""]);
        assert_eq!(ok("_x$1"), ["_x$1"]);
        assert_eq!(ok("Zoë"), ["zoë"]);
        assert_eq!(parse_single("Email").as_deref(), Ok("email"));
    }

    #[test]
    fn rejects() {
        assert_eq!(parse_qualified(""), Err(NameError::Empty));
        assert_eq!(parse_qualified("a..b"), Err(NameError::Empty));
        assert_eq!(parse_qualified("a."), Err(NameError::Empty));
        assert_eq!(parse_qualified("\"\""), Err(NameError::Empty));
        assert_eq!(parse_qualified("\"abc"), Err(NameError::UnterminatedQuote));
        assert_eq!(
            parse_qualified("\"a\"b"),
            Err(NameError::AfterQuote { ch: 'b' })
        );
        assert_eq!(
            parse_qualified("1abc"),
            Err(NameError::InvalidChar { ch: '1' })
        );
        assert_eq!(
            parse_qualified("a b"),
            Err(NameError::InvalidChar { ch: ' ' })
        );
        assert_eq!(
            parse_qualified(&"x".repeat(64)),
            Err(NameError::TooLong { len: 64, max: 63 })
        );
        assert!(parse_qualified(&"x".repeat(63)).is_ok());
        assert_eq!(
            parse_single("a.b"),
            Err(NameError::TooManyParts { max: 1, found: 2 })
        );
    }
}
