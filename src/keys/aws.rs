//! `aws-kms:KEY_ID|ARN|alias/NAME` KEK: data keys generated and unwrapped by AWS KMS (or a
//! KMS-compatible server reached through `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_KMS`).
//!
//! - New DEKs come from `GenerateDataKey` (`KeySpec=AES_256`); the `CiphertextBlob` is the
//!   wrapped form stored in the key store. `Decrypt` unwraps (with `KeyId` set, so a blob made
//!   under another key is refused by KMS), `Encrypt` wraps an existing key, and `ReEncrypt`
//!   moves a wrapped DEK to another KMS key without the plaintext leaving KMS (`keys rewrap`).
//! - Every call carries the encryption context `{"pgenvelope:org": ORG, "pgenvelope:dek":
//!   DEK}`. KMS binds it into the ciphertext, so a wrapped DEK copied into another
//!   organisation's row fails to decrypt, and IAM policies can condition on it.
//! - Every call is bounded: a connect timeout, a per-attempt timeout and an overall operation
//!   timeout, with the SDK's standard retry mode (exponential backoff with jitter, throttling
//!   and transient errors only). Calls share no lock: one organisation's slow call never
//!   waits behind another's.
//!
//! Errors are classified for the caller: unreachable, timed out, throttled or a KMS internal
//! error is [`KekError::Unavailable`] (retried by the next request); a refused ciphertext or
//! context, or denied access, is [`KekError::Rejected`]; a disabled, pending-deletion or
//! missing key is [`KekError::KeyUnusable`], which the SDK does not retry.
//!
//! Never logs or formats key material: plaintext keys we hold pass through zeroizing buffers
//! only (the SDK's own request and response buffers, which carry the key base64-encoded over
//! TLS, are outside our control), and error messages are built from the KMS error code and
//! message, never from request or response bodies.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_sdk_kms::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use zeroize::Zeroizing;

use crate::crypto::{DataKey, KEY_LEN};

use super::kek::{KekError, KekProvider, KeyContext};

/// Encryption-context key naming the organisation that owns a DEK.
pub const CONTEXT_ORG: &str = "pgenvelope:org";
/// Encryption-context key naming the DEK id.
pub const CONTEXT_DEK: &str = "pgenvelope:dek";

/// Time allowed to open a TCP/TLS connection to KMS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for one attempt (request sent to response read).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one operation including its retries.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(8);
/// Attempts per operation (the first plus retries).
const MAX_ATTEMPTS: u32 = 3;
/// First retry delay; later ones back off exponentially, with jitter.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// A KEK held in AWS KMS. Cheap to share; calls run concurrently without a common lock.
pub struct AwsKmsKek {
    client: Client,
    key: String,
}

impl AwsKmsKek {
    /// Load the standard AWS configuration chain (environment, shared config and credential
    /// files, web identity / STS for Kubernetes service accounts, ECS and EC2 instance
    /// metadata; `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_KMS`) and use KMS key `key`
    /// (key id, key ARN, alias ARN or `alias/NAME`).
    ///
    /// Makes no KMS call: a wrong key or missing permission shows on first use.
    pub async fn from_env(key: impl Into<String>) -> Result<Self, KekError> {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https_client())
            .timeout_config(timeout_config())
            .retry_config(retry_config())
            .load()
            .await;
        Self::from_sdk_config(&config, key)
    }

    /// Use KMS key `key` with an explicit SDK configuration (region, credentials, endpoint).
    ///
    /// The provider's own timeouts and retry settings replace those in `config`; an HTTPS
    /// client (rustls) is added if `config` has none.
    pub fn from_sdk_config(config: &SdkConfig, key: impl Into<String>) -> Result<Self, KekError> {
        let key = key.into();
        if config.region().is_none() {
            return Err(KekError::Misconfigured {
                kek: format!("aws-kms:{key}"),
                reason: "no AWS region configured (set AWS_REGION or a profile region)",
            });
        }
        let mut builder = aws_sdk_kms::config::Builder::from(config)
            .timeout_config(timeout_config())
            .retry_config(retry_config());
        if config.http_client().is_none() {
            builder = builder.http_client(https_client());
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            key,
        })
    }

    /// The key reference as configured.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn fail<E, R>(&self, op: &'static str, err: SdkError<E, R>) -> KekError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: fmt::Debug,
    {
        classify(self.kek_id(), op, err)
    }
}

#[async_trait]
impl KekProvider for AwsKmsKek {
    fn kek_id(&self) -> String {
        format!("aws-kms:{}", self.key)
    }

