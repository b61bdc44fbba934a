//! The session's `client_encoding`, for the text the proxy reads and writes itself (SQL
//! literals, parameter values, COPY fields, decrypted values).
//!
//! Plaintext is always encrypted in its UTF-8 form, so a value reads back the same whatever the
//! reader's client_encoding. Supported: UTF8, SQL_ASCII (bytes must be UTF-8) and LATIN1.
//! Statements that touch encrypted columns under any other encoding are refused (0A000): the
//! proxy never guesses at a conversion.

use std::borrow::Cow;

/// A client_encoding the proxy can convert, or one it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEncoding {
    /// UTF8 (the default).
    Utf8,
    /// SQL_ASCII: bytes are passed as they are; they must be valid UTF-8 to be encrypted.
    SqlAscii,
    /// LATIN1 (ISO-8859-1).
    Latin1,
    /// Any other encoding, by name.
    Unsupported(String),
}

/// Text that cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    /// The encoding is not supported for encrypted columns.
    #[error("client_encoding {0} is not supported for encrypted columns (use UTF8)")]
    Unsupported(String),
    /// The bytes are not valid in the encoding.
    #[error("text is not valid in client_encoding {0}")]
    Invalid(&'static str),
    /// A character has no representation in the client's encoding.
    #[error("a character of a decrypted value has no equivalent in client_encoding {0}")]
    Unrepresentable(&'static str),
}

impl ClientEncoding {
    /// From the name the server reports in ParameterStatus.
    pub fn from_name(name: &str) -> Self {
        match name.to_ascii_uppercase().replace(['-', '_'], "").as_str() {
            "UTF8" | "UNICODE" => Self::Utf8,
            "SQLASCII" => Self::SqlAscii,
            "LATIN1" | "ISO88591" => Self::Latin1,
            _ => Self::Unsupported(name.to_owned()),
        }
    }

    /// The encoding's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Utf8 => "UTF8",
            Self::SqlAscii => "SQL_ASCII",
            Self::Latin1 => "LATIN1",
            Self::Unsupported(name) => name,
        }
    }

    /// Whether text needs no conversion.
    pub fn is_utf8(&self) -> bool {
        matches!(self, Self::Utf8 | Self::SqlAscii)
    }

    /// Client bytes → UTF-8 text.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, str>, EncodingError> {
        match self {
            Self::Utf8 => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|_| EncodingError::Invalid("UTF8")),
            Self::SqlAscii => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|_| EncodingError::Invalid("SQL_ASCII (as UTF-8)")),
            Self::Latin1 => Ok(if bytes.is_ascii() {
                // ASCII is valid UTF-8.
                Cow::Borrowed(std::str::from_utf8(bytes).unwrap_or_default())
            } else {
                Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect())
            }),
            Self::Unsupported(name) => Err(EncodingError::Unsupported(name.clone())),
        }
    }

    /// UTF-8 text → client bytes.
    pub fn encode<'a>(&self, text: &'a str) -> Result<Cow<'a, [u8]>, EncodingError> {
        match self {
            Self::Utf8 | Self::SqlAscii => Ok(Cow::Borrowed(text.as_bytes())),
            Self::Latin1 => {
                if text.is_ascii() {
                    return Ok(Cow::Borrowed(text.as_bytes()));
                }
                text.chars()
                    .map(|c| {
                        u8::try_from(u32::from(c))
                            .map_err(|_| EncodingError::Unrepresentable("LATIN1"))
                    })
                    .collect::<Result<Vec<u8>, _>>()
                    .map(Cow::Owned)
            }
            Self::Unsupported(name) => Err(EncodingError::Unsupported(name.clone())),
        }
    }
}

/// What a non-ASCII character stands as in [`ClientEncoding::lexing_view`]: a letter, so it
/// lexes as PostgreSQL lexes any non-ASCII character (part of an identifier or of a string).
pub const LEXING_PLACEHOLDER: char = '\u{4e00}';

