//! `pkcs11:` KEK: an AES-256 key inside an HSM, reached through a PKCS#11 module.
//!
//! The URI follows RFC 7512. Path attributes (separated by `;`): `token` (token label),
//! `object` (key label), `id` (key id, percent-encoded bytes), `slot-id` (decimal) and `type`
//! (must be `secret-key` if given). Query attributes (separated by `&`): `module-path` (default
//! `/usr/lib/softhsm/libsofthsm2.so`), `pin-source` (`env:VAR` or `file:/path`) and
//! `pin-value` (the PIN itself; for tests only, logs a warning). Values are percent-decoded.
//!
//! The key must be a token object of type AES, 32 bytes long, with `CKA_SENSITIVE` true and
//! `CKA_EXTRACTABLE` false; anything else is refused at start-up. Data keys never leave this
//! process in plaintext and the KEK never leaves the token.
//!
//! Wrapped DEK layout (61 bytes), produced by `CKM_AES_GCM` on the token:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version, `0x01` |
//! | 1 | 12 | random IV (OS RNG) |
//! | 13 | 48 | AES-256-GCM ciphertext of the 32-byte DEK ‖ 16-byte tag |
//!
//! AAD = `"pgenvelope/kek/pkcs11/v1"` ‖ organisation id (UTF-8) ‖ DEK id (16 bytes). The DEK
//! id has a fixed length and ends the AAD, so the encoding is unambiguous.
//!
//! SoftHSM2 reports a failed GCM tag check as `CKR_GENERAL_ERROR`. Because that code can also
//! mean a device fault, a decrypt failing with it is followed by an encrypt/decrypt round trip
//! of a fixed block on the same session: if that works the wrapped key is rejected (`XX001`),
//! otherwise the token is unavailable (`58000`).
//!
//! PKCS#11 calls block, so every token operation runs in `tokio::task::spawn_blocking`.
//! At most [`MAX_SESSIONS`] token operations run at once (a semaphore), each on a session
//! from a pool of at most as many idle sessions. A session whose login
//! was lost (the token was logged out, restarted or the session closed) is dropped, the user
//! logs in again on a fresh session and the operation is retried once.
//!
//! Never logs or formats the PIN, plaintext keys or wrapped keys; the
//! [`KekProvider::kek_id`] is `pkcs11:token=<label>;object=<label>` (or `;id=<id>` when
//! the URI names the key by id only), percent-encoded: no PIN, no module path.

pub(crate) mod fault;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::crypto::{DataKey, KEY_LEN};

use super::kek::{KekError, KekProvider, KeyContext};

mod uri;

use uri::percent_encode;
pub use uri::{PinSource, Pkcs11Uri};

/// The module tried when the URI has no `module-path` (Debian's SoftHSM2).
pub const DEFAULT_MODULE_PATH: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Token operations in flight at once per provider, and idle sessions kept for reuse.
pub const MAX_SESSIONS: usize = 8;

/// Default bound on one token operation (see [`Pkcs11Kek::with_timeout`]), as for AWS KMS.
/// A PKCS#11 call cannot be interrupted: a call that hangs keeps its blocking thread and its
/// session permit until the module returns, but the statement waiting for it fails with
/// `58000` after this long instead of hanging with the HSM.
pub(crate) const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);

/// Format version byte of a PKCS#11-wrapped DEK.
const WRAP_VERSION: u8 = 0x01;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const TAG_BITS: u64 = 128;
/// Length of a wrapped DEK: version ‖ IV ‖ ciphertext ‖ tag.
const WRAPPED_LEN: usize = 1 + IV_LEN + KEY_LEN + TAG_LEN;
const AAD_PREFIX: &[u8] = b"pgenvelope/kek/pkcs11/v1";

