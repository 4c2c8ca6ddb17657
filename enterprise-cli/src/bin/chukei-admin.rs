#[tokio::main]
async fn main() {
    let cli = chukei_proto::server::parse_args::<enterprise_cli::operator::AdminCli>();
    let mut stdout = std::io::stdout();
    if let Err(error) = enterprise_cli::operator::run(cli, &mut stdout).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
