//! Key-encryption-key (KEK) providers: the trait, the wrapping context and `--kms` URIs.
//!
//! A provider wraps and unwraps data keys; it never hands out its own key material, and its
//! [`KekProvider::kek_id`] is a public label (scheme plus fingerprint or key reference), never
//! key bytes. Every wrap binds a [`KeyContext`] (organisation and DEK id), so a wrapped DEK
//! copied into another organisation's row cannot be unwrapped.
//!
//! Errors never say why an unwrap failed beyond "rejected": like `aead::Error`, they give
//! nothing away.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::crypto::{DataKey, DekId, OrgId};

use super::aws::AwsKmsKek;
use super::local::LocalKek;
use super::pkcs11::{Pkcs11Error, Pkcs11Kek, Pkcs11Uri};

/// What a wrapped DEK is bound to. Part of the AAD (local KEK) or the encryption context (KMS).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyContext {
    /// The organisation that owns the DEK.
    pub org: OrgId,
    /// The DEK's id, as stored in the key store and in every `enc:v1` value.
    pub dek: DekId,
}

/// A key-encryption key: wraps and unwraps data keys.
///
/// Object safe; use it as `Arc<dyn KekProvider>`. Implementations must be cheap to call
/// concurrently; the DEK cache in front of them keeps calls off the request path when warm.
#[async_trait]
pub trait KekProvider: Send + Sync {
    /// A stable, public label for this KEK, recorded with every DEK it wraps
    /// (for example `local:3f9a…` or `aws-kms:alias/pgenvelope`). Never contains key bytes.
    fn kek_id(&self) -> String;

    /// Generate a fresh DEK and wrap it for `ctx`. Returns the plaintext key and its wrapped
    /// form. The default draws the key from the OS RNG and calls [`KekProvider::wrap`];
    /// a KMS may override it with its own data-key generation.
    async fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, Vec<u8>), KekError> {
        let key = DataKey::generate();
        let wrapped = self.wrap(ctx, &key).await?;
        Ok((key, wrapped))
    }

    /// Wrap `key` for `ctx`.
    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError>;

    /// Unwrap a key previously wrapped for exactly this `ctx`.
    ///
    /// Fails with [`KekError::Rejected`] if the bytes were altered, were wrapped for another
    /// context, or were wrapped by another KEK.
    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError>;

    /// Re-wrap `wrapped` (made by this KEK for `ctx`) under `to` without the plaintext key
    /// leaving the key service, where both KEKs live in one (AWS KMS `ReEncrypt`). `None`
    /// when not available: the caller unwraps and wraps instead.
    async fn rewrap_to(
        &self,
        _ctx: &KeyContext,
        _wrapped: &[u8],
        _to: &dyn KekProvider,
    ) -> Option<Result<Vec<u8>, KekError>> {
        None
    }

    /// The AWS KMS key this provider wraps with, if it is an AWS KMS key.
    fn aws_kms_key(&self) -> Option<String> {
        None
    }
}

/// A parsed `--kms` URI naming the KEK.
///
/// `Debug` and `Display` redact a PKCS#11 `pin-value`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KmsUri {
    /// `local:PATH`: 32 random bytes in a file with mode 0600. For development.
    Local {
        /// The key file; created on first use.
        path: PathBuf,
    },
    /// `aws-kms:KEY_ID|ARN|alias/NAME`: an AWS KMS symmetric key.
    AwsKms {
        /// Key id, key ARN, alias ARN or `alias/NAME`, as given.
        key: String,
    },
    /// `pkcs11:…`: an RFC 7512 URI naming a key in an HSM.
    Pkcs11 {
        /// The whole URI, including the `pkcs11:` scheme.
        uri: String,
    },
}

impl KmsUri {
    /// The URI scheme: `local`, `aws-kms` or `pkcs11`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Local { .. } => "local",
            Self::AwsKms { .. } => "aws-kms",
            Self::Pkcs11 { .. } => "pkcs11",
        }
    }

    /// Build the provider this URI names.
    ///
    /// `local:` opens (or creates) the key file on a blocking thread; `aws-kms:` loads the
    /// standard AWS configuration chain (no KMS call is made yet); `pkcs11:` loads the module
    /// and logs in to the token on a blocking thread. Call at start-up, not on the request
    /// path.
    pub async fn open(&self) -> Result<Arc<dyn KekProvider>, KekError> {
        match self {
            Self::Local { path } => {
                let path = path.clone();
                let kek = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || LocalKek::open_or_create(path)
                })
                .await
                .map_err(|e| KekError::KeyFileIo {
                    path,
                    op: "open (task)",
                    source: Arc::new(io::Error::other(e.to_string())),
                })??;
                Ok(Arc::new(kek))
            }
            Self::AwsKms { key } => Ok(Arc::new(AwsKmsKek::from_env(key.clone()).await?)),
            Self::Pkcs11 { uri } => {
                let uri = Pkcs11Uri::parse(uri)?;
                let kek = tokio::task::spawn_blocking(move || Pkcs11Kek::open(&uri))
                    .await
                    .map_err(|e| KekError::Unavailable {
                        kek: "pkcs11".to_owned(),
                        source: Arc::new(io::Error::other(e.to_string())),
                    })??;
                Ok(Arc::new(kek))
            }
        }
    }
}

