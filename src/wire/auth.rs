//! Authentication messages of the startup phase: the server's `R` requests and the client's
//! `p` answers to SASL. Pure, like the rest of [`crate::wire`].
//!
//! Only what the proxy must look at is decoded: the request code, the SASL mechanism list
//! (to hide `SCRAM-SHA-256-PLUS` from clients that cannot bind to the server's channel) and
//! the mechanism a client chose. Password, MD5 and SCRAM payloads pass through as bytes and
//! are never decoded, logged or kept here.

use bytes::BytesMut;

use crate::wire::backend::AUTHENTICATION_TAG;
use crate::wire::frontend::PASSWORD_TAG;
use crate::wire::{put_cstr, put_message, Cursor, WireError};

/// AuthenticationOk.
pub const AUTH_OK: i32 = 0;
/// AuthenticationCleartextPassword.
pub const AUTH_CLEARTEXT: i32 = 3;
/// AuthenticationMD5Password.
pub const AUTH_MD5: i32 = 5;
/// AuthenticationSASL: the body lists the mechanisms the server offers.
pub const AUTH_SASL: i32 = 10;
/// AuthenticationSASLContinue.
pub const AUTH_SASL_CONTINUE: i32 = 11;
/// AuthenticationSASLFinal.
pub const AUTH_SASL_FINAL: i32 = 12;

/// SCRAM with SHA-256, no channel binding.
pub const SCRAM_SHA_256: &[u8] = b"SCRAM-SHA-256";
/// SCRAM with SHA-256 bound to the TLS channel (`tls-server-end-point`).
pub const SCRAM_SHA_256_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// An authentication request (`R` message body), as far as the proxy reads it.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthRequest<'a> {
    /// Authentication succeeded.
    Ok,
    /// The server offers these SASL mechanisms, in its order of preference.
    Sasl(Vec<&'a [u8]>),
    /// Any other request (password, MD5, SASL continue/final, GSS, SSPI): its code.
    Other(i32),
}

impl std::fmt::Debug for AuthRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthRequest::Ok => f.write_str("AuthenticationOk"),
            AuthRequest::Sasl(m) => write!(f, "AuthenticationSASL({} mechanisms)", m.len()),
            AuthRequest::Other(code) => write!(f, "Authentication({code})"),
        }
    }
}

impl<'a> AuthRequest<'a> {
    /// Decode an `R` message body.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(AUTHENTICATION_TAG, body);
        let code = cur.i32()?;
        match code {
            AUTH_OK => {
                cur.finish()?;
                Ok(AuthRequest::Ok)
            }
            AUTH_SASL => {
                let mut mechanisms = Vec::new();
                loop {
                    let name = cur.cstr()?;
                    if name.is_empty() {
                        break;
                    }
                    mechanisms.push(name);
                }
                cur.finish()?;
                Ok(AuthRequest::Sasl(mechanisms))
            }
            other => Ok(AuthRequest::Other(other)),
        }
    }

    /// Whether the client answers this request with a `p` message (password, SASL response,
    /// GSS/SSPI token). GSS continuations may or may not be answered, so the relay never
    /// relies on this to wait for the client.
    pub fn expects_answer(&self) -> bool {
        match self {
            AuthRequest::Ok => false,
            AuthRequest::Sasl(_) => true,
            AuthRequest::Other(code) => *code != AUTH_SASL_FINAL,
        }
    }
}

/// Append an AuthenticationSASL message offering `mechanisms`.
pub fn put_auth_sasl(out: &mut BytesMut, mechanisms: &[&[u8]]) -> Result<(), WireError> {
    put_message(out, AUTHENTICATION_TAG, |b| {
        b.extend_from_slice(&AUTH_SASL.to_be_bytes());
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.extend_from_slice(&[0]);
    })
}

/// A SASLInitialResponse (`p` message answering AuthenticationSASL), as far as the proxy reads
/// it: the mechanism chosen. The client's first message is kept opaque.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    /// The mechanism the client chose.
    pub mechanism: &'a [u8],
    /// The client's first SASL message (`None` when sent as length -1).
    pub data: Option<&'a [u8]>,
}

impl std::fmt::Debug for SaslInitialResponse<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SASLInitialResponse({}, {} bytes)",
            String::from_utf8_lossy(self.mechanism),
            self.data.map_or(0, <[u8]>::len)
        )
    }
}

impl<'a> SaslInitialResponse<'a> {
    /// Decode a `p` body sent in answer to AuthenticationSASL.
    pub fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(PASSWORD_TAG, body);
        let mechanism = cur.cstr()?;
        let len = cur.i32()?;
        let data = if len < 0 {
            if len != -1 {
                return Err(WireError::Malformed {
                    tag: PASSWORD_TAG,
                    what: "SASL response length",
                });
            }
            None
        } else {
            let n = usize::try_from(len).map_err(|_| WireError::Malformed {
                tag: PASSWORD_TAG,
                what: "SASL response length",
            })?;
            Some(cur.bytes(n)?)
        };
        cur.finish()?;
        Ok(Self { mechanism, data })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn body(msg: &[u8]) -> &[u8] {
        &msg[5..]
    }

    #[test]
    fn sasl_offer_round_trips() {
        let mut out = BytesMut::new();
        put_auth_sasl(&mut out, &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]).unwrap();
        assert_eq!(
            &out[..],
            b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
        );
        assert_eq!(
            AuthRequest::parse(body(&out)).unwrap(),
            AuthRequest::Sasl(vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256])
        );
    }

    #[test]
    fn requests_are_classified() {
        assert_eq!(AuthRequest::parse(&[0, 0, 0, 0]).unwrap(), AuthRequest::Ok);
        assert!(
            AuthRequest::parse(&[0, 0, 0, 0, 1]).is_err(),
            "trailing bytes"
        );
        let md5 = [0, 0, 0, 5, 1, 2, 3, 4];
        assert_eq!(AuthRequest::parse(&md5).unwrap(), AuthRequest::Other(5));
        assert!(AuthRequest::parse(&md5).unwrap().expects_answer());
        assert!(!AuthRequest::Other(AUTH_SASL_FINAL).expects_answer());
        // A mechanism list without its terminating empty name is truncated.
        assert!(AuthRequest::parse(b"\x00\x00\x00\x0aSCRAM-SHA-256\x00").is_err());
    }

    #[test]
    fn initial_response_names_the_mechanism() {
        let r = SaslInitialResponse::decode(b"SCRAM-SHA-256\x00\x00\x00\x00\x03n,,").unwrap();
        assert_eq!(r.mechanism, SCRAM_SHA_256);
        assert_eq!(r.data, Some(&b"n,,"[..]));
        let none = SaslInitialResponse::decode(b"X\x00\xff\xff\xff\xff").unwrap();
        assert_eq!(none.data, None);
        assert!(SaslInitialResponse::decode(b"X\x00\xff\xff\xff\xfe").is_err());
        assert!(SaslInitialResponse::decode(b"X\x00\x00\x00\x00\x09n,,").is_err());
        // Debug never shows the client's first message.
        assert!(!format!("{r:?}").contains("n,,"));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = AuthRequest::parse(&data);
            let _ = SaslInitialResponse::decode(&data);
        }
    }
}
