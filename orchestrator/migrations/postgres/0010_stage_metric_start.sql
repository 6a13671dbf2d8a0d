-- A reward-model stage measures its metric's start only once under way; since this migration the
-- stage's end records it (`StageEnd::metric_start`). Rows written before hold it only in their
-- summary. Keep in step with ../sqlite/0010_stage_metric_start.sql.
UPDATE stages SET metric_start = (summary_json::jsonb ->> 'start')::double precision
WHERE metric_start IS NULL AND summary_json IS NOT NULL
  AND jsonb_typeof(summary_json::jsonb -> 'start') = 'number';
