//! The hub as real processes — a relay, carriers registered with it, and a
//! terminal fleet registered with one enterprise — for the tests about the
//! binaries themselves (`smoke.rs`, `tracing.rs`, `privacy.rs`). The chaos
//! harness starts its own, behind fault proxies.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1 as pb;

use crate::process::{Process, free_port, test_binary};
use crate::{Admin, wait_healthy, wait_healthy_for};

pub const ADMIN_TOKEN: &str = "binaries-admin-token-0123456789";
pub const DELIVER_TOKEN: &str = "binaries-deliver-token-0123456789";
pub const CARRIER_ADMIN_TOKEN: &str = "binaries-carrier-admin-0123456789";

/// What to start.
#[derive(Clone, Debug)]
pub struct Launch {
    /// PostgreSQL for the relay (default: SQLite in the temporary directory).
    pub database_url: Option<String>,
    pub carriers: Vec<&'static str>,
    pub users: usize,
    pub seed: u64,
    pub relay_args: Vec<String>,
    pub carrier_args: Vec<String>,
    pub fleet_args: Vec<String>,
    /// Environment of every process; then, for carriers, `carrier_env` on top.
    pub env: Vec<(String, String)>,
    pub carrier_env: Vec<(String, String)>,
    /// Each process's stderr goes to `<name>.log` here (default: nowhere).
    pub logs: Option<PathBuf>,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            database_url: None,
            carriers: vec!["alpha", "beta"],
            users: 300,
            seed: 42,
            relay_args: Vec::new(),
            carrier_args: Vec::new(),
            fleet_args: Vec::new(),
            env: Vec::new(),
            carrier_env: Vec::new(),
            logs: None,
        }
    }
}

/// The running processes, and what a test needs to talk to them.
pub struct BinaryHub {
    pub dir: tempfile::TempDir,
    pub relay_url: String,
    /// The fleet's `Terminal` service.
    pub fleet_url: String,
    pub admin: Admin,
    /// The enterprise the fleet registered with.
    pub enterprise: pb::CreateEnterpriseResponse,
    relay: Process,
    carriers: Vec<Process>,
    /// How each carrier was started (to start it again after a kill).
    carrier_launches: Vec<CarrierLaunch>,
    fleet: Process,
}

/// A carrier process's command line and environment.
struct CarrierLaunch {
    carrier_id: &'static str,
    url: String,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
}

impl CarrierLaunch {
    fn spawn(&self) -> anyhow::Result<Process> {
        let stderr = match &self.log {
            Some(log) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            ),
            None => Stdio::null(),
        };
        Process::spawn(
            self.carrier_id,
            Command::new(test_binary("carrier-svc")?)
                .args(&self.args)
                .envs(self.env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(stderr),
        )
    }
}

impl BinaryHub {
    /// Starts the relay, the carriers (registered with it) and the fleet
    /// (opening everything at once), each once healthy.
    pub async fn start(launch: Launch) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let spawn = |name: &str, command: &mut Command, env: &[(String, String)]| {
            let stderr = match &launch.logs {
                Some(logs) => Stdio::from(std::fs::File::create(logs.join(format!("{name}.log")))?),
                None => Stdio::null(),
            };
            command.envs(launch.env.iter().cloned());
            command.envs(env.iter().cloned());
            Process::spawn(name, command.stdout(Stdio::null()).stderr(stderr))
        };

        let relay_port = free_port()?;
        let relay_url = format!("http://127.0.0.1:{relay_port}");
        let mut command = Command::new(test_binary("relay-svc")?);
        command
            .args(["--listen", &format!("127.0.0.1:{relay_port}")])
            .arg("--data-dir")
            .arg(dir.path().join("relay"))
            .args(&launch.relay_args)
            .env("CHUKEI_RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CHUKEI_RELAY_DELIVER_TOKEN", DELIVER_TOKEN);
        if let Some(url) = &launch.database_url {
            command.args(["--database-url", url]);
        }
        let relay = spawn("relay-svc", &mut command, &[])?;
        wait_healthy(&relay_url).await?;
        let channel = tonic::transport::Channel::from_shared(relay_url.clone())?
            .connect()
            .await?;
        let mut admin = pb::admin_client::AdminClient::with_interceptor(
            channel,
            BearerInterceptor::new(ADMIN_TOKEN)?,
        );
        let enterprise = admin
            .create_enterprise(pb::CreateEnterpriseRequest {
                name: "binaries".into(),
                ..Default::default()
            })
            .await?
            .into_inner();

