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

use super::shape::Shape;

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
}

impl Pending {
    /// Whether the request ends a cycle (is answered by ReadyForQuery).
    pub(crate) fn ends_cycle(&self) -> bool {
        matches!(
            self,
            Pending::Sync | Pending::Query { .. } | Pending::FunctionCall
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

/// The session tenant, tracked with transaction semantics (docs/design.md, tenancy).
///
/// A change (`SET [LOCAL] pgenvelope.tenant`, RESET, set_config) takes effect for later
/// statements as soon as it is forwarded, but it is only *settled* when the server answers
/// the request cycle (simple Query, Sync or FunctionCall) it was part of: committed if the
/// cycle ended outside a transaction without error or ROLLBACK, dropped if that transaction
/// rolled back, and kept pending while a transaction is still open. Changes are numbered by
/// cycle, so a change sent in a later, pipelined cycle is never undone by the rollback of an
/// earlier one. `SET LOCAL` values end with their transaction. SAVEPOINT, ROLLBACK TO and
/// RELEASE are recorded in the same order, so a rollback to a savepoint restores the tenant
/// the savepoint saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct TenantState {
    /// Value from the startup packet (`options=-c pgenvelope.tenant=…`): what RESET returns to.
    pub(crate) startup: Option<OrgId>,
    /// Committed session-level value.
    confirmed: Option<OrgId>,
    /// Changes of the open transaction, already executed by the server.
    in_tx: Vec<TenantChangeOp>,
    /// Changes sent but not yet answered, with the cycle they belong to.
    pending: VecDeque<(u64, TenantChangeOp)>,
    /// Cycles sent by the client side (Query, Sync, FunctionCall).
    sent_cycles: u64,
    /// Cycles answered (ReadyForQuery matched to a Query, Sync or FunctionCall).
    answered_cycles: u64,
}

/// One event of the tenant's history inside a transaction, in the order the server runs them.
#[derive(Debug, Clone)]
pub(crate) enum TenantChangeOp {
    /// A change: new value (`None` = RESET / DEFAULT) and whether it is `LOCAL`.
    Change { value: Option<OrgId>, local: bool },
    /// `SAVEPOINT name`: the tenant is saved.
    Savepoint(String),
    /// `ROLLBACK TO [SAVEPOINT] name`: the tenant returns to its value at the savepoint.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`: the savepoint (and later ones) are forgotten.
    Release(String),
}

/// A tenant: (session value, SET LOCAL value if one is in force).
type TenantPair = (Option<OrgId>, Option<Option<OrgId>>);

/// The tenant after `ops`, starting from the committed value.
fn fold_ops<'a>(
    confirmed: &Option<OrgId>,
    startup: &Option<OrgId>,
    ops: impl Iterator<Item = &'a TenantChangeOp>,
) -> TenantPair {
    let mut session = confirmed.clone();
    let mut local: Option<Option<OrgId>> = None;
    let mut saved: Vec<(&str, TenantPair)> = Vec::new();
    for op in ops {
        match op {
            TenantChangeOp::Change { value, local: true } => {
                local = Some(value.clone().or_else(|| session.clone()));
            }
            TenantChangeOp::Change {
                value,
                local: false,
            } => {
                session = value.clone().or_else(|| startup.clone());
                local = None;
            }
            TenantChangeOp::Savepoint(name) => saved.push((name, (session.clone(), local.clone()))),
            TenantChangeOp::RollbackTo(name) => {
                if let Some(i) = saved.iter().rposition(|(n, ..)| n == name) {
                    saved.truncate(i + 1);
                    if let Some((_, (s, l))) = saved.last() {
                        session = s.clone();
                        local = l.clone();
                    }
                }
            }
            TenantChangeOp::Release(name) => {
                if let Some(i) = saved.iter().rposition(|(n, ..)| n == name) {
                    saved.truncate(i);
                }
            }
        }
    }
    (session, local)
}

impl TenantState {
    /// A state starting at the tenant given in the startup packet.
    pub(crate) fn new(startup: Option<OrgId>) -> Self {
        Self {
            confirmed: startup.clone(),
            startup,
            ..Self::default()
        }
    }

    /// The tenant in force for the next statement: SET LOCAL, else SET, else startup option.
    pub(crate) fn effective(&self) -> Option<OrgId> {
        let (session, local) = fold_ops(
            &self.confirmed,
            &self.startup,
            self.in_tx
                .iter()
                .chain(self.pending.iter().map(|(_, op)| op)),
        );
        match local {
            Some(l) => l,
            None => session,
        }
    }

