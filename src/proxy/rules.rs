//! The rules in force for a proxy, swapped whole on reload, with the analyser's view of them
//! and the plan cache of statement analyses made under them.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::proxy::plans::PlanCache;
use crate::rules::RuleSet;
use crate::sql::{Analysis, Protected, ProtectedTable};

/// The rules and the analyser's view of them, swapped together.
#[derive(Debug)]
pub(crate) struct RulesSnapshot {
    pub(crate) rules: Arc<RuleSet>,
    pub(crate) protected: Protected,
}

impl RulesSnapshot {
    fn new(rules: Arc<RuleSet>) -> Self {
        let protected = protected_from_rules(&rules);
        Self { rules, protected }
    }
}

/// The analyser's view of the rules.
pub(crate) fn protected_from_rules(rules: &RuleSet) -> Protected {
    Protected::new(rules.tables().map(|t| {
        ProtectedTable {
            schema: t.schema().to_owned(),
            name: t.name().to_owned(),
            tenant_column: t.tenant_column().map(str::to_owned),
            row_key: t.row_key().map(str::to_owned),
            encrypted: t.columns().map(|c| c.column().to_owned()).collect(),
            searchable: t
                .columns()
                .filter_map(|c| Some((c.column().to_owned(), c.search()?)))
                .collect(),
        }
    }))
}

/// The rules in force and the analyses made under them.
pub struct Rules {
    /// Invariant: replaced whole on reload; readers take a snapshot and keep it for the
    /// message they are handling.
    current: ArcSwap<RulesSnapshot>,
    plans: PlanCache,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rules({} tables)", self.current.load().rules.len())
    }
}

impl Rules {
    /// Rules to start with.
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self {
            current: ArcSwap::from_pointee(RulesSnapshot::new(rules)),
            plans: PlanCache::new(),
        }
    }

    /// The rules in force now.
    pub(crate) fn snapshot(&self) -> Arc<RulesSnapshot> {
        self.current.load_full()
    }

    /// The analysis of `sql`, from the plan cache when this text was seen before.
    pub(crate) fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Some(hit) = self.plans.get(sql) {
            return hit;
        }
        let analysis = Arc::new(crate::sql::analyze(sql, &self.current.load().protected));
        self.plans.offer(sql, &analysis);
        analysis
    }

    /// Whether `sql` must be analysed: it may touch protected tables or the tenant setting,
    /// or is a COPY whose output may carry enc:v1 values (no parsing).
    pub(crate) fn might_touch(&self, sql: &str) -> bool {
        crate::sql::worth_analysing(sql, &self.current.load().protected)
    }

    /// Replace the rules (SIGHUP). Statements already prepared keep the analysis they were
    /// prepared with; cached analyses are dropped so new statements use the new rules.
    pub fn replace(&self, rules: RuleSet) {
        self.current
            .store(Arc::new(RulesSnapshot::new(Arc::new(rules))));
        self.plans.clear();
    }

    /// Number of tables with rules now.
    pub fn tables(&self) -> usize {
        self.current.load().rules.len()
    }

    /// Weight of the cached statement analyses, in bytes (bounded by the cache's cap).
    pub fn plan_cache_bytes(&self) -> u64 {
        self.plans.weighted_size()
    }
}
