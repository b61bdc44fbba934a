//! What the core knows about a session: prepared statements and portals, the queue of
//! requests whose responses are still expected, the session tenant, how the server reads SQL
//! text, and the transaction status. One place for each fact.
//!
//! The client side pushes one [`Pending`] per request it forwards (or injects); the server side
//! pops them as the responses arrive, in order, exactly as the server answers them. Entries
//! marked `hidden` were injected by the proxy: their responses are swallowed.
//!
//! Statements and portals are shared (`Arc`) between the maps and the queue; what the server
//! tells about them later (descriptions) goes into write-once cells, never behind a lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::crypto::OrgId;
use crate::rules::ColumnRule;
use crate::sql::{Analysis, CopyPlan};
use crate::wire::backend::TransactionStatus;
use crate::wire::encoding::ClientEncoding;
use crate::wire::frontend::Target;

pub(crate) use super::lexing::{may_change_lexing, LexState};
use super::shape::Shape;
pub(crate) use super::tenant::{TenantChangeOp, TenantState};

/// A prepared statement.
#[derive(Debug, Default)]
pub(crate) struct Statement {
    /// The analysis, when the text may touch protected tables.
    pub(crate) analysis: Option<Arc<Analysis>>,
    /// Parameter types given in Parse (after forcing encrypted parameters to text).
    pub(crate) param_types: Vec<u32>,
    /// Whether the client itself sent Describe for this statement.
    pub(crate) described: AtomicBool,
    /// Result columns, from the first Describe answered (empty for NoData).
    pub(crate) shape: OnceLock<Arc<Shape>>,
    /// Parameter types from the first ParameterDescription answered.
    pub(crate) described_params: OnceLock<Vec<u32>>,
    /// Executing it may change how the server reads later texts ([`may_change_lexing`]).
    pub(crate) changes_lexing: bool,
    /// The organisation its literals were sealed for under the session (or default) tenant,
    /// when it has such literals: it may only be bound while that organisation is in force.
    pub(crate) sealed_for: Option<OrgId>,
    /// The parameter the proxy added for a tenant pin (1-based, after the client's): each Bind
    /// gets the session (or default) tenant in force then, and the client never sees it.
    pub(crate) tenant_param: Option<usize>,
    /// The first of the parameters the proxy added for drawn row keys (after the client's and
    /// the tenant pin's): each Bind gets keys drawn for its rows.
    pub(crate) key_param: Option<usize>,
    /// The analysed text, kept when a Bind may have to look up the organisation of the rows
    /// it writes (its WHERE clause is run as a query).
    pub(crate) text: Option<Arc<str>>,
}

impl Statement {
    /// The first parameter the proxy added (the client's come before it), if any.
    pub(crate) fn hidden_from(&self) -> Option<usize> {
        self.tenant_param.or(self.key_param)
    }
}

/// A portal (a bound statement).
#[derive(Debug)]
pub(crate) struct Portal {
    pub(crate) statement: Arc<Statement>,
    /// Result format codes from Bind.
    pub(crate) result_formats: Vec<i16>,
    /// Whether Describe was sent for this portal (by the client, or injected).
    pub(crate) described: AtomicBool,
    /// From the first Describe Portal answered.
    pub(crate) shape: OnceLock<Arc<Shape>>,
    /// The organisation its values (literals of the statement, parameters of the Bind) were
    /// sealed for under the session (or default) tenant: it may only be executed while that
    /// organisation is in force.
    pub(crate) sealed_for: Option<OrgId>,
    /// Tenant changes and savepoint events its statement makes, recorded when it first runs.
    pub(crate) tenant_ops: Vec<TenantChangeOp>,
    /// Whether `tenant_ops` were recorded (a portal suspended and executed again makes its
    /// changes once).
    pub(crate) ran: AtomicBool,
}

impl Portal {
    /// The result shape: the portal's own description, else the statement's (with this
    /// portal's result formats).
    pub(crate) fn shape(&self) -> Option<Arc<Shape>> {
        if let Some(s) = self.shape.get() {
            return Some(Arc::clone(s));
        }
        let described = Arc::clone(self.statement.shape.get()?);
        if self.result_formats.is_empty() {
            return Some(described);
        }
        let mut columns = described.columns.clone();
        for (i, c) in columns.iter_mut().enumerate() {
            c.format = crate::wire::frontend::format_at(&self.result_formats, i);
        }
        Some(Arc::new(Shape::new(columns)))
    }

