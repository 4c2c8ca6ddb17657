//! A service running in this process on a runtime of its own, stopped
//! gracefully or killed like SIGKILL would.

use std::future::Future;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A service running in this process, on a runtime of its own so that
/// killing it drops every task and connection it owns, like SIGKILL would.
pub(crate) struct Running {
    stop: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Option<anyhow::Result<()>>>>,
}

impl Running {
    /// Runs `start(listener, stopped)` on a fresh runtime whose threads are
    /// called `name` (what the benchmarks' CPU figures are grouped by);
    /// `stopped` resolves on [`Running::stop`].
    pub(crate) fn spawn<F>(
        name: &str,
        listener: std::net::TcpListener,
        start: impl FnOnce(TcpListener, oneshot::Receiver<()>) -> F + Send + 'static,
    ) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let (kill, killed) = oneshot::channel::<()>();
        let name = name.to_owned();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .thread_name(name)
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let outcome = runtime.block_on(async move {
                listener.set_nonblocking(true)?;
                let listener = TcpListener::from_std(listener)?;
                let run = start(listener, stopped);
                tokio::select! {
                    result = run => Ok(Some(result)),
                    _ = killed => Ok(None),
                }
            });
            runtime.shutdown_background();
            outcome.unwrap_or_else(|error: std::io::Error| Some(Err(error.into())))
        });
        Self {
            stop: Some(stop),
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    pub(crate) async fn join(mut self) -> Option<anyhow::Result<()>> {
        let thread = self.thread.take()?;
        tokio::task::spawn_blocking(move || thread.join().ok().flatten())
            .await
            .ok()
            .flatten()
    }

    /// Graceful: the SIGTERM path.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join().await.unwrap_or(Ok(()))
    }

    /// Abrupt: everything the service owns is dropped at once.
    pub(crate) async fn kill(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        let _ = self.join().await;
    }
}

pub(crate) async fn shutdown_on(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}
