//! The one place that knows how a statement reaches either database.
//!
//! Statements are written once, in the SQL both SQLite and PostgreSQL accept
//! (`$1` placeholders, `ON CONFLICT ... DO NOTHING`), as a [`Stmt`]: text plus
//! [`Param`]s. [`Pools`] runs it on whichever backend the ledger opened, and rows
//! come back through the [`Cols`] trait, so decoding is also written once.

use sqlx::encode::Encode;
use sqlx::postgres::PgRow;
use sqlx::query::Query;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Database, PgPool, Row, SqlitePool, Type};

/// A bound value. Integers are `BIGINT`, reals `DOUBLE PRECISION`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Blob(Vec<u8>),
    Bool(bool),
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::Int(Some(v))
    }
}
impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Self {
        Param::Int(v)
    }
}
impl From<f64> for Param {
    fn from(v: f64) -> Self {
        Param::Real(Some(v))
    }
}
impl From<Option<f64>> for Param {
    fn from(v: Option<f64>) -> Self {
        Param::Real(v)
    }
}
/// PostgreSQL text cannot hold NUL, which model output can contain: both dialects store it as
/// U+FFFD so that the two ledgers read back alike.
fn storable(v: &str) -> String {
    if v.contains('\0') {
        v.replace('\0', "\u{FFFD}")
    } else {
        v.to_owned()
    }
}

impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Param::Text(Some(storable(v)))
    }
}
impl From<String> for Param {
    fn from(v: String) -> Self {
        Param::Text(Some(if v.contains('\0') { storable(&v) } else { v }))
    }
}
impl From<Option<&str>> for Param {
    fn from(v: Option<&str>) -> Self {
        Param::Text(v.map(storable))
    }
}
impl From<Vec<u8>> for Param {
    fn from(v: Vec<u8>) -> Self {
        Param::Blob(v)
    }
}
impl From<bool> for Param {
    fn from(v: bool) -> Self {
        Param::Bool(v)
    }
}

/// A statement with its parameters.
///
/// The text is either a literal or assembled from literal fragments and `$n`
/// placeholders (see [`placeholders`]); values are always bound, never spliced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stmt {
    pub sql: String,
    pub params: Vec<Param>,
}

impl Stmt {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    pub fn bind(mut self, p: impl Into<Param>) -> Self {
        self.params.push(p.into());
        self
    }
}

/// `($first, $first+1, ...)` groups for a multi-row `VALUES` or an `IN` list:
/// `rows` groups of `per_row` placeholders numbered from `first`.
pub(crate) fn placeholders(first: usize, rows: usize, per_row: usize) -> String {
    let mut out = String::new();
    let mut n = first;
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..per_row {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&n.to_string());
            n += 1;
        }
        out.push(')');
    }
    out
}

fn bind_params<DB>(
    mut query: Query<'static, DB, DB::Arguments>,
    params: Vec<Param>,
) -> Query<'static, DB, DB::Arguments>
where
    DB: Database,
    Option<i64>: Encode<'static, DB> + Type<DB>,
    Option<f64>: Encode<'static, DB> + Type<DB>,
    Option<String>: Encode<'static, DB> + Type<DB>,
    Vec<u8>: Encode<'static, DB> + Type<DB>,
    bool: Encode<'static, DB> + Type<DB>,
{
    for p in params {
        query = match p {
            Param::Int(v) => query.bind(v),
            Param::Real(v) => query.bind(v),
            Param::Text(v) => query.bind(v),
            Param::Blob(v) => query.bind(v),
            Param::Bool(v) => query.bind(v),
        };
    }
    query
}

/// The connection pool of the backend in use.
#[derive(Debug, Clone)]
pub(crate) enum Pools {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pools {
    pub fn backend_name(&self) -> &'static str {
        match self {
            Pools::Sqlite(_) => "sqlite",
            Pools::Postgres(_) => "postgres",
        }
    }

