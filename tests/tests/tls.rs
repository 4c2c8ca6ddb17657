//! TLS on every hop, with certificates made here (rcgen): enterprise →
//! relay, relay ⇄ carrier (mutual TLS, each side's certificate naming its
//! role), carrier → terminal; a message travels the whole way. Then what
//! must be refused is: no certificate, a certificate from another CA, a
//! certificate naming the wrong role, a server whose CA is not trusted,
//! plain HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as cpb;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::tls::TlsArgs;
use clap::Parser;
use integration_tests::{Backend, backend_tests, eventually, postgres_database, send_request};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use terminal_sim::FleetOptions;
use terminal_sim::fleet::Fleet;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const ADMIN: &str = "tls-admin-token-0123456789";
const DELIVER: &str = "tls-deliver-token-0123456789";
const ALPHA: &str = "tls-alpha-token-0123456789";
const CARRIER_ADMIN: &str = "tls-carrier-admin-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// A CA that signs leaf certificates for `localhost` plus role names.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes `<name>.pem` and `<name>.key` for a leaf naming `role` (and
    /// localhost, 127.0.0.1) to `dir`; returns (cert, key) paths.
    fn leaf(&self, dir: &Path, name: &str, role: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![
            role.to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn free_addr() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn tokio_listener(listener: std::net::TcpListener) -> tokio::net::TcpListener {
    listener.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(listener).unwrap()
}

fn args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, value)| [format!("--{flag}"), value.clone()])
        .collect()
}

