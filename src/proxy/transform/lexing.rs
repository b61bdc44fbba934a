//! How the server reads the SQL text the client sends: `standard_conforming_strings` and
//! `client_encoding`, and whether a statement in flight may change them.

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
}
