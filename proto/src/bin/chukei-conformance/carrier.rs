//! The carrier's contract, driven as the relay and a terminal would: the
//! Deliver stream refuses a wrong token and another protocol version naming
//! both; provisioning pushes contracts to the relay's `CarrierIngress`; a
//! batch is acked once stored and its deliveries pushed to the attached
//! terminal, even one that sends its response headers only with its first
//! event; delivered and read events come up as receipts; a batch repeated
//! after a lost ack is acked and not pushed again; receipts the relay did
//! not ack come again on its next stream; a malformed record is dropped and
//! the rest of its batch kept; a priority stream's batch is acked and
//! pushed, the main stream still served beside it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::clock::{Clock, to_timestamp};
use chukei_proto::common::v1 as common;
use chukei_proto::deliver;
use chukei_proto::relay::v1 as relay;
use chukei_proto::terminal::v1 as terminal;
use tokio::sync::mpsc;

use self::peers::{Deliver, Ingress, KitTerminal};
use crate::{Report, probe};

mod peers;

const CARRIER: &str = "chukei.carrier.v1.Carrier";
const SUBSCRIBERS: &str = "chukei.carrier.v1.SubscriberApi";
const ADMIN: &str = "chukei.carrier.v1.CarrierAdmin";

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The carrier's gRPC URL serving `Carrier` (its `--listen`).
    #[arg(value_parser = chukei_proto::validate::url_argument)]
    url: String,
    /// Where it serves `SubscriberApi` and `CarrierAdmin`, when apart (its `--subscriber-listen`).
    #[arg(long, value_parser = chukei_proto::validate::url_argument)]
    subscriber_url: Option<String>,
    /// Where the kit serves `CarrierIngress`: the carrier's `--relay-url` must name it.
    #[arg(long)]
    ingress_listen: std::net::SocketAddr,
    /// Where the kit serves its `Terminal` (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    terminal_listen: std::net::SocketAddr,
    /// The token the carrier expects from the relay on `Deliver`.
    #[arg(long, env = "CHUKEI_CARRIER_RELAY_TOKEN", hide_env_values = true)]
    relay_token: String,
    /// The carrier operator's token for `CarrierAdmin`.
    #[arg(long, env = "CHUKEI_CARRIER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
}