/// A client endpoint trusting `ca`, presenting `identity` when given.
fn client(
    url: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> tonic::transport::Endpoint {
    TlsArgs {
        tls_ca: Some(ca.to_owned()),
        tls_cert: identity.map(|(cert, _)| cert.clone()),
        tls_key: identity.map(|(_, key)| key.clone()),
        tls_client_ca: None,
    }
    .endpoint(url)
    .unwrap()
    .connect_timeout(Duration::from_secs(3))
}

#[derive(Parser)]
struct FleetArgs {
    #[command(flatten)]
    options: FleetOptions,
}

async fn every_hop_is_tls_and_roles_are_checked(backend: Backend) {
    let (database_url, postgres) = match backend {
        Backend::Sqlite => (None, None),
        Backend::Postgres => match postgres_database().await.unwrap() {
            Some((url, name)) => (Some(url), Some(name)),
            None => return,
        },
    };
    integration_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    let ca = Ca::new("chukei test CA");
    let rogue = Ca::new("someone else's CA");
    let ca_path = pki.join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let rogue_path = pki.join("rogue-ca.pem");
    std::fs::write(&rogue_path, &rogue.pem).unwrap();
    let relay_id = ca.leaf(pki, "relay", chukei_proto::tls::RELAY_NAME);
    let alpha_id = ca.leaf(pki, "alpha", &chukei_proto::tls::carrier_name("alpha"));
    let beta_id = ca.leaf(pki, "beta", &chukei_proto::tls::carrier_name("beta"));
    let terminal_id = ca.leaf(pki, "terminal", "terminal.chukei");
    let forged_alpha = rogue.leaf(
        pki,
        "forged-alpha",
        &chukei_proto::tls::carrier_name("alpha"),
    );
    let path = |p: &Path| p.display().to_string();

    let cancel = CancellationToken::new();
    let stopped = |cancel: &CancellationToken| {
        let cancel = cancel.clone();
        async move { cancel.cancelled().await }
    };

    // The relay: TLS, verifying carriers' certificates.
    let (relay_listener, relay_addr) = free_addr();
    let relay_url = format!("https://localhost:{}", relay_addr.port());
    let mut relay_args = vec!["relay-svc".to_owned()];
    relay_args.extend(args(&[
        ("listen", relay_addr.to_string()),
        ("data-dir", path(&pki.join("relay"))),
        ("admin-token", ADMIN.into()),
        ("deliver-token", DELIVER.into()),
        ("poll-interval-ms", "100".into()),
        ("tls-cert", path(&relay_id.0)),
        ("tls-key", path(&relay_id.1)),
        ("tls-ca", path(&ca_path)),
        ("tls-client-ca", path(&ca_path)),
    ]));
    if let Some(url) = &database_url {
        relay_args.extend(args(&[("database-url", url.clone())]));
    }
    let relay_config = relay_svc::Config::try_parse_from(relay_args).unwrap();
    let relay = tokio::spawn(relay_svc::run(
        relay_config,
        tokio_listener(relay_listener),
        stopped(&cancel),
    ));

    // Carrier alpha: TLS, requiring the relay's certificate on its stream.
    let (alpha_listener, alpha_addr) = free_addr();
    let alpha_url = format!("https://localhost:{}", alpha_addr.port());
    let mut alpha_args = vec!["carrier-svc".to_owned()];
    alpha_args.extend(args(&[
        ("listen", alpha_addr.to_string()),
        ("carrier-id", "alpha".into()),
        ("relay-url", relay_url.clone()),
        ("token", ALPHA.into()),
        ("relay-token", DELIVER.into()),
        ("admin-token", CARRIER_ADMIN.into()),
        ("data-dir", path(&pki.join("alpha"))),
        ("report-interval-secs", "1".into()),
        ("poll-interval-ms", "100".into()),
        ("tls-cert", path(&alpha_id.0)),
        ("tls-key", path(&alpha_id.1)),
        ("tls-ca", path(&ca_path)),
        ("tls-client-ca", path(&ca_path)),
    ]));
    let alpha = tokio::spawn(carrier_svc::run(
        carrier_svc::Config::try_parse_from(alpha_args).unwrap(),
        tokio_listener(alpha_listener),
        stopped(&cancel),
    ));

    // Over TLS trusting the CA: the operator sets up an enterprise and the carrier.
    let admin_channel = eventually("the relay serving TLS", WAIT, || async {
        client(&relay_url, &ca_path, None).connect().await.ok()
    })
    .await;
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        admin_channel,
        BearerInterceptor::new(ADMIN).unwrap(),
    );
    let created = admin
        .create_enterprise(pb::CreateEnterpriseRequest {
            name: "shop".into(),
            enterprise_id: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .register_carrier(pb::RegisterCarrierRequest {
            carrier_id: "alpha".into(),
            endpoint: alpha_url.clone(),
            token: ALPHA.into(),
        })
        .await
        .unwrap();
    // The relay dials alpha with its certificate; alpha accepts it.
    eventually("the relay's stream to alpha open", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let stats = admin
                .get_carrier_stats(pb::GetCarrierStatsRequest::default())
                .await
                .ok()?
                .into_inner();
            stats
                .carriers
                .iter()
                .any(|c| c.carrier_id == "alpha" && c.connected)
                .then_some(())
        }
    })
    .await;

    // A fleet of terminals over TLS: provisioned and registered through alpha
    // (alpha calls the relay with its certificate), pushed to over TLS.
    let (fleet_listener, fleet_addr) = free_addr();
    let fleet = Fleet::generate(3, 12, &["alpha".into()]).with_every_channel();
    let mut fleet_args = vec!["terminal-sim".to_owned()];
    fleet_args.extend(args(&[
        (
            "advertise-url",
            format!("https://localhost:{}", fleet_addr.port()),
        ),
        ("carrier", format!("alpha={alpha_url}")),
        ("carrier-admin-token", CARRIER_ADMIN.into()),
        ("enterprise", "shop".into()),
        ("open-mode", "always".into()),
        ("tls-cert", path(&terminal_id.0)),
        ("tls-key", path(&terminal_id.1)),
        ("tls-ca", path(&ca_path)),
    ]));
    let options = FleetArgs::try_parse_from(fleet_args).unwrap().options;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let fleet_task = tokio::spawn(terminal_sim::run_fleet(
        fleet.clone(),
        options,
        tokio_listener(fleet_listener),
        stopped(&cancel),
        move |terminals| {
            let _ = ready_tx.send(terminals);
        },
    ));
    let terminals = tokio::time::timeout(WAIT, ready_rx).await.unwrap().unwrap();

    // An enterprise without a client certificate sends; everyone registered reads it.
    let mut enterprise = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        client(&relay_url, &ca_path, None).connect().await.unwrap(),
        BearerInterceptor::new(&created.api_key).unwrap(),
    );
    let sent = enterprise
        .send_message(send_request(
            "over-tls",
            pb::target::Kind::AllRegistered(true),
            "encrypted all the way",
            common::Channel::Sms,
        ))
        .await
        .unwrap()
        .into_inner();
    let matched = sent.matched.unwrap_or(0);
    let status = eventually("every registered person read it", WAIT, || {
        let mut enterprise = enterprise.clone();
        let id = sent.message_id.clone();
        async move {
            let status = enterprise
                .get_message(pb::GetMessageRequest { message_id: id })
                .await
                .ok()?
                .into_inner();
            (status.matched > 0 && status.opened == status.matched).then_some(status)
        }
    })
    .await;
    assert!(status.matched >= matched);
    assert_eq!(
        terminals.recipients(&sent.message_id).len() as u64,
        status.matched
    );

    // CarrierIngress with alpha's token: without a certificate, with one from
    // another CA, with beta's (the wrong role) — all refused.
    let contract = pb::Contract {
        user_id: fleet.users[0].user_id.clone(),
        primary: true,
        active: true,
    };
    let ingress = |endpoint: tonic::transport::Endpoint| {
        let contract = contract.clone();
        async move {
            let channel = endpoint.connect().await?;
            let mut ingress = pb::carrier_ingress_client::CarrierIngressClient::with_interceptor(
                channel,
                BearerInterceptor::new(ALPHA).unwrap(),
            );
            Ok::<_, tonic::transport::Error>(
                ingress
                    .upsert_contracts(pb::UpsertContractsRequest {
                        contracts: vec![contract],
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| (s.code(), s.message().to_owned())),
            )
        }
    };
    assert_eq!(
        ingress(client(&relay_url, &ca_path, Some(&alpha_id)))
            .await
            .unwrap(),
        Ok(())
    );
    let none = ingress(client(&relay_url, &ca_path, None))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(none.0, Code::Unauthenticated, "{none:?}");
    assert!(none.1.contains("client certificate"), "{none:?}");
    let wrong_role = ingress(client(&relay_url, &ca_path, Some(&beta_id)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(wrong_role.0, Code::PermissionDenied, "{wrong_role:?}");
    // A certificate from another CA fails the handshake (or the first call).
    match ingress(client(&relay_url, &ca_path, Some(&forged_alpha))).await {
        Err(_) => {}
        Ok(result) => assert!(result.is_err(), "a foreign CA's certificate was accepted"),
    }

    // A client that does not trust the relay's CA cannot talk to it; nor can plain HTTP.
    assert!(
        pb::admin_client::AdminClient::new(
            match client(&relay_url, &rogue_path, None).connect().await {
                Ok(channel) => channel,
                Err(_) =>
                    tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy(),
            }
        )
        .get_prices(pb::GetPricesRequest {})
        .await
        .is_err()
    );
    let plain = format!("http://127.0.0.1:{}", relay_addr.port());
    let plain_call = async {
        let channel = tonic::transport::Endpoint::from_shared(plain)?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await?;
        pb::admin_client::AdminClient::with_interceptor(channel, BearerInterceptor::new(ADMIN)?)
            .get_prices(pb::GetPricesRequest {})
            .await?;
        anyhow::Ok(())
    };
    assert!(
        tokio::time::timeout(WAIT, plain_call)
            .await
            .unwrap()
            .is_err()
    );

    // Alpha's Deliver stream with the right token: refused without the
    // relay's certificate, and with a carrier's.
    for (identity, code) in [
        (None, Code::Unauthenticated),
        (Some(&alpha_id), Code::PermissionDenied),
    ] {
        let channel = client(&alpha_url, &ca_path, identity)
            .connect()
            .await
            .unwrap();
        let mut carrier = cpb::carrier_client::CarrierClient::with_interceptor(
            channel,
            BearerInterceptor::new(DELIVER).unwrap(),
        );
        let (_tx, rx) = tokio::sync::mpsc::channel::<cpb::RelayToCarrier>(1);
        let refused = carrier
            .deliver(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
    }

    cancel.cancel();
    relay.await.unwrap().unwrap();
    alpha.await.unwrap().unwrap();
    fleet_task.await.unwrap().unwrap();
    if let Some(name) = postgres {
        integration_tests::drop_postgres_database(&name)
            .await
            .unwrap();
    }
}

backend_tests!(every_hop_is_tls_and_roles_are_checked);
