//! Errors of the ledger.

use std::path::PathBuf;

/// What can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The URL is neither `sqlite:...` nor `postgres://...`, or is malformed.
    #[error("invalid ledger URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL (password removed).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory of the SQLite file could not be created.
    #[error("cannot create directory {} for the SQLite ledger", path.display())]
    CreateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The lock that keeps processes from migrating one SQLite file at once could not be taken.
    #[error("cannot lock {} to migrate the SQLite ledger", path.display())]
    MigrationLock {
        /// The lock file beside the ledger.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the {backend} ledger at {url}")]
    Connect {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The URL (password removed).
        url: String,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("migrating the {backend} ledger schema failed")]
    Migrate {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Cause.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("ledger query `{operation}` failed on {backend}")]
    Query {
        /// The [`Ledger`](super::Ledger) method.
        operation: &'static str,
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// A stored value could not be decoded.
    #[error("corrupt ledger value: {table}.{column} of row {id:?}: {reason}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// Key of the row.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A number does not fit the signed 64-bit columns.
    #[error("{field} = {value} does not fit in a signed 64-bit column")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// Writes were refused by the database; the rest of their batch was kept.
    #[error("{failed} ledger write(s) failed since the last flush; first: {first}")]
    WriteFailed {
        /// Writes that failed (one per method call).
        failed: usize,
        /// Description of the first failure.
        first: String,
    },
    /// The ledger was closed; nothing more can be written.
    #[error("the ledger is closed")]
    Closed,
    /// No run has this id (`chorus inspect runs` lists them).
    #[error("no run `{0}` in the ledger (chorus inspect runs lists the runs)")]
    UnknownRun(String),
}

impl LedgerError {
    /// True when the ledger was closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed)
    }

    /// True when background writes failed.
    pub fn is_write_failed(&self) -> bool {
        matches!(self, Self::WriteFailed { .. })
    }
}

/// `url` with any password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://chorus:s3cret@127.0.0.1:5432/db?sslmode=disable"),
            "postgres://chorus:***@127.0.0.1:5432/db?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://chorus@host/db"),
            "postgres://chorus@host/db"
        );
        assert_eq!(redact("sqlite://runs/ledger.db"), "sqlite://runs/ledger.db");
        assert_eq!(redact("sqlite::memory:"), "sqlite::memory:");
    }
}
