//! The authentication exchange: from the server's first answer to the StartupMessage up to
//! AuthenticationOk, relayed between client and server before the message pumps start.
//!
//! The proxy's two legs are separate TLS channels (or none), so SCRAM channel binding
//! (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`) can never hold across it: the client would
//! bind to the proxy's certificate, the server checks against its own. Hence:
//!
//! | client leg | server offers `-PLUS` (its leg is TLS) | what the proxy does |
//! |---|---|---|
//! | plaintext | yes | hides `SCRAM-SHA-256-PLUS`: the client answers with SCRAM-SHA-256 and the `n` flag ("cannot bind"), which the server accepts |
//! | TLS | yes | relays the offer; a client that chooses `-PLUS` gets a FATAL `28000` saying to connect with `channel_binding=disable` |
//! | either | yes | a client that answers with the GS2 flag `y` ("I could bind, you did not offer it": node-postgres with `enableChannelBinding`) gets the same FATAL: the server would refuse the flag as a downgrade, and the flag is covered by the client's proof |
//! | either | no (plaintext upstream) | relays unchanged |
//!
//! Everything else of the exchange (password, MD5, SCRAM messages, GSS/SSPI tokens, errors)
//! is relayed byte for byte in both directions, as it arrives; the exchange ends with the
//! server's AuthenticationOk (or when either side closes). Never logs or keeps passwords,
//! SCRAM messages or tokens: only mechanism names are read.
//!
//! [`AuthRelay`] makes the decisions and is pure; [`relay`] moves the bytes.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proxy::error::ConnError;
use crate::wire::auth::{put_auth_sasl, AuthRequest, SaslInitialResponse, SCRAM_SHA_256_PLUS};
use crate::wire::backend::AUTHENTICATION_TAG;
use crate::wire::frontend::PASSWORD_TAG;
use crate::wire::{Frame, Header, WireError};

/// Which legs of the session are TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Legs {
    /// The client connected over TLS.
    pub(crate) client_tls: bool,
    /// The proxy's connection to the server is TLS.
    pub(crate) upstream_tls: bool,
}

/// The decisions of the authentication exchange, one message at a time.
#[derive(Debug)]
pub(crate) struct AuthRelay {
    legs: Legs,
    /// The last request was AuthenticationSASL: the client's next `p` is its
    /// SASLInitialResponse.
    sasl_offered: bool,
}

/// What to do after a server message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ServerStep {
    /// Keep relaying.
    Continue,
    /// AuthenticationOk was relayed: the session starts.
    Authenticated,
}

impl AuthRelay {
    pub(crate) fn new(legs: Legs) -> Self {
        Self {
            legs,
            sasl_offered: false,
        }
    }

    /// A whole server message: append what the client gets to `out`.
    pub(crate) fn on_server(
        &mut self,
        frame: &Frame,
        out: &mut BytesMut,
    ) -> Result<ServerStep, ConnError> {
        if frame.tag() != AUTHENTICATION_TAG {
            // ErrorResponse (the server closes after it), NegotiateProtocolVersion, notices.
            out.extend_from_slice(frame.raw());
            return Ok(ServerStep::Continue);
        }
        let request = AuthRequest::parse(frame.body()).map_err(ConnError::ServerProtocol)?;
        self.sasl_offered = false;
        match request {
            AuthRequest::Ok => {
                out.extend_from_slice(frame.raw());
                return Ok(ServerStep::Authenticated);
            }
            AuthRequest::Sasl(mechanisms) => {
                self.sasl_offered = true;
                let binds = mechanisms.contains(&SCRAM_SHA_256_PLUS);
                if binds && !self.legs.client_tls {
                    // The client has no channel to bind to; offering it -PLUS would make
                    // libpq refuse the connection as a downgrade.
                    let kept: Vec<&[u8]> = mechanisms
                        .into_iter()
                        .filter(|m| *m != SCRAM_SHA_256_PLUS)
                        .collect();
                    if kept.is_empty() {
                        return Err(ConnError::ChannelBindingUnavailable);
                    }
                    put_auth_sasl(out, &kept).map_err(ConnError::ServerProtocol)?;
                    return Ok(ServerStep::Continue);
                }
            }
            AuthRequest::Other(_) => {}
        }
        out.extend_from_slice(frame.raw());
        Ok(ServerStep::Continue)
    }

