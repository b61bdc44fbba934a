//! Sealing and opening single values for a column, an organisation and (with row binding) a
//! row: the one place that turns keys and rules into `enc:v1` values and back. Used by the
//! proxy, `reencrypt` and `inspect`.
//!
//! ```text
//!   Cipher ── keys at hand (KeyRing) ──▶ seal / classify / open     synchronous
//!      │            ▲
//!      │ Missing(KeyNeed)                                            the caller fetches and
//!      └──────▶ fetch(need).await ── KeyManager (cache, store, KEK)   runs the operation again
//! ```
//!
//! Every operation is synchronous and uses only the keys already at hand. When a key is not
//! (or is no longer fresh), the operation fails with [`CipherError::Missing`] naming it; the
//! caller fetches it with [`Cipher::fetch`] and runs the operation again. The proxy's protocol
//! core works this way without an async runtime; callers that may simply wait use
//! [`Cipher::with_keys`]. A failed fetch is remembered and reported by the next attempt, so key
//! errors reach the client through the same path as every other refusal.
//!
//! Counting: what a connection seals, opens and refuses is tallied locally and added to the
//! shared [`CipherMetrics`] by [`Cipher::commit`], so an attempt abandoned for a missing key
//! (and run again) is not counted twice; [`Cipher::abandon`] drops the tally. Encryptions are
//! always noted against their DEK at once (each consumed a random nonce).
//!
//! Never logs values, plaintext, keys or ciphertext; errors name columns only. Decrypted
//! plaintext is handed out in [`Zeroizing`] buffers.

mod error;
mod metrics;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use zeroize::Zeroizing;

pub use error::{CipherError, KeyNeed};
pub use metrics::{CipherMetrics, ReasonCounts, DECRYPT_FAILURE_REASONS};

use crate::crypto::{
    looks_like_enc_v1, ColumnId, ColumnKey, DekId, EncV1, NonceSource, OrgId, SearchMode,
    SearchTerm, TermKey,
};
use crate::keys::{CachedDek, KeyError, KeyManager};
use crate::rules::{ColumnRule, RuleSet};

/// What reading a value whose DEK was destroyed (`keys shred`) gives the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShreddedReads {
    /// An error, SQLSTATE XX001 "uses a destroyed data key" (the default).
    #[default]
    Error,
    /// NULL, in query results and `COPY … TO` alike (counted as decrypt failures with
    /// reason `shredded`). Writes of such values are still refused.
    Null,
}

/// How values are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CipherPolicy {
    /// Plaintext found in an encrypted column is an error (XX001) instead of passing through.
    pub strict_reads: bool,
    /// What a value under a destroyed DEK reads as.
    pub shredded_reads: ShreddedReads,
}

/// A decrypted value.
pub struct Opened {
    /// Plaintext (UTF-8 as encrypted), wiped when dropped.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The organisation that owns the value.
    pub org: OrgId,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opened({} bytes of {})", self.plaintext.len(), self.org)
    }
}

/// What reading one value of a column found.
#[derive(Debug)]
pub enum ReadOutcome {
    /// An enc:v1 value, decrypted.
    Opened(Opened),
    /// Not an enc:v1 value: passed through unchanged.
    Plain,
    /// An enc:v1 value under a destroyed DEK, with the `null` shredded-reads policy.
    Shredded,
}

/// What a write found in a value it gives for an encrypted column that already is an enc:v1
/// value of that column (a restore of an encrypted dump, a re-run): see
/// [`Cipher::open_restored`].
#[derive(Debug)]
pub enum Restored {
    /// Valid for the row it is written to: stored unchanged.
    AsIs(Opened),
    /// Valid, but sealed before its table's values were bound to their rows (the table's
    /// `row_key` was added since), or whose search term is not its column's current one (the
    /// column became searchable or stopped being so, or its search key was rotated): its
    /// plaintext is sealed again, bound to the row written.
    Rebind(Opened),
}

/// What a value is, before any key is used.
pub enum Classified {
    /// Not an enc:v1 value of a known column: pass through.
    Plain,
    /// An enc:v1 value; `column` is `None` when it is the column the caller expected.
    Sealed {
        /// The parsed value.
        parsed: EncV1,
        /// Its column, when it was found from the value's header.
        column: Option<Box<ColumnRule>>,
    },
}

/// A DEK looked up by id, as far as the keys at hand tell.
pub enum ById {
    /// The key, fresh.
    Key(Arc<CachedDek>),
    /// Destroyed, under the `null` shredded-reads policy.
    Shredded,
}