/// Receipts of `kind` in a batch: (relay delivery id, user id).
fn receipts_of(batch: &pb::ReceiptBatch, kind: common::ReceiptKind) -> Vec<(u64, String)> {
    batch
        .messages
        .iter()
        .flat_map(|record| {
            (0..record
                .user_ids
                .len()
                .min(record.kinds.len())
                .min(record.delivery_ids.len()))
                .filter(|&i| i32::from(record.kinds[i]) == kind as i32)
                .map(|i| (record.delivery_ids[i], record.user_ids[i].clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn batch(batch_id: u64, records: Vec<pb::MessageDeliveries>) -> pb::relay_to_carrier::Kind {
    pb::relay_to_carrier::Kind::Batch(pb::DeliveryBatch {
        batch_id,
        messages: records,
    })
}

fn record(message_id: &str, ids: &[u64], users: &[String]) -> pb::MessageDeliveries {
    pb::MessageDeliveries {
        message_id: message_id.to_owned(),
        content: Some(common::Content {
            text: "Chukei conformance check".into(),
            ..Default::default()
        }),
        expires_at: Some(to_timestamp(Clock::system().now_ms() + 3_600_000)),
        channel: common::Channel::Sms as i32,
        delivery_ids: ids.to_vec(),
        user_ids: users.to_vec(),
        ..Default::default()
    }
}

/// Waits for the batch ack of `batch_id`.
async fn acked(stream: &mut Deliver, timeout: Duration, batch_id: u64) -> Result<(), String> {
    stream
        .expect(
            timeout,
            &format!("the ack of batch {batch_id}"),
            |kind| match kind {
                pb::carrier_to_relay::Kind::BatchAck(ack) if ack.batch_id == batch_id => Some(()),
                _ => None,
            },
        )
        .await
}

/// Pushes that reach the kit's terminal within `timeout`, until `enough`.
async fn pushes(
    from: &mut mpsc::UnboundedReceiver<terminal::PushedMessage>,
    timeout: Duration,
    enough: usize,
) -> Vec<terminal::PushedMessage> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < enough {
        match tokio::time::timeout_at(deadline, from.recv()).await {
            Ok(Some(message)) => got.push(message),
            _ => break,
        }
    }
    got
}

pub(crate) async fn run(args: Args, timeout: Duration, report: &mut Report) -> anyhow::Result<()> {
    let channel = crate::connect(&args.url).await?;
    let subscriber_channel = match &args.subscriber_url {
        Some(url) if *url != args.url => {
            probe::port(report, &channel, &[CARRIER], "health", "reflection").await;
            let other = crate::connect(url).await?;
            probe::port(
                report,
                &other,
                &[SUBSCRIBERS, ADMIN],
                "health-of-the-subscriber-port",
                "reflection-of-the-subscriber-port",
            )
            .await;
            other
        }
        _ => {
            probe::port(
                report,
                &channel,
                &[CARRIER, SUBSCRIBERS, ADMIN],
                "health",
                "reflection",
            )
            .await;
            channel.clone()
        }
    };

    // The kit's servers: the relay's ingress, and a terminal.
    let (contracts, mut contracted) = mpsc::unbounded_channel();
    let ingress = tokio::net::TcpListener::bind(args.ingress_listen)
        .await
        .map_err(|error| anyhow::anyhow!("--ingress-listen {}: {error}", args.ingress_listen))?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(relay::carrier_ingress_server::CarrierIngressServer::new(
                Ingress(contracts),
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(ingress)),
    );
    let (pushed, mut arrivals) = mpsc::unbounded_channel();
    let kit = KitTerminal {
        pushes: pushed,
        sink: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind(args.terminal_listen)
        .await
        .map_err(|error| anyhow::anyhow!("--terminal-listen {}: {error}", args.terminal_listen))?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(terminal::terminal_server::TerminalServer::new(kit.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // Refusals, at the first call.
    let mut wrong = Deliver::open(
        &channel,
        "not-the-token",
        &deliver::PROTOCOL_VERSION.to_string(),
    );
    let outcome = match wrong.up.recv().await {
        Some(Err(status)) if status.code() == tonic::Code::Unauthenticated => {
            Ok("refused: UNAUTHENTICATED".to_owned())
        }
        other => Err(format!("expected UNAUTHENTICATED, got {other:?}")),
    };
    report.case("deliver-refuses-a-wrong-token", outcome);
    let mut other_version = Deliver::open(&channel, &args.relay_token, "99");
    let outcome = match other_version.up.recv().await {
        Some(Err(status))
            if status.code() == tonic::Code::FailedPrecondition
                && status.message().contains("99")
                && status
                    .message()
                    .contains(&deliver::PROTOCOL_VERSION.to_string()) =>
        {
            Ok(format!("refused: {}", status.message()))
        }
        other => Err(format!(
            "expected FAILED_PRECONDITION naming versions 99 and {}, got {other:?}",
            deliver::PROTOCOL_VERSION
        )),
    };
    report.case("deliver-refuses-another-protocol-version", outcome);

    // Subscribers, their contracts at the relay, their terminal.
    let run_id = std::process::id();
    let users: Vec<String> = (1..=3)
        .map(|i| format!("conformance-{run_id}-{i}"))
        .collect();
    let subscribers = users
        .iter()
        .enumerate()
        .map(|(i, user_id)| pb::Subscriber {
            user_id: user_id.clone(),
            phone_number: format!("+8190{:08}", u64::from(run_id % 10_000) * 10 + i as u64),
            name: "Conformance Check".into(),
            gender: common::Gender::Other as i32,
            birth_date: "1990-01-01".into(),
            region: "tokyo/shibuya".into(),
            occupation: "engineer".into(),
            primary: true,
            ..Default::default()
        })
        .collect();
    let mut admin = pb::carrier_admin_client::CarrierAdminClient::with_interceptor(
        subscriber_channel.clone(),
        BearerInterceptor::new(&args.admin_token)?,
    );
    let outcome = match admin
        .provision_subscribers(pb::ProvisionSubscribersRequest { subscribers })
        .await
    {
        Err(status) => Err(format!("ProvisionSubscribers answered {status}")),
        Ok(_) => {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut seen = HashSet::new();
            while !users.iter().all(|u| seen.contains(u)) {
                match tokio::time::timeout_at(deadline, contracted.recv()).await {
                    Ok(Some(user)) => {
                        seen.insert(user);
                    }
                    _ => break,
                }
            }
            if users.iter().all(|u| seen.contains(u)) {
                Ok(format!("{} contracts reached CarrierIngress", users.len()))
            } else {
                Err("the contracts never reached CarrierIngress (is the carrier's --relay-url the kit's --ingress-listen?)".into())
            }
        }
    };
    report.case("provisioning-pushes-contracts-to-the-relay", outcome);
    let mut subscriber_api =
        pb::subscriber_api_client::SubscriberApiClient::new(subscriber_channel);
    let outcome = match subscriber_api
        .attach(pb::AttachRequest {
            endpoint: endpoint.clone(),
            user_ids: users.clone(),
        })
        .await
    {
        Ok(answer) if answer.get_ref().attached as usize == users.len() => Ok(format!(
            "{} users attached to the kit's terminal",
            users.len()
        )),
        Ok(answer) => Err(format!(
            "attached {} of {}",
            answer.get_ref().attached,
            users.len()
        )),
        Err(status) => Err(format!("Attach answered {status}")),
    };
    report.case("attach-names-the-terminal", outcome);

    // A batch: acked, pushed, confirmed, counted.
    let base = u64::from(run_id) * 1_000;
    let ids: Vec<u64> = (1..=3).map(|i| base + i).collect();
    let message_id = format!("conformance-{run_id}");
    let mut stream = Deliver::open(
        &channel,
        &args.relay_token,
        &deliver::PROTOCOL_VERSION.to_string(),
    );
    let outcome = async {
        stream
            .send(batch(1, vec![record(&message_id, &ids, &users)]))
            .await?;
        acked(&mut stream, timeout, 1).await?;
        let got = pushes(&mut arrivals, timeout, ids.len()).await;
        let wanted: HashSet<String> = ids.iter().map(u64::to_string).collect();
        let seen: HashSet<String> = got.iter().map(|m| m.delivery_id.clone()).collect();
        if seen != wanted {
            return Err(format!("pushed deliveries {seen:?}, expected {wanted:?}"));
        }
        if let Some(m) = got.iter().find(|m| {
            m.message_id != message_id
                || m.content
                    .as_ref()
                    .is_none_or(|c| c.text != "Chukei conformance check")
        }) {
            return Err(format!(
                "delivery {} pushed with the wrong message or content",
                m.delivery_id
            ));
        }
        Ok((
            got,
            "acked, and each delivery pushed once to the late-headers terminal".to_owned(),
        ))
    }
    .await;
    let pushed_first = outcome
        .as_ref()
        .map(|(got, _)| got.clone())
        .unwrap_or_default();
    report.case("batch-acked-and-pushed", outcome.map(|(_, seen)| seen));

    let outcome = async {
        let mut waiting: HashSet<u64> = ids.iter().copied().collect();
        while !waiting.is_empty() {
            let receipts = stream
                .expect(timeout, "DELIVERED receipts", |kind| match kind {
                    pb::carrier_to_relay::Kind::Receipts(batch) => Some(batch.clone()),
                    _ => None,
                })
                .await
                .map_err(|why| format!("{why} ({} still waiting)", waiting.len()))?;
            for (id, _) in receipts_of(&receipts, common::ReceiptKind::Delivered) {
                waiting.remove(&id);
            }
            stream
                .send(pb::relay_to_carrier::Kind::ReceiptAck(pb::ReceiptAck {
                    up_to_seq: receipts.seq,
                }))
                .await?;
        }
        Ok(format!("{} DELIVERED receipts, acked", ids.len()))
    }
    .await;
    report.case("delivered-events-come-up-as-receipts", outcome);

    // The relay never saw the ack: it sends the batch again.
    let outcome = async {
        stream
            .send(batch(2, vec![record(&message_id, &ids, &users)]))
            .await?;
        acked(&mut stream, timeout, 2).await?;
        let again = pushes(&mut arrivals, Duration::from_secs(1), 1).await;
        match again.first() {
            Some(m) => Err(format!(
                "delivery {} was pushed a second time",
                m.delivery_id
            )),
            None => Ok("acked, nothing pushed again".to_owned()),
        }
    }
    .await;
    report.case("repeated-batch-acked-not-pushed-again", outcome);

    // A read becomes an OPENED receipt; unacked, it comes again on the next stream.
    let opened = |batch: &pb::ReceiptBatch, id: u64| {
        receipts_of(batch, common::ReceiptKind::Opened)
            .iter()
            .any(|(d, _)| *d == id)
    };
    let outcome = async {
        let first = pushed_first.first().ok_or("nothing was pushed to read")?;
        let id: u64 = first
            .delivery_id
            .parse()
            .map_err(|_| "a pushed delivery id is not a number")?;
        kit.read(first)?;
        stream
            .expect(timeout, "an OPENED receipt", |kind| match kind {
                pb::carrier_to_relay::Kind::Receipts(batch) if opened(batch, id) => Some(()),
                _ => None,
            })
            .await?;
        Ok(id)
    }
    .await;
    let read_id = outcome.as_ref().ok().copied();
    report.case(
        "read-event-comes-up-as-opened",
        outcome.map(|id| format!("OPENED for delivery {id}")),
    );
    let outcome = async {
        let id = read_id.ok_or("no OPENED receipt to withhold the ack of")?;
        drop(stream);
        let mut again = Deliver::open(
            &channel,
            &args.relay_token,
            &deliver::PROTOCOL_VERSION.to_string(),
        );
        let seq = again
            .expect(
                timeout,
                "the unacked OPENED receipt again",
                |kind| match kind {
                    pb::carrier_to_relay::Kind::Receipts(batch) if opened(batch, id) => {
                        Some(batch.seq)
                    }
                    _ => None,
                },
            )
            .await?;
        again
            .send(pb::relay_to_carrier::Kind::ReceiptAck(pb::ReceiptAck {
                up_to_seq: seq,
            }))
            .await?;
        Ok(again)
    }
    .await;
    let mut stream = match outcome {
        Ok(again) => {
            report.case(
                "unacked-receipts-come-again-on-a-new-stream",
                Ok("resent on the new stream, then acked".into()),
            );
            again
        }
        Err(why) => {
            report.case("unacked-receipts-come-again-on-a-new-stream", Err(why));
            Deliver::open(
                &channel,
                &args.relay_token,
                &deliver::PROTOCOL_VERSION.to_string(),
            )
        }
    };

    // A malformed record is dropped; the rest of the batch is kept.
    let outcome = async {
        let bad = record(
            &format!("{message_id}-bad"),
            &[base + 10, base + 11],
            &users[..1],
        );
        let good = record(&format!("{message_id}-good"), &[base + 12], &users[1..2]);
        stream.send(batch(3, vec![bad, good])).await?;
        acked(&mut stream, timeout, 3).await?;
        let got = pushes(&mut arrivals, timeout, 1).await;
        match got.first() {
            Some(m) if m.delivery_id == (base + 12).to_string() => {
                Ok("the batch acked, its good record pushed".to_owned())
            }
            Some(m) => Err(format!(
                "delivery {} pushed, expected {}",
                m.delivery_id,
                base + 12
            )),
            None => Err("the good record was never pushed".to_owned()),
        }
    }
    .await;
    report.case("malformed-record-dropped-rest-kept", outcome);

    // The priority stream (version 3) beside the main one: its batch is
    // acked and pushed there, and the main stream is not superseded by it.
    let outcome = async {
        let priority = Deliver::open_stream(
            &channel,
            &args.relay_token,
            &deliver::PROTOCOL_VERSION.to_string(),
            deliver::Stream::Priority,
        );
        let mut priority = priority;
        let mut urgent = record(&format!("{message_id}-urgent"), &[base + 20], &users[..1]);
        urgent.priority = true;
        priority.send(batch(1, vec![urgent])).await?;
        acked(&mut priority, timeout, 1).await?;
        let got = pushes(&mut arrivals, timeout, 1).await;
        if got.first().map(|m| m.delivery_id.as_str()) != Some(&(base + 20).to_string()) {
            return Err(format!(
                "the priority batch's delivery {} was not pushed",
                base + 20
            ));
        }
        let later = record(&format!("{message_id}-later"), &[base + 21], &users[1..2]);
        stream.send(batch(4, vec![later])).await?;
        acked(&mut stream, timeout, 4)
            .await
            .map_err(|why| format!("the main stream, beside the priority one: {why}"))?;
        Ok("acked and pushed on the priority stream; the main stream still served".to_owned())
    }
    .await;
    report.case("priority-stream-beside-the-main-one", outcome);
    Ok(())
}
