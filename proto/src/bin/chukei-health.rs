//! `chukei-health URL [SERVICE]`: asks a Chukei server's `grpc.health.v1`
//! whether it (or one of its services) is SERVING; exits 0 if so, 1 if not,
//! 2 if it cannot ask. For container health checks, where no gRPC probe is
//! built in. An https:// URL is checked over TLS trusting the CA
//! certificates in `CHUKEI_TLS_CA` (and presenting `CHUKEI_TLS_CERT` /
//! `CHUKEI_TLS_KEY` when set), the same variables the services read.

use std::process::ExitCode;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Asks a Chukei server's gRPC health service whether it (or one of its
/// services) is SERVING: exits 0 if so, 1 if not, 2 if it cannot ask (or
/// the arguments are wrong). An https:// URL is checked over TLS trusting
/// CHUKEI_TLS_CA (presenting CHUKEI_TLS_CERT / CHUKEI_TLS_KEY when set).
#[derive(clap::Parser, Debug)]
#[command(name = "chukei-health", version)]
struct Args {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(value_parser = chukei_proto::validate::url_argument)]
    url: String,
    /// One service it serves, e.g. chukei.relay.v1.EnterpriseApi (default: the whole server).
    #[arg(default_value = "")]
    service: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap answers --help and --version itself (exit 0) and refuses wrong
    // arguments naming them (exit 2).
    let Args { url, service } = chukei_proto::server::parse_args::<Args>();
    let asked = async {
        let path = |name| std::env::var_os(name).map(std::path::PathBuf::from);
        let tls = chukei_proto::tls::TlsArgs {
            tls_ca: path("CHUKEI_TLS_CA"),
            tls_cert: path("CHUKEI_TLS_CERT"),
            tls_key: path("CHUKEI_TLS_KEY"),
            tls_client_ca: None,
        };
        let channel = tls
            .endpoint(&url)?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest { service })
            .await?;
        anyhow::Ok(response.into_inner().status())
    };
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(ServingStatus::Serving)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("not serving: {status:?}");
            ExitCode::from(1)
        }
        Ok(Err(error)) => {
            eprintln!("health check failed: {error}");
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!("health check timed out");
            ExitCode::from(2)
        }
    }
}
