-- A reward-model stage measures its metric's start only once under way; since this migration the
-- stage's end records it (`StageEnd::metric_start`). Rows written before hold it only in their
-- summary. Keep in step with ../postgres/0010_stage_metric_start.sql.
UPDATE stages SET metric_start = json_extract(summary_json, '$.start')
WHERE metric_start IS NULL AND summary_json IS NOT NULL
  AND json_valid(summary_json) AND json_type(summary_json, '$.start') IN ('real', 'integer');
