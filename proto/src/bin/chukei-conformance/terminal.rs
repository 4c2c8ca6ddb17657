//! The terminal's contract, driven as a carrier would: the first request of
//! a `Push` stream may carry only the carrier's id, and the carrier sends
//! before it has seen any response header; every pushed message is answered
//! with a DELIVERED (or UNSUPPORTED) event naming its delivery, message and
//! user; a push repeated after a lost confirmation is confirmed again (the
//! carrier cannot tell a lost event from a slow one); bad input does not
//! break the stream; a new stream from the same carrier works; READ events
//! name a delivery that was pushed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chukei_proto::common::v1 as common;
use chukei_proto::terminal::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use crate::{Report, probe};

const SERVICE: &str = "chukei.terminal.v1.Terminal";

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The terminal's gRPC URL, e.g. http://127.0.0.1:50071.
    #[arg(value_parser = chukei_proto::validate::url_argument)]
    url: String,
    /// A user the terminal hosts (repeat for several); messages are pushed to them.
    #[arg(long = "user", default_value = "conformance-user-1")]
    users: Vec<String>,
    /// The carrier id the kit pushes as.
    #[arg(long, default_value = "conformance-carrier")]
    carrier_id: String,
    /// Require a READ event for every message the terminal confirmed (for a
    /// terminal set to open everything, like `terminal-sim --open-mode always`).
    #[arg(long)]
    expect_reads: bool,
}

/// One `Push` stream: requests go in as they are queued, whether or not the
/// terminal has sent its response headers; event batches (or the stream's
/// failure) come out of `events`.
struct Stream {
    requests: mpsc::Sender<pb::PushRequest>,
    events: mpsc::UnboundedReceiver<Result<pb::TerminalEvents, Status>>,
}

impl Stream {
    /// Opens a stream whose first request names only the carrier.
    async fn open(channel: &Channel, carrier_id: &str) -> Stream {
        let (requests, outgoing) = mpsc::channel(16);
        let _ = requests
            .send(pb::PushRequest {
                messages: Vec::new(),
                carrier_id: carrier_id.to_owned(),
            })
            .await;
        let mut client = pb::terminal_client::TerminalClient::new(channel.clone());
        let events =
            crate::forward(async move { client.push(ReceiverStream::new(outgoing)).await });
        Stream { requests, events }
    }

    async fn push(&self, messages: Vec<pb::PushedMessage>) -> Result<(), String> {
        self.requests
            .send(pb::PushRequest {
                messages,
                carrier_id: String::new(),
            })
            .await
            .map_err(|_| "the stream is closed".to_owned())
    }

    /// Waits until every one of `wanted` is confirmed (or `timeout`);
    /// READ events seen meanwhile are kept in `reads`.
    async fn confirmed(
        &mut self,
        wanted: &[pb::PushedMessage],
        timeout: Duration,
        reads: &mut Vec<pb::TerminalEvent>,
    ) -> Result<Vec<pb::TerminalEvent>, String> {
        let events = self.gather(timeout, all_confirmed(wanted)).await?;
        reads.extend(
            events
                .iter()
                .filter(|e| e.kind == pb::EventKind::Read as i32)
                .cloned(),
        );
        Ok(events)
    }

    /// Pushes `wanted` in one request and checks each is confirmed, naming
    /// its own message and user.
    async fn push_and_check(
        &mut self,
        wanted: &[pb::PushedMessage],
        timeout: Duration,
        pushed: &HashMap<String, (String, String)>,
        reads: &mut Vec<pb::TerminalEvent>,
    ) -> Result<String, String> {
        self.push(wanted.to_vec()).await?;
        let events = self.confirmed(wanted, timeout, reads).await?;
        check_confirmed(wanted, &events, pushed)
    }

    /// Events until `done` holds for what was gathered or `timeout` passes.
    async fn gather(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[pb::TerminalEvent]) -> bool,
    ) -> Result<Vec<pb::TerminalEvent>, String> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&seen) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(batch))) => seen.extend(batch.events),
                Ok(Some(Err(status))) => return Err(format!("the stream failed: {status}")),
                Ok(None) => return Err("the terminal ended the stream".into()),
                Err(_) => break,
            }
        }
        Ok(seen)
    }
}

