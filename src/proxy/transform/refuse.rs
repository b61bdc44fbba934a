//! How a refused statement takes its place in the protocol.
//!
//! A statement that cannot be encrypted safely is never forwarded. In its place the server is
//! made to raise our error (`DO … RAISE`), so the client sees an ordinary ErrorResponse with
//! our SQLSTATE at exactly the right point, the transaction is aborted as for any other error,
//! and the rest of an extended-protocol pipeline is skipped up to Sync.

use bytes::BytesMut;

use crate::wire::frontend::{self as fe, Bind, Parse, Target};

use super::session::Pending;
use super::{Ctx, Fail, Stop};

/// Name of the statement the proxy prepares to raise a refusal in extended protocol.
const REJECT_STATEMENT: &[u8] = b"__pgenvelope_reject";

impl Ctx<'_> {
    /// Refuse an extended-protocol message: make the server raise the error in its place and
    /// skip the client's messages up to Sync, as the server does after an error. A need is
    /// handed back to the shell instead (nothing was written).
    pub(super) fn refuse_extended(&mut self, f: Fail, out: &mut BytesMut) -> Result<(), Stop> {
        let e = match self.checked(f) {
            Fail::Need(n) => return Err(Stop::Need(n)),
            Fail::Lookup(req) => return Err(self.start_extended_lookup(req, out)?),
            // The look-up's error answered this message; the server skips to Sync.
            Fail::Answered => {
                self.s.skipping = true;
                return Ok(());
            }
            Fail::Refuse(e) => e,
        };
        self.count_refusal(&e);
        let raise = e.raise_sql();
        crate::wire::put_message(out, fe::CLOSE_TAG, |b| {
            b.extend_from_slice(b"S");
            b.extend_from_slice(REJECT_STATEMENT);
            b.extend_from_slice(&[0]);
        })?;
        Parse {
            name: REJECT_STATEMENT,
            sql: raise.as_bytes(),
            param_types: Vec::new(),
        }
        .encode(out)?;
        Bind {
            portal: b"",
            statement: REJECT_STATEMENT,
            param_formats: Vec::new(),
            params: Vec::new(),
            result_formats: Vec::new(),
        }
        .encode_with(&[], out)?;
        crate::wire::put_message(out, fe::EXECUTE_TAG, |b| {
            b.extend_from_slice(&[0]);
            b.extend_from_slice(&0i32.to_be_bytes());
        })?;
        let queue = &mut self.s.queue;
        queue.push_back(Pending::Close {
            hidden: true,
            target: Target::Statement,
            name: REJECT_STATEMENT.to_vec(),
        });
        queue.push_back(Pending::Parse {
            hidden: true,
            name: REJECT_STATEMENT.to_vec(),
            statement: None,
        });
        // The server's unnamed portal becomes the refusal's.
        queue.push_back(Pending::Bind {
            hidden: true,
            name: Vec::new(),
            portal: None,
        });
        queue.push_back(Pending::Execute {
            portal: None,
            copy_out: None,
            tenant: None,
        });
        self.s.skipping = true;
        Ok(())
    }
}
