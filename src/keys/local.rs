//! `local:PATH` KEK: 32 random bytes in a file, for development and tests.
//!
//! Wrapped DEK layout (61 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version, `0x01` |
//! | 1 | 12 | random nonce |
//! | 13 | 48 | AES-256-GCM ciphertext of the 32-byte DEK ‖ 16-byte tag |
//!
//! AAD = `"pgenvelope/kek/v1"` ‖ organisation id (UTF-8) ‖ DEK id (16 bytes). The DEK id has a
//! fixed length and ends the AAD, so the encoding is unambiguous.
//!
//! Invariants: the key file is a regular file of exactly 32 bytes with no group or world
//! permission bits; key bytes are only held in zeroizing buffers and in the AES key schedule;
//! the [`KekProvider::kek_id`] is a fingerprint prefix, never key bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{DataKey, KEY_LEN};

use super::kek::{KekError, KekProvider, KeyContext};

/// Format version byte of a locally wrapped DEK.
const WRAP_VERSION: u8 = 0x01;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length of a locally wrapped DEK: version ‖ nonce ‖ ciphertext ‖ tag.
const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
const AAD_PREFIX: &[u8] = b"pgenvelope/kek/v1";
const FINGERPRINT_PREFIX: &[u8] = b"pgenvelope/kek-id/v1";

/// A KEK read from (or created in) a local file.
pub struct LocalKek {
    cipher: Aes256Gcm,
    id: String,
    path: PathBuf,
}

impl LocalKek {
    /// Open the key file at `path`, creating it (and its parent directories, mode 0700) with
    /// 32 random bytes and mode 0600 if it does not exist.
    ///
    /// Creation is atomic: the key is written to a temporary file and hard-linked into place,
    /// which fails rather than overwrites if another process got there first; the loser then
    /// reads the winner's key. Refuses a file of the wrong size or with any group or world
    /// permission bit. Blocking: call at start-up.
    pub fn open_or_create(path: impl AsRef<Path>) -> Result<Self, KekError> {
        let path = path.as_ref();
        if let Some(kek) = Self::open_existing(path)? {
            return Ok(kek);
        }
        if create_key_file(path)? {
            tracing::warn!(
                path = %path.display(),
                "created a new local KEK file; local keys are for development only, use a KMS \
                 or HSM in production and back this file up: without it data is unrecoverable"
            );
        }
        let file = File::open(path).map_err(|e| io_error(path, "open", e))?;
        Self::from_file(file, path)
    }

    /// Open the key file at `path` if it exists, with the same checks as
    /// [`LocalKek::open_or_create`] (regular file of exactly 32 bytes, no group or world
    /// permission bits); `Ok(None)` if there is no file. Never creates or changes anything.
    /// Blocking.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Option<Self>, KekError> {
        let path = path.as_ref();
        match File::open(path) {
            Ok(file) => Self::from_file(file, path).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(path, "open", e)),
        }
    }

    /// The key file this KEK was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn from_file(mut file: File, path: &Path) -> Result<Self, KekError> {
        let meta = file.metadata().map_err(|e| io_error(path, "stat", e))?;
        if !meta.is_file() || meta.len() != KEY_LEN as u64 {
            return Err(KekError::KeyFileInvalid {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        check_permissions(&meta, path)?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        file.read_exact(&mut key[..])
            .map_err(|e| io_error(path, "read", e))?;
        Ok(Self::from_key(&key, path))
    }

    fn from_key(key: &Zeroizing<[u8; KEY_LEN]>, path: &Path) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_PREFIX);
        hasher.update(&key[..]);
        let digest = hasher.finalize();
        let fingerprint: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            cipher: Aes256Gcm::new(key[..].into()),
            id: format!("local:{fingerprint}"),
            path: path.to_owned(),
        }
    }
}

#[async_trait]
impl KekProvider for LocalKek {
    fn kek_id(&self) -> String {
        self.id.clone()
    }