/// Messages for the kit's pushes: distinct delivery ids, users in turn.
struct Messages<'a> {
    users: &'a [String],
    next: u64,
    /// What was pushed, by delivery id: (message id, user id).
    pushed: HashMap<String, (String, String)>,
}

impl Messages<'_> {
    fn next(&mut self, message_id: &str, channel: common::Channel) -> pb::PushedMessage {
        self.next += 1;
        let user_id = self.users[self.next as usize % self.users.len()].clone();
        let delivery_id = format!("conformance-{}-{}", std::process::id(), self.next);
        self.pushed.insert(
            delivery_id.clone(),
            (message_id.to_owned(), user_id.clone()),
        );
        pb::PushedMessage {
            delivery_id,
            message_id: message_id.to_owned(),
            user_id,
            content: Some(common::Content {
                text: "Chukei conformance check".into(),
                ..Default::default()
            }),
            channel: channel as i32,
            sms_segments: vec!["Chukei conformance check".into()],
            ..Default::default()
        }
    }
}

/// The confirmations (DELIVERED or UNSUPPORTED) among `events`, by delivery id.
fn confirmed(events: &[pb::TerminalEvent]) -> HashSet<&str> {
    events
        .iter()
        .filter(|e| {
            e.kind == pb::EventKind::Delivered as i32 || e.kind == pb::EventKind::Unsupported as i32
        })
        .map(|e| e.delivery_id.as_str())
        .collect()
}

/// Every one of `wanted` confirmed, each event naming its own message and user.
fn check_confirmed(
    wanted: &[pb::PushedMessage],
    events: &[pb::TerminalEvent],
    pushed: &HashMap<String, (String, String)>,
) -> Result<String, String> {
    for event in events {
        let Some((message_id, user_id)) = pushed.get(&event.delivery_id) else {
            return Err(format!(
                "an event names delivery {:?}, which was never pushed",
                event.delivery_id
            ));
        };
        if &event.message_id != message_id || &event.user_id != user_id {
            return Err(format!(
                "the event for delivery {:?} names message {:?} and user {:?}, not {message_id:?} and {user_id:?}",
                event.delivery_id, event.message_id, event.user_id
            ));
        }
        if event.at.is_none() {
            return Err(format!(
                "the event for delivery {:?} has no `at`",
                event.delivery_id
            ));
        }
    }
    let got = confirmed(events);
    let missing: Vec<&str> = wanted
        .iter()
        .map(|m| m.delivery_id.as_str())
        .filter(|id| !got.contains(id))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} of {} messages never confirmed (DELIVERED or UNSUPPORTED), e.g. {:?}",
            missing.len(),
            wanted.len(),
            missing[0]
        ));
    }
    Ok(format!("{} confirmed", wanted.len()))
}

fn all_confirmed(wanted: &[pb::PushedMessage]) -> impl Fn(&[pb::TerminalEvent]) -> bool + '_ {
    move |events| {
        let got = confirmed(events);
        wanted.iter().all(|m| got.contains(m.delivery_id.as_str()))
    }
}

