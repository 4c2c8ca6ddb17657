use chukei_proto::server;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = carrier_svc::Config::parse();
    if let Err(error) = config.validate() {
        return server::refuse_configuration(&error);
    }
    server::exit_code(
        async {
            let _telemetry = chukei_proto::telemetry::init("carrier-svc")?;
            let listener = tokio::net::TcpListener::bind(config.listen).await?;
            carrier_svc::run(config, listener, server::shutdown_signal()).await
        }
        .await,
    )
}
