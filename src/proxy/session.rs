//! What an encrypting session knows, shared by its two directions: prepared statements and
//! portals, the queue of requests whose responses are still expected, the session tenant and
//! the client encoding.
//!
//! The client → server side pushes one [`Pending`] per request it forwards (or injects); the
//! server → client side pops them as the responses arrive, in order, exactly as the server
//! answers them. Entries marked `hidden` were injected by the proxy: their responses are
//! swallowed.
//!
//! Invariant: the lock is never held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};

use crate::crypto::OrgId;
use crate::rules::ColumnRule;
use crate::sql::{Analysis, CopyPlan};
use crate::wire::backend::TransactionStatus;
use crate::wire::encoding::ClientEncoding;

/// Shared handle.
pub(crate) type SharedSession = Arc<Mutex<Session>>;

/// Lock a session, ignoring poisoning (a panicked holder left plain data behind).
pub(crate) fn lock(s: &SharedSession) -> std::sync::MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One result column as the proxy sees it.
#[derive(Debug, Clone)]
pub(crate) struct ColumnShape {
    /// The rule of the table column this result column comes from, if any.
    pub(crate) rule: Option<ColumnRule>,
    /// Index (in the same result) of that table's tenant column, if it is in the result.
    pub(crate) tenant_index: Option<usize>,
    /// Whether values may be text (so may hold enc:v1 values of unknown origin).
    pub(crate) textlike: bool,
    /// Format code reported in the RowDescription.
    pub(crate) format: i16,
}

/// The columns of a result set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    pub(crate) columns: Vec<ColumnShape>,
}

impl Shape {
    /// Whether no column needs looking at.
    pub(crate) fn is_inert(&self) -> bool {
        self.columns.iter().all(|c| c.rule.is_none() && !c.textlike)
    }
}

/// A prepared statement.
#[derive(Debug, Default)]
pub(crate) struct Statement {
    /// The analysis, when the text may touch protected tables.
    pub(crate) analysis: Option<Arc<Analysis>>,
    /// Parameter types given in Parse (after forcing encrypted parameters to text).
    pub(crate) param_types: Vec<u32>,
    /// Whether the client itself sent Describe for this statement.
    pub(crate) described: AtomicBool,
    /// Filled by the server side from Describe responses.
    pub(crate) described_as: Mutex<Described>,
}

/// What a Describe told us.
#[derive(Debug, Default, Clone)]
pub(crate) struct Described {
    /// Result columns (None until described; empty for NoData).
    pub(crate) shape: Option<Arc<Shape>>,
    /// Parameter types from ParameterDescription.
    pub(crate) param_types: Option<Vec<u32>>,
}

/// A portal (a bound statement).
#[derive(Debug)]
pub(crate) struct Portal {
    pub(crate) statement: Arc<Statement>,
    /// Result format codes from Bind.
    pub(crate) result_formats: Vec<i16>,
    /// Whether Describe was sent for this portal (by the client, or injected).
    pub(crate) described: AtomicBool,
    /// Filled from a Describe Portal response.
    pub(crate) shape: Mutex<Option<Arc<Shape>>>,
}

impl Portal {
    /// The result shape: the portal's own description, else the statement's (with this
    /// portal's result formats).
    pub(crate) fn shape(&self) -> Option<Arc<Shape>> {
        if let Some(s) = self
            .shape
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Some(s);
        }
        let described = self
            .statement
            .described_as
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shape
            .clone()?;
        let mut shape = (*described).clone();
        for (i, c) in shape.columns.iter_mut().enumerate() {
            c.format = crate::wire::frontend::format_at(&self.result_formats, i);
        }
        Some(Arc::new(shape))
    }
}

/// A COPY whose rows the proxy rewrites, as resolved when the statement was forwarded.
#[derive(Debug, Clone)]
pub(crate) struct CopyJob {
    /// The COPY statement's plan.
    pub(crate) plan: CopyPlan,
    /// (column index in the COPY rows, rule) of encrypted columns.
    pub(crate) targets: Vec<(usize, ColumnRule)>,
    /// Index of the tenant column in the rows, if present.
    pub(crate) tenant_index: Option<usize>,
}

