//! How a daemon stops: one [`Shutdown`] handle per daemon, cancelled by the
//! first SIGINT or SIGTERM in the binaries (or by a test in-process). Every
//! background task (piece server, heartbeats, metrics listener, expiry and
//! copy loops) is spawned through it, ends when it is cancelled, and is
//! awaited by [`Shutdown::stop`] before the daemon's `run` returns.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// How long a daemon waits for its background tasks to end once cancelled.
pub const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Background tasks still running when [`Shutdown::stop`] gave up on them.
#[derive(Debug, thiserror::Error)]
#[error("{running} background tasks still running {within:?} after shutdown")]
pub struct Unfinished {
    pub running: usize,
    pub within: Duration,
}

/// A daemon's shutdown signal and the background tasks that end with it.
/// Clones share both.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    /// A handle that nothing cancels but [`Shutdown::cancel`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle cancelled by the first SIGINT or SIGTERM. Must be called
    /// inside a runtime.
    pub fn on_signals() -> std::io::Result<Self> {
        let shutdown = Self::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = shutdown.token.clone();
        shutdown.spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            token.cancel();
        });
        Ok(shutdown)
    }

    /// Stops the daemon: every task spawned through this handle ends.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once the handle is cancelled (for servers' graceful
    /// shutdown futures).
    pub fn cancelled(&self) -> WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    /// Runs `task` in the background until it ends or the handle is
    /// cancelled, whichever comes first (then `task` is dropped).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = task => {}
            }
        })
    }

    /// Background tasks not yet ended.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Awaits `served` (a daemon's servers, which return once the handle is
    /// cancelled or one fails), then stops every background task within
    /// [`STOP_WITHIN`]: the servers' error first, else the stop's.
    pub async fn serve_then_stop(
        &self,
        served: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let served = served.await;
        let stopped = self.stop(STOP_WITHIN).await;
        served?;
        stopped?;
        tracing::info!("stopped");
        Ok(())
    }

    /// Cancels the handle and waits up to `within` for every background
    /// task to end.
    pub async fn stop(&self, within: Duration) -> Result<(), Unfinished> {
        self.cancel();
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_err()
        {
            return Err(Unfinished {
                running: self.tasks.len(),
                within,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_ends_every_loop_and_reports_one_that_would_not_end() {
        let shutdown = Shutdown::new();
        let forever = shutdown.spawn(std::future::pending());
        let ticking = shutdown.spawn(async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert_eq!(shutdown.running(), 2);
        shutdown.stop(Duration::from_secs(1)).await.unwrap();
        assert_eq!(shutdown.running(), 0);
        // The tracker counts a task done once its future is dropped, a moment
        // before its JoinHandle hears of it.
        for handle in [forever, ticking] {
            tokio::time::timeout(Duration::from_secs(1), handle)
                .await
                .expect("the task ended")
                .unwrap();
        }

        // A task stuck in blocking code cannot be cancelled: stop says so.
        let stuck = Shutdown::new();
        stuck.spawn(async {
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(500)));
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let unfinished = stuck.stop(Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(unfinished.running, 1);
        stuck.stop(Duration::from_secs(2)).await.unwrap();
    }
}
