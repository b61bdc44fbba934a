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
//! the URI names the key by id only): no PIN, no module path.

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

/// The module tried when the URI has no `module-path` (Debian's SoftHSM2).
pub const DEFAULT_MODULE_PATH: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Token operations in flight at once per provider, and idle sessions kept for reuse.
pub const MAX_SESSIONS: usize = 8;

/// Format version byte of a PKCS#11-wrapped DEK.
const WRAP_VERSION: u8 = 0x01;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const TAG_BITS: u64 = 128;
/// Length of a wrapped DEK: version ‖ IV ‖ ciphertext ‖ tag.
const WRAPPED_LEN: usize = 1 + IV_LEN + KEY_LEN + TAG_LEN;
const AAD_PREFIX: &[u8] = b"pgenvelope/kek/pkcs11/v1";

/// A parsed `pkcs11:` URI. Holding one means every attribute was understood.
///
/// `Debug` never shows a PIN.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token label.
    token: Option<String>,
    /// `object=`: the key label.
    object: Option<String>,
    /// `id=`: the key's `CKA_ID`.
    id: Option<Vec<u8>>,
    /// `slot-id=`: the slot number.
    slot_id: Option<u64>,
    /// `module-path=`: the PKCS#11 library.
    module_path: PathBuf,
    /// Where the user PIN comes from.
    pin: PinSource,
}

/// Where the user PIN comes from. `Debug` never shows a PIN value.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinSource {
    /// `pin-source=env:VAR`: the environment variable `VAR`.
    Env(String),
    /// `pin-source=file:/path`: the first line of a file.
    File(PathBuf),
    /// `pin-value=…`: the PIN in the URI itself. For tests only.
    Value(Zeroizing<String>),
}

