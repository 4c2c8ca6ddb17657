use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = enterprise_cli::operator::AdminCli::parse();
    let mut stdout = std::io::stdout();
    if let Err(error) = enterprise_cli::operator::run(cli, &mut stdout).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