/// Keys fetched by this cipher, with their derived per-column subkeys.
///
/// Invariant: an entry is used only while the key manager says it is still fresh (not past
/// its TTL, not revoked by a rotation, shred or key change notification).
#[derive(Default)]
struct KeyRing {
    active: HashMap<OrgId, Arc<CachedDek>>,
    by_id: HashMap<DekId, Arc<CachedDek>, rustc_hash::FxBuildHasher>,
    /// DEKs found destroyed while the policy reads their values as NULL.
    shredded: HashSet<DekId, rustc_hash::FxBuildHasher>,
    /// Fetches that failed, reported (once) by the next attempt that needs the key.
    failed: HashMap<KeyNeed, KeyError>,
    /// Active search keys by organisation.
    search: HashMap<OrgId, Arc<CachedDek>>,
    /// Derived term keys, per (search key, column), valid while the cached search key they
    /// came from is the same allocation.
    term_keys: TermKeyMap,
    /// Derived subkeys, valid while the cached DEK they came from is the same allocation.
    /// Keys are ids of DEKs that exist in the key store (random, not chosen by clients), so a
    /// fast non-keyed hash is safe.
    subkeys: SubkeyMap,
}

/// Counts of one attempt, added to the shared metrics when it completes.
#[derive(Default)]
struct Tally {
    encrypted: u64,
    decrypted: u64,
    plaintext_reads: u64,
    failures: Vec<&'static str>,
}

/// Seals and opens values for one connection (or one `reencrypt` run): holds the nonce
/// generator, the keys at hand and the derived per-column keys.
pub struct Cipher {
    keys: Arc<KeyManager>,
    policy: CipherPolicy,
    metrics: Arc<CipherMetrics>,
    nonces: NonceSource,
    ring: KeyRing,
    tally: Tally,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cipher({} keys at hand)", self.ring.by_id.len())
    }
}

/// Bounds on what one cipher keeps at hand (a connection reading rows of many organisations).
const MAX_KEYS_AT_HAND: usize = 4096;

impl Cipher {
    /// A cipher drawing keys from `keys`.
    pub fn new(keys: Arc<KeyManager>, policy: CipherPolicy, metrics: Arc<CipherMetrics>) -> Self {
        Self {
            keys,
            policy,
            metrics,
            nonces: NonceSource::from_os_rng(),
            ring: KeyRing::default(),
            tally: Tally::default(),
        }
    }

    /// The key manager keys are fetched from.
    pub fn keys(&self) -> &Arc<KeyManager> {
        &self.keys
    }

    /// The read policy.
    pub fn policy(&self) -> CipherPolicy {
        self.policy
    }

    /// Add what was counted since the last commit to the shared metrics.
    pub fn commit(&mut self) {
        let t = std::mem::take(&mut self.tally);
        self.metrics
            .add(t.encrypted, t.decrypted, t.plaintext_reads, &t.failures);
    }

    /// Drop what was counted since the last commit (the attempt will be run again).
    pub fn abandon(&mut self) {
        self.tally = Tally::default();
    }

    /// Count a read failure found outside the cipher (a value in another organisation's row).
    pub fn count_failure(&mut self, reason: &'static str) {
        self.tally.failures.push(reason);
    }

    /// Fetch a key an operation reported missing. Never fails: a failure is kept and reported
    /// by the next attempt that needs the key (as a [`CipherError::Key`]).
    pub async fn fetch(&mut self, need: &KeyNeed) {
        if self.ring.by_id.len() >= MAX_KEYS_AT_HAND {
            self.ring.by_id.clear();
            self.ring.active.clear();
            self.ring.subkeys.clear();
            self.ring.search.clear();
            self.ring.term_keys.clear();
        }
        // Boxed: the key manager's futures (cache, key store, KMS) are large, and a session's
        // future would otherwise carry their size even while idle.
        match need {
            KeyNeed::Active(org) => match Box::pin(self.keys.active_key(org)).await {
                Ok(dek) => {
                    self.ring.by_id.insert(dek.dek_id(), Arc::clone(&dek));
                    self.ring.active.insert(org.clone(), dek);
                }
                Err(e) => {
                    self.ring.failed.insert(need.clone(), e);
                }
            },
            KeyNeed::ById(id) => match Box::pin(self.keys.key_by_id(*id)).await {
                Ok(dek) => {
                    self.ring.by_id.insert(*id, dek);
                }
                Err(KeyError::DestroyedDek(_))
                    if self.policy.shredded_reads == ShreddedReads::Null =>
                {
                    self.ring.shredded.insert(*id);
                }
                Err(e) => {
                    self.ring.failed.insert(need.clone(), e);
                }
            },
            KeyNeed::Search(org) => match Box::pin(self.keys.search_key(org)).await {
                Ok(key) => {
                    self.ring.search.insert(org.clone(), key);
                }
                Err(e) => {
                    self.ring.failed.insert(need.clone(), e);
                }
            },
        }
    }

