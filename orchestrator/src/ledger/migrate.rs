//! Schema migrations, one folder per dialect, embedded at compile time.
//!
//! Files follow sqlx-cli naming (`<version>_<description>.sql`), so
//! `sqlx migrate run --source orchestrator/migrations/<dialect>` applies the
//! same history by hand. A new migration must be added to both folders and to
//! the lists below; a test checks the lists match the folders.

use std::borrow::Cow;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// (version, description, SQL) of each SQLite migration.
pub(crate) const SQLITE: &[(i64, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("../../migrations/sqlite/0001_ledger.sql"),
    ),
    (
        2,
        "logprob_mismatch",
        include_str!("../../migrations/sqlite/0002_logprob_mismatch.sql"),
    ),
    (
        3,
        "launches",
        include_str!("../../migrations/sqlite/0003_launches.sql"),
    ),
    (
        4,
        "stages",
        include_str!("../../migrations/sqlite/0004_stages.sql"),
    ),
    (
        5,
        "evaluations",
        include_str!("../../migrations/sqlite/0005_evaluations.sql"),
    ),
    (
        6,
        "run_outputs",
        include_str!("../../migrations/sqlite/0006_run_outputs.sql"),
    ),
    (
        7,
        "views",
        include_str!("../../migrations/sqlite/0007_views.sql"),
    ),
    (
        8,
        "weight_transfers",
        include_str!("../../migrations/sqlite/0008_weight_transfers.sql"),
    ),
    (
        9,
        "weights_digest",
        include_str!("../../migrations/sqlite/0009_weights_digest.sql"),
    ),
    (
        10,
        "stage_metric_start",
        include_str!("../../migrations/sqlite/0010_stage_metric_start.sql"),
    ),
    (
        11,
        "sampled_evaluations",
        include_str!("../../migrations/sqlite/0011_sampled_evaluations.sql"),
    ),
];

/// (version, description, SQL) of each PostgreSQL migration.
pub(crate) const POSTGRES: &[(i64, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("../../migrations/postgres/0001_ledger.sql"),
    ),
    (
        2,
        "logprob_mismatch",
        include_str!("../../migrations/postgres/0002_logprob_mismatch.sql"),
    ),
    (
        3,
        "launches",
        include_str!("../../migrations/postgres/0003_launches.sql"),
    ),
    (
        4,
        "stages",
        include_str!("../../migrations/postgres/0004_stages.sql"),
    ),
    (
        5,
        "evaluations",
        include_str!("../../migrations/postgres/0005_evaluations.sql"),
    ),
    (
        6,
        "run_outputs",
        include_str!("../../migrations/postgres/0006_run_outputs.sql"),
    ),
    (
        7,
        "views",
        include_str!("../../migrations/postgres/0007_views.sql"),
    ),
    (
        8,
        "weight_transfers",
        include_str!("../../migrations/postgres/0008_weight_transfers.sql"),
    ),
    (
        9,
        "weights_digest",
        include_str!("../../migrations/postgres/0009_weights_digest.sql"),
    ),
    (
        10,
        "stage_metric_start",
        include_str!("../../migrations/postgres/0010_stage_metric_start.sql"),
    ),
    (
        11,
        "sampled_evaluations",
        include_str!("../../migrations/postgres/0011_sampled_evaluations.sql"),
    ),
];

