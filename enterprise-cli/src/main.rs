use tracing::Instrument;

#[tokio::main]
async fn main() {
    let cli = chukei_proto::server::parse_args::<enterprise_cli::Cli>();
    // Logs only warnings unless RUST_LOG says otherwise; with
    // OTEL_EXPORTER_OTLP_ENDPOINT set, the command is the root span of the
    // message's trace (the relay continues it from the call's metadata).
    let telemetry = chukei_proto::telemetry::init_with("enterprise-cli", "warn");
    let span = tracing::info_span!("enterprise-cli", otel.name = cli.command.name());
    let mut stdout = std::io::stdout();
    let result = enterprise_cli::run(cli, &mut stdout).instrument(span).await;
    drop(telemetry);
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