impl Pkcs11Uri {
    /// Parse a `pkcs11:` URI (RFC 7512) naming a secret key and how to log in.
    pub fn parse(uri: &str) -> Result<Self, KekError> {
        let err = |reason: String| setup(Pkcs11Error::Uri { reason });
        let body = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| err("the URI must start with pkcs11:".into()))?;
        let (path, query) = body.split_once('?').unwrap_or((body, ""));
        let mut out = Self {
            token: None,
            object: None,
            id: None,
            slot_id: None,
            module_path: PathBuf::from(DEFAULT_MODULE_PATH),
            pin: PinSource::Env(String::new()),
        };
        let mut pin = None;
        let attrs = path
            .split(';')
            .map(|a| (a, false))
            .chain(query.split('&').map(|a| (a, true)));
        for (attr, in_query) in attrs.filter(|(a, _)| !a.is_empty()) {
            let Some((name, raw)) = attr.split_once('=') else {
                return Err(err(format!(
                    "attribute `{}` has no value",
                    attr.split('=').next().unwrap_or(attr)
                )));
            };
            let value = || {
                percent_decode(raw)
                    .ok_or_else(|| err(format!("attribute `{name}`: invalid percent-encoding")))
            };
            let text = || {
                String::from_utf8(value()?)
                    .map_err(|_| err(format!("attribute `{name}` is not valid UTF-8")))
            };
            let dup = |set: bool| {
                if set {
                    Err(err(format!("attribute `{name}` given twice")))
                } else {
                    Ok(())
                }
            };
            match (name, in_query) {
                ("token", false) => {
                    dup(out.token.is_some())?;
                    out.token = Some(text()?);
                }
                ("object", false) => {
                    dup(out.object.is_some())?;
                    out.object = Some(text()?);
                }
                ("id", false) => {
                    dup(out.id.is_some())?;
                    out.id = Some(value()?);
                }
                ("slot-id", false) => {
                    dup(out.slot_id.is_some())?;
                    out.slot_id =
                        Some(text()?.parse().map_err(|_| {
                            err("attribute `slot-id` must be a decimal number".into())
                        })?);
                }
                ("type", false) => {
                    if text()? != "secret-key" {
                        return Err(err(
                            "attribute `type` must be `secret-key`: the KEK is an AES key".into(),
                        ));
                    }
                }
                ("module-path", true) => out.module_path = PathBuf::from(text()?),
                ("pin-source", true) => {
                    dup(pin.is_some())?;
                    let source = text()?;
                    pin = Some(if let Some(var) = source.strip_prefix("env:") {
                        if var.is_empty() {
                            return Err(err("attribute `pin-source`: env: needs a name".into()));
                        }
                        PinSource::Env(var.to_owned())
                    } else if let Some(file) = source.strip_prefix("file:") {
                        if file.is_empty() {
                            return Err(err("attribute `pin-source`: file: needs a path".into()));
                        }
                        PinSource::File(PathBuf::from(file))
                    } else {
                        return Err(err(
                            "attribute `pin-source` must be env:VAR or file:/path".into()
                        ));
                    });
                }
                ("pin-value", _) => {
                    dup(pin.is_some())?;
                    let raw = Zeroizing::new(value()?);
                    let text = std::str::from_utf8(&raw)
                        .map_err(|_| err("attribute `pin-value` is not valid UTF-8".into()))?;
                    pin = Some(PinSource::Value(Zeroizing::new(text.to_owned())));
                }
                (other, _) => {
                    return Err(err(format!(
                        "unknown {} attribute `{other}`; expected token, object, id, slot-id, \
                         type in the path and module-path, pin-source, pin-value in the query",
                        if in_query { "query" } else { "path" }
                    )))
                }
            }
        }
        if out.token.is_none() && out.slot_id.is_none() {
            return Err(err("name the token with `token=` (or `slot-id=`)".into()));
        }
        if out.object.is_none() && out.id.is_none() {
            return Err(err("name the key with `object=` (or `id=`)".into()));
        }
        out.pin = pin.ok_or_else(|| {
            err("no PIN: add ?pin-source=env:VAR or ?pin-source=file:/path".into())
        })?;
        Ok(out)
    }

    /// `token=`: the token label, if given.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `object=`: the key label, if given.
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// `id=`: the key's `CKA_ID`, if given.
    pub fn id(&self) -> Option<&[u8]> {
        self.id.as_deref()
    }

    /// `slot-id=`: the slot number, if given.
    pub fn slot_id(&self) -> Option<u64> {
        self.slot_id
    }

    /// The PKCS#11 library to load.
    pub fn module_path(&self) -> &std::path::Path {
        &self.module_path
    }

    /// Where the user PIN comes from.
    pub fn pin_source(&self) -> &PinSource {
        &self.pin
    }

    fn read_pin(&self) -> Result<AuthPin, KekError> {
        let pin = match &self.pin {
            PinSource::Env(var) => Zeroizing::new(std::env::var(var).map_err(|_| {
                setup(Pkcs11Error::Pin {
                    reason: format!("environment variable {var} is not set or not UTF-8"),
                })
            })?),
            PinSource::File(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    setup(Pkcs11Error::Pin {
                        reason: format!("cannot read PIN file {}: {e}", path.display()),
                    })
                })?);
                Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
            }
            PinSource::Value(value) => {
                tracing::warn!(
                    "the PKCS#11 PIN is given with pin-value= in the URI; that is for testing \
                     only, use pin-source=env:VAR or pin-source=file:/path"
                );
                value.clone()
            }
        };
        Ok(AuthPin::from(pin.as_str()))
    }
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Uri")
            .field("token", &self.token)
            .field("object", &self.object)
            .field("id", &self.id)
            .field("slot_id", &self.slot_id)
            .field("module_path", &self.module_path)
            .field("pin", &self.pin)
            .finish()
    }
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "env:{var}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::Value(_) => f.write_str("pin-value=REDACTED"),
        }
    }
}

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
}

/// A KEK held in an HSM, used through its PKCS#11 module.
pub struct Pkcs11Kek {
    inner: Arc<Inner>,
    /// Invariant: [`MAX_SESSIONS`] permits; one held per token operation in flight.
    in_flight: Arc<tokio::sync::Semaphore>,
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
        let (object, id) = match (&uri.object, &uri.id) {
            (Some(label), _) => (
                label.clone(),
                format!("pkcs11:token={token};object={label}"),
            ),
            (None, Some(id)) => {
                let id = percent_encode(id);
                (format!("id={id}"), format!("pkcs11:token={token};id={id}"))
            }
            (None, None) => (String::new(), format!("pkcs11:token={token}")),
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
        })
    }

    async fn run<T, F>(&self, op: F) -> Result<T, KekError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session, ObjectHandle) -> Result<T, Outcome> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let kek = inner.id.clone();
        let result = match Arc::clone(&self.in_flight).acquire_owned().await {
            Ok(permit) => tokio::task::spawn_blocking(move || {
                let result = inner.with_session(op);
                drop(permit);
                result
            })
            .await
            .unwrap_or(Err(Outcome::Failed(Pkcs11Error::Task))),
            // Never closed; treated like a failed worker all the same.
            Err(_) => Err(Outcome::Failed(Pkcs11Error::Task)),
        };
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

