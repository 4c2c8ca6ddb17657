use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = carrier_svc::Config::parse();
    config.validate()?;
    let _telemetry = chukei_proto::telemetry::init("carrier-svc")?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    carrier_svc::run(config, listener, chukei_proto::server::shutdown_signal()).await
}