        let mut carriers = Vec::new();
        let mut carrier_launches = Vec::new();
        let mut carrier_flags = Vec::new();
        for carrier_id in &launch.carriers {
            let port = free_port()?;
            let url = format!("http://127.0.0.1:{port}");
            let token = format!("binaries-{carrier_id}-token-0123456789");
            let mut args: Vec<std::ffi::OsString> = vec![
                "--listen".into(),
                format!("127.0.0.1:{port}").into(),
                "--carrier-id".into(),
                (*carrier_id).into(),
                "--relay-url".into(),
                relay_url.clone().into(),
                "--data-dir".into(),
                dir.path().join(carrier_id).into(),
            ];
            args.extend(launch.carrier_args.iter().map(Into::into));
            let mut env = launch.env.clone();
            env.extend([
                ("CHUKEI_CARRIER_TOKEN".to_owned(), token.clone()),
                (
                    "CHUKEI_CARRIER_RELAY_TOKEN".to_owned(),
                    DELIVER_TOKEN.to_owned(),
                ),
                (
                    "CHUKEI_CARRIER_ADMIN_TOKEN".to_owned(),
                    CARRIER_ADMIN_TOKEN.to_owned(),
                ),
            ]);
            env.extend(launch.carrier_env.iter().cloned());
            let carrier = CarrierLaunch {
                carrier_id,
                url: url.clone(),
                args,
                env,
                log: launch
                    .logs
                    .as_ref()
                    .map(|logs| logs.join(format!("{carrier_id}.log"))),
            };
            carriers.push(carrier.spawn()?);
            carrier_launches.push(carrier);
            wait_healthy(&url).await?;
            admin
                .register_carrier(pb::RegisterCarrierRequest {
                    carrier_id: (*carrier_id).into(),
                    endpoint: url.clone(),
                    token,
                })
                .await?;
            carrier_flags.push(format!("--carrier={carrier_id}={url}"));
        }

        let fleet_port = free_port()?;
        let mut command = Command::new(test_binary("terminal-sim")?);
        command
            .args(["--listen", &format!("127.0.0.1:{fleet_port}"), "fleet"])
            .args(["--users", &launch.users.to_string()])
            .args(["--seed", &launch.seed.to_string(), "--open-mode", "always"])
            .args(&carrier_flags)
            .args(["--enterprise", &enterprise.enterprise_id])
            .args(&launch.fleet_args)
            .env("CHUKEI_TERMINAL_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN);
        let fleet = spawn("terminal-sim", &mut command, &[])?;
        wait_healthy_for(
            &format!("http://127.0.0.1:{fleet_port}"),
            Duration::from_secs(120),
        )
        .await?;
        Ok(Self {
            dir,
            relay_url,
            fleet_url: format!("http://127.0.0.1:{fleet_port}"),
            admin,
            enterprise,
            relay,
            carriers,
            carrier_launches,
            fleet,
        })
    }

    /// SIGKILL to the `index`th carrier, then the same command line again
    /// after `down` (its database and data directory stay); returns once it
    /// is healthy.
    pub async fn kill_and_restart_carrier(
        &mut self,
        index: usize,
        down: Duration,
    ) -> anyhow::Result<()> {
        self.carriers.remove(index).kill();
        tokio::time::sleep(down).await;
        let launch = &self.carrier_launches[index];
        self.carriers.insert(index, launch.spawn()?);
        wait_healthy(&launch.url).await
    }

    /// SIGTERM to the fleet, the carriers, then the relay (so nobody sees its
    /// caller vanish); each one's name and exit status.
    pub fn stop(self) -> anyhow::Result<Vec<(&'static str, ExitStatus)>> {
        const GRACE: Duration = Duration::from_secs(20);
        let mut stopped = vec![("terminal-sim", self.fleet.terminate(GRACE)?)];
        for carrier in self.carriers {
            stopped.push(("carrier-svc", carrier.terminate(GRACE)?));
        }
        stopped.push(("relay-svc", self.relay.terminate(GRACE)?));
        Ok(stopped)
    }
}
