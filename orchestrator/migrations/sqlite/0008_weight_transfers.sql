-- Weight transfers: which worker fetched which policy version from the learner, how many bytes
-- and how long it took (timed by the learner, from the version being available to the last chunk
-- handed to the transport). Reported with the learner's steps. Keep in step with
-- ../postgres/0008_weight_transfers.sql.
CREATE TABLE weight_transfers (
    run_id          TEXT    NOT NULL REFERENCES runs (id),
    requester_id    TEXT    NOT NULL,
    policy_version  BIGINT  NOT NULL,
    num_bytes       BIGINT  NOT NULL,
    seconds         DOUBLE PRECISION NOT NULL,
    finished_at_ms  BIGINT  NOT NULL
);

CREATE INDEX weight_transfers_run_version ON weight_transfers (run_id, policy_version);

-- Per version: how many transfers, their bytes, mean and slowest seconds, and the span from the
-- first transfer's start to the last one's end (a waiting worker's transfer starts when the
-- version is published, so this is the time for a version to reach every worker that asked).
CREATE VIEW weight_sync AS
SELECT run_id, policy_version,
       COUNT(*) AS transfers,
       CAST(SUM(num_bytes) AS BIGINT) AS bytes,
       AVG(seconds) AS mean_seconds,
       MAX(seconds) AS max_seconds,
       (CAST(MAX(finished_at_ms) AS DOUBLE PRECISION)
        - MIN(CAST(finished_at_ms AS DOUBLE PRECISION) - seconds * 1000)) / 1000
           AS seconds_to_last_worker
FROM weight_transfers
GROUP BY run_id, policy_version;
