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
