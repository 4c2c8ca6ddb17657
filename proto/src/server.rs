//! What every Chukei gRPC server has besides its own services: gRPC health,
//! reflection over the Chukei descriptors, and the shutdown signal.

use tonic_health::server::HealthReporter;

use crate::FILE_DESCRIPTOR_SET;

/// The standard `grpc.health.v1.Health` service of one port and the
/// reporter that sets its statuses: the whole server ("") and each of
/// `services` SERVING — exactly the services the port serves, so a check of
/// any of them says SERVING and a check of any other says NOT_FOUND.
pub async fn health(
    services: &[&str],
) -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    for service in services {
        reporter
            .set_service_status(*service, tonic_health::ServingStatus::Serving)
            .await;
    }
    (reporter, server)
}

/// Health and reflection themselves, listed beside a port's own services.
const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The `grpc.reflection.v1` service of one port: it lists exactly
/// `services` (and health and reflection), and describes them from the
/// Chukei descriptors.
pub fn reflection(
    services: &[&str],
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(reflection_builder(services).build_v1()?)
}

/// The same descriptions over `grpc.reflection.v1alpha`, which older
/// tools (grpcurl before 1.8.8, Python's grpcio-reflection) still speak.
pub fn reflection_v1alpha(
    services: &[&str],
) -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(reflection_builder(services).build_v1alpha()?)
}

fn reflection_builder(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for service in services.iter().chain(&STANDARD_SERVICES) {
        builder = builder.with_service_name(*service);
    }
    builder
}

/// What a binary's `main` returns for a configuration its `validate`
/// refused: one line naming the flag on stderr (never a backtrace, whatever
/// `RUST_BACKTRACE` says) and exit code 2, like clap's own refusals.
pub fn refuse_configuration(error: &anyhow::Error) -> std::process::ExitCode {
    eprintln!("error: {error:#}");
    std::process::ExitCode::from(2)
}

/// What a binary's `main` returns once it ran: success, or what went wrong
/// on one line (its causes after colons) and exit code 1.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C: the signal every binary shuts down on.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}

/// Parses the command line as every Chukei binary does: `--help` and
/// `--version` are answered (exit 0); a wrong flag or value is refused in one
/// line on stderr naming it (exit 2), not clap's usage block.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                error.exit();
            }
            eprintln!("{} (see --help)", one_line(&error.render().to_string()));
            std::process::exit(2);
        }
    }
}

/// clap's message up to its first blank line (which ends what is wrong; the
/// tips and usage follow), on one line.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Serves `router` on `listener` until `shutdown` resolves or `cancel` is
/// cancelled; then cancels `cancel` (so long-lived streams end), lets in-flight
/// calls finish, and gives up on them after `grace`.
/// Concurrent HTTP/2 streams one client connection may open, and calls one
/// connection may have in flight: a client cannot take a server's every
/// task with one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// A gRPC server as every process builds one: over TLS when `tls` says so,
/// streams and in-flight calls per connection bounded, each call timed into
/// `histogram` (see [`crate::metrics::RpcMetricsLayer`]) and run in a span
/// that continues the caller's trace.
pub fn builder(
    registry: &crate::metrics::Registry,
    histogram: &'static str,
    tls: &crate::tls::TlsArgs,
) -> anyhow::Result<
    tonic::transport::Server<
        tower_layer::Stack<crate::metrics::RpcMetricsLayer, tower_layer::Identity>,
    >,
> {
    let mut server = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .concurrency_limit_per_connection(MAX_CONCURRENT_STREAMS as usize)
        .trace_fn(crate::telemetry::grpc_request_span);
    if let Some(config) = tls.server()? {
        server = server.tls_config(config)?;
    }
    Ok(server.layer(crate::metrics::RpcMetricsLayer::new(registry, histogram)))
}

/// A server's routes behind the RPC metrics layer, as every process builds them.
pub type Router = tonic::transport::server::Router<
    tower_layer::Stack<crate::metrics::RpcMetricsLayer, tower_layer::Identity>,
>;

pub async fn serve(
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    cancel: tokio_util::sync::CancellationToken,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal = {
        let cancel = cancel.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = cancel.cancelled() => {}
            }
            cancel.cancel();
        }
    };
    let serve = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => served?,
        () = async {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("shutdown deadline passed, dropping remaining connections"),
    }
    Ok(())
}