impl FromStr for KmsUri {
    type Err = KekError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| KekError::InvalidUri {
            uri: redact_pin(s),
            reason,
        };
        if let Some(path) = s.strip_prefix("local:") {
            if path.is_empty() {
                return Err(invalid(
                    "local: needs a file path, as in local:.pgenvelope/kek",
                ));
            }
            return Ok(Self::Local { path: path.into() });
        }
        if let Some(key) = s.strip_prefix("aws-kms:") {
            if !is_aws_key_ref(key) {
                return Err(invalid(
                    "aws-kms: needs a key id, a key or alias ARN, or alias/NAME",
                ));
            }
            return Ok(Self::AwsKms { key: key.into() });
        }
        if let Some(rest) = s.strip_prefix("pkcs11:") {
            if !is_pkcs11_body(rest) {
                return Err(invalid(
                    "pkcs11: attributes must be name=value pairs separated by ';' (RFC 7512)",
                ));
            }
            return Ok(Self::Pkcs11 { uri: s.into() });
        }
        Err(invalid(
            "unknown scheme; expected local:, aws-kms: or pkcs11:",
        ))
    }
}

impl fmt::Display for KmsUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local { path } => write!(f, "local:{}", path.display()),
            Self::AwsKms { key } => write!(f, "aws-kms:{key}"),
            Self::Pkcs11 { uri } => f.write_str(&redact_pin(uri)),
        }
    }
}

impl fmt::Debug for KmsUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KmsUri({self})")
    }
}

/// Why a KEK provider could not be built or could not wrap or unwrap a key.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    /// The `--kms` URI did not parse. `uri` has any PKCS#11 PIN redacted.
    #[error("invalid KMS URI `{uri}`: {reason}")]
    InvalidUri {
        /// The URI as given, PIN redacted.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The URI is valid but this build has no provider for its scheme yet.
    #[error("KEK provider `{scheme}:` is not supported in this build yet; use local:PATH")]
    NotSupported {
        /// The URI scheme.
        scheme: &'static str,
    },
    /// Reading, creating or inspecting a local key file failed.
    #[error("local KEK file {}: {op} failed", path.display())]
    KeyFileIo {
        /// The key file (or its directory).
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The local key file is readable or writable by group or others.
    #[error(
        "local KEK file {} has mode {mode:04o}; it must not be accessible by group or others \
         (chmod 600)",
        path.display()
    )]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The local key file is not a regular file of exactly 32 bytes.
    #[error(
        "local KEK file {} must be a regular file of exactly 32 bytes, found {len} bytes",
        path.display()
    )]
    KeyFileInvalid {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// A wrapped key failed authentication: altered, wrapped for another organisation or DEK,
    /// or wrapped by another KEK. Deliberately carries no detail.
    #[error("wrapped data key rejected by the KEK")]
    Rejected,
    /// A wrapped key has the wrong length or an unknown format version.
    #[error("wrapped data key is malformed: {reason}")]
    Malformed {
        /// What is wrong with it (never the bytes themselves).
        reason: &'static str,
    },
    /// A PKCS#11 KEK could not be set up (URI, PIN, module, token or key), or a token call
    /// failed in a way that is not a rejected wrapped key.
    #[error(transparent)]
    Pkcs11(Arc<Pkcs11Error>),
    /// A remote KEK (KMS, HSM) could not be reached, timed out, was throttled or failed
    /// internally. Transient: the next request tries again.
    #[error("KEK `{kek}` unavailable")]
    Unavailable {
        /// The provider's [`KekProvider::kek_id`].
        kek: String,
        /// The underlying failure.
        #[source]
        source: Arc<dyn StdError + Send + Sync>,
    },
    /// The KEK exists in name but cannot be used until an operator acts: disabled, pending
    /// deletion, deleted or not found. Not retried.
    #[error("KEK `{kek}` is disabled, pending deletion or not found")]
    KeyUnusable {
        /// The provider's [`KekProvider::kek_id`].
        kek: String,
        /// What the KMS or HSM reported.
        #[source]
        source: Arc<dyn StdError + Send + Sync>,
    },
    /// The provider's configuration is incomplete (for example no AWS region).
    #[error("KEK `{kek}` is misconfigured: {reason}")]
    Misconfigured {
        /// The provider's [`KekProvider::kek_id`].
        kek: String,
        /// What is missing.
        reason: &'static str,
    },
}

