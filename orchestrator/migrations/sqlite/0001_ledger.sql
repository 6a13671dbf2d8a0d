-- Chorus ledger, SQLite dialect. Keep in step with ../postgres/0001_ledger.sql.
-- Timestamps: milliseconds since the Unix epoch (UTC). JSON: TEXT.
-- Arrays: little-endian BLOBs (see docs/ledger.md).

CREATE TABLE runs (
    id             TEXT    PRIMARY KEY,
    name           TEXT    NOT NULL,
    config_toml    TEXT    NOT NULL,
    status         TEXT    NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at_ms  BIGINT  NOT NULL,
    finished_at_ms BIGINT
);

CREATE TABLE prompts (
    id               TEXT    PRIMARY KEY,
    run_id           TEXT    NOT NULL REFERENCES runs (id),
    group_id         TEXT    NOT NULL,
    environment      TEXT    NOT NULL,
    split            TEXT    NOT NULL CHECK (split IN ('train', 'heldout')),
    task_json        TEXT    NOT NULL,
    state            TEXT    NOT NULL
        CHECK (state IN ('dispatched', 'generated', 'scored', 'consumed', 'dropped')),
    drop_reason      TEXT,
    step_dispatched  BIGINT  NOT NULL,
    consumed_at_step BIGINT,
    dispatched_at_ms BIGINT  NOT NULL,
    generated_at_ms  BIGINT,
    scored_at_ms     BIGINT,
    consumed_at_ms   BIGINT,
    dropped_at_ms    BIGINT
);
CREATE INDEX prompts_run_state ON prompts (run_id, state);
CREATE INDEX prompts_group ON prompts (group_id);

CREATE TABLE trajectories (
    id                    TEXT    PRIMARY KEY,
    run_id                TEXT    NOT NULL REFERENCES runs (id),
    prompt_id             TEXT    NOT NULL,
    group_id              TEXT    NOT NULL,
    environment           TEXT    NOT NULL,
    worker_id             TEXT    NOT NULL,
    prompt_token_ids      BLOB    NOT NULL,
    completion_token_ids  BLOB    NOT NULL,
    num_completion_tokens BIGINT  NOT NULL,
    completion_text       TEXT    NOT NULL,
    logprobs              BLOB    NOT NULL,
    policy_versions       BLOB    NOT NULL,
    min_policy_version    BIGINT,
    max_policy_version    BIGINT,
    finish_reason         TEXT    NOT NULL,
    reward                DOUBLE PRECISION,
    reward_components     TEXT    NOT NULL,
    reason                TEXT,
    status                TEXT    NOT NULL CHECK (status IN ('ok', 'failed')),
    failure_reason        TEXT,
    queue_ms              BIGINT  NOT NULL,
    generate_ms           BIGINT  NOT NULL,
    score_ms              BIGINT  NOT NULL,
    created_at_ms         BIGINT  NOT NULL,
    consumed_at_step      BIGINT
);
CREATE INDEX trajectories_run_created ON trajectories (run_id, created_at_ms);
CREATE INDEX trajectories_env_created ON trajectories (environment, created_at_ms);
CREATE INDEX trajectories_prompt ON trajectories (prompt_id);

CREATE TABLE learner_steps (
    run_id           TEXT    NOT NULL REFERENCES runs (id),
    step             BIGINT  NOT NULL,
    policy_version   BIGINT  NOT NULL,
    loss             DOUBLE PRECISION,
    kl               DOUBLE PRECISION,
    entropy          DOUBLE PRECISION,
    grad_norm        DOUBLE PRECISION,
    learning_rate    DOUBLE PRECISION,
    clip_fraction    DOUBLE PRECISION,
    num_tokens       BIGINT  NOT NULL,
    num_trajectories BIGINT  NOT NULL,
    skipped          BOOLEAN NOT NULL,
    skip_reason      TEXT,
    created_at_ms    BIGINT  NOT NULL,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE policy_versions (
    run_id        TEXT    NOT NULL REFERENCES runs (id),
    version       BIGINT  NOT NULL,
    learner_step  BIGINT  NOT NULL,
    sha256        TEXT    NOT NULL,
    num_bytes     BIGINT  NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (run_id, version)
);

CREATE TABLE events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        TEXT    NOT NULL REFERENCES runs (id),
    kind          TEXT    NOT NULL,
    payload_json  TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL
);
CREATE INDEX events_run ON events (run_id, id);