    async fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, Vec<u8>), KekError> {
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.key)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(encryption_context(ctx)))
            .send()
            .await
            .map_err(|e| self.fail("GenerateDataKey", e))?;
        let plaintext = out.plaintext.map(|b| Zeroizing::new(b.into_inner()));
        let key = data_key(plaintext.as_deref().map(Vec::as_slice))?;
        let wrapped = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .filter(|b| !b.is_empty())
            .ok_or(KekError::Malformed {
                reason: "KMS returned no CiphertextBlob",
            })?;
        Ok((key, wrapped))
    }

    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
        let out = self
            .client
            .encrypt()
            .key_id(&self.key)
            .plaintext(Blob::new(key.expose_secret().to_vec()))
            .set_encryption_context(Some(encryption_context(ctx)))
            .send()
            .await
            .map_err(|e| self.fail("Encrypt", e))?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .filter(|b| !b.is_empty())
            .ok_or(KekError::Malformed {
                reason: "KMS returned no CiphertextBlob",
            })
    }

    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
        if wrapped.is_empty() {
            return Err(KekError::Malformed {
                reason: "empty wrapped key",
            });
        }
        let out = self
            .client
            .decrypt()
            .key_id(&self.key)
            .ciphertext_blob(Blob::new(wrapped))
            .set_encryption_context(Some(encryption_context(ctx)))
            .send()
            .await
            .map_err(|e| self.fail("Decrypt", e))?;
        let plaintext = out.plaintext.map(|b| Zeroizing::new(b.into_inner()));
        data_key(plaintext.as_deref().map(Vec::as_slice))
    }

    async fn rewrap_to(
        &self,
        ctx: &KeyContext,
        wrapped: &[u8],
        to: &dyn KekProvider,
    ) -> Option<Result<Vec<u8>, KekError>> {
        let destination = to.aws_kms_key()?;
        let context = encryption_context(ctx);
        let result = self
            .client
            .re_encrypt()
            .source_key_id(&self.key)
            .ciphertext_blob(Blob::new(wrapped))
            .set_source_encryption_context(Some(context.clone()))
            .destination_key_id(destination)
            .set_destination_encryption_context(Some(context))
            .send()
            .await
            .map_err(|e| self.fail("ReEncrypt", e))
            .and_then(|out| {
                out.ciphertext_blob
                    .map(Blob::into_inner)
                    .filter(|b| !b.is_empty())
                    .ok_or(KekError::Malformed {
                        reason: "KMS returned no CiphertextBlob",
                    })
            });
        Some(result)
    }

    fn aws_kms_key(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

/// A failed KMS call, described by operation, KMS error code and message only (never request
/// or response bodies, which may hold key material).
#[derive(Debug, Clone, thiserror::Error)]
#[error("KMS {op} failed{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
pub struct KmsCallError {
    /// The KMS operation, e.g. `Decrypt`.
    pub op: &'static str,
    /// The KMS error code, e.g. `ThrottlingException`, when KMS answered.
    pub code: Option<String>,
    /// What went wrong.
    pub message: String,
}

/// The HTTPS client for KMS and the credential providers: hyper with rustls and ring.
fn https_client() -> aws_sdk_kms::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

fn retry_config() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(INITIAL_BACKOFF)
}

fn encryption_context(ctx: &KeyContext) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([
        (CONTEXT_ORG.to_owned(), ctx.org.as_str().to_owned()),
        (CONTEXT_DEK.to_owned(), ctx.dek.to_string()),
    ])
}

fn data_key(plaintext: Option<&[u8]>) -> Result<DataKey, KekError> {
    let plaintext = plaintext.ok_or(KekError::Malformed {
        reason: "KMS returned no plaintext key",
    })?;
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    if plaintext.len() != KEY_LEN {
        return Err(KekError::Malformed {
            reason: "KMS returned a plaintext key that is not 32 bytes",
        });
    }
    bytes.copy_from_slice(plaintext);
    Ok(DataKey::from_bytes(*bytes))
}

/// KMS error codes meaning the key itself cannot be used until an operator acts. Transient
/// codes (`ThrottlingException`, `KeyUnavailableException`, `KMSInternalException`,
/// `DependencyTimeoutException`) and unknown ones count as unavailable.
const UNUSABLE_CODES: &[&str] = &[
    "DisabledException",
    "KMSInvalidStateException",
    "NotFoundException",
];
/// KMS error codes meaning this request was refused (wrong ciphertext, key, context or
/// permissions).
const REJECTED_CODES: &[&str] = &[
    "AccessDeniedException",
    "InvalidCiphertextException",
    "IncorrectKeyException",
    "InvalidKeyUsageException",
    "InvalidGrantTokenException",
];