/// A migrator for one dialect's list.
pub(crate) fn migrator(list: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        list.iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn files(dialect: &str) -> Vec<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dialect);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    }

    fn names(list: &[(i64, &str, &str)]) -> Vec<String> {
        list.iter()
            .map(|(v, d, _)| format!("{v:04}_{d}.sql"))
            .collect()
    }

    #[test]
    fn embedded_lists_match_the_migration_folders() {
        assert_eq!(names(SQLITE), files("sqlite"));
        assert_eq!(names(POSTGRES), files("postgres"));
    }

    #[test]
    fn both_dialects_create_the_same_tables() {
        let tables = |sql: &str| {
            let mut t: Vec<String> = sql
                .lines()
                .filter_map(|l| l.strip_prefix("CREATE TABLE "))
                .map(|l| l.split_whitespace().next().unwrap().to_owned())
                .collect();
            t.sort();
            t
        };
        for ((_, _, lite), (_, _, pg)) in SQLITE.iter().zip(POSTGRES) {
            assert_eq!(tables(lite), tables(pg));
        }
        assert_eq!(
            tables(SQLITE[0].2),
            [
                "events",
                "learner_steps",
                "policy_versions",
                "prompts",
                "runs",
                "trajectories"
            ]
        );
    }

    #[test]
    fn migrator_orders_versions() {
        let m = migrator(SQLITE);
        assert_eq!(
            m.iter().map(|m| m.version).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        );
    }

    /// An in-memory SQLite ledger with the first `applied` migrations and run `r`, and the
    /// migrations left to apply.
    async fn sqlite_with_a_run_before(
        applied: usize,
    ) -> (
        sqlx::SqliteConnection,
        &'static [(i64, &'static str, &'static str)],
    ) {
        use sqlx::Connection;
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let (before, after) = SQLITE.split_at(applied);
        apply(&mut db, before).await;
        sqlx::query(
            "INSERT INTO runs (id, name, config_toml, status, created_at_ms) \
             VALUES ('r', 'r', '', 'running', 0)",
        )
        .execute(&mut db)
        .await
        .unwrap();
        (db, after)
    }

    /// Applies `migrations` in order.
    async fn apply(db: &mut sqlx::SqliteConnection, migrations: &[(i64, &str, &'static str)]) {
        for (_, _, sql) in migrations {
            sqlx::raw_sql(*sql).execute(&mut *db).await.unwrap();
        }
    }

    #[tokio::test]
    async fn digests_written_before_0009_read_back_as_sha256() {
        use sqlx::Row;
        let (mut db, after) = sqlite_with_a_run_before(8).await;
        sqlx::query(
            "INSERT INTO policy_versions (run_id, version, learner_step, sha256, num_bytes, \
             created_at_ms) VALUES ('r', 1, 1, 'abcd', 10, 0)",
        )
        .execute(&mut db)
        .await
        .unwrap();
        apply(&mut db, after).await;
        let row = sqlx::query("SELECT weights_digest FROM policy_versions")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>(0), "sha256:abcd");
    }

    #[tokio::test]
    async fn stage_starts_written_before_0010_are_read_from_their_summaries() {
        use sqlx::Row;
        let (mut db, after) = sqlite_with_a_run_before(9).await;
        // A reward model's row (start only in its summary), a row whose start was recorded,
        // and one without a summary.
        for (index, start, summary) in [
            (0, None, Some(r#"{"start": 0.46, "end": 0.95}"#)),
            (1, Some(0.3), Some(r#"{"start": 0.9}"#)),
            (2, None, None),
        ] {
            sqlx::query(
                "INSERT INTO stages (run_id, stage_index, name, kind, status, first_step, \
                 metric_start, summary_json, started_at_ms) \
                 VALUES ('r', $1, 's', 'k', 'succeeded', 0, $2, $3, 0)",
            )
            .bind(index)
            .bind(start)
            .bind(summary)
            .execute(&mut db)
            .await
            .unwrap();
        }
        apply(&mut db, after).await;
        let starts: Vec<Option<f64>> =
            sqlx::query("SELECT metric_start FROM stages ORDER BY stage_index")
                .fetch_all(&mut db)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        assert_eq!(starts, [Some(0.46), Some(0.3), None]);
    }

    #[tokio::test]
    async fn evaluations_written_before_0011_read_back_as_one_greedy_answer_per_task() {
        use sqlx::Row;
        let (mut db, after) = sqlite_with_a_run_before(10).await;
        sqlx::query(
            "INSERT INTO evaluations (run_id, policy_version, environment, difficulty, tasks, \
             correct, accuracy, accuracy_lo, accuracy_hi, mean_reward, created_at_ms) \
             VALUES ('r', 0, 'math', 0, 4, 1, 0.25, 0.05, 0.7, 0.25, 0)",
        )
        .execute(&mut db)
        .await
        .unwrap();
        apply(&mut db, after).await;
        let row = sqlx::query("SELECT samples_per_task, effective_tasks FROM evaluations")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(row.get::<i64, _>(0), 1);
        assert_eq!(row.get::<Option<f64>, _>(1), None);
    }
}