    /// Put a key at hand as a fetch would (unit tests without a key store): as `org`'s active
    /// key when `active`, and by its id.
    #[cfg(test)]
    pub(crate) fn insert_for_tests(&mut self, dek: Arc<CachedDek>, active: bool) {
        if active {
            self.ring.active.insert(dek.org().clone(), Arc::clone(&dek));
        }
        self.ring.by_id.insert(dek.dek_id(), dek);
    }

    /// Put a search key at hand as a fetch would (unit tests without a key store).
    #[cfg(test)]
    pub(crate) fn insert_search_for_tests(&mut self, key: Arc<CachedDek>) {
        self.ring.search.insert(key.org().clone(), key);
    }

    /// Record a failed fetch as [`Cipher::fetch`] would (unit tests without a key store).
    #[cfg(test)]
    pub(crate) fn fail_for_tests(&mut self, need: KeyNeed, error: KeyError) {
        self.ring.failed.insert(need, error);
    }

    /// Run `op` until it no longer reports a missing key, fetching each one it names (at most
    /// a few rounds: an operation needs a handful of keys).
    pub async fn with_keys<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, CipherError>,
    ) -> Result<T, CipherError> {
        for _ in 0..8 {
            match op(self) {
                Err(CipherError::Missing(need)) => {
                    self.abandon();
                    self.fetch(&need).await;
                }
                done => return done,
            }
        }
        op(self)
    }

    /// The active DEK of `org`, at hand and fresh.
    pub fn active(
        &mut self,
        org: &OrgId,
        column: &ColumnRule,
    ) -> Result<Arc<CachedDek>, CipherError> {
        let need = KeyNeed::Active(org.clone());
        if let Some(e) = self.ring.failed.remove(&need) {
            return Err(key_error(column, e));
        }
        match self.ring.active.get(org) {
            Some(dek) if self.keys.still_fresh(dek) => Ok(Arc::clone(dek)),
            _ => Err(CipherError::Missing(need)),
        }
    }

    /// The DEK `id`, at hand and fresh, to open a value of `column`.
    pub fn by_id(&mut self, id: DekId, column: &ColumnRule) -> Result<ById, CipherError> {
        let need = KeyNeed::ById(id);
        if let Some(e) = self.ring.failed.remove(&need) {
            self.tally.failures.push("key_unavailable");
            return Err(key_error(column, e));
        }
        if self.ring.shredded.contains(&id) {
            self.tally.failures.push("shredded");
            return Ok(ById::Shredded);
        }
        match self.ring.by_id.get(&id) {
            Some(dek) if self.keys.still_fresh(dek) => Ok(ById::Key(Arc::clone(dek))),
            _ => Err(CipherError::Missing(need)),
        }
    }

    /// Seal `plaintext` (UTF-8) for `column` under `org`'s active DEK. `row_key`: the key of
    /// the row the value is written to, as PostgreSQL prints it; needed (and only used) when
    /// the column's table binds values to their row.
    pub fn seal(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
        row_key: Option<&[u8]>,
        plaintext: &[u8],
    ) -> Result<String, CipherError> {
        let dek = self.active(org, column)?;
        self.seal_with(&dek, column, org, row_key, plaintext)
    }

    /// The search term of `plaintext` in searchable `column` for `org`, under the
    /// organisation's active search key. `None` when the column is not searchable.
    pub fn term(
        &mut self,
        column: &ColumnRule,
        org: &OrgId,
        plaintext: &[u8],
    ) -> Result<Option<SearchTerm>, CipherError> {
        let Some(mode) = column.search() else {
            return Ok(None);
        };
        let need = KeyNeed::Search(org.clone());
        if let Some(e) = self.ring.failed.remove(&need) {
            return Err(key_error(column, e));
        }
        let key = match self.ring.search.get(org) {
            Some(key) if self.keys.still_fresh(key) => Arc::clone(key),
            _ => return Err(CipherError::Missing(need)),
        };
        Ok(Some(
            term_key(&mut self.ring.term_keys, &key, column.id(), mode).term(plaintext),
        ))
    }

    /// Seal with a DEK already at hand.
    pub fn seal_with(
        &mut self,
        dek: &Arc<CachedDek>,
        column: &ColumnRule,
        org: &OrgId,
        row_key: Option<&[u8]>,
        plaintext: &[u8],
    ) -> Result<String, CipherError> {
        let term = self.term(column, org, plaintext)?;
        let key = subkey(&mut self.ring.subkeys, dek, column.id());
        let mut out = String::new();
        let sealed = match (column.row_key(), row_key) {
            (None, _) => match &term {
                Some(term) => {
                    key.seal_searchable_into(org, None, term, plaintext, &mut self.nonces, &mut out)
                }
                None => key.seal_into(org, plaintext, &mut self.nonces, &mut out),
            },
            (Some(k), None) => {
                return Err(CipherError::RowKeyNotGiven {
                    column: column.qualified_name().to_owned(),
                    key: k.to_owned(),
                })
            }
            (Some(_), Some(row)) => match &term {
                Some(term) => key.seal_searchable_into(
                    org,
                    Some(row),
                    term,
                    plaintext,
                    &mut self.nonces,
                    &mut out,
                ),
                None => key.seal_for_row_into(org, row, plaintext, &mut self.nonces, &mut out),
            },
        };
        sealed.map_err(|_| CipherError::TooLarge {
            column: column.qualified_name().to_owned(),
        })?;
        self.keys.note_encryptions(dek.dek_id(), 1);
        self.tally.encrypted += 1;
        Ok(out)
    }

    /// Classify a value read from a column whose origin is known (`expected`), or from a
    /// column with no origin (`None`: only values whose header names a column of `rules` are
    /// enc:v1 values). Counts plaintext found in an encrypted column; refuses it under strict
    /// reads. Uses no key.
    pub fn classify(
        &mut self,
        rules: &RuleSet,
        expected: Option<&ColumnRule>,
        value: &[u8],
    ) -> Result<Classified, CipherError> {
        if !looks_like_enc_v1(value) {
            if let Some(col) = expected {
                if self.policy.strict_reads {
                    self.tally.failures.push("not_encrypted");
                    return Err(CipherError::NotEncrypted {
                        column: col.qualified_name().to_owned(),
                    });
                }
                self.tally.plaintext_reads += 1;
            }
            return Ok(Classified::Plain);
        }
        let parsed = match EncV1::parse(value) {
            Ok(p) => p,
            // Text that merely starts like an enc:v1 value in a column we know nothing about
            // is not ours.
            Err(_) if expected.is_none() => return Ok(Classified::Plain),
            Err(_) => {
                self.tally.failures.push("malformed");
                return Err(CipherError::Malformed {
                    column: expected.map(|c| c.qualified_name().to_owned()),
                });
            }
        };
        let column = match expected {
            Some(col) if parsed.column_id() != col.id() => {
                self.tally.failures.push("wrong_column");
                return Err(CipherError::WrongColumn {
                    column: col.qualified_name().to_owned(),
                });
            }
            Some(_) => None,
            None => match rules.by_column_id(parsed.column_id()) {
                Some(col) => Some(Box::new(col.clone())),
                None => return Ok(Classified::Plain),
            },
        };
        Ok(Classified::Sealed { parsed, column })
    }

    /// Read one value: classify it, fetch its DEK from the keys at hand, open it.
    ///
    /// `tenant`: the session tenant; a value of another organisation is refused (42501).
    /// `row_key`: the key of the row the value was read from, when known (row binding).
    pub fn read(
        &mut self,
        rules: &RuleSet,
        expected: Option<&ColumnRule>,
        value: &[u8],
        tenant: Option<&OrgId>,
        row_key: Option<&[u8]>,
    ) -> Result<ReadOutcome, CipherError> {
        let (parsed, found) = match self.classify(rules, expected, value)? {
            Classified::Plain => return Ok(ReadOutcome::Plain),
            Classified::Sealed { parsed, column } => (parsed, column),
        };
        let Some(column) = found.as_deref().or(expected) else {
            return Ok(ReadOutcome::Plain);
        };
        let dek = match self.by_id(parsed.dek_id(), column)? {
            ById::Key(dek) => dek,
            ById::Shredded => return Ok(ReadOutcome::Shredded),
        };
        self.open_with(&dek, parsed, column, tenant, row_key)
            .map(ReadOutcome::Opened)
    }

    /// Open `parsed` with its fetched DEK.
    ///
    /// Row binding: a value of a column whose table has a `row_key` must be bound to its row
    /// and opens only with `row_key`, the key of the row it was read from; without one it is
    /// refused (0A000: read the key column too). A bound value in a column without a row key,
    /// or an unbound one in a column with one, is refused (XX001).
    pub fn open_with(
        &mut self,
        dek: &Arc<CachedDek>,
        parsed: EncV1,
        column: &ColumnRule,
        tenant: Option<&OrgId>,
        row_key: Option<&[u8]>,
    ) -> Result<Opened, CipherError> {
        self.check_binding(&parsed, column, row_key)?;
        if let Some(t) = tenant {
            if dek.org() != t {
                self.tally.failures.push("other_tenant");
                return Err(CipherError::OtherTenant {
                    column: column.qualified_name().to_owned(),
                });
            }
        }
        let org = dek.org().clone();
        let opened = subkey(&mut self.ring.subkeys, dek, column.id())
            .open_owned_in_row(&org, row_key, parsed);
        match opened {
            Ok(plaintext) => {
                self.tally.decrypted += 1;
                Ok(Opened {
                    plaintext: Zeroizing::new(plaintext),
                    org,
                })
            }
            Err(_) => {
                self.tally.failures.push("authentication");
                Err(CipherError::Authentication {
                    column: column.qualified_name().to_owned(),
                })
            }
        }
    }

    /// Open `parsed` with its DEK as it is stored: bound to `row_key` if the value is bound,
    /// without any check of the rules' binding or a session tenant (for `reencrypt`, which
    /// decides itself what to do with a value not bound as the rules say).
    pub fn open_as_stored(
        &mut self,
        dek: &Arc<CachedDek>,
        parsed: EncV1,
        column: &ColumnRule,
        row_key: Option<&[u8]>,
    ) -> Result<Opened, CipherError> {
        let org = dek.org().clone();
        let opened = subkey(&mut self.ring.subkeys, dek, column.id())
            .open_owned_in_row(&org, row_key, parsed);
        match opened {
            Ok(plaintext) => {
                self.tally.decrypted += 1;
                Ok(Opened {
                    plaintext: Zeroizing::new(plaintext),
                    org,
                })
            }
            Err(_) => Err(CipherError::Authentication {
                column: column.qualified_name().to_owned(),
            }),
        }
    }

    /// Open `parsed`, an enc:v1 value of `column` that a write gives for the row with key
    /// `row_key` (a restore of an encrypted dump, a re-run); `Ok(None)` when it fails
    /// authentication (not a value of ours: data like any other, to be encrypted). The binding
    /// is checked as by [`Cipher::open_with`], except that an unbound value written before the
    /// table's `row_key` was added opens without a row key and comes back as
    /// [`Restored::Rebind`], to be sealed again for its new row as `reencrypt` would. The
    /// caller checks the organisation.
    pub fn open_restored(
        &mut self,
        dek: &Arc<CachedDek>,
        parsed: EncV1,
        column: &ColumnRule,
        row_key: Option<&[u8]>,
    ) -> Result<Option<Restored>, CipherError> {
        let rebind = column.row_key().is_some() && !parsed.is_row_bound();
        let row_key = if rebind {
            None
        } else {
            self.check_binding(&parsed, column, row_key)?;
            row_key
        };
        let org = dek.org().clone();
        let stored_term = parsed.search_term();
        let opened = subkey(&mut self.ring.subkeys, dek, column.id())
            .open_owned_in_row(&org, row_key, parsed);
        let Ok(plaintext) = opened else {
            return Ok(None);
        };
        // A searchable column's value must carry the current term of its plaintext (and an
        // unsearchable one none), or look-ups would miss it: otherwise it is sealed again.
        let rebind = rebind || self.term(column, &org, &plaintext)? != stored_term;
        self.tally.decrypted += 1;
        let opened = Opened {
            plaintext: Zeroizing::new(plaintext),
            org,
        };
        Ok(Some(if rebind {
            Restored::Rebind(opened)
        } else {
            Restored::AsIs(opened)
        }))
    }

    /// Whether `parsed` is bound as its column's rules say: bound to a row (and then opened
    /// with the key of the row it was read from) exactly when the table has a `row_key`.
    fn check_binding(
        &mut self,
        parsed: &EncV1,
        column: &ColumnRule,
        row_key: Option<&[u8]>,
    ) -> Result<(), CipherError> {
        let name = || column.qualified_name().to_owned();
        match (column.row_key(), parsed.is_row_bound(), row_key) {
            (Some(_), true, Some(_)) | (None, false, _) => Ok(()),
            (Some(k), true, None) => Err(CipherError::RowKeyNotRead {
                column: name(),
                key: k.to_owned(),
            }),
            (Some(_), false, _) => {
                self.tally.failures.push("wrong_row");
                Err(CipherError::NotRowBound { column: name() })
            }
            (None, true, _) => {
                self.tally.failures.push("wrong_row");
                Err(CipherError::BoundWithoutRowKey { column: name() })
            }
        }
    }
}