    /// Record tenant changes and savepoint events in order, as the statement making them runs.
    pub(crate) fn apply(&mut self, ops: &[TenantChangeOp]) {
        for op in ops {
            match op {
                TenantChangeOp::Change { value, local } => self.set(value.clone(), *local),
                other => self.savepoint_event(other.clone()),
            }
        }
    }

    /// Record a change sent in the current cycle.
    pub(crate) fn set(&mut self, value: Option<OrgId>, local: bool) {
        self.pending
            .push_back((self.sent_cycles, TenantChangeOp::Change { value, local }));
    }

    /// Record a savepoint event sent in the current cycle.
    pub(crate) fn savepoint_event(&mut self, op: TenantChangeOp) {
        self.pending.push_back((self.sent_cycles, op));
    }

    /// The client side sent a cycle end (Query, Sync, FunctionCall).
    pub(crate) fn cycle_sent(&mut self) {
        self.sent_cycles += 1;
    }

    /// The server answered the oldest outstanding cycle with ReadyForQuery(`status`).
    /// `rolled_back`: the cycle saw an error or a ROLLBACK.
    pub(crate) fn cycle_answered(&mut self, status: TransactionStatus, rolled_back: bool) {
        let cycle = self.answered_cycles;
        self.answered_cycles += 1;
        while let Some((c, _)) = self.pending.front() {
            if *c > cycle {
                break;
            }
            if let Some((_, op)) = self.pending.pop_front() {
                self.in_tx.push(op);
            }
        }
        if status != TransactionStatus::Idle {
            return;
        }
        let ops = std::mem::take(&mut self.in_tx);
        if rolled_back {
            return;
        }
        let (session, _) = fold_ops(&self.confirmed, &self.startup, ops.iter());
        self.confirmed = session;
    }
}

/// How the server will read the next SQL text the client sends.
///
/// `standard_conforming_strings` is taken from ParameterStatus (startup and later changes), as
/// `client_encoding` is. The server reports a change only when it executes it, so while a
/// statement that may change either setting is in flight (sent, its cycle not yet answered by
/// ReadyForQuery; this includes earlier messages of the cycle being sent), the proxy cannot know
/// how the server will read what follows: [`LexState::uncertain`].
#[derive(Debug, Clone)]
pub(crate) struct LexState {
    /// `standard_conforming_strings` as last reported (on unless the server says otherwise).
    pub(crate) standard_strings: bool,
    /// The server's encoding is SQL_ASCII: it converts nothing and lexes the client's bytes.
    pub(crate) server_sql_ascii: bool,
    /// Cycles sent (Query, Sync, FunctionCall); the one being sent has this index.
    sent: u64,
    /// Cycles answered.
    answered: u64,
    /// Index of the last cycle holding a statement that may change how text is read.
    risky: Option<u64>,
}

impl Default for LexState {
    fn default() -> Self {
        Self {
            standard_strings: true,
            server_sql_ascii: false,
            sent: 0,
            answered: 0,
            risky: None,
        }
    }
}

impl LexState {
    /// A statement that may change `standard_conforming_strings` or `client_encoding` is part
    /// of the cycle being sent.
    pub(crate) fn may_change(&mut self) {
        self.risky = Some(self.sent);
    }

    /// Whether such a statement is still unanswered.
    pub(crate) fn uncertain(&self) -> bool {
        self.risky.is_some_and(|c| c >= self.answered)
    }

    /// The client side sent a cycle end.
    pub(crate) fn cycle_sent(&mut self) {
        self.sent += 1;
    }

