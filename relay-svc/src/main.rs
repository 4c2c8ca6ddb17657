use chukei_proto::server;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = chukei_proto::server::parse_args::<relay_svc::Config>();
    if let Err(error) = config.validate() {
        return server::refuse_configuration(&error);
    }
    server::exit_code(
        async {
            let _telemetry = chukei_proto::telemetry::init("relay-svc")?;
            chukei_proto::crash::check_armed()?;
            let listener = tokio::net::TcpListener::bind(config.listen).await?;
            relay_svc::run(config, listener, server::shutdown_signal()).await
        }
        .await,
    )
}
