use std::io::BufRead;
use std::net::SocketAddr;

use chukei_proto::carrier::v1 as pb;
use chukei_proto::common::v1::Channel;
use clap::{Parser, Subcommand};
use terminal_sim::fleet::Fleet;
use terminal_sim::terminal::OpenMode;
use terminal_sim::{CarrierUrl, FleetOptions};

/// Simulated terminals for Chukei: a seeded fleet, or one interactive user.
#[derive(Parser, Debug)]
#[command(name = "terminal-sim", version, about)]
struct Cli {
    /// Address the Terminal service listens on.
    #[arg(
        long,
        env = "CHUKEI_TERMINAL_LISTEN",
        default_value = "127.0.0.1:50071",
        global = true
    )]
    listen: SocketAddr,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Host a whole fleet generated from a seed.
    Fleet {
        /// Seed of the fleet: the same seed gives the same users and behaviour.
        #[arg(long, env = "CHUKEI_TERMINAL_SEED", default_value_t = 42)]
        seed: u64,
        /// Number of simulated users.
        #[arg(long, env = "CHUKEI_TERMINAL_USERS", default_value_t = 10_000)]
        users: usize,
        /// Every user registers with every enterprise offered (their consent
        /// choices still drawn by the model): for runs about volume, not consent.
        #[arg(long)]
        everyone_registers: bool,
        /// Every terminal takes every channel and has an address for each:
        /// for runs not about capabilities.
        #[arg(long)]
        every_channel: bool,
        #[command(flatten)]
        options: FleetOptions,
    },
    /// One user at a keyboard: list the inbox, open messages (sending read receipts).
    Interactive {
        /// The user this terminal belongs to (already provisioned at the carrier).
        #[arg(long, env = "CHUKEI_TERMINAL_USER_ID")]
        user_id: String,
        /// Register with this enterprise first, `ENTERPRISE_ID[:SERVICE_ID]`.
        #[arg(long)]
        register: Option<String>,
        /// What to share when registering: any of gender, age, age-decade, region, region-prefecture, occupation.
        #[arg(long, value_delimiter = ',')]
        share: Vec<String>,
        #[command(flatten)]
        options: FleetOptions,
    },
}

const HELP: &str = "commands: inbox | open N | consent ENTERPRISE [FIELD,…] (none: withdraw) | leave ENTERPRISE|hub | quit";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    chukei_proto::server::exit_code(run(chukei_proto::server::parse_args::<Cli>()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = chukei_proto::telemetry::init("terminal-sim")?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    match cli.command {
        Command::Fleet {
            seed,
            users,
            everyone_registers,
            every_channel,
            options,
        } => {
            if users == 0 {
                anyhow::bail!("--users: must be positive");
            }
            let carriers: Vec<String> = options
                .carriers
                .iter()
                .map(|c| c.carrier_id.clone())
                .collect();
            let mut fleet = Fleet::generate(seed, users, &carriers);
            if everyone_registers {
                fleet = fleet.everyone_registers();
            }
            if every_channel {
                fleet = fleet.with_every_channel();
            }
            terminal_sim::run_fleet(
                fleet,
                options,
                listener,
                chukei_proto::server::shutdown_signal(),
                |_| {},
            )
            .await
        }
        Command::Interactive {
            user_id,
            register,
            share,
            mut options,
        } => {
            options.open_mode = OpenMode::Never;
            options.enterprises.clear();
            let carriers: Vec<String> = options
                .carriers
                .iter()
                .map(|c| c.carrier_id.clone())
                .collect();
            let mut fleet = Fleet::generate(0, 1, &carriers).with_every_channel();
            fleet.users[0].user_id = user_id.clone();
            fleet.users[0].carriers = carriers;
            if let Some(register) = register {
                register_one(&options.carriers, &options.tls, &user_id, &register, &share).await?;
            }
            let options_carriers = options.carriers.clone();
            let tls = options.tls.clone();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let fleet_task = tokio::spawn(terminal_sim::run_fleet(
                fleet,
                options,
                listener,
                chukei_proto::server::shutdown_signal(),
                move |terminals| {
                    let _ = ready_tx.send(terminals);
                },
            ));
            let terminals = ready_rx.await?;
            println!("attached as {user_id}. {HELP}");
            let user = user_id.clone();
            let carriers = options_carriers;
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["inbox"] => {
                            for (n, item) in terminals.inbox(&user).iter().enumerate() {
                                let state = if item.opened_at.is_some() {
                                    "read"
                                } else {
                                    "new"
                                };
                                let channel = Channel::short_name_of(item.channel);
                                let mut extras = Vec::new();
                                if item.sms_segments.len() > 1 {
                                    extras.push(format!("{} parts", item.sms_segments.len()));
                                }
                                if !item.subject.is_empty() {
                                    extras.push(format!("subject: {}", item.subject));
                                }
                                if !item.suggested_replies.is_empty() {
                                    extras
                                        .push(format!("[{}]", item.suggested_replies.join(" | ")));
                                }
                                if !item.media_url.is_empty() {
                                    extras.push(format!("media: {}", item.media_url));
                                }
                                println!(
                                    "{n:>3}  {state:<4}  {}  {channel:<5}  {}  {}",
                                    item.message_id,
                                    item.text,
                                    extras.join("  ")
                                );
                            }
                        }
                        ["open", n] => {
                            let inbox = terminals.inbox(&user);
                            match n.parse::<usize>().ok().and_then(|n| inbox.get(n)) {
                                Some(item) if terminals.open(&item.delivery_id) => {
                                    println!("opened {}", item.message_id)
                                }
                                Some(_) => println!("already open"),
                                None => println!("no message {n}"),
                            }
                        }
                        ["consent", ..] | ["leave", ..] => {
                            let done =
                                runtime.block_on(consent_command(&carriers, &tls, &user, &words));
                            if let Err(error) = done {
                                println!("{error}");
                            }
                        }
                        ["quit"] | ["exit"] => break,
                        [] => {}
                        _ => println!("{HELP}"),
                    }
                }
            })
            .await?;
            fleet_task.abort();
            Ok(())
        }
    }
}

