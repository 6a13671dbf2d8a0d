-- Held-out evaluations, one row per policy version and environment (the learning curve in SQL),
-- and the stage each published policy version belongs to. Keep in step with the other
-- dialect's 0005_evaluations.sql.

CREATE TABLE evaluations (
    run_id         TEXT    NOT NULL REFERENCES runs (id),
    policy_version BIGINT  NOT NULL,
    environment    TEXT    NOT NULL,
    difficulty     BIGINT  NOT NULL,
    stage_index    BIGINT,
    tasks          BIGINT  NOT NULL,
    correct        BIGINT  NOT NULL,
    accuracy       DOUBLE PRECISION NOT NULL,
    accuracy_lo    DOUBLE PRECISION NOT NULL,
    accuracy_hi    DOUBLE PRECISION NOT NULL,
    mean_reward    DOUBLE PRECISION NOT NULL,
    created_at_ms  BIGINT  NOT NULL,
    PRIMARY KEY (run_id, policy_version, environment, difficulty)
);

ALTER TABLE policy_versions ADD COLUMN stage_index BIGINT;
