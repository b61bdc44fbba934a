//! The session tenant's history, with transaction and savepoint semantics.

use std::collections::VecDeque;

use crate::crypto::OrgId;
use crate::wire::backend::TransactionStatus;

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

#[cfg(test)]
mod tests {
    use super::*;

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