/// What went wrong setting up or using a PKCS#11 KEK. Never carries a PIN or key bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Pkcs11Error {
    /// The URI names an attribute we do not know or has a bad value.
    #[error("invalid pkcs11: URI: {reason}")]
    Uri {
        /// What is wrong, naming the attribute.
        reason: String,
    },
    /// The PIN could not be read from its source.
    #[error("PKCS#11 PIN: {reason}")]
    Pin {
        /// Why (never the PIN itself).
        reason: String,
    },
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {}", path.display())]
    Module {
        /// The module path.
        path: PathBuf,
        /// The loader's or the module's error.
        #[source]
        source: Arc<CkError>,
    },
    /// No slot holds a token with the requested label or slot id.
    #[error("no PKCS#11 token {token} found in module {}", module.display())]
    TokenNotFound {
        /// The token label or slot id asked for.
        token: String,
        /// The module searched.
        module: PathBuf,
    },
    /// The token refused the PIN.
    #[error("PIN incorrect for token {token}")]
    PinIncorrect {
        /// The token label.
        token: String,
    },
    /// The token's user PIN is locked after too many wrong attempts.
    #[error("user PIN locked for token {token}")]
    PinLocked {
        /// The token label.
        token: String,
    },
    /// No secret key with the requested label or id on the token.
    #[error("no secret key {object} on PKCS#11 token {token}")]
    KeyNotFound {
        /// The token label.
        token: String,
        /// The key label or id asked for.
        object: String,
    },
    /// More than one secret key matches the label or id.
    #[error("{count} secret keys match {object} on PKCS#11 token {token}; make the URI unique")]
    KeyAmbiguous {
        /// The token label.
        token: String,
        /// The key label or id asked for.
        object: String,
        /// How many matched.
        count: usize,
    },
    /// The key exists but is not usable as a KEK.
    #[error("PKCS#11 key {object} on token {token} is not a valid KEK: {reason}")]
    KeyUnsuitable {
        /// The token label.
        token: String,
        /// The key label or id.
        object: String,
        /// Why: not AES, not 256 bits, extractable or not sensitive.
        reason: &'static str,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {op} failed")]
    Call {
        /// What we were doing.
        op: &'static str,
        /// The module's error (a `CKR_*` code).
        #[source]
        source: Arc<CkError>,
    },
    /// A blocking task running a token operation panicked or was cancelled.
    #[error("PKCS#11 worker task failed")]
    Task,
    /// A token operation (including the wait for a free session) did not finish in time:
    /// the HSM hangs or is overloaded.
    #[error("PKCS#11 operation did not finish within {}s", after.as_secs_f32())]
    TimedOut {
        /// The bound that was exceeded.
        after: std::time::Duration,
    },
}

/// A KEK held in an HSM, used through its PKCS#11 module.
pub struct Pkcs11Kek {
    inner: Arc<Inner>,
    /// Invariant: [`MAX_SESSIONS`] permits; one held per token operation in flight.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bound on one operation, from asking for a session to the token's answer.
    timeout: std::time::Duration,
}

struct Inner {
    ctx: Pkcs11,
    slot: Slot,
    token: String,
    /// Template finding the key: class, key type and label and/or id.
    find: Vec<Attribute>,
    object: String,
    pin: AuthPin,
    id: String,
    /// Invariant: every idle session belongs to `slot`; at most [`MAX_SESSIONS`].
    idle: Mutex<Vec<Session>>,
}

