//! The limits every service enforces on what it is sent, in one place, so a server and its
//! clients agree on them and every refusal can quote the limit it applied.
//!
//! Two kinds:
//! - **message sizes**, per service: the largest encoded message a server decodes (and its
//!   clients should decode from it). Tonic's default is 4 MiB for decoding and unbounded for
//!   encoding; a longer message is refused by tonic itself with `OUT_OF_RANGE` ("decoded
//!   message length too large: found N bytes, the limit is: M bytes") before any handler
//!   runs. Servers apply them with `max_decoding_message_size` on the generated
//!   `*Server` (and `max_encoding_message_size`, so a server never sends what its client
//!   refuses); clients with the same calls on the generated `*Client`.
//! - **counts within a message**: tokens in a prompt or a completion, trajectories in a group,
//!   groups in a step. A message under its size limit can still ask for absurd work (a
//!   `max_new_tokens` of 4 billion in a 30-byte request, a group that says its step has a
//!   billion groups), so handlers check these before they allocate or queue anything, and
//!   refuse with `INVALID_ARGUMENT` (or a rejected group) naming the field and the limit.

/// 1 MiB.
const MIB: usize = 1 << 20;

/// HTTP/2 flow-control window of one stream, set by every Chorus server and client
/// (`tls::server`, `tls::endpoint`): how many bytes a sender may have in flight on a stream
/// before the receiver acknowledges them. hyper's defaults under tonic (1 MiB for a server, 2 MiB for
/// a client) hold a weight stream of 1 MiB chunks to one or two chunks per round trip; 8 MiB lets
/// the learner keep sending while a worker decodes and verifies (README, "weight_sync"). It
/// bounds what one stream can make its receiver buffer.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 8 * MIB as u32;

/// HTTP/2 flow-control window of a whole connection: two streams' worth.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 * HTTP2_STREAM_WINDOW_BYTES;

/// Largest HTTP/2 DATA frame a Chorus endpoint accepts. HTTP/2's default is 16 KiB, which cuts a
/// 1 MiB weight chunk into 64 frames, each with its own header, window accounting and wake-up.
pub const HTTP2_MAX_FRAME_BYTES: u32 = MIB as u32;

/// Largest message the `Orchestrator` service decodes: registrations, heartbeats, a launched
/// run's TOML configuration. Tonic's default.
pub const ORCHESTRATOR_MAX_MESSAGE_BYTES: usize = 4 * MIB;

/// Largest message of the `RolloutWorker` service (a `GenerateRequest` of up to
/// [`MAX_PROMPT_TOKENS`] token ids, about 5 bytes each; a `GenerateResponse` of up to
/// [`MAX_NEW_TOKENS`] tokens with their log-probability and policy version, about 15 bytes
/// each).
pub const ROLLOUT_WORKER_MAX_MESSAGE_BYTES: usize = 32 * MIB;

/// Largest message of the `Learner` service: a scored `TrajectoryGroup` (every trajectory's
/// prompt, completion, log-probabilities and versions; a group of 64 sequences of 32k tokens is
/// about 30 MiB) or one weight chunk.
pub const LEARNER_MAX_MESSAGE_BYTES: usize = 256 * MIB;

/// Largest message of the `Environment` service: a task (its prompt and `task_json`, which may
/// carry a repository for SWE tasks), an episode's state, a completion.
pub const ENVIRONMENT_MAX_MESSAGE_BYTES: usize = 64 * MIB;

/// Most token ids in a prompt a rollout worker accepts (Nemotron 3's context of 1M tokens).
pub const MAX_PROMPT_TOKENS: usize = 1 << 20;

/// Most tokens one generation may ask for (`max_new_tokens`), and most completion tokens of one
/// trajectory the learner trains on.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

/// Most trajectories in one scored group (completions per prompt).
pub const MAX_GROUP_SIZE: usize = 4096;

/// Most groups one optimizer step may gather (`step_groups`, the stage's prompts per step): the
/// learner queues groups until it holds that many.
pub const MAX_STEP_GROUPS: usize = 1 << 16;

/// Most steps ahead of its current version a group's `step` may be: the learner holds groups of
/// later steps until it reaches them, and an orchestrator is never further ahead than its
/// staleness bound.
pub const MAX_STEPS_AHEAD: u64 = 1024;