    async fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<Vec<u8>, KekError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut buf = Zeroizing::new(*key.expose_secret());
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &aad(ctx), &mut buf[..])
            // Only fails for messages longer than GCM's limit; a key is 32 bytes.
            .map_err(|_| KekError::Malformed {
                reason: "AES-GCM refused to wrap",
            })?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(WRAP_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf[..]);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    async fn unwrap(&self, ctx: &KeyContext, wrapped: &[u8]) -> Result<DataKey, KekError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(KekError::Malformed {
                reason: "wrong length for a local:v1 wrapped key",
            });
        }
        if wrapped[0] != WRAP_VERSION {
            return Err(KekError::Malformed {
                reason: "unknown local wrapped-key version",
            });
        }
        let (nonce, rest) = wrapped[1..].split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(KEY_LEN);
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        buf.copy_from_slice(ct);
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                &aad(ctx),
                &mut buf[..],
                Tag::from_slice(tag),
            )
            .map_err(|_| KekError::Rejected)?;
        DataKey::from_slice(&buf[..]).ok_or(KekError::Malformed {
            reason: "unwrapped key has the wrong length",
        })
    }
}

impl std::fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKek")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn aad(ctx: &KeyContext) -> Vec<u8> {
    let org = ctx.org.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + org.len() + 16);
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(org);
    aad.extend_from_slice(ctx.dek.as_bytes());
    aad
}

fn io_error(path: &Path, op: &'static str, source: io::Error) -> KekError {
    KekError::KeyFileIo {
        path: path.to_owned(),
        op,
        source: Arc::new(source),
    }
}

/// Create the key file if absent. Returns `false` if another process created it first.
fn create_key_file(path: &Path) -> Result<bool, KekError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    create_private_dir(dir).map_err(|e| io_error(dir, "create directory", e))?;
    let name = path
        .file_name()
        .ok_or_else(|| KekError::KeyFileInvalid {
            path: path.to_owned(),
            len: 0,
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let written = write_new_key(&tmp);
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    // Best effort: the temporary name is random and holds a key we may not use.
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error(path, "create", e)),
    }
}

fn write_new_key(tmp: &Path) -> io::Result<()> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rand::RngCore::fill_bytes(&mut OsRng, &mut key[..]);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(tmp)?;
    file.write_all(&key[..])?;
    file.sync_all()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(unix)]