impl ClientEncoding {
    /// For an encoding the proxy cannot convert: the text with every character of PostgreSQL's
    /// multibyte rules for that encoding (`pg_encoding_mblen`) replaced by
    /// [`LEXING_PLACEHOLDER`], ASCII kept. The server converts client text to its own encoding
    /// before lexing, so this lexes as the server lexes it (in GBK, SJIS, BIG5, UHC, GB18030
    /// and JOHAB a trailing byte may be `\\`, which must not be read as one). `bytewise`: the
    /// server's encoding is SQL_ASCII, so it converts nothing and lexes byte by byte. `None`
    /// for an encoding name PostgreSQL does not have, or a truncated character.
    pub fn lexing_view(&self, bytes: &[u8], bytewise: bool) -> Option<String> {
        let name = match self {
            Self::Unsupported(name) => name.to_ascii_uppercase().replace(['-', '_'], ""),
            _ => return self.decode(bytes).ok().map(Cow::into_owned),
        };
        enum Rule {
            /// Every non-ASCII byte is (part of) a character all of whose bytes are non-ASCII.
            HighBytes,
            Sjis,
            TwoByte,
            Gb18030,
            Euc,
        }
        let rule = match name.as_str() {
            _ if bytewise => Rule::HighBytes,
            "SJIS" | "SHIFTJIS2004" => Rule::Sjis,
            "BIG5" | "GBK" | "UHC" => Rule::TwoByte,
            "GB18030" => Rule::Gb18030,
            "JOHAB" => Rule::Euc,
            "EUCJP" | "EUCCN" | "EUCKR" | "EUCTW" | "EUCJIS2004" | "MULEINTERNAL" | "WIN866"
            | "WIN874" | "KOI8R" | "KOI8U" => Rule::HighBytes,
            n if n.starts_with("LATIN") || n.starts_with("ISO8859") || n.starts_with("WIN125") => {
                Rule::HighBytes
            }
            _ => return None,
        };
        let mut out = String::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            if b.is_ascii() {
                out.push(char::from(b));
                i += 1;
                continue;
            }
            let len = match rule {
                Rule::HighBytes => 1,
                Rule::Sjis if (0xa1..=0xdf).contains(&b) => 1,
                Rule::Sjis | Rule::TwoByte => 2,
                Rule::Gb18030 => match bytes.get(i + 1) {
                    Some(0x30..=0x39) => 4,
                    _ => 2,
                },
                Rule::Euc if b == 0x8f => 3,
                Rule::Euc => 2,
            };
            if i + len > bytes.len() {
                return None;
            }
            out.push(LEXING_PLACEHOLDER);
            i += len;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn latin1_round_trip() {
        let e = ClientEncoding::from_name("LATIN1");
        assert_eq!(e.decode(b"caf\xe9").unwrap(), "café");
        assert_eq!(e.encode("café").unwrap().as_ref(), b"caf\xe9");
        assert!(e.encode("日本").is_err());
        assert!(ClientEncoding::from_name("EUC_JP").decode(b"x").is_err());
        assert!(ClientEncoding::from_name("UTF8").decode(b"\xff").is_err());
    }

    #[test]
    fn lexing_view_follows_multibyte_rules() {
        let gbk = ClientEncoding::from_name("GBK");
        assert_eq!(
            gbk.lexing_view(b"E'\x95\\'", false).as_deref(),
            Some("E'\u{4e00}'")
        );
        let sjis = ClientEncoding::from_name("SJIS");
        assert_eq!(
            sjis.lexing_view(b"\xb1\\", false).as_deref(),
            Some("\u{4e00}\\")
        );
        let latin9 = ClientEncoding::from_name("LATIN9");
        assert_eq!(
            latin9.lexing_view(b"\xa4\\", false).as_deref(),
            Some("\u{4e00}\\")
        );
        let gb18030 = ClientEncoding::from_name("GB18030");
        assert_eq!(
            gb18030.lexing_view(b"\x81\x30\x81\x30'", false).as_deref(),
            Some("\u{4e00}'")
        );
        assert_eq!(gbk.lexing_view(b"x\x95", false), None, "truncated");
        assert_eq!(
            ClientEncoding::from_name("KLINGON").lexing_view(b"x", false),
            None
        );
        assert_eq!(
            gbk.lexing_view(b"E'\x95\\'", true).as_deref(),
            Some("E'\u{4e00}\\'"),
            "a SQL_ASCII server reads the trailing byte as a backslash"
        );
    }

    proptest! {
        #[test]
        fn latin1_bytes_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = ClientEncoding::Latin1;
            let text = e.decode(&bytes).unwrap();
            let back = e.encode(&text).unwrap().into_owned();
            prop_assert_eq!(back, bytes);
        }
    }
}