pub(crate) async fn run(args: Args, timeout: Duration, report: &mut Report) -> anyhow::Result<()> {
    let channel = crate::connect(&args.url).await?;
    probe::port(report, &channel, &[SERVICE], "health", "reflection").await;

    let mut messages = Messages {
        users: &args.users,
        next: 0,
        pushed: HashMap::new(),
    };
    let mut reads: Vec<pb::TerminalEvent> = Vec::new();

    // The carrier names itself, waits a while (no headers need come), then pushes.
    let mut stream = Stream::open(&channel, &args.carrier_id).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = vec![messages.next("conformance-first", common::Channel::Sms)];
    let outcome = stream
        .push_and_check(&first, timeout, &messages.pushed, &mut reads)
        .await;
    report.case("first-request-names-only-the-carrier", outcome);

    let batch: Vec<pb::PushedMessage> = (0..20)
        .map(|_| messages.next("conformance-batch", common::Channel::Sms))
        .collect();
    let outcome = stream
        .push_and_check(&batch, timeout, &messages.pushed, &mut reads)
        .await;
    report.case("every-message-in-a-push-confirmed", outcome);

    // One per request, newest delivery first.
    let mut spread: Vec<pb::PushedMessage> = (0..10)
        .map(|_| messages.next("conformance-spread", common::Channel::Sms))
        .collect();
    spread.reverse();
    let outcome = async {
        for message in &spread {
            stream.push(vec![message.clone()]).await?;
        }
        let events = stream.confirmed(&spread, timeout, &mut reads).await?;
        check_confirmed(&spread, &events, &messages.pushed)
    }
    .await;
    report.case("pushes-out-of-delivery-order-confirmed", outcome);

    // A carrier re-pushes when a confirmation was lost: it must be confirmed again.
    let again = vec![batch[0].clone()];
    let outcome = stream
        .push_and_check(&again, timeout, &messages.pushed, &mut reads)
        .await
        .map(|_| "the repeated push confirmed again".to_owned());
    report.case("repeated-push-confirmed-again", outcome);

    // Bad input: no user, an unknown channel. Whatever the terminal makes of
    // them, the stream must carry on.
    let mut no_user = messages.next("conformance-bad", common::Channel::Sms);
    no_user.user_id.clear();
    let mut odd_channel = messages.next("conformance-bad", common::Channel::Sms);
    odd_channel.channel = 99;
    let after = vec![messages.next("conformance-after-bad", common::Channel::Sms)];
    let outcome = async {
        stream.push(vec![no_user, odd_channel]).await?;
        stream.push(after.clone()).await?;
        let events = stream.confirmed(&after, timeout, &mut reads).await?;
        if confirmed(&events).contains(after[0].delivery_id.as_str()) {
            Ok("the stream carried on after them".to_owned())
        } else {
            Err("the message pushed after them was never confirmed".to_owned())
        }
    }
    .await;
    report.case("bad-input-does-not-break-the-stream", outcome);

    // The carrier's stream breaks and it dials again.
    drop(stream);
    let mut stream = Stream::open(&channel, &args.carrier_id).await;
    let later = vec![messages.next("conformance-reconnect", common::Channel::Sms)];
    let outcome = stream
        .push_and_check(&later, timeout, &messages.pushed, &mut reads)
        .await;
    report.case("a-new-stream-from-the-carrier-works", outcome);

    // Reads: each names a pushed delivery with its message and user.
    let delivered: HashSet<String> = messages
        .pushed
        .keys()
        .filter(|id| {
            [&first, &batch, &spread, &later]
                .iter()
                .any(|set| set.iter().any(|m| &m.delivery_id == *id))
        })
        .cloned()
        .collect();
    let outcome = async {
        if args.expect_reads {
            let events = stream
                .gather(timeout, |events| {
                    let mut read: HashSet<&str> =
                        reads.iter().map(|e| e.delivery_id.as_str()).collect();
                    read.extend(
                        events
                            .iter()
                            .filter(|e| e.kind == pb::EventKind::Read as i32)
                            .map(|e| e.delivery_id.as_str()),
                    );
                    delivered.iter().all(|id| read.contains(id.as_str()))
                })
                .await?;
            reads.extend(
                events
                    .into_iter()
                    .filter(|e| e.kind == pb::EventKind::Read as i32),
            );
        }
        let wrong = check_confirmed(&[], &reads, &messages.pushed);
        wrong?;
        let read: HashSet<&str> = reads.iter().map(|e| e.delivery_id.as_str()).collect();
        if args.expect_reads {
            let unread = delivered
                .iter()
                .filter(|id| !read.contains(id.as_str()))
                .count();
            if unread > 0 {
                return Err(format!(
                    "{unread} of {} confirmed messages never read",
                    delivered.len()
                ));
            }
        }
        Ok(format!(
            "{} READ events, each naming a pushed delivery",
            reads.len()
        ))
    }
    .await;
    report.case("read-events-name-pushed-deliveries", outcome);
    Ok(())
}