/// A request whose response is still expected.
#[derive(Debug)]
pub(crate) enum Pending {
    /// Simple query: answered up to ReadyForQuery. `copy_out` is set for a COPY TO whose
    /// rows must be decrypted.
    Query { copy_out: Option<CopyJob> },
    /// FunctionCall: answered up to ReadyForQuery.
    FunctionCall,
    /// Parse → ParseComplete.
    Parse { hidden: bool },
    /// Bind → BindComplete.
    Bind { hidden: bool },
    /// Describe statement → ParameterDescription, RowDescription | NoData.
    DescribeStatement {
        statement: Arc<Statement>,
        hidden: bool,
    },
    /// Describe portal → RowDescription | NoData.
    DescribePortal { portal: Arc<Portal>, hidden: bool },
    /// Execute → DataRow*, CommandComplete | EmptyQueryResponse | PortalSuspended.
    Execute {
        portal: Option<Arc<Portal>>,
        copy_out: Option<CopyJob>,
    },
    /// Close → CloseComplete.
    Close { hidden: bool },
    /// Sync → ReadyForQuery.
    Sync,
}

/// The session tenant, tracked with transaction semantics (DESIGN §5).
///
/// Changes are applied when the statement is forwarded; at the end of a transaction the
/// server side commits them or, if the transaction rolled back, restores the value it had
/// at the transaction's start. `SET LOCAL` values end with the transaction.
#[derive(Debug, Default, Clone)]
pub(crate) struct TenantState {
    /// Value from the startup packet (`options=-c pgenvelope.tenant=…`): what RESET returns to.
    pub(crate) startup: Option<OrgId>,
    /// Session-level value.
    pub(crate) session: Option<OrgId>,
    /// Transaction-level value (SET LOCAL).
    pub(crate) local: Option<OrgId>,
    /// Session value at the start of the current transaction, once a change was made in it.
    pub(crate) snapshot: Option<Option<OrgId>>,
}

impl TenantState {
    /// The tenant in force: SET LOCAL, else SET, else the startup option.
    pub(crate) fn effective(&self) -> Option<&OrgId> {
        self.local.as_ref().or(self.session.as_ref())
    }

    /// Apply `SET [LOCAL] pgenvelope.tenant` (value `None` = RESET / DEFAULT).
    pub(crate) fn set(&mut self, value: Option<OrgId>, local: bool) {
        if local {
            self.local = value.or_else(|| self.session.clone());
            return;
        }
        if self.snapshot.is_none() {
            self.snapshot = Some(self.session.clone());
        }
        self.session = value.or_else(|| self.startup.clone());
        self.local = None;
    }

    /// The transaction ended.
    pub(crate) fn end_transaction(&mut self, rolled_back: bool) {
        if let Some(before) = self.snapshot.take() {
            if rolled_back {
                self.session = before;
            }
        }
        self.local = None;
    }
}

/// The shared session state.
#[derive(Debug)]
pub(crate) struct Session {
    /// Database name (catalog look-ups are per database).
    pub(crate) db: String,
    /// The session's client_encoding.
    pub(crate) encoding: ClientEncoding,
    /// Named and unnamed prepared statements.
    pub(crate) statements: HashMap<Vec<u8>, Arc<Statement>>,
    /// Open portals.
    pub(crate) portals: HashMap<Vec<u8>, Arc<Portal>>,
    /// Requests in flight.
    pub(crate) queue: VecDeque<Pending>,
    /// Session tenant.
    pub(crate) tenant: TenantState,
    /// Transaction status from the last ReadyForQuery.
    pub(crate) status: TransactionStatus,
}

impl Session {
    pub(crate) fn new(db: String, startup_tenant: Option<OrgId>) -> Self {
        Self {
            db,
            encoding: ClientEncoding::Utf8,
            statements: HashMap::new(),
            portals: HashMap::new(),
            queue: VecDeque::new(),
            tenant: TenantState {
                startup: startup_tenant.clone(),
                session: startup_tenant,
                ..TenantState::default()
            },
            status: TransactionStatus::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    #[test]
    fn tenant_follows_transactions() {
        let mut t = TenantState {
            startup: Some(org("boot")),
            session: Some(org("boot")),
            ..TenantState::default()
        };
        t.set(Some(org("a")), false);
        t.end_transaction(false);
        assert_eq!(t.effective(), Some(&org("a")));

        t.set(Some(org("b")), false);
        t.end_transaction(true);
        assert_eq!(t.effective(), Some(&org("a")), "rollback restores");

        t.set(Some(org("l")), true);
        assert_eq!(t.effective(), Some(&org("l")));
        t.end_transaction(false);
        assert_eq!(
            t.effective(),
            Some(&org("a")),
            "SET LOCAL ends with the transaction"
        );

        t.set(None, false);
        t.end_transaction(false);
        assert_eq!(
            t.effective(),
            Some(&org("boot")),
            "RESET returns to the startup value"
        );
    }
}
