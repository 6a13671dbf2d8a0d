//! A small tokio runtime owned by a synchronous environment that talks over a network.
//!
//! The [`Environment`](crate::Environment) trait is synchronous. Its callers are plain threads
//! (the CLI), `spawn_blocking` threads (the orchestrator) or, in the worst case, async tasks. A
//! call therefore never uses `block_on` on a handle of the caller's runtime: the future runs on
//! this private runtime's own worker thread and the caller waits on a channel, which is safe in
//! all three places (in an async task it blocks that worker thread for the call, like any
//! synchronous code does, but cannot panic or deadlock).

use std::future::Future;

use crate::error::EnvError;

/// One worker thread and the I/O and timer drivers, shut down without waiting when dropped.
pub(crate) struct BlockingRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for BlockingRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingRuntime").finish_non_exhaustive()
    }
}

impl BlockingRuntime {
    /// A runtime whose thread is named after `label` (e.g. the server's address).
    pub(crate) fn new(label: &str) -> Result<Self, EnvError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chorus-env-client")
            .enable_all()
            .build()
            .map_err(|e| EnvError::Remote {
                url: label.to_string(),
                call: "starting the client runtime".into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// A handle for spawning onto this runtime.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
    }

    /// Runs `future` on this runtime and waits for its output on the calling thread.
    pub(crate) fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .expect("the client runtime dropped a call it had accepted")
    }
}

impl Drop for BlockingRuntime {
    fn drop(&mut self) {
        // Dropping a runtime normally waits for its tasks, which panics inside async code (the
        // orchestrator drops its registry there); nothing here needs waiting for.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_futures_from_plain_threads_and_from_async_code() {
        let rt = std::sync::Arc::new(BlockingRuntime::new("test").unwrap());
        assert_eq!(rt.run(async { 2 + 2 }), 4);
        // From inside another runtime (where block_on would panic), and dropped there.
        let outer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let inner = rt.clone();
        let got = outer.block_on(async move {
            let v = inner.run(async {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                7
            });
            drop(inner);
            v
        });
        assert_eq!(got, 7);
        let last = std::sync::Arc::try_unwrap(rt).unwrap();
        outer.block_on(async move { drop(last) });
    }
}
