//! Startup-phase packets: the first packet(s) a client sends, which carry no tag byte.

use std::fmt;

use super::{Cursor, WireError};

/// Protocol code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Protocol code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Protocol code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Major protocol version 3 (in the upper 16 bits of the version field).
pub const PROTOCOL_MAJOR_3: u32 = 3;

/// A decoded startup-phase packet. Borrows from the packet bytes.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartupPacket<'a> {
    /// SSLRequest: the client asks whether TLS is available.
    SslRequest,
    /// GSSENCRequest: the client asks whether GSSAPI encryption is available.
    GssEncRequest,
    /// CancelRequest: `key` is the process id followed by the secret key, exactly as the
    /// server sent them in BackendKeyData (4 + 4 bytes in protocol 3.0, longer in 3.2).
    CancelRequest {
        /// Process id and secret, as raw bytes.
        key: &'a [u8],
    },
    /// StartupMessage for protocol 3.x.
    Startup(StartupParams<'a>),
}

/// Parameters of a StartupMessage, as raw bytes (the protocol does not promise UTF-8).
#[derive(Clone, PartialEq, Eq)]
pub struct StartupParams<'a> {
    /// The full protocol version field (major << 16 | minor).
    pub version: u32,
    params: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> StartupParams<'a> {
    /// The value of a parameter by exact name.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.params
            .iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| *v)
    }

    /// The value of a parameter as text, if present and valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All parameters in the order the client sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        self.params.iter().copied()
    }

    /// Whether this is a replication connection (`replication=true|on|yes|1|database`).
    pub fn is_replication(&self) -> bool {
        match self.get("replication") {
            None => false,
            Some(v) => !matches!(
                v.to_ascii_lowercase().as_slice(),
                b"false" | b"off" | b"no" | b"0"
            ),
        }
    }
}

impl fmt::Debug for StartupParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StartupParams(v{}.{}, {} params)",
            self.version >> 16,
            self.version & 0xffff,
            self.params.len()
        )
    }
}

impl fmt::Debug for StartupPacket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SslRequest => f.write_str("SslRequest"),
            Self::GssEncRequest => f.write_str("GssEncRequest"),
            Self::CancelRequest { .. } => f.write_str("CancelRequest"),
            Self::Startup(p) => write!(f, "Startup({p:?})"),
        }
    }
}

impl<'a> StartupPacket<'a> {
    /// Decode a whole startup-phase packet, including its 4-byte length prefix (as returned by
    /// [`super::header::scan_startup`]).
    pub fn parse(packet: &'a [u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(0, packet);
        let len = cur.u32()?;
        if len as usize != packet.len() {
            return Err(WireError::BadLength { tag: 0, len });
        }
        let code = cur.u32()?;
        match code {
            SSL_REQUEST_CODE => {
                cur.finish()?;
                Ok(Self::SslRequest)
            }
            GSSENC_REQUEST_CODE => {
                cur.finish()?;
                Ok(Self::GssEncRequest)
            }
            CANCEL_REQUEST_CODE => {
                let key = cur.remaining();
                if key.len() < 8 || key.len() > 260 {
                    return Err(WireError::Malformed {
                        tag: 0,
                        what: "cancel key length",
                    });
                }
                Ok(Self::CancelRequest { key })
            }
            version if version >> 16 == PROTOCOL_MAJOR_3 => {
                let mut params = Vec::new();
                loop {
                    let name = cur.cstr()?;
                    if name.is_empty() {
                        break;
                    }
                    let value = cur.cstr()?;
                    params.push((name, value));
                }
                cur.finish()?;
                Ok(Self::Startup(StartupParams { version, params }))
            }
            _ => Err(WireError::Malformed {
                tag: 0,
                what: "unsupported protocol version",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(body: &[u8]) -> Vec<u8> {
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn parses_startup_params() {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0alice\0database\0db\0replication\0database\0\0");
        let p = packet(&body);
        let StartupPacket::Startup(params) = StartupPacket::parse(&p).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(params.get_str("user"), Some("alice"));
        assert_eq!(params.get("database"), Some(&b"db"[..]));
        assert!(params.is_replication());
    }

    #[test]
    fn parses_requests() {
        let p = packet(&SSL_REQUEST_CODE.to_be_bytes());
        assert_eq!(StartupPacket::parse(&p).unwrap(), StartupPacket::SslRequest);
        let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 7, 1, 2, 3, 4]);
        let p = packet(&body);
        assert_eq!(
            StartupPacket::parse(&p).unwrap(),
            StartupPacket::CancelRequest {
                key: &[0, 0, 0, 7, 1, 2, 3, 4]
            }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(StartupPacket::parse(&packet(&[0, 2, 0, 0])).is_err());
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0alice");
        assert!(StartupPacket::parse(&packet(&body)).is_err());
    }
}
