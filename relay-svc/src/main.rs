use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = relay_svc::Config::parse();
    config.validate()?;
    let _telemetry = chukei_proto::telemetry::init("relay-svc")?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    relay_svc::run(config, listener, chukei_proto::server::shutdown_signal()).await
}
