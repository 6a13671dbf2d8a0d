-- The stages of a run (SFT, RLVR, ...), and which stage every prompt, trajectory and learner step
-- belongs to. Keep in step with the other dialect's 0004_stages.sql.
-- A stage's learner steps are first_step + 1 ..= last_step: first_step is the learner's policy
-- version when the stage began.

CREATE TABLE stages (
    run_id          TEXT    NOT NULL REFERENCES runs (id),
    stage_index     BIGINT  NOT NULL,
    name            TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    first_step      BIGINT  NOT NULL,
    last_step       BIGINT,
    metric          TEXT,
    metric_start    DOUBLE PRECISION,
    metric_end      DOUBLE PRECISION,
    trajectories    BIGINT,
    checkpoint_path TEXT,
    started_at_ms   BIGINT  NOT NULL,
    finished_at_ms  BIGINT,
    PRIMARY KEY (run_id, stage_index)
);

ALTER TABLE prompts ADD COLUMN stage_index BIGINT;
ALTER TABLE trajectories ADD COLUMN stage_index BIGINT;
ALTER TABLE learner_steps ADD COLUMN stage_index BIGINT;