impl Pkcs11Kek {
    /// Load the module, find the token, log in and check the key. Blocking: call at start-up
    /// or from `spawn_blocking`.
    ///
    /// Refuses to start if the PIN is wrong, the key is missing, is not AES-256, is extractable
    /// or is not sensitive.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, KekError> {
        let pin = uri.read_pin()?;
        let ctx = Pkcs11::new(&uri.module_path).map_err(|e| {
            setup(Pkcs11Error::Module {
                path: uri.module_path.clone(),
                source: Arc::new(e),
            })
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // The module is process-wide: another context in this process initialised it.
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(setup(Pkcs11Error::Module {
                    path: uri.module_path.clone(),
                    source: Arc::new(e),
                }))
            }
        }
        let (slot, token) = find_token(&ctx, uri)?;
        // Percent-encoded as in RFC 7512, so a label holding `;` cannot forge an attribute.
        let token_attr = format!("pkcs11:token={}", percent_encode(token.as_bytes()));
        let (object, id) = match (&uri.object, &uri.id) {
            (Some(label), _) => (
                label.clone(),
                format!("{token_attr};object={}", percent_encode(label.as_bytes())),
            ),
            (None, Some(id)) => {
                let id = percent_encode(id);
                (format!("id={id}"), format!("{token_attr};id={id}"))
            }
            (None, None) => (String::new(), token_attr),
        };
        let mut find = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
        ];
        if let Some(label) = &uri.object {
            find.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            find.push(Attribute::Id(id.clone()));
        }
        let inner = Inner {
            ctx,
            slot,
            id,
            token,
            find,
            object,
            pin,
            idle: Mutex::new(Vec::new()),
        };
        let session = inner.open_session().map_err(|e| match e {
            Pkcs11Error::Call { source, .. }
                if matches!(
                    *source,
                    CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)
                ) =>
            {
                setup(Pkcs11Error::PinIncorrect {
                    token: inner.token.clone(),
                })
            }
            Pkcs11Error::Call { source, .. }
                if matches!(*source, CkError::Pkcs11(RvError::PinLocked, _)) =>
            {
                setup(Pkcs11Error::PinLocked {
                    token: inner.token.clone(),
                })
            }
            other => setup(other),
        })?;
        inner.check_key(&session).map_err(setup)?;
        inner.release(session);
        tracing::info!(kek = %inner.id, "PKCS#11 KEK ready");
        Ok(Self {
            inner: Arc::new(inner),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS)),
            timeout: OPERATION_TIMEOUT,
        })
    }

    /// Bound each operation (waiting for a session included) by `timeout` instead of
    /// [`OPERATION_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn run<T, F>(&self, op: F) -> Result<T, KekError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session, ObjectHandle) -> Result<T, Outcome> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let kek = inner.id.clone();
        let in_flight = Arc::clone(&self.in_flight);
        let operation = async move {
            match in_flight.acquire_owned().await {
                Ok(permit) => tokio::task::spawn_blocking(move || {
                    let result = match fault::hsm_fault() {
                        Some(e) => Err(Outcome::Failed(e)),
                        None => inner.with_session(op),
                    };
                    drop(permit);
                    result
                })
                .await
                .unwrap_or(Err(Outcome::Failed(Pkcs11Error::Task))),
                // Never closed; treated like a failed worker all the same.
                Err(_) => Err(Outcome::Failed(Pkcs11Error::Task)),
            }
        };
        let result = tokio::time::timeout(self.timeout, operation)
            .await
            .unwrap_or(Err(Outcome::Failed(Pkcs11Error::TimedOut {
                after: self.timeout,
            })));
        result.map_err(|outcome| match outcome {
            Outcome::Rejected => KekError::Rejected,
            Outcome::Failed(e) => KekError::Unavailable {
                kek,
                source: Arc::new(e),
            },
        })
    }
}

#[async_trait]
impl KekProvider for Pkcs11Kek {
    fn kek_id(&self) -> String {
        self.inner.id.clone()
    }

    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
        let aad = aad(ctx);
        let plain = Zeroizing::new(*key.expose_secret());
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let sealed = self
            .run(move |_, session, key| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())
                    .map_err(|e| Outcome::from(call("C_Encrypt", e)))?;
                session
                    .encrypt(&Mechanism::AesGcm(params), key, &plain[..])
                    .map_err(|e| Outcome::from(call("C_Encrypt", e)))
            })
            .await?;
        if sealed.len() != KEY_LEN + TAG_LEN {
            return Err(KekError::Malformed {
                reason: "the token returned a wrapped key of the wrong length",
            });
        }
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(WRAP_VERSION);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(KekError::Malformed {
                reason: "wrong length for a pkcs11:v1 wrapped key",
            });
        }
        if wrapped[0] != WRAP_VERSION {
            return Err(KekError::Malformed {
                reason: "unknown pkcs11 wrapped-key version",
            });
        }
        let aad = aad(ctx);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[1..1 + IV_LEN]);
        let sealed = wrapped[1 + IV_LEN..].to_vec();
        let plain = self
            .run(move |_, session, key| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())
                    .map_err(|e| Outcome::from(call("C_Decrypt", e)))?;
                match session.decrypt(&Mechanism::AesGcm(params), key, &sealed) {
                    Ok(plain) => Ok(Zeroizing::new(plain)),
                    Err(CkError::Pkcs11(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::DataInvalid,
                        _,
                    )) => Err(Outcome::Rejected),
                    // SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR, which could
                    // also be a device fault: a round trip on the same session tells them apart.
                    Err(CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _))
                        if probe(session, key) =>
                    {
                        Err(Outcome::Rejected)
                    }
                    Err(e) => Err(call("C_Decrypt", e).into()),
                }
            })
            .await?;
        DataKey::from_slice(&plain[..]).ok_or(KekError::Malformed {
            reason: "unwrapped key has the wrong length",
        })
    }
}

