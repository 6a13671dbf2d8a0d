//! A fresh PostgreSQL schema per test, so tests sharing one database never see each other's
//! rows (included by path by the ledger test suites).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Creates an empty schema in the database at `base` and returns a URL whose connections use
/// it, with the schema's name (to drop it afterwards).
pub async fn fresh_schema(base: &str) -> (String, String) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let schema = format!(
        "chorus_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let admin = sqlx::PgPool::connect(base).await.unwrap();
    for sql in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    (format!("{base}{sep}options[search_path]={schema}"), schema)
}

/// Drops `schema` from the database at `base`.
pub async fn drop_schema(base: &str, schema: &str) {
    let admin = sqlx::PgPool::connect(base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
}
