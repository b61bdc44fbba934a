//! Tag + length scanning for the pass-through path, with size limits checked before any
//! allocation.

use std::fmt;

use bytes::Bytes;

use super::WireError;

/// Bytes in a regular message header: 1 tag byte and a 4-byte big-endian length.
pub const HEADER_LEN: usize = 5;

/// The largest message PostgreSQL itself accepts (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB − 1).
pub const POSTGRES_MAX_MESSAGE: usize = (1 << 30) - 1;

/// The largest startup-phase packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// A scanned message header.
///
/// Invariant: `len >= 4` and `len - 4 <= limit` of the scan that produced it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header {
    tag: u8,
    len: u32,
}

impl Header {
    /// Scan the header at the start of `buf`.
    ///
    /// `Ok(None)` when fewer than [`HEADER_LEN`] bytes are present. `limit` bounds the body
    /// length, so a peer claiming a huge message is refused before anything is reserved.
    pub fn scan(buf: &[u8], limit: usize) -> Result<Option<Header>, WireError> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let tag = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        if len < 4 {
            return Err(WireError::BadLength { tag, len });
        }
        let body = (len - 4) as usize;
        if body > limit {
            return Err(WireError::TooLarge {
                tag,
                len: u64::from(len),
                limit: limit as u64,
            });
        }
        Ok(Some(Header { tag, len }))
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// Body length in bytes.
    pub fn body_len(&self) -> usize {
        (self.len - 4) as usize
    }

    /// Whole frame length: tag, length field and body.
    pub fn frame_len(&self) -> usize {
        self.len as usize + 1
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Header({:?}, {})", char::from(self.tag), self.len)
    }
}

/// One complete message kept as shared bytes: tag, length and body.
///
/// Invariant: `raw.len() >= HEADER_LEN` and the length field matches `raw.len() - 1`.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Wrap a complete frame. Returns `None` unless `raw` is exactly one well-formed frame.
    pub fn from_raw(raw: Bytes) -> Option<Frame> {
        let header = Header::scan(&raw, usize::MAX).ok()??;
        (header.frame_len() == raw.len()).then_some(Frame { raw })
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The body (after tag and length).
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    /// The whole frame, as it travels on the wire.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Consume into the raw frame bytes.
    pub fn into_raw(self) -> Bytes {
        self.raw
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({:?}, {})", char::from(self.tag()), self.raw.len())
    }
}

/// Scan a startup-phase packet (no tag byte; 4-byte length including itself).
///
/// Returns the total packet length when the whole packet is in `buf`, `Ok(None)` when more
/// bytes are needed.
pub fn scan_startup(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if len < 8 {
        return Err(WireError::BadLength { tag: 0, len });
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(WireError::TooLarge {
            tag: 0,
            len: len as u64,
            limit: MAX_STARTUP_PACKET as u64,
        });
    }
    Ok((buf.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_header() {
        let h = Header::scan(b"Q\0\0\0\x09abcd\0", 100).unwrap().unwrap();
        assert_eq!(h.tag(), b'Q');
        assert_eq!(h.body_len(), 5);
        assert_eq!(h.frame_len(), 10);
        assert_eq!(Header::scan(b"Q\0\0", 100).unwrap(), None);
    }

    #[test]
    fn refuses_bad_and_oversize_lengths() {
        assert!(matches!(
            Header::scan(b"Q\0\0\0\x03", 100),
            Err(WireError::BadLength { .. })
        ));
        assert!(matches!(
            Header::scan(b"Q\xff\xff\xff\xff", 100),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn startup_lengths() {
        assert_eq!(
            scan_startup(b"\0\0\0\x08\x04\xd2\x16\x2f").unwrap(),
            Some(8)
        );
        assert_eq!(scan_startup(b"\0\0\0\x08\x04").unwrap(), None);
        assert!(scan_startup(b"\0\0\0\x04").is_err());
        assert!(scan_startup(b"\x7f\0\0\0").is_err());
    }
}