    /// The tenant changes to record now: its statement's, the first time it runs.
    pub(crate) fn take_tenant_ops(&self) -> &[TenantChangeOp] {
        if self.ran.swap(true, Ordering::Relaxed) {
            &[]
        } else {
            &self.tenant_ops
        }
    }

    /// A placeholder for a portal the proxy does not know (described, with no statement).
    pub(crate) fn unknown() -> Self {
        Self {
            statement: Arc::default(),
            result_formats: Vec::new(),
            described: AtomicBool::new(true),
            shape: OnceLock::new(),
            sealed_for: None,
            tenant_ops: Vec::new(),
            ran: AtomicBool::new(false),
        }
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
    /// Index of the row key in the rows, if the table binds values to their row.
    pub(crate) key_index: Option<usize>,
}

/// A request whose response is still expected.
///
/// Parse, Bind and Close change the server's prepared statements and portals only when the
/// server confirms them (ParseComplete, BindComplete, CloseComplete): the proxy commits their
/// effect to [`Session::statements`] / [`Session::portals`] then, and not when it forwards
/// them, since the server may refuse them (42P05, a parse error) or skip them (after an
/// earlier error, up to Sync).
#[derive(Debug)]
pub(crate) enum Pending {
    /// Simple query: answered up to ReadyForQuery. `copy_out` is set for a COPY TO whose
    /// rows must be decrypted; `tenant` is the session tenant its rows are read under (the
    /// one in force after its own tenant changes, which must come before its reads).
    Query {
        copy_out: Option<CopyJob>,
        tenant: Option<OrgId>,
    },
    /// FunctionCall: answered up to ReadyForQuery.
    FunctionCall,
    /// Parse → ParseComplete: `name` then denotes `statement` (`None`: one the proxy does not
    /// track, such as its own refusal statement).
    Parse {
        hidden: bool,
        name: Vec<u8>,
        statement: Option<Arc<Statement>>,
    },
    /// Bind → BindComplete: portal `name` then denotes `portal` (`None`: untracked).
    Bind {
        hidden: bool,
        name: Vec<u8>,
        portal: Option<Arc<Portal>>,
    },
    /// Describe statement → ParameterDescription, RowDescription | NoData.
    DescribeStatement {
        statement: Arc<Statement>,
        hidden: bool,
    },
    /// Describe portal → RowDescription | NoData.
    DescribePortal { portal: Arc<Portal>, hidden: bool },
    /// Execute → DataRow*, CommandComplete | EmptyQueryResponse | PortalSuspended.
    /// `tenant`: the session tenant when it was sent, which its rows are read under (a
    /// tenant change pipelined after it does not apply to them).
    Execute {
        portal: Option<Arc<Portal>>,
        copy_out: Option<CopyJob>,
        tenant: Option<OrgId>,
    },
    /// Close → CloseComplete: `name` then denotes nothing.
    Close {
        hidden: bool,
        target: Target,
        name: Vec<u8>,
    },
    /// Sync → ReadyForQuery.
    Sync,
    /// A look-up the proxy sent (see `lookup.rs`): its rows are the proxy's. `simple`: a Query
    /// of its own, answered up to ReadyForQuery; else the Execute of an extended-protocol
    /// look-up, answered up to CommandComplete.
    Lookup { simple: bool },
}

impl Pending {
    /// Whether the request ends a cycle (is answered by ReadyForQuery).
    pub(crate) fn ends_cycle(&self) -> bool {
        matches!(
            self,
            Pending::Sync
                | Pending::Query { .. }
                | Pending::FunctionCall
                | Pending::Lookup { simple: true }
        )
    }
}

/// What a statement or portal name will denote when the server reaches the message being sent.
#[derive(Debug)]
pub(crate) enum Ahead<T> {
    /// Known: the server's object if every request before in this cycle succeeds (if one
    /// fails, the server skips the message being sent).
    Known(Option<Arc<T>>),
    /// It depends on whether requests of an earlier, still unanswered cycle succeed: any of
    /// these (the last is the value if they all succeed).
    Uncertain(Vec<Option<Arc<T>>>),
}

impl<T> Ahead<T> {
    /// The value if every request in flight succeeds.
    pub(crate) fn latest(&self) -> Option<Arc<T>> {
        match self {
            Ahead::Known(v) => v.clone(),
            Ahead::Uncertain(c) => c.last().cloned().flatten(),
        }
    }
}

/// The session's protocol state.
#[derive(Debug)]
pub(crate) struct Session {
    /// Database name (catalog look-ups are per database).
    pub(crate) db: String,
    /// The session's client_encoding.
    pub(crate) encoding: ClientEncoding,
    /// Named and unnamed prepared statements, as the server confirmed them.
    pub(crate) statements: HashMap<Vec<u8>, Arc<Statement>>,
    /// Open portals, as the server confirmed them.
    pub(crate) portals: HashMap<Vec<u8>, Arc<Portal>>,
    /// The server skips messages up to Sync (after an error in the extended protocol, ours or
    /// its own): the client side drops them, a Query included, as the server ignores them.
    /// Set when the proxy refuses an extended-protocol message and on a server error while no
    /// Sync has been forwarded yet; cleared when a Sync is forwarded.
    pub(crate) skipping: bool,
    /// Requests in flight.
    pub(crate) queue: VecDeque<Pending>,
    /// Session tenant.
    pub(crate) tenant: TenantState,
    /// Transaction status from the last ReadyForQuery.
    pub(crate) status: TransactionStatus,
    /// How the server reads SQL text.
    pub(crate) lexing: LexState,
    /// The SQLSTATE of a COPY FROM STDIN the proxy refused by sending CopyFail: the server
    /// answers any CopyFail with 57014 ("COPY from stdin failed: …"), and the server side puts
    /// this code back in that answer so the client sees why (XX001, 0A000, 42501, …).
    pub(crate) copy_refusal: Option<&'static str>,
}

impl Session {
    pub(crate) fn new(db: String, startup_tenant: Option<OrgId>) -> Self {
        Self {
            db,
            encoding: ClientEncoding::Utf8,
            statements: HashMap::new(),
            portals: HashMap::new(),
            skipping: false,
            queue: VecDeque::new(),
            tenant: TenantState::new(startup_tenant),
            status: TransactionStatus::Idle,
            lexing: LexState::default(),
            copy_refusal: None,
        }
    }
}

impl Session {
    /// What statement `name` will denote when the server reaches the message being sent.
    pub(crate) fn statement_ahead(&self, name: &[u8]) -> Ahead<Statement> {
        self.ahead(self.statements.get(name).cloned(), |p| match p {
            Pending::Parse {
                name: n, statement, ..
            } if n == name => Some(statement.clone()),
            Pending::Close {
                target: Target::Statement,
                name: n,
                ..
            } if n == name => Some(None),
            _ => None,
        })
    }

