-- A policy version's digest says which hash made it: Chorus' learner seals weight streams with
-- BLAKE3 since this migration, other learners may still use SHA-256. The column holds
-- `<algorithm>:<hex>` (`chorus_proto::checksum::describe`); the rows written before it were all
-- SHA-256. Keep in step with ../postgres/0009_weights_digest.sql.
ALTER TABLE policy_versions RENAME COLUMN sha256 TO weights_digest;
UPDATE policy_versions SET weights_digest = 'sha256:' || weights_digest;