/// What an enc:v1 value says about itself, without any key.
#[derive(Debug, Clone)]
pub struct Header {
    /// The algorithm byte.
    pub algorithm: crate::crypto::Algorithm,
    /// The DEK that sealed it.
    pub dek_id: DekId,
    /// The column it was sealed for.
    pub column_id: ColumnId,
    /// That column's name in `rules`, when a rule has this column id.
    pub column: Option<String>,
    /// Length of the plaintext, in bytes.
    pub plaintext_len: usize,
    /// Whether the value carries a search term (algorithm `0x04` in front).
    pub searchable: bool,
}

/// Read the header of an enc:v1 value (for `pgenvelope inspect`); never decrypts.
pub fn inspect(
    value: &[u8],
    rules: Option<&RuleSet>,
) -> Result<Header, crate::crypto::FormatError> {
    let parsed = EncV1::parse(value)?;
    Ok(Header {
        algorithm: parsed.algorithm(),
        dek_id: parsed.dek_id(),
        column_id: parsed.column_id(),
        column: rules
            .and_then(|r| r.by_column_id(parsed.column_id()))
            .map(|c| c.qualified_name().to_owned()),
        plaintext_len: parsed.plaintext_len(),
        searchable: parsed.is_searchable(),
    })
}

/// Whether `value` is shaped like an enc:v1 value of `column` (it parses and carries the
/// column's id). Anything else that merely starts with `enc:v1:` is plaintext to encrypt.
pub fn is_envelope_of(column: &ColumnRule, value: &[u8]) -> bool {
    looks_like_enc_v1(value) && EncV1::parse(value).is_ok_and(|p| p.column_id() == column.id())
}

