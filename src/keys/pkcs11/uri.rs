//! Parsing `pkcs11:` URIs (RFC 7512) and reading the PIN they point to.
//!
//! Pure apart from reading the PIN (`Pkcs11Uri::read_pin`), which reads the environment or a
//! file at start-up.
//! Never formats a PIN: `Debug` redacts `pin-value`, and errors name attributes, not values.

use std::fmt;
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::keys::KekError;

use super::{setup, Pkcs11Error, DEFAULT_MODULE_PATH};

/// A parsed `pkcs11:` URI. Holding one means every attribute was understood.
///
/// `Debug` never shows a PIN.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token label.
    pub(super) token: Option<String>,
    /// `object=`: the key label.
    pub(super) object: Option<String>,
    /// `id=`: the key's `CKA_ID`.
    pub(super) id: Option<Vec<u8>>,
    /// `slot-id=`: the slot number.
    pub(super) slot_id: Option<u64>,
    /// `module-path=`: the PKCS#11 library.
    pub(super) module_path: PathBuf,
    /// Where the user PIN comes from.
    pub(super) pin: PinSource,
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
    pub fn module_path(&self) -> &Path {
        &self.module_path
    }

    /// Where the user PIN comes from.
    pub fn pin_source(&self) -> &PinSource {
        &self.pin
    }

    pub(super) fn read_pin(&self) -> Result<AuthPin, KekError> {
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
pub(super) fn percent_encode(bytes: &[u8]) -> String {
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
    fn percent_coding_round_trips() {
        assert_eq!(percent_decode("a%20b%2F").unwrap(), b"a b/");
        assert!(percent_decode("%2").is_none());
        assert!(percent_decode("%g0").is_none());
        assert_eq!(percent_encode(&[0x01, b'a', b' ']), "%01a%20");
    }
}