    /// A whole client message: append what the server gets to `out`.
    pub(crate) fn on_client(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), ConnError> {
        if frame.tag() == PASSWORD_TAG && std::mem::take(&mut self.sasl_offered) {
            let initial =
                SaslInitialResponse::decode(frame.body()).map_err(ConnError::ClientProtocol)?;
            if initial.mechanism == SCRAM_SHA_256_PLUS {
                // Bound to the proxy's certificate, the server's check can only fail.
                return Err(ConnError::ChannelBindingUnavailable);
            }
            // GS2 flag `y`: "I can bind, but you did not offer it". A server on TLS refuses
            // that as a downgrade (node-postgres with enableChannelBinding sends it even
            // without TLS), and the flag is covered by the client's proof, so it cannot be
            // changed on the way.
            if self.legs.upstream_tls && initial.data.is_some_and(|d| d.starts_with(b"y")) {
                return Err(ConnError::ChannelBindingUnavailable);
            }
        }
        out.extend_from_slice(frame.raw());
        Ok(())
    }
}

/// Relay the authentication exchange until AuthenticationOk has gone to the client.
///
/// `client_buf` and `server_buf` hold bytes already read from each side; what is left of them
/// after AuthenticationOk (the server's ParameterStatus, BackendKeyData, ReadyForQuery, or a
/// client's pipelined first query) is returned for the pumps. `Ok(None)`: a side closed
/// during the exchange (after a failed login: the server's error has been relayed).
pub(crate) async fn relay<C, U>(
    client: &mut C,
    server: &mut U,
    mut client_buf: BytesMut,
    mut server_buf: BytesMut,
    legs: Legs,
    limit: usize,
) -> Result<Option<(BytesMut, BytesMut)>, ConnError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay = AuthRelay::new(legs);
    let mut to_client = BytesMut::new();
    let mut to_server = BytesMut::new();
    loop {
        let mut authenticated = false;
        while let Some(frame) =
            next_frame(&mut server_buf, limit).map_err(ConnError::ServerProtocol)?
        {
            if relay.on_server(&frame, &mut to_client)? == ServerStep::Authenticated {
                authenticated = true;
                break;
            }
        }
        if !to_client.is_empty() {
            client
                .write_all(&to_client)
                .await
                .map_err(ConnError::ClientIo)?;
            client.flush().await.map_err(ConnError::ClientIo)?;
            to_client.clear();
        }
        if authenticated {
            return Ok(Some((client_buf, server_buf)));
        }
        while let Some(frame) =
            next_frame(&mut client_buf, limit).map_err(ConnError::ClientProtocol)?
        {
            relay.on_client(&frame, &mut to_server)?;
        }
        if !to_server.is_empty() {
            server
                .write_all(&to_server)
                .await
                .map_err(ConnError::ServerIo)?;
            server.flush().await.map_err(ConnError::ServerIo)?;
            to_server.clear();
        }
        // Both directions at once: a GSS continuation may or may not be answered.
        tokio::select! {
            n = client.read_buf(&mut client_buf) => {
                if n.map_err(ConnError::ClientIo)? == 0 {
                    return Ok(None);
                }
            }
            n = server.read_buf(&mut server_buf) => {
                if n.map_err(ConnError::ServerIo)? == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

/// Split one whole message off the front of `buf`, if it holds one.
fn next_frame(buf: &mut BytesMut, limit: usize) -> Result<Option<Frame>, WireError> {
    let Some(header) = Header::scan(buf, limit)? else {
        return Ok(None);
    };
    let len = header.frame_len();
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(len).freeze();
    let frame = Frame::from_raw(raw).ok_or(WireError::Malformed {
        tag: header.tag(),
        what: "frame",
    })?;
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::auth::SCRAM_SHA_256;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut raw = vec![tag];
        raw.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        raw.extend_from_slice(body);
        Frame::from_raw(raw.into()).unwrap()
    }

    fn sasl_offer(mechanisms: &[&[u8]]) -> Frame {
        let mut out = BytesMut::new();
        put_auth_sasl(&mut out, mechanisms).unwrap();
        Frame::from_raw(out.freeze()).unwrap()
    }

    fn initial(mechanism: &[u8]) -> Frame {
        let mut body = mechanism.to_vec();
        body.extend_from_slice(b"\0\0\0\0\x03n,,");
        frame(b'p', &body)
    }

    const PLAIN_CLIENT: Legs = Legs {
        client_tls: false,
        upstream_tls: true,
    };
    const TLS_CLIENT: Legs = Legs {
        client_tls: true,
        upstream_tls: true,
    };

    #[test]
    fn a_plaintext_client_is_not_offered_channel_binding() {
        let mut relay = AuthRelay::new(PLAIN_CLIENT);
        let mut out = BytesMut::new();
        let step = relay
            .on_server(&sasl_offer(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]), &mut out)
            .unwrap();
        assert_eq!(step, ServerStep::Continue);
        assert_eq!(&out[..], &sasl_offer(&[SCRAM_SHA_256]).raw()[..]);

        // A client that says it could bind would be refused by the server as downgraded.
        let yes = b"SCRAM-SHA-256\0\0\0\0\x03y,,".to_vec();
        let err = relay
            .on_client(&frame(b'p', &yes), &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, ConnError::ChannelBindingUnavailable));
        // ... but not by a server without TLS.
        let mut plain = AuthRelay::new(Legs {
            client_tls: false,
            upstream_tls: false,
        });
        plain
            .on_server(&sasl_offer(&[SCRAM_SHA_256]), &mut BytesMut::new())
            .unwrap();
        let mut out = BytesMut::new();
        plain.on_client(&frame(b'p', &yes), &mut out).unwrap();
        assert!(!out.is_empty());

        // Only -PLUS on offer: nothing the client could use.
        let err = relay
            .on_server(&sasl_offer(&[SCRAM_SHA_256_PLUS]), &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, ConnError::ChannelBindingUnavailable));
    }

    #[test]
    fn a_tls_client_sees_the_offer_but_may_not_bind() {
        let mut relay = AuthRelay::new(TLS_CLIENT);
        let offer = sasl_offer(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
        let mut out = BytesMut::new();
        relay.on_server(&offer, &mut out).unwrap();
        assert_eq!(&out[..], &offer.raw()[..]);
        let err = relay
            .on_client(&initial(SCRAM_SHA_256_PLUS), &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, ConnError::ChannelBindingUnavailable));
        let (_, message) = err.client_response().unwrap();
        assert!(message.contains("channel_binding=disable"), "{message}");

        // channel_binding=disable: plain SCRAM is relayed as is.
        let mut relay = AuthRelay::new(TLS_CLIENT);
        relay.on_server(&offer, &mut BytesMut::new()).unwrap();
        let mut out = BytesMut::new();
        relay.on_client(&initial(SCRAM_SHA_256), &mut out).unwrap();
        assert_eq!(&out[..], &initial(SCRAM_SHA_256).raw()[..]);
    }

    #[test]
    fn other_messages_pass_untouched_and_ok_ends_the_exchange() {
        let mut relay = AuthRelay::new(PLAIN_CLIENT);
        let md5 = frame(b'R', &[0, 0, 0, 5, 9, 9, 9, 9]);
        let mut out = BytesMut::new();
        assert_eq!(
            relay.on_server(&md5, &mut out).unwrap(),
            ServerStep::Continue
        );
        // A password message is never decoded (it is not a SASL answer).
        let password = frame(b'p', b"md5abc\0");
        relay.on_client(&password, &mut out).unwrap();
        let error = frame(b'E', b"SFATAL\0C28P01\0Mpassword authentication failed\0\0");
        relay.on_server(&error, &mut out).unwrap();
        let ok = frame(b'R', &[0, 0, 0, 0]);
        assert_eq!(
            relay.on_server(&ok, &mut out).unwrap(),
            ServerStep::Authenticated
        );
        let expected: Vec<u8> = [md5.raw(), password.raw(), error.raw(), ok.raw()]
            .iter()
            .flat_map(|b| b.to_vec())
            .collect();
        assert_eq!(&out[..], &expected[..]);
        // Malformed requests are the server's protocol violation.
        assert!(matches!(
            relay.on_server(&frame(b'R', &[0, 0]), &mut out),
            Err(ConnError::ServerProtocol(_))
        ));
    }

    #[test]
    fn frames_are_split_only_when_whole() {
        let mut buf = BytesMut::from(&b"R\0\0\0\x08\0\0\0\0Z\0\0"[..]);
        let f = next_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag(), b'R');
        assert!(next_frame(&mut buf, 1024).unwrap().is_none());
        assert_eq!(buf.len(), 3);
    }
}
