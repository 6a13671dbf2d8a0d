//! Environments in other processes, over the gRPC `Environment` service of `chorus-proto`.
//!
//! - [`RemoteEnvironment`] is the client: an [`Environment`](crate::Environment) whose methods
//!   call a server (a plugin written in any language — `environments/python/` has a Python SDK —
//!   or a built-in behind `chorus serve environment`). A run registers one for every
//!   `{ url = "http://host:port" }` entry of its config, under that URL.
//! - [`serve_environment`] is the server: any Rust environment behind the service.
//!
//! Both attach or check the shared token (`authorization: Bearer …`, see
//! `chorus_proto::auth`). The service is stateless: a task travels whole in every call
//! (`task_json` carries its verification data) and a multi-turn episode's state comes back in
//! each `StepResponse` to be sent with the next `StepRequest`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chorus_environments::EnvError> {
//! use std::sync::Arc;
//! use chorus_environments::builtin::Arithmetic;
//! use chorus_environments::plugin::serve_environment;
//!
//! let served = serve_environment(Arc::new(Arithmetic), "127.0.0.1:0", "s3cret").await?;
//! println!("listening on {}", served.url());
//! # Ok(()) }
//! ```

mod client;
mod convert;
pub(crate) mod runtime;
pub mod scaffold;
mod server;

pub use client::{RemoteEnvironment, RemoteOptions};
pub use server::{ServedEnvironment, serve_environment};
