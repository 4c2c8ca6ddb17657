//! `chukei-conformance terminal URL` and `chukei-conformance carrier URL`:
//! drive an implementation of one side of Chukei's contracts — a terminal's
//! `chukei.terminal.v1.Terminal`, or a carrier's `Carrier`, `SubscriberApi`
//! and `CarrierAdmin` — through what the other side relies on, and print
//! PASS or FAIL per case with the reason. Exit 0 when every case passes, 1
//! when one fails, 2 when the arguments are wrong.
//!
//! The kit plays the peer: against a terminal it is the carrier (it dials
//! `Push`); against a carrier it is both the relay (it dials `Deliver` and
//! serves `CarrierIngress` where the carrier's relay URL points) and a
//! terminal (it serves `Terminal` and attaches its users there). Its own
//! servers answer response headers late, with their first message, as
//! grpcio's servers do, so a carrier that waits for headers fails here
//! rather than in production. `docs/integrators.md` explains each case.

mod carrier;
mod probe;
mod terminal;

use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::mpsc;

/// Drives an implementation of a Chukei contract through its cases.
#[derive(clap::Parser, Debug)]
#[command(name = "chukei-conformance", version)]
struct Args {
    #[command(subcommand)]
    side: Side,
    /// How long each case waits for an answer it expects (seconds).
    #[arg(long, global = true, default_value_t = 5)]
    timeout_secs: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Side {
    /// A terminal's `chukei.terminal.v1.Terminal` at URL (the kit is the carrier).
    Terminal(terminal::Args),
    /// A carrier at URL (the kit is the relay and a terminal).
    Carrier(carrier::Args),
}

/// The cases' outcomes, printed as they are decided.
#[derive(Debug, Default)]
pub(crate) struct Report {
    failed: Vec<&'static str>,
    passed: usize,
}

impl Report {
    /// Records one case: `Ok` with what was seen, or `Err` with why it failed.
    pub(crate) fn case(&mut self, name: &'static str, outcome: Result<String, String>) {
        match outcome {
            Ok(seen) => {
                self.passed += 1;
                say(&format!("PASS  {name}: {seen}"));
            }
            Err(why) => {
                self.failed.push(name);
                say(&format!("FAIL  {name}: {why}"));
            }
        }
    }

    fn finish(self) -> ExitCode {
        if self.failed.is_empty() {
            say(&format!("{} cases passed", self.passed));
            ExitCode::SUCCESS
        } else {
            say(&format!(
                "{} passed, {} failed: {}",
                self.passed,
                self.failed.len(),
                self.failed.join(", ")
            ));
            ExitCode::from(1)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // clap answers --help and --version itself (exit 0) and refuses wrong
    // arguments naming them (exit 2).
    let args = chukei_proto::server::parse_args::<Args>();
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let mut report = Report::default();
    let ran = match args.side {
        Side::Terminal(side) => terminal::run(side, timeout, &mut report).await,
        Side::Carrier(side) => carrier::run(side, timeout, &mut report).await,
    };
    if let Err(error) = ran {
        report.case("set-up", Err(format!("{error:#}")));
    }
    report.finish()
}

/// One line of the report on stdout (a closed pipe, e.g. `| head`, is not an error).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A channel to `url`, or an error naming it.
pub(crate) async fn connect(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!("cannot reach {url}: {error}"))
}

/// Runs a server-streaming answer `call` in its own task (the kit keeps
/// sending meanwhile: `call` resolves only once the peer sends its response
/// headers, which it may hold until its first message) and passes on what
/// comes back: each message, then a failing status if the stream fails. The
/// receiver ends when the stream does.
pub(crate) fn forward<T: Send + 'static>(
    call: impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>
    + Send
    + 'static,
) -> mpsc::UnboundedReceiver<Result<T, tonic::Status>> {
    let (sink, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut inbound = match call.await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let _ = sink.send(Err(status));
                return;
            }
        };
        loop {
            match inbound.message().await {
                Ok(Some(message)) => {
                    if sink.send(Ok(message)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = sink.send(Err(status));
                    return;
                }
            }
        }
    });
    received
}