fn is_aws_key_ref(key: &str) -> bool {
    let name_ok = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
    };
    if let Some(name) = key.strip_prefix("alias/") {
        return name_ok(name);
    }
    if key.starts_with("arn:") {
        // arn:PARTITION:kms:REGION:ACCOUNT:key/ID | alias/NAME
        let parts: Vec<&str> = key.splitn(6, ':').collect();
        return parts.len() == 6
            && parts[2] == "kms"
            && parts.iter().all(|p| !p.is_empty())
            && (parts[5].strip_prefix("key/").is_some_and(name_ok)
                || parts[5].strip_prefix("alias/").is_some_and(name_ok));
    }
    if let Some(hex) = key.strip_prefix("mrk-") {
        return hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    uuid::Uuid::try_parse(key).is_ok()
}

fn is_pkcs11_body(rest: &str) -> bool {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let attrs_ok = |s: &str, sep: char| {
        s.is_empty()
            || s.split(sep)
                .all(|a| a.split_once('=').is_some_and(|(name, _)| !name.is_empty()))
    };
    attrs_ok(path, ';') && attrs_ok(query, '&')
}

/// Replace the value of any `pin-value` attribute with `REDACTED`.
fn redact_pin(uri: &str) -> String {
    let Some(start) = uri.find("pin-value=") else {
        return uri.to_owned();
    };
    let value_start = start + "pin-value=".len();
    let value_end = uri[value_start..]
        .find([';', '&', '?'])
        .map_or(uri.len(), |i| value_start + i);
    format!(
        "{}REDACTED{}",
        &uri[..value_start],
        redact_pin(&uri[value_end..])
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_local() {
        let uri: KmsUri = "local:.pgenvelope/kek".parse().unwrap();
        assert_eq!(
            uri,
            KmsUri::Local {
                path: ".pgenvelope/kek".into()
            }
        );
        assert_eq!(uri.to_string(), "local:.pgenvelope/kek");
        assert!(matches!(
            "local:".parse::<KmsUri>(),
            Err(KekError::InvalidUri { .. })
        ));
    }

    #[test]
    fn parses_aws_kms_forms() {
        for key in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            "arn:aws:kms:us-east-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-2:111122223333:alias/pgenvelope",
            "alias/pgenvelope",
            "alias/team/pg_envelope-1",
        ] {
            let uri: KmsUri = format!("aws-kms:{key}").parse().unwrap();
            assert_eq!(uri, KmsUri::AwsKms { key: key.into() }, "{key}");
        }
        for bad in [
            "aws-kms:",
            "aws-kms:alias/",
            "aws-kms:not a key",
            "aws-kms:arn:aws:s3:us-east-2:111122223333:key/x",
            "aws-kms:arn:aws:kms:us-east-2::key/x",
            "aws-kms:mrk-123",
        ] {
            assert!(bad.parse::<KmsUri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_pkcs11_and_redacts_pin() {
        let s = "pkcs11:token=hsm;object=pgenvelope-kek;pin-value=1234?module-path=/usr/lib/x.so";
        let uri: KmsUri = s.parse().unwrap();
        assert_eq!(uri.scheme(), "pkcs11");
        let shown = uri.to_string();
        assert!(!shown.contains("1234"), "{shown}");
        assert!(shown.contains("pin-value=REDACTED?module-path="), "{shown}");
        assert!(!format!("{uri:?}").contains("1234"));
        assert!("pkcs11:".parse::<KmsUri>().is_ok());
        assert!("pkcs11:token".parse::<KmsUri>().is_err());
        let err = "pkcs11:token=a;bad;pin-value=9999"
            .parse::<KmsUri>()
            .unwrap_err();
        assert!(!err.to_string().contains("9999"), "{err}");
    }

    #[test]
    fn rejects_unknown_scheme() {
        let err = "vault:secret/kek".parse::<KmsUri>().unwrap_err();
        assert!(err.to_string().contains("unknown scheme"), "{err}");
    }
}
