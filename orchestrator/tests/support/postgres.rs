//! Whether a PostgreSQL test runs: shared by the ledger suite and the binary's run tests
//! (included by path, so neither test crate depends on the other).
//!
//! Without `CHORUS_TEST_POSTGRES_URL` a PostgreSQL test cannot run. It must not pass silently
//! then: under CI (`CI` set), where PostgreSQL is always started, a missing URL is a broken
//! setup and the test fails; elsewhere the test says `SKIPPED` on the terminal and returns.

use std::io::Write;

/// The variable naming the test database.
pub const POSTGRES_URL_ENV: &str = "CHORUS_TEST_POSTGRES_URL";

/// What a PostgreSQL test does, given the two variables.
#[derive(Debug, PartialEq)]
pub enum PostgresTest {
    /// Run against this URL.
    Run(String),
    /// Report the skip and pass.
    Skip,
    /// Fail: CI promised a database and there is none.
    Fail,
}

/// The decision, apart from the process environment so that it can be tested.
pub fn decide(url: Option<String>, ci: Option<String>) -> PostgresTest {
    match (url, ci) {
        (Some(url), _) => PostgresTest::Run(url),
        // CI runners set CI=true; an empty or "false" value means a developer cleared it.
        (None, Some(ci)) if !ci.is_empty() && ci != "false" && ci != "0" => PostgresTest::Fail,
        (None, _) => PostgresTest::Skip,
    }
}

/// The test database's URL, or `None` after reporting `test` as skipped; panics under CI.
pub fn postgres_url_or_skip(test: &str) -> Option<String> {
    match decide(
        std::env::var(POSTGRES_URL_ENV).ok(),
        std::env::var("CI").ok(),
    ) {
        PostgresTest::Run(url) => Some(url),
        PostgresTest::Fail => panic!(
            "{test}: {POSTGRES_URL_ENV} is unset under CI, where PostgreSQL is always started; \
             the test would otherwise pass without having run"
        ),
        PostgresTest::Skip => {
            // Straight to the stream, not through `println!`, which the test harness captures
            // and shows only for failures: a skip must be seen in a green run.
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: {test} ({POSTGRES_URL_ENV} unset)"
            );
            None
        }
    }
}

#[cfg(test)]
mod decide_tests {
    use super::*;

    #[test]
    fn a_url_runs_the_test_a_missing_one_skips_it_or_fails_under_ci() {
        let url = || Some("postgres://h/db".to_string());
        assert_eq!(
            decide(url(), Some("true".into())),
            PostgresTest::Run("postgres://h/db".into())
        );
        assert_eq!(
            decide(url(), None),
            PostgresTest::Run("postgres://h/db".into())
        );
        assert_eq!(decide(None, Some("true".into())), PostgresTest::Fail);
        assert_eq!(decide(None, Some("1".into())), PostgresTest::Fail);
        assert_eq!(decide(None, None), PostgresTest::Skip);
        assert_eq!(decide(None, Some(String::new())), PostgresTest::Skip);
        assert_eq!(decide(None, Some("false".into())), PostgresTest::Skip);
    }
}
