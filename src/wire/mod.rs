//! PostgreSQL v3 wire codec for both directions. Pure: no I/O, no tokio, no clocks.
//!
//! The proxy's hot path only scans message headers ([`header`]) and forwards untouched
//! messages as raw bytes. Bodies are decoded only for the few messages the proxy must look at
//! or rewrite, each from its own isolated, length-checked frame, through accessors that borrow
//! from the frame ([`backend`], [`frontend`], [`startup`]).
//!
//! Invariants:
//! - no function in this module panics on any input; malformed input gives [`WireError`];
//! - lengths are checked against the configured limit before any buffer is reserved;
//! - `Debug` of message views prints tags and lengths only, never contents.
//!
//! Unknown tags: forwarded unchanged in both directions. The server is the authority on what a
//! client may send (it answers an unknown frontend tag with 08P01 itself), and a backend tag
//! we do not know is relayed so that newer servers keep working through the proxy.

pub mod array;
pub mod auth;
pub mod backend;
pub mod copy;
pub mod encoding;
pub mod frontend;
pub mod header;
pub mod sqlstate;
pub mod startup;

pub use header::{Frame, Header, HEADER_LEN};

/// A malformed or oversize message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length field is smaller than the length field itself.
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength {
        /// Message tag byte (0 for startup-phase packets).
        tag: u8,
        /// Declared length.
        len: u32,
    },
    /// The message is larger than the configured limit.
    #[error("message of type {tag:?} is {len} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Message tag byte (0 for startup-phase packets).
        tag: u8,
        /// Declared length.
        len: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A message body ended before a field it declares.
    #[error("message of type {tag:?} is truncated")]
    Truncated {
        /// Message tag byte (0 for startup-phase packets).
        tag: u8,
    },
    /// A message body has bytes after its last field, or a field has an invalid value.
    #[error("message of type {tag:?} is malformed: {what}")]
    Malformed {
        /// Message tag byte (0 for startup-phase packets).
        tag: u8,
        /// Which field is wrong (a fixed description, never message contents).
        what: &'static str,
    },
}

/// A small cursor over a message body. Every read is bounds-checked.
#[derive(Clone, Copy)]
pub(crate) struct Cursor<'a> {
    tag: u8,
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(tag: u8, buf: &'a [u8]) -> Self {
        Self { tag, buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    fn truncated(&self) -> WireError {
        WireError::Truncated { tag: self.tag }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.truncated())?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, WireError> {
        let bytes = self.bytes(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, WireError> {
        let bytes = self.bytes(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let bytes = self.bytes(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, returned without its terminator, as raw bytes.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], WireError> {
        let end = memchr::memchr(0, self.buf).ok_or_else(|| self.truncated())?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub(crate) fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                tag: self.tag,
                what: "trailing bytes",
            })
        }
    }
}

/// Append a NUL-terminated string.
pub(crate) fn put_cstr(out: &mut bytes::BytesMut, s: &[u8]) {
    out.extend_from_slice(s);
    out.extend_from_slice(&[0]);
}

/// Append `tag`, a length placeholder and the body written by `f`, then back-patch the length.
pub(crate) fn put_message(
    out: &mut bytes::BytesMut,
    tag: u8,
    f: impl FnOnce(&mut bytes::BytesMut),
) -> Result<(), WireError> {
    out.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = out.len() - 4;
    f(out);
    let len = out.len() - start;
    let len32 = u32::try_from(len).map_err(|_| WireError::TooLarge {
        tag,
        len: len as u64,
        limit: u64::from(u32::MAX),
    })?;
    out[start..start + 4].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::backend::*;
    use super::header::*;
    use super::startup::*;

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Header::scan(&data, 1 << 20);
            let _ = scan_startup(&data);
            let _ = StartupPacket::parse(&data);
            let _ = parse_ready_for_query(&data);
            let _ = parse_parameter_status(&data);
            let _ = parse_backend_key_data(&data);
            let _ = parse_authentication_code(&data);
            let _ = ErrorFields::new(&data).count();
            let _ = Frame::from_raw(bytes::Bytes::from(data.clone()));
        }

        #[test]
        fn startup_packets_with_length_prefix_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
            p.extend_from_slice(&body);
            let _ = StartupPacket::parse(&p);
        }

        #[test]
        fn non_utf8_parameter_values_are_kept_exactly(name in "[a-z_]{1,20}", value in proptest::collection::vec(1u8..=255, 0..64)) {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            body.extend_from_slice(&value);
            body.push(0);
            let (n, v) = parse_parameter_status(&body).unwrap();
            prop_assert_eq!(n, name.as_bytes());
            prop_assert_eq!(v, &value[..]);
        }
    }
}
