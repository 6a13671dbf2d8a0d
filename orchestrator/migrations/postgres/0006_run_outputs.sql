-- What a run's summary.json is assembled from besides the other tables: chorus derives the
-- summary from the ledger. Keep in step with ../sqlite/0006_run_outputs.sql.

-- The CPU the run's process ran on, the directory of its final policy (HF layout), and its
-- environments' fault records (JSON: environment -> {faults, paused, last_fault}).
ALTER TABLE runs ADD COLUMN cpu TEXT;
ALTER TABLE runs ADD COLUMN checkpoint_path TEXT;
ALTER TABLE runs ADD COLUMN environment_faults TEXT;

-- A finished stage's summary as runs/<run>/stages/<stage>/summary.json holds it (JSON).
ALTER TABLE stages ADD COLUMN summary_json TEXT;

-- A launched run's own evaluation settings (LaunchRunRequest.eval_tasks and eval_every; NULL:
-- the daemon's), kept so that a restarted orchestrator queues the run again with them.
ALTER TABLE launches ADD COLUMN eval_tasks BIGINT;
ALTER TABLE launches ADD COLUMN eval_every BIGINT;