/// The shutdown deadline of a process: `grace` after `cancel` fires. The
/// server's connections drain against it ([`serve`]) and the background
/// workers stop against it ([`Workers::stop`]), so a process is gone within
/// one grace period of its SIGTERM, not one per stage.
pub fn shutdown_deadline(
    cancel: &tokio_util::sync::CancellationToken,
    grace: std::time::Duration,
) -> tokio::task::JoinHandle<tokio::time::Instant> {
    let cancel = cancel.clone();
    tokio::spawn(async move {
        cancel.cancelled().await;
        tokio::time::Instant::now() + grace
    })
}

/// A process's background workers, each started as `(handle, join)` by its
/// module (`dispatch::start`, `expansion::start`, …) and stopped together:
/// they watch one cancellation token, and [`Workers::stop`] waits for them
/// until the process's one shutdown deadline.
#[derive(Debug, Default)]
pub struct Workers {
    running: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Workers {
    /// Keeps `join` of the worker called `name`.
    pub fn add(&mut self, name: &'static str, join: tokio::task::JoinHandle<()>) {
        self.running.push((name, join));
    }

    /// Waits for every worker until `deadline`, naming (at WARN) each one
    /// that had not stopped by then.
    pub async fn stop(self, deadline: tokio::time::Instant) {
        for (name, join) in self.running {
            if tokio::time::timeout_at(deadline, join).await.is_err() {
                tracing::warn!(
                    worker = name,
                    "worker did not stop by the shutdown deadline"
                );
            }
        }
    }
}

/// How often the relay and the carriers checkpoint their SQLite WAL while
/// writers ahead (targeted messages' accepts, priority batches) are about,
/// from a task beside the writer rather than inside its commits. Each
/// checkpoint ends by syncing the database file, which writes what the
/// checkpoint copied; every 250 ms during a 1M broadcast that was enough
/// that commits' WAL syncs queued behind it on the disk for 35–56 ms, the
/// longest holds of the write turn left. Every 50 ms the syncs are a fifth
/// of that (`docs/benchmarks.md`).
pub const WAL_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How often they checkpoint with only bulk work about: nothing waits on
/// a commit then but the bulk work itself, and a page a broadcast rewrites
/// is copied once per checkpoint — every 50 ms cost ~10 % of its rate.
pub const WAL_CHECKPOINT_BULK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs `checkpoint` every [`WAL_CHECKPOINT_EVERY`] while `ahead_lately`
/// (writers ahead came lately: [`crate::turn::Turn::ahead_lately`]), every
/// [`WAL_CHECKPOINT_BULK_EVERY`] otherwise, until `cancel`, then once more
/// (its last run should see the last writes). A checkpoint that fails is
/// logged and tried again at the next turn.
pub async fn checkpoints<L, F, Fut, E>(
    ahead_lately: L,
    cancel: tokio_util::sync::CancellationToken,
    mut checkpoint: F,
) where
    L: Fn() -> bool,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut last = std::time::Instant::now();
    loop {
        let stop = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(WAL_CHECKPOINT_EVERY) => false,
        };
        if stop || ahead_lately() || last.elapsed() >= WAL_CHECKPOINT_BULK_EVERY {
            if let Err(error) = checkpoint().await {
                tracing::warn!(%error, "checkpointing the WAL failed, will retry");
            }
            last = std::time::Instant::now();
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// How many checkpoints [`checkpoints`] runs in `run`, with writers
    /// ahead lately or not, counting the last one at the cancellation.
    async fn checkpoints_in(run: Duration, ahead_lately: bool) -> usize {
        let runs = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let counted = runs.clone();
        let task = tokio::spawn(checkpoints(
            move || ahead_lately,
            cancel.clone(),
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), String>(()) }
            },
        ));
        tokio::time::sleep(run).await;
        cancel.cancel();
        task.await.unwrap();
        runs.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn checkpoints_come_often_only_while_writers_ahead_are_about() {
        let run = WAL_CHECKPOINT_BULK_EVERY * 2 + WAL_CHECKPOINT_EVERY / 2;
        // Bulk work alone: at 250 and 500 ms, and once more at the end (a
        // loaded machine only makes it fewer).
        let bulk = checkpoints_in(run, false).await;
        assert!(
            (1..=3).contains(&bulk),
            "{bulk} checkpoints with bulk work alone"
        );
        // Writers ahead about: every 50 ms, ~10 of them.
        let ahead = checkpoints_in(run, true).await;
        assert!(ahead >= 4, "{ahead} checkpoints with writers ahead about");
    }
}