impl fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Kek")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// The result of one token operation, before mapping to [`KekError`].
enum Outcome {
    /// Authentication of a wrapped key failed.
    Rejected,
    /// The token or module failed.
    Failed(Pkcs11Error),
}

impl From<Pkcs11Error> for Outcome {
    fn from(e: Pkcs11Error) -> Self {
        Self::Failed(e)
    }
}

impl Inner {
    /// Run `op` on a logged-in session with the key's handle. If the session lost its login
    /// or was closed, drop it and retry once on a fresh, logged-in session.
    fn with_session<T>(
        &self,
        op: impl Fn(&Inner, &Session, ObjectHandle) -> Result<T, Outcome>,
    ) -> Result<T, Outcome> {
        let mut retried = false;
        loop {
            let session = match self.take_idle().filter(|_| !retried) {
                Some(s) => s,
                None => self.open_session()?,
            };
            let result = self
                .ensure_login(&session)
                .and_then(|()| self.key_handle(&session))
                .map_err(Outcome::Failed)
                .and_then(|key| op(self, &session, key));
            match result {
                Err(Outcome::Failed(ref e)) if !retried && needs_new_session(e) => {
                    tracing::warn!(kek = %self.id, "PKCS#11 session lost its login; logging in again");
                    // Whatever ended this session's login most likely ended the others'.
                    drop(session);
                    if let Ok(mut idle) = self.idle.lock() {
                        idle.clear();
                    }
                    retried = true;
                }
                other => {
                    if !matches!(other, Err(Outcome::Failed(_))) {
                        self.release(session);
                    }
                    return other;
                }
            }
        }
    }

    fn take_idle(&self) -> Option<Session> {
        self.idle.lock().ok()?.pop()
    }

    fn release(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_SESSIONS {
                idle.push(session);
            }
        }
    }

    fn open_session(&self) -> Result<Session, Pkcs11Error> {
        let session = self
            .ctx
            .open_ro_session(self.slot)
            .map_err(|e| call("C_OpenSession", e))?;
        self.ensure_login(&session)?;
        Ok(session)
    }

    /// Log the user in unless this session already sees the user logged in. Login state is
    /// per application and token, so one login covers every session.
    fn ensure_login(&self, session: &Session) -> Result<(), Pkcs11Error> {
        let info = session
            .get_session_info()
            .map_err(|e| call("C_GetSessionInfo", e))?;
        if matches!(
            info.session_state(),
            SessionState::RoUser | SessionState::RwUser
        ) {
            return Ok(());
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => Err(call("C_Login", e)),
        }
    }

    fn key_handle(&self, session: &Session) -> Result<ObjectHandle, Pkcs11Error> {
        let found = session
            .find_objects(&self.find)
            .map_err(|e| call("C_FindObjects", e))?;
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(Pkcs11Error::KeyNotFound {
                token: self.token.clone(),
                object: self.object.clone(),
            }),
            many => Err(Pkcs11Error::KeyAmbiguous {
                token: self.token.clone(),
                object: self.object.clone(),
                count: many.len(),
            }),
        }
    }

    fn check_key(&self, session: &Session) -> Result<(), Pkcs11Error> {
        let key = self.key_handle(session)?;
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(|e| call("C_GetAttributeValue", e))?;
        let unsuitable = |reason| Pkcs11Error::KeyUnsuitable {
            token: self.token.clone(),
            object: self.object.clone(),
            reason,
        };
        let (mut aes, mut len, mut sensitive, mut extractable) = (false, 0u64, false, true);
        let (mut encrypt, mut decrypt) = (false, false);
        for attr in attrs {
            match attr {
                Attribute::KeyType(t) => aes = t == KeyType::AES,
                Attribute::ValueLen(l) => len = l.into(),
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::Extractable(b) => extractable = b,
                Attribute::Encrypt(b) => encrypt = b,
                Attribute::Decrypt(b) => decrypt = b,
                _ => {}
            }
        }
        if !aes {
            return Err(unsuitable("not an AES key"));
        }
        if len != KEY_LEN as u64 {
            return Err(unsuitable("not a 256-bit key"));
        }
        if extractable {
            return Err(unsuitable(
                "CKA_EXTRACTABLE is true; the KEK must never leave the token",
            ));
        }
        if !sensitive {
            return Err(unsuitable("CKA_SENSITIVE is false"));
        }
        if !encrypt || !decrypt {
            return Err(unsuitable("CKA_ENCRYPT and CKA_DECRYPT must both be true"));
        }
        Ok(())
    }
}