/// Decode `%XX` escapes; `None` for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Encode every byte outside RFC 3986's unreserved set as `%XX`.
fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse_err(uri: &str) -> String {
        Pkcs11Uri::parse(uri).unwrap_err().to_string()
    }

    #[test]
    fn parses_full_uri() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=My%20HSM;object=pg-kek;id=%01%02;slot-id=7;type=secret-key\
             ?module-path=/opt/lib/p11.so&pin-source=env:HSM_PIN",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("My HSM"));
        assert_eq!(uri.object.as_deref(), Some("pg-kek"));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(uri.slot_id, Some(7));
        assert_eq!(uri.module_path, PathBuf::from("/opt/lib/p11.so"));
        assert_eq!(uri.pin, PinSource::Env("HSM_PIN".into()));
    }

    #[test]
    fn defaults_module_and_reads_file_pin_source() {
        let uri =
            Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-source=file:/run/secrets/pin").unwrap();
        assert_eq!(uri.module_path, PathBuf::from(DEFAULT_MODULE_PATH));
        assert_eq!(uri.pin, PinSource::File("/run/secrets/pin".into()));
    }

    #[test]
    fn errors_name_the_bad_attribute() {
        for (uri, needle) in [
            (
                "pkcs11:token=t;object=k;colour=red?pin-source=env:P",
                "colour",
            ),
            (
                "pkcs11:token=t;object=k;slot-id=x?pin-source=env:P",
                "slot-id",
            ),
            (
                "pkcs11:token=t;object=k;type=private?pin-source=env:P",
                "type",
            ),
            ("pkcs11:token=t;object=%zz?pin-source=env:P", "object"),
            ("pkcs11:token=t;object=k?pin-source=vault:x", "pin-source"),
            ("pkcs11:token=t;token=u;object=k?pin-source=env:P", "token"),
            (
                "pkcs11:token=t;object=k?module-path=/x&bogus=1&pin-source=env:P",
                "bogus",
            ),
            ("pkcs11:object=k?pin-source=env:P", "token="),
            ("pkcs11:token=t?pin-source=env:P", "object="),
            ("pkcs11:token=t;object=k", "no PIN"),
            ("pkcs11:token=t;object", "object"),
        ] {
            let msg = parse_err(uri);
            assert!(msg.contains(needle), "{uri}: {msg}");
        }
    }

    #[test]
    fn pin_value_is_accepted_and_never_shown() {
        let uri = Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-value=s%33cret").unwrap();
        assert!(matches!(&uri.pin, PinSource::Value(v) if v.as_str() == "s3cret"));
        assert!(!format!("{uri:?}").contains("s3cret"));
        let uri = Pkcs11Uri::parse("pkcs11:token=t;object=k;pin-value=4321").unwrap();
        assert!(!format!("{uri:?}").contains("4321"));
        let msg = parse_err("pkcs11:token=t;object=k;pin-value=4321;what=1");
        assert!(!msg.contains("4321"), "{msg}");
    }

    #[test]
    fn pin_sources_read_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pin");
        std::fs::write(&file, "98765\n").unwrap();
        let uri = Pkcs11Uri::parse(&format!(
            "pkcs11:token=t;object=k?pin-source=file:{}",
            file.display()
        ))
        .unwrap();
        assert!(uri.read_pin().is_ok());
        let missing = Pkcs11Uri::parse(
            "pkcs11:token=t;object=k?pin-source=env:PGENVELOPE_TEST_SURELY_UNSET_PIN",
        )
        .unwrap();
        let msg = missing.read_pin().err().unwrap().to_string();
        assert!(msg.contains("PGENVELOPE_TEST_SURELY_UNSET_PIN"), "{msg}");
    }

    #[test]
    fn missing_module_is_a_clear_error() {
        let uri =
            Pkcs11Uri::parse("pkcs11:token=t;object=k?module-path=/nonexistent/p11.so&pin-value=1")
                .unwrap();
        let msg = format!("{:#}", Pkcs11Kek::open(&uri).err().unwrap());
        assert!(msg.contains("/nonexistent/p11.so"), "{msg}");
    }

    #[test]
    fn percent_coding_round_trips() {
        assert_eq!(percent_decode("a%20b%2F").unwrap(), b"a b/");
        assert!(percent_decode("%2").is_none());
        assert!(percent_decode("%g0").is_none());
        assert_eq!(percent_encode(&[0x01, b'a', b' ']), "%01a%20");
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