fn check_permissions(meta: &fs::Metadata, path: &Path) -> Result<(), KekError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KekError::KeyFilePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_meta: &fs::Metadata, _path: &Path) -> Result<(), KekError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::crypto::{DekId, OrgId};

    fn ctx(org: &str) -> KeyContext {
        KeyContext {
            org: OrgId::new(org).unwrap(),
            dek: DekId::new_random(),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn wraps_and_unwraps_in_the_same_context() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path().join("kek")).unwrap();
        let ctx = ctx("acme");
        let key = DataKey::generate();
        let wrapped = kek.wrap(&ctx, &key).await.unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert_eq!(wrapped[0], WRAP_VERSION);
        let back = kek.unwrap(&ctx, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
        assert_ne!(
            kek.wrap(&ctx, &key).await.unwrap(),
            wrapped,
            "nonce is random"
        );
    }

    #[tokio::test]
    async fn default_generate_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path().join("kek")).unwrap();
        let ctx = ctx("acme");
        let (key, wrapped) = kek.generate(&ctx).await.unwrap();
        let back = kek.unwrap(&ctx, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
    }

    #[tokio::test]
    async fn context_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path().join("kek")).unwrap();
        let ctx = ctx("acme");
        let wrapped = kek.wrap(&ctx, &DataKey::generate()).await.unwrap();

        let other_org = KeyContext {
            org: OrgId::new("globex").unwrap(),
            ..ctx.clone()
        };
        let other_dek = KeyContext {
            dek: DekId::new_random(),
            ..ctx.clone()
        };
        for bad in [other_org, other_dek] {
            assert!(matches!(
                kek.unwrap(&bad, &wrapped).await,
                Err(KekError::Rejected)
            ));
        }
        for i in 1..wrapped.len() {
            let mut tampered = wrapped.clone();
            tampered[i] ^= 0x01;
            assert!(
                matches!(kek.unwrap(&ctx, &tampered).await, Err(KekError::Rejected)),
                "byte {i}"
            );
        }
    }

    #[tokio::test]
    async fn another_kek_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalKek::open_or_create(dir.path().join("a")).unwrap();
        let b = LocalKek::open_or_create(dir.path().join("b")).unwrap();
        assert_ne!(a.kek_id(), b.kek_id());
        let ctx = ctx("acme");
        let wrapped = a.wrap(&ctx, &DataKey::generate()).await.unwrap();
        assert!(matches!(
            b.unwrap(&ctx, &wrapped).await,
            Err(KekError::Rejected)
        ));
    }

    #[tokio::test]
    async fn malformed_wrapped_keys() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path().join("kek")).unwrap();
        let ctx = ctx("acme");
        let mut wrapped = kek.wrap(&ctx, &DataKey::generate()).await.unwrap();
        for len in [0, 1, WRAPPED_LEN - 1] {
            assert!(matches!(
                kek.unwrap(&ctx, &wrapped[..len]).await,
                Err(KekError::Malformed { .. })
            ));
        }
        wrapped[0] = 0x02;
        assert!(matches!(
            kek.unwrap(&ctx, &wrapped).await,
            Err(KekError::Malformed { .. })
        ));
    }

    #[test]
    fn creates_file_with_mode_0600_and_reopens_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/kek");
        let first = LocalKek::open_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 32);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let second = LocalKek::open_or_create(&path).unwrap();
        assert_eq!(first.kek_id(), second.kek_id());
        assert_eq!(first.path(), path);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("kek")]);
    }

    #[test]
    fn kek_id_is_a_fingerprint_not_key_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = LocalKek::open_or_create(&path).unwrap();
        let id = kek.kek_id();
        assert!(id.starts_with("local:"), "{id}");
        assert_eq!(id.len(), "local:".len() + 16);
        let bytes = fs::read(&path).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!hex.contains(&id["local:".len()..]));
        let debug = format!("{kek:?}");
        assert!(!debug.contains(&hex[..16]), "{debug}");
    }

    #[test]
    fn concurrent_creation_yields_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| LocalKek::open_or_create(&path).unwrap().kek_id()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_group_or_world_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        LocalKek::open_or_create(&path).unwrap();
        for bad in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = LocalKek::open_or_create(&path).unwrap_err();
            assert!(
                matches!(err, KekError::KeyFilePermissions { mode, .. } if mode == bad),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        LocalKek::open_or_create(&path).unwrap();
    }

    #[test]
    fn refuses_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 16, 31, 33, 64] {
            let path = dir.path().join(format!("kek-{len}"));
            fs::write(&path, vec![7u8; len]).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = LocalKek::open_or_create(&path).unwrap_err();
            assert!(
                matches!(err, KekError::KeyFileInvalid { len: l, .. } if l == len as u64),
                "{err}"
            );
            assert!(err.to_string().contains(&path.display().to_string()));
        }
    }

    #[test]
    fn open_existing_never_creates_and_checks_like_open_or_create() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/kek");
        assert!(LocalKek::open_existing(&path).unwrap().is_none());
        assert!(!path.exists());
        assert!(!path.parent().unwrap().exists());

        let created = LocalKek::open_or_create(&path).unwrap();
        let opened = LocalKek::open_existing(&path).unwrap().unwrap();
        assert_eq!(created.kek_id(), opened.kek_id());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            LocalKek::open_existing(&path),
            Err(KekError::KeyFilePermissions { mode: 0o640, .. })
        ));
        fs::write(&path, [1u8; 31]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            LocalKek::open_existing(&path),
            Err(KekError::KeyFileInvalid { len: 31, .. })
        ));
    }

    #[test]
    fn refuses_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalKek::open_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, KekError::KeyFileInvalid { .. }), "{err}");
    }
}