    /// The server answered the oldest outstanding cycle.
    pub(crate) fn cycle_answered(&mut self) {
        self.answered += 1;
    }
}

/// Whether a SQL text may change how the server reads later texts (`standard_conforming_strings`
/// or `client_encoding`): it names either setting, says `names` (SET NAMES), `set_config`,
/// `reset` or `discard` (RESET ALL, DISCARD ALL), or `u&` (a Unicode-escaped identifier may
/// spell a setting's name). Case-insensitive, anywhere in the text (in strings and comments
/// too, so DO blocks and function bodies count). Server-side code that changes a setting
/// without naming it (a name built at run time, a function called by another name) is not seen.
pub(crate) fn may_change_lexing(sql: &[u8]) -> bool {
    const NEEDLES: [&[u8]; 7] = [
        b"standard_conforming",
        b"client_encoding",
        b"names",
        b"set_config",
        b"reset",
        b"discard",
        b"u&",
    ];
    // One pass: only positions starting with a needle's first letter are compared.
    sql.iter().enumerate().any(|(i, b)| {
        matches!(
            b.to_ascii_lowercase(),
            b's' | b'c' | b'n' | b'r' | b'd' | b'u'
        ) && NEEDLES.iter().any(|n| {
            sql.get(i..i + n.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(n))
        })
    })
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

    #[test]
    fn lexing_is_uncertain_until_the_cycle_is_answered() {
        let mut l = LexState::default();
        assert!(!l.uncertain());
        l.cycle_sent();
        l.may_change();
        assert!(l.uncertain(), "in the cycle being sent");
        l.cycle_sent();
        l.cycle_sent();
        l.cycle_answered();
        assert!(l.uncertain(), "an earlier cycle was answered");
        l.cycle_answered();
        assert!(!l.uncertain());
        assert!(may_change_lexing(b"ReSeT ALL"));
        assert!(may_change_lexing(
            b"select set_config('client_encoding', 'GBK', false)"
        ));
        assert!(may_change_lexing(b"SET NAMES 'GBK'"));
        assert!(may_change_lexing(
            b"SET U&\"client_\\0065ncoding\" TO 'GBK'"
        ));
        assert!(!may_change_lexing(b"SELECT 1 FROM t"));
        assert!(!may_change_lexing(b"UPDATE t SET a = 1"));
    }

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

    fn org(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    #[test]
    fn tenant_follows_transactions() {
        use TransactionStatus::{Idle, InTransaction};
        let mut t = TenantState::new(Some(org("boot")));
        t.set(Some(org("a")), false);
        t.cycle_sent();
        assert_eq!(t.effective(), Some(org("a")), "in force at once");
        t.cycle_answered(Idle, false);
        assert_eq!(t.effective(), Some(org("a")));

        // BEGIN; SET b; ROLLBACK in three cycles.
        t.cycle_sent();
        t.cycle_answered(InTransaction, false);
        t.set(Some(org("b")), false);
        t.cycle_sent();
        t.cycle_answered(InTransaction, false);
        assert_eq!(t.effective(), Some(org("b")));
        t.cycle_sent();
        t.cycle_answered(Idle, true);
        assert_eq!(t.effective(), Some(org("a")), "rollback restores");

        t.set(Some(org("l")), true);
        t.cycle_sent();
        assert_eq!(t.effective(), Some(org("l")));
        t.cycle_answered(InTransaction, false);
        t.cycle_sent();
        t.cycle_answered(Idle, false);
        assert_eq!(
            t.effective(),
            Some(org("a")),
            "SET LOCAL ends with the transaction"
        );

        // A failed cycle answered after the next cycle's SET was already sent keeps that SET.
        t.cycle_sent();
        t.set(Some(org("c")), false);
        t.cycle_sent();
        t.cycle_answered(Idle, true);
        assert_eq!(t.effective(), Some(org("c")));
        t.cycle_answered(Idle, false);
        assert_eq!(t.effective(), Some(org("c")));

        t.set(None, false);
        t.cycle_sent();
        t.cycle_answered(Idle, false);
        assert_eq!(
            t.effective(),
            Some(org("boot")),
            "RESET returns to the startup value"
        );
    }

    #[test]
    fn tenant_follows_savepoints() {
        use TransactionStatus::{Idle, InTransaction};
        let mut t = TenantState::new(Some(org("a")));
        // SAVEPOINT s; SET b; ROLLBACK TO s; SET d; SAVEPOINT t; SET LOCAL c; RELEASE t;
        // ROLLBACK TO s; SET e; COMMIT.
        t.savepoint_event(TenantChangeOp::Savepoint("s".into()));
        t.set(Some(org("b")), false);
        assert_eq!(t.effective(), Some(org("b")));
        t.savepoint_event(TenantChangeOp::RollbackTo("s".into()));
        assert_eq!(t.effective(), Some(org("a")), "ROLLBACK TO undoes the SET");
        t.set(Some(org("d")), false);
        t.savepoint_event(TenantChangeOp::Savepoint("t".into()));
        t.set(Some(org("c")), true);
        t.savepoint_event(TenantChangeOp::Release("t".into()));
        assert_eq!(t.effective(), Some(org("c")), "RELEASE keeps changes");
        t.savepoint_event(TenantChangeOp::RollbackTo("s".into()));
        assert_eq!(
            t.effective(),
            Some(org("a")),
            "the savepoint survives ROLLBACK TO"
        );
        t.set(Some(org("e")), false);
        t.cycle_sent();
        t.cycle_answered(InTransaction, false);
        t.cycle_sent();
        t.cycle_answered(Idle, false);
        assert_eq!(t.effective(), Some(org("e")), "committed");
        // Unknown savepoint names change nothing.
        t.savepoint_event(TenantChangeOp::RollbackTo("nope".into()));
        assert_eq!(t.effective(), Some(org("e")));
    }
}