/// Whether the token still encrypts and decrypts with `key` on `session`: an AES-GCM round
/// trip of a fixed, non-secret block under a fresh IV.
fn probe(session: &Session, key: ObjectHandle) -> bool {
    const PROBE_AAD: &[u8] = b"pgenvelope/kek/pkcs11/probe";
    let block = [0u8; KEY_LEN];
    let mut iv = [0u8; IV_LEN];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let round_trip = || -> Result<bool, CkError> {
        let mut enc_iv = iv;
        let params = GcmParams::new(&mut enc_iv, PROBE_AAD, TAG_BITS.into())?;
        let sealed = session.encrypt(&Mechanism::AesGcm(params), key, &block)?;
        let mut dec_iv = iv;
        let params = GcmParams::new(&mut dec_iv, PROBE_AAD, TAG_BITS.into())?;
        let opened = session.decrypt(&Mechanism::AesGcm(params), key, &sealed)?;
        Ok(opened == block)
    };
    round_trip().unwrap_or(false)
}

/// Whether an error means the session (or its login) is gone, so a fresh session may work.
fn needs_new_session(e: &Pkcs11Error) -> bool {
    match e {
        Pkcs11Error::Call { source, .. } => matches!(
            **source,
            CkError::Pkcs11(
                RvError::UserNotLoggedIn
                    | RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::KeyHandleInvalid
                    | RvError::ObjectHandleInvalid,
                _
            )
        ),
        // Private objects are invisible without a login.
        Pkcs11Error::KeyNotFound { .. } => true,
        _ => false,
    }
}

fn find_token(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<(Slot, String), KekError> {
    let wanted = match (&uri.token, uri.slot_id) {
        (Some(label), _) => label.clone(),
        (None, Some(id)) => format!("slot-id={id}"),
        (None, None) => String::new(),
    };
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| setup(call("C_GetSlotList", e)))?;
    for slot in slots {
        if uri.slot_id.is_some_and(|id| id != slot.id()) {
            continue;
        }
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| setup(call("C_GetTokenInfo", e)))?;
        let label = info.label().trim_end().to_owned();
        if uri.token.as_ref().is_some_and(|t| *t != label) {
            continue;
        }
        return Ok((slot, label));
    }
    Err(setup(Pkcs11Error::TokenNotFound {
        token: wanted,
        module: uri.module_path.clone(),
    }))
}

fn aad(ctx: &KeyContext) -> Vec<u8> {
    let org = ctx.org.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + org.len() + 16);
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(org);
    aad.extend_from_slice(ctx.dek.as_bytes());
    aad
}

fn call(op: &'static str, source: CkError) -> Pkcs11Error {
    Pkcs11Error::Call {
        op,
        source: Arc::new(source),
    }
}

fn setup(e: Pkcs11Error) -> KekError {
    KekError::Pkcs11(Arc::new(e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn missing_module_is_a_clear_error() {
        let uri =
            Pkcs11Uri::parse("pkcs11:token=t;object=k?module-path=/nonexistent/p11.so&pin-value=1")
                .unwrap();
        let msg = format!("{:#}", Pkcs11Kek::open(&uri).err().unwrap());
        assert!(msg.contains("/nonexistent/p11.so"), "{msg}");
    }

    #[test]
    fn aad_binds_org_and_dek() {
        let ctx = KeyContext {
            org: crate::crypto::OrgId::new("acme").unwrap(),
            dek: crate::crypto::DekId::from_bytes([7; 16]),
        };
        let aad = aad(&ctx);
        assert!(aad.starts_with(b"pgenvelope/kek/pkcs11/v1acme"));
        assert!(aad.ends_with(&[7; 16]));
    }
}