fn classify<E, R>(kek: String, op: &'static str, err: SdkError<E, R>) -> KekError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: fmt::Debug,
{
    let call = |code: Option<String>, message: String| Arc::new(KmsCallError { op, code, message });
    match err {
        SdkError::ServiceError(service) => {
            let service = service.into_err();
            let code = service.code().map(str::to_owned);
            let message = service.message().unwrap_or("no message").to_owned();
            match code.as_deref() {
                Some(c) if UNUSABLE_CODES.contains(&c) => KekError::KeyUnusable {
                    kek,
                    source: call(code, message),
                },
                Some(c) if REJECTED_CODES.contains(&c) => {
                    tracing::debug!(kek = %kek, op, code = c, "KMS refused the request");
                    KekError::Rejected
                }
                _ => KekError::Unavailable {
                    kek,
                    source: call(code, message),
                },
            }
        }
        SdkError::TimeoutError(_) => KekError::Unavailable {
            kek,
            source: call(None, "timed out".to_owned()),
        },
        SdkError::DispatchFailure(failure) => {
            let message = match failure.as_connector_error() {
                Some(c) if c.is_timeout() => "connection timed out".to_owned(),
                Some(c) if c.is_io() => format!("connection failed: {c}"),
                _ => "request could not be sent".to_owned(),
            };
            KekError::Unavailable {
                kek,
                source: call(None, message),
            }
        }
        SdkError::ResponseError(_) => KekError::Unavailable {
            kek,
            source: call(None, "unreadable response".to_owned()),
        },
        SdkError::ConstructionFailure(_) => KekError::Unavailable {
            kek,
            source: call(
                None,
                "request could not be built (configuration?)".to_owned(),
            ),
        },
        _ => KekError::Unavailable {
            kek,
            source: call(None, "unknown SDK error".to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::{DekId, OrgId};

    fn ctx(org: &str) -> KeyContext {
        KeyContext {
            org: OrgId::new(org.to_owned()).unwrap(),
            dek: DekId(uuid::Uuid::new_v4()),
        }
    }

    #[test]
    fn context_names_org_and_dek() {
        let c = ctx("acme");
        let map = encryption_context(&c);
        assert_eq!(map.len(), 2);
        assert_eq!(map[CONTEXT_ORG], "acme");
        assert_eq!(map[CONTEXT_DEK], c.dek.to_string());
    }

    #[test]
    fn plaintext_must_be_32_bytes() {
        assert!(data_key(Some(&[7u8; 32])).is_ok());
        for bad in [None, Some(&[0u8; 16][..]), Some(&[0u8; 33][..])] {
            assert!(matches!(data_key(bad), Err(KekError::Malformed { .. })));
        }
    }

    #[tokio::test]
    async fn unreachable_kms_is_unavailable_within_the_timeouts() {
        // A port nothing listens on: connection refused, retried, then Unavailable.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let config = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(
                aws_sdk_kms::config::Credentials::new("test", "test", None, None, "test"),
            ))
            .build();
        let kek = AwsKmsKek::from_sdk_config(&config, "alias/missing").unwrap();
        assert_eq!(kek.kek_id(), "aws-kms:alias/missing");
        let started = std::time::Instant::now();
        let err = kek.generate(&ctx("acme")).await.err().unwrap();
        assert!(matches!(err, KekError::Unavailable { .. }), "{err}");
        assert!(started.elapsed() < OPERATION_TIMEOUT + Duration::from_secs(2));
    }

    fn service_error(code: &str) -> KekError {
        let meta = aws_sdk_kms::error::ErrorMetadata::builder()
            .code(code)
            .message("from KMS")
            .build();
        let err = aws_sdk_kms::operation::decrypt::DecryptError::generic(meta);
        let response = aws_sdk_kms::config::http::HttpResponse::new(
            400.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        );
        classify(
            "aws-kms:alias/x".to_owned(),
            "Decrypt",
            SdkError::service_error(err, response),
        )
    }

    #[test]
    fn kms_error_codes_are_classified() {
        for code in [
            "DisabledException",
            "KMSInvalidStateException",
            "NotFoundException",
        ] {
            let err = service_error(code);
            assert!(matches!(err, KekError::KeyUnusable { .. }), "{code}: {err}");
            let source = std::error::Error::source(&err).unwrap().to_string();
            assert!(source.contains(code), "{source}");
        }
        for code in [
            "AccessDeniedException",
            "InvalidCiphertextException",
            "IncorrectKeyException",
        ] {
            assert!(matches!(service_error(code), KekError::Rejected), "{code}");
        }
        for code in [
            "ThrottlingException",
            "KeyUnavailableException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "SomethingNew",
        ] {
            let err = service_error(code);
            assert!(matches!(err, KekError::Unavailable { .. }), "{code}: {err}");
        }
    }

    #[test]
    fn no_region_is_a_configuration_error() {
        let config = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .build();
        let err = AwsKmsKek::from_sdk_config(&config, "alias/x")
            .err()
            .unwrap();
        assert!(err.to_string().contains("aws-kms:alias/x"), "{err}");
    }
}
