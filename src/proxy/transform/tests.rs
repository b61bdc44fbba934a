//! Unit tests of the protocol core from byte fixtures.