fn key_error(column: &ColumnRule, error: KeyError) -> CipherError {
    tracing::warn!(error = %error, column = column.qualified_name(), "key unavailable");
    CipherError::Key {
        column: column.qualified_name().to_owned(),
        error,
    }
}

/// Derived subkeys by (DEK, column), with the cached DEK they were derived from.
type TermKeyMap = HashMap<(DekId, ColumnId), (Arc<CachedDek>, TermKey), rustc_hash::FxBuildHasher>;

/// The term key of (search key, column), derived once per cached search key allocation.
fn term_key<'a>(
    keys: &'a mut TermKeyMap,
    search: &Arc<CachedDek>,
    column: ColumnId,
    mode: SearchMode,
) -> &'a TermKey {
    let id = (search.dek_id(), column);
    let stale = match keys.get(&id) {
        Some((cached, k)) => !Arc::ptr_eq(cached, search) || k.mode() != mode,
        None => true,
    };
    if stale {
        if keys.len() > MAX_KEYS_AT_HAND {
            keys.clear();
        }
        keys.remove(&id);
    }
    &keys
        .entry(id)
        .or_insert_with(|| {
            (
                Arc::clone(search),
                TermKey::derive(search.key(), search.dek_id(), column, mode),
            )
        })
        .1
}

type SubkeyMap = HashMap<(DekId, ColumnId), (Arc<CachedDek>, ColumnKey), rustc_hash::FxBuildHasher>;

/// The derived subkey for (DEK, column), derived once per cached DEK allocation.
fn subkey<'a>(subkeys: &'a mut SubkeyMap, dek: &Arc<CachedDek>, column: ColumnId) -> &'a ColumnKey {
    let key = (dek.dek_id(), column);
    let fresh = match subkeys.get(&key) {
        Some((cached, _)) => !Arc::ptr_eq(cached, dek),
        None => true,
    };
    if fresh {
        if subkeys.len() > MAX_KEYS_AT_HAND {
            subkeys.clear();
        }
        subkeys.remove(&key);
    }
    &subkeys
        .entry(key)
        .or_insert_with(|| {
            (
                Arc::clone(dek),
                ColumnKey::derive(dek.key(), dek.dek_id(), column),
            )
        })
        .1
}
