-- Views for the questions people ask of a run's rollouts, so that psql (or sqlite3) alone
-- answers them, and indexes for filtering by run and environment, reward, step and version.
-- Keep in step with ../postgres/0007_views.sql; docs/ledger.md describes each view.

-- Reward per environment and step: the scored trajectories of each step's prompts.
CREATE VIEW reward_by_step AS
SELECT t.run_id, p.stage_index, p.step_dispatched AS step, t.environment,
       COUNT(*) AS trajectories,
       AVG(t.reward) AS mean_reward,
       MIN(t.reward) AS min_reward,
       MAX(t.reward) AS max_reward,
       AVG(CASE WHEN t.reward >= 1 THEN CAST(1 AS DOUBLE PRECISION)
                ELSE CAST(0 AS DOUBLE PRECISION) END) AS solved,
       AVG(CAST(t.num_completion_tokens AS DOUBLE PRECISION)) AS mean_tokens
FROM trajectories t JOIN prompts p ON p.id = t.prompt_id
WHERE t.status = 'ok' AND t.reward IS NOT NULL
GROUP BY t.run_id, p.stage_index, p.step_dispatched, t.environment;

-- Hardest and easiest tasks: each task of a run (by its content) with how often it was
-- drawn and how its completions scored. ORDER BY mean_reward for the hardest first.
CREATE VIEW task_difficulty AS
SELECT p.run_id, p.environment, p.task_json,
       COUNT(DISTINCT p.id) AS prompts,
       COUNT(*) AS trajectories,
       AVG(t.reward) AS mean_reward,
       AVG(CASE WHEN t.reward >= 1 THEN CAST(1 AS DOUBLE PRECISION)
                ELSE CAST(0 AS DOUBLE PRECISION) END) AS solved
FROM prompts p JOIN trajectories t ON t.prompt_id = p.id
WHERE t.status = 'ok' AND t.reward IS NOT NULL
GROUP BY p.run_id, p.environment, p.task_json;

-- Staleness of what the learner trained on: trajectories and their completion tokens by how
-- many versions their oldest token lagged the weights that trained on them (lag > 0: sampled
-- by a stale version).
CREATE VIEW trained_staleness AS
SELECT run_id, stage_index, environment, consumed_at_step - min_policy_version AS lag,
       COUNT(*) AS trajectories, CAST(SUM(num_completion_tokens) AS BIGINT) AS tokens
FROM trajectories
WHERE consumed_at_step IS NOT NULL AND min_policy_version IS NOT NULL
GROUP BY run_id, stage_index, environment, consumed_at_step - min_policy_version;

-- Faults per environment: trajectories that failed (an environment error, a panic, a
-- deadline, a lost worker) and prompts dropped, with the last failure's reason.
CREATE VIEW faults_by_environment AS
SELECT e.run_id, e.environment,
       (SELECT COUNT(*) FROM trajectories t
        WHERE t.run_id = e.run_id AND t.environment = e.environment) AS trajectories,
       (SELECT COUNT(*) FROM trajectories t
        WHERE t.run_id = e.run_id AND t.environment = e.environment
          AND t.status = 'failed') AS failed_trajectories,
       (SELECT COUNT(*) FROM prompts p
        WHERE p.run_id = e.run_id AND p.environment = e.environment
          AND p.state = 'dropped') AS dropped_prompts,
       (SELECT t.failure_reason FROM trajectories t
        WHERE t.run_id = e.run_id AND t.environment = e.environment AND t.status = 'failed'
        ORDER BY t.created_at_ms DESC, t.id DESC LIMIT 1) AS last_failure
FROM (SELECT DISTINCT run_id, environment FROM prompts) e;

-- One row per stage: its span, metric at the start and the end, trajectories, wall time,
-- the mean loss of its learner steps and the mean reward of what it trained on.
CREATE VIEW stage_summary AS
SELECT s.run_id, s.stage_index, s.name, s.kind, s.status, s.first_step, s.last_step,
       s.last_step - s.first_step AS steps,
       s.metric, s.metric_start, s.metric_end, s.metric_end - s.metric_start AS metric_gain,
       s.trajectories,
       CAST(s.finished_at_ms - s.started_at_ms AS DOUBLE PRECISION) / 1000 AS wall_seconds,
       (SELECT AVG(l.loss) FROM learner_steps l
        WHERE l.run_id = s.run_id AND l.stage_index = s.stage_index) AS mean_loss,
       (SELECT AVG(t.reward) FROM trajectories t
        WHERE t.run_id = s.run_id AND t.stage_index = s.stage_index
          AND t.consumed_at_step IS NOT NULL) AS mean_trained_reward,
       s.checkpoint_path
FROM stages s;

CREATE INDEX trajectories_run_env ON trajectories (run_id, environment);
CREATE INDEX trajectories_run_consumed ON trajectories (run_id, consumed_at_step);
CREATE INDEX trajectories_run_reward ON trajectories (run_id, reward);
CREATE INDEX trajectories_run_version ON trajectories (run_id, min_policy_version);
CREATE INDEX prompts_run_env ON prompts (run_id, environment);