    /// What portal `name` will denote when the server reaches the message being sent.
    pub(crate) fn portal_ahead(&self, name: &[u8]) -> Ahead<Portal> {
        self.ahead(self.portals.get(name).cloned(), |p| match p {
            Pending::Bind {
                name: n, portal, ..
            } if n == name => Some(portal.clone()),
            Pending::Close {
                target: Target::Portal,
                name: n,
                ..
            } if n == name => Some(None),
            _ => None,
        })
    }

    /// Replay the effects (`effect`: `Some(new value)` for a request naming the object) of
    /// the requests in flight on the `confirmed` value.
    fn ahead<T>(
        &self,
        confirmed: Option<Arc<T>>,
        effect: impl Fn(&Pending) -> Option<Option<Arc<T>>>,
    ) -> Ahead<T> {
        // Requests after the last cycle end belong to the cycle being sent.
        let current = self
            .queue
            .iter()
            .rposition(Pending::ends_cycle)
            .map_or(0, |i| i + 1);
        let mut candidates = vec![confirmed];
        let mut last = None;
        for (i, p) in self.queue.iter().enumerate() {
            if let Some(v) = effect(p) {
                candidates.push(v);
                last = Some(i);
            }
        }
        match last {
            // One of this cycle's requests decides it (if any of them fails, the message being
            // sent is skipped).
            Some(i) if i >= current => Ahead::Known(candidates.pop().flatten()),
            Some(_) => Ahead::Uncertain(candidates),
            None => Ahead::Known(candidates.pop().flatten()),
        }
    }