    /// Runs `stmts` in one transaction: all or nothing.
    pub async fn execute_in_transaction(&self, stmts: Vec<Stmt>) -> Result<(), sqlx::Error> {
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                for s in stmts {
                    bind_params(sqlx::query(AssertSqlSafe(s.sql)), s.params)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            }};
        }
        match self {
            Pools::Sqlite(p) => run!(p),
            Pools::Postgres(p) => run!(p),
        }
    }

    /// Runs a query and decodes each row with `decode`.
    pub async fn fetch<T, E>(
        &self,
        stmt: Stmt,
        decode: impl Fn(&dyn Cols) -> Result<T, E>,
    ) -> Result<Vec<T>, FetchError<E>> {
        let query = |sql| AssertSqlSafe(sql);
        match self {
            Pools::Sqlite(p) => {
                let rows = bind_params(sqlx::query(query(stmt.sql)), stmt.params)
                    .fetch_all(p)
                    .await
                    .map_err(FetchError::Sql)?;
                rows.iter()
                    .map(|r| decode(r).map_err(FetchError::Decode))
                    .collect()
            }
            Pools::Postgres(p) => {
                let rows = bind_params(sqlx::query(query(stmt.sql)), stmt.params)
                    .fetch_all(p)
                    .await
                    .map_err(FetchError::Sql)?;
                rows.iter()
                    .map(|r| decode(r).map_err(FetchError::Decode))
                    .collect()
            }
        }
    }

    pub async fn close(&self) {
        match self {
            Pools::Sqlite(p) => p.close().await,
            Pools::Postgres(p) => p.close().await,
        }
    }
}

/// Failure of [`Pools::fetch`]: the query, or decoding a row.
#[derive(Debug)]
pub(crate) enum FetchError<E> {
    Sql(sqlx::Error),
    Decode(E),
}

/// Typed access to the columns of a row of either backend.
pub(crate) trait Cols {
    fn int(&self, col: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn opt_real(&self, col: &str) -> Result<Option<f64>, sqlx::Error>;
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn blob(&self, col: &str) -> Result<Vec<u8>, sqlx::Error>;
    fn boolean(&self, col: &str) -> Result<bool, sqlx::Error>;
}

macro_rules! impl_cols {
    ($row:ty) => {
        impl Cols for $row {
            fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_real(&self, col: &str) -> Result<Option<f64>, sqlx::Error> {
                self.try_get(col)
            }
            fn text(&self, col: &str) -> Result<String, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(col)
            }
            fn blob(&self, col: &str) -> Result<Vec<u8>, sqlx::Error> {
                self.try_get(col)
            }
            fn boolean(&self, col: &str) -> Result<bool, sqlx::Error> {
                self.try_get(col)
            }
        }
    };
}

impl_cols!(SqliteRow);
impl_cols!(PgRow);

#[cfg(test)]
mod nul_tests {
    use super::*;

    #[test]
    fn nul_is_replaced_in_text() {
        assert_eq!(Param::from("a\0b"), Param::Text(Some("a\u{FFFD}b".into())));
        assert_eq!(
            Param::from(String::from("ok")),
            Param::Text(Some("ok".into()))
        );
        assert_eq!(
            Param::from(Some("\0")),
            Param::Text(Some("\u{FFFD}".into()))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_consecutively() {
        assert_eq!(placeholders(1, 1, 3), "($1, $2, $3)");
        assert_eq!(placeholders(4, 2, 2), "($4, $5), ($6, $7)");
        assert_eq!(placeholders(1, 3, 1), "($1), ($2), ($3)");
    }

    #[test]
    fn stmt_collects_params_in_order() {
        let s = Stmt::new("SELECT $1, $2, $3")
            .bind(1i64)
            .bind(Some("x"))
            .bind(None::<f64>);
        assert_eq!(
            s.params,
            [
                Param::Int(Some(1)),
                Param::Text(Some("x".into())),
                Param::Real(None)
            ]
        );
    }
}
