-- Mean |log pi_learner - log pi_worker| over a step's tokens: how far the rollout workers'
-- sampling distribution (stale weights, NVFP4 quantization) is from the learner's.
ALTER TABLE learner_steps ADD COLUMN mean_abs_logprob_diff DOUBLE PRECISION;