async fn register_one(
    carriers: &[CarrierUrl],
    tls: &chukei_proto::tls::TlsArgs,
    user_id: &str,
    register: &str,
    share: &[String],
) -> anyhow::Result<()> {
    let (enterprise_id, service_id) = register.split_once(':').unwrap_or((register, ""));
    let consent = choices(share).map_err(|e| anyhow::anyhow!("--share: {e}"))?;
    let mut client = subscriber_api(carriers, tls).await?;
    let text_version = preview(&mut client, user_id, enterprise_id, consent).await?;
    let response = client
        .register(pb::RegisterRequest {
            registrations: vec![pb::SubscriberRegistration {
                user_id: user_id.to_owned(),
                enterprise_id: enterprise_id.to_owned(),
                service_id: service_id.to_owned(),
                consent: Some(consent),
                text_version,
            }],
        })
        .await?;
    println!(
        "registered; the enterprise knows you as {}",
        response.into_inner().user_refs.join(",")
    );
    Ok(())
}

/// Consent choices from field names: gender, age, age-decade, region,
/// region-prefecture, occupation. None of them: share nothing.
fn choices(fields: &[String]) -> Result<pb::ConsentChoices, String> {
    let mut consent = pb::ConsentChoices::default();
    for field in fields {
        match field.as_str() {
            "gender" => consent.gender = true,
            "age" => consent.age = pb::AgeGranularity::Exact as i32,
            "age-decade" => consent.age = pb::AgeGranularity::Decade as i32,
            "region" => consent.region = pb::RegionGranularity::City as i32,
            "region-prefecture" => consent.region = pb::RegionGranularity::Prefecture as i32,
            "occupation" => consent.occupation = true,
            other => return Err(format!("unknown field {other:?}")),
        }
    }
    Ok(consent)
}

type SubscriberApi = pb::subscriber_api_client::SubscriberApiClient<tonic::transport::Channel>;

/// The user's (first) carrier's subscriber API.
async fn subscriber_api(
    carriers: &[CarrierUrl],
    tls: &chukei_proto::tls::TlsArgs,
) -> anyhow::Result<SubscriberApi> {
    let carrier = carriers
        .first()
        .ok_or_else(|| anyhow::anyhow!("--carrier: give at least one"))?;
    Ok(SubscriberApi::new(
        tls.endpoint(&carrier.url)?.connect().await?,
    ))
}

/// Shows the person exactly what these choices would share, and returns the
/// version of the text shown.
async fn preview(
    client: &mut SubscriberApi,
    user_id: &str,
    enterprise_id: &str,
    consent: pb::ConsentChoices,
) -> anyhow::Result<String> {
    let preview = client
        .preview_consent(pb::PreviewConsentRequest {
            user_id: user_id.to_owned(),
            enterprise_id: enterprise_id.to_owned(),
            consent: Some(consent),
        })
        .await?
        .into_inner();
    println!("{}", preview.text);
    Ok(preview.text_version)
}

/// The interactive consent commands: `consent ENTERPRISE [FIELD…]` shows
/// and then records a new choice (no fields: withdraw), `leave ENTERPRISE`
/// or `leave hub` unregisters (erased there).
async fn consent_command(
    carriers: &[CarrierUrl],
    tls: &chukei_proto::tls::TlsArgs,
    user_id: &str,
    words: &[&str],
) -> anyhow::Result<()> {
    let mut client = subscriber_api(carriers, tls).await?;
    match words {
        ["consent", enterprise_id, fields @ ..] => {
            let fields: Vec<String> = fields
                .iter()
                .flat_map(|f| f.split(','))
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect();
            let consent = choices(&fields).map_err(anyhow::Error::msg)?;
            let text_version = preview(&mut client, user_id, enterprise_id, consent).await?;
            client
                .change_consent(pb::ChangeConsentRequest {
                    user_id: user_id.to_owned(),
                    enterprise_id: (*enterprise_id).to_owned(),
                    consent: Some(consent),
                    text_version,
                })
                .await?;
            println!(
                "{}",
                if fields.is_empty() {
                    "consent withdrawn; your attributes were deleted"
                } else {
                    "consent changed"
                }
            );
        }
        ["leave", place] => {
            let enterprise_id = if *place == "hub" { "" } else { place };
            let removed = client
                .unregister(pb::UnregisterRequest {
                    user_id: user_id.to_owned(),
                    enterprise_id: enterprise_id.to_owned(),
                    service_id: String::new(),
                })
                .await?
                .into_inner()
                .removed;
            println!("left {place}: {removed} registration(s) erased");
        }
        _ => anyhow::bail!("usage: consent ENTERPRISE [FIELD,…] | leave ENTERPRISE|hub"),
    }
    Ok(())
}
