-- Runs launched through Orchestrator.LaunchRun, by the orchestrator that accepted them. Keep in
-- step with ../postgres/0003_launches.sql.
-- A restarted orchestrator finds its launched runs here: pending ones are queued again,
-- and a retried launch with the same request id gets the run the first one created.

CREATE TABLE launches (
    orchestrator    TEXT    NOT NULL,
    request_id      TEXT    NOT NULL,
    run_id          TEXT    NOT NULL REFERENCES runs (id),
    launched_at_ms  BIGINT  NOT NULL,
    PRIMARY KEY (orchestrator, request_id)
);

CREATE INDEX launches_by_run ON launches (run_id);