    /// The server confirmed the oldest request (ParseComplete, BindComplete, CloseComplete):
    /// commit its effect. Returns whether it was injected by the proxy.
    pub(crate) fn confirm(&mut self) -> bool {
        match self.queue.pop_front() {
            Some(Pending::Parse {
                hidden,
                name,
                statement,
            }) => {
                match statement {
                    Some(s) => self.statements.insert(name, s),
                    None => self.statements.remove(&name),
                };
                hidden
            }
            Some(Pending::Bind {
                hidden,
                name,
                portal,
            }) => {
                match portal {
                    Some(p) => self.portals.insert(name, p),
                    None => self.portals.remove(&name),
                };
                hidden
            }
            Some(Pending::Close {
                hidden,
                target,
                name,
            }) => {
                match target {
                    Target::Statement => {
                        self.statements.remove(&name);
                    }
                    Target::Portal => {
                        self.portals.remove(&name);
                    }
                }
                hidden
            }
            _ => false,
        }
    }

    /// An ErrorResponse answered the oldest request of an extended-protocol cycle: the server
    /// skips the rest up to Sync, so their effects never happen. Returns how many cycle ends
    /// (Query, FunctionCall sent meanwhile) the server skipped with them.
    pub(crate) fn fail_extended(&mut self) -> usize {
        match self.queue.front() {
            // PostgreSQL drops the unnamed statement before parsing a new one, and may have
            // replaced the unnamed portal before a Bind failed.
            Some(Pending::Parse { name, .. }) if name.is_empty() => {
                self.statements.remove(&b""[..]);
            }
            Some(Pending::Bind { name, .. }) if name.is_empty() => {
                self.portals.remove(&b""[..]);
            }
            _ => {}
        }
        let mut skipped_cycles = 0;
        while let Some(p) = self.queue.front() {
            if matches!(p, Pending::Sync) {
                return skipped_cycles;
            }
            if p.ends_cycle() {
                skipped_cycles += 1;
            }
            self.queue.pop_front();
        }
        // No Sync forwarded yet: the server skips what the client sends next too.
        self.skipping = true;
        skipped_cycles
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &[u8], s: &Arc<Statement>) -> Pending {
        Pending::Parse {
            hidden: false,
            name: name.to_vec(),
            statement: Some(Arc::clone(s)),
        }
    }

    fn is(a: &Ahead<Statement>, s: &Arc<Statement>) -> bool {
        matches!(a, Ahead::Known(Some(x)) if Arc::ptr_eq(x, s))
    }

    #[test]
    fn statements_change_when_the_server_confirms() {
        let mut session = Session::new("db".into(), None);
        let (old, new) = (
            Arc::new(Statement::default()),
            Arc::new(Statement::default()),
        );
        session.queue.push_back(parse(b"s", &old));
        assert!(is(&session.statement_ahead(b"s"), &old), "same cycle");
        assert!(session.statements.is_empty());
        session.confirm();
        assert!(Arc::ptr_eq(&session.statements[&b"s"[..]], &old));

        // A redefinition in an earlier, unanswered cycle: either may be in force.
        session.queue.push_back(parse(b"s", &new));
        session.queue.push_back(Pending::Sync);
        match session.statement_ahead(b"s") {
            Ahead::Uncertain(c) => assert_eq!(c.len(), 2),
            Ahead::Known(_) => panic!("must be uncertain"),
        }
        // It fails (42P05): the server skips to Sync, the old statement stays.
        assert_eq!(session.fail_extended(), 0);
        assert!(!session.skipping, "the Sync was already forwarded");
        assert!(is(&session.statement_ahead(b"s"), &old));
        session.queue.pop_front(); // ReadyForQuery

        // A Close skipped after an error is not honoured; a Query skipped with it is counted.
        session.queue.push_back(Pending::Execute {
            portal: None,
            copy_out: None,
            tenant: None,
        });
        session.queue.push_back(Pending::Close {
            hidden: false,
            target: Target::Statement,
            name: b"s".to_vec(),
        });
        session.queue.push_back(Pending::Query {
            copy_out: None,
            tenant: None,
        });
        assert!(matches!(session.statement_ahead(b"s"), Ahead::Uncertain(_)));
        assert_eq!(session.fail_extended(), 1);
        assert!(session.skipping, "no Sync yet: the server still skips");
        assert!(is(&session.statement_ahead(b"s"), &old));

        // A failed Parse of the unnamed statement drops it, as PostgreSQL does.
        session.statements.insert(Vec::new(), Arc::clone(&old));
        session.queue.push_back(parse(b"", &new));
        session.fail_extended();
        assert!(!session.statements.contains_key(&b""[..]));
    }
}
