-- A held-out evaluation may play each task several times at a temperature (`[evaluation]
-- samples`); since this migration a row says how many (`correct` then counts solved episodes
-- of tasks x samples_per_task) and the effective number of independent tasks its interval
-- used (NULL: `tasks`, as for every row written before). Keep in step with
-- ../sqlite/0011_sampled_evaluations.sql.
ALTER TABLE evaluations ADD COLUMN samples_per_task BIGINT NOT NULL DEFAULT 1;
ALTER TABLE evaluations ADD COLUMN effective_tasks DOUBLE PRECISION;
