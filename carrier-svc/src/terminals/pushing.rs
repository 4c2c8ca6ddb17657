//! What goes down a terminal link's push streams: held deliveries due for
//! the endpoint (read from the batches, rendered by their channel's
//! adapter, then marked pushed), the carrier's own notices, and a priority
//! batch's recipients pushed at once while the batch commits.

use std::collections::HashMap;
use std::sync::Arc;

use chukei_proto::common::v1 as common;
use chukei_proto::telemetry;
use chukei_proto::terminal::v1 as pb;
use tokio::sync::mpsc;

use crate::Shared;
use crate::channels;
use crate::model::{Lanes, Outgoing, Slot};
use crate::storage::PushableNow;

use super::PUSH_BATCH;

/// A link's priority stream while it is up: dropped, it is no longer
/// pushed to at once (unless a newer stream of the endpoint replaced it).
pub(super) struct PriorityStreamUp {
    pub(super) streams: Arc<std::sync::Mutex<HashMap<Arc<str>, mpsc::Sender<pb::PushRequest>>>>,
    pub(super) endpoint: Arc<str>,
    pub(super) down: mpsc::Sender<pb::PushRequest>,
}

impl Drop for PriorityStreamUp {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().expect("priority streams lock");
        if streams
            .get(&self.endpoint)
            .is_some_and(|down| down.same_channel(&self.down))
        {
            streams.remove(&self.endpoint);
        }
    }
}

/// Pushes what a priority batch can push at once, while the batch commits
/// (`Store::accept_batch_pushing`): each endpoint's recipients down its
/// link's priority stream, if that stream is up and has room now, never
/// waiting. Returns the slots pushed; what could not go (no stream, no
/// room, a channel the subscriber cannot take) stays held for the push's
/// own read, which also reports the unsupported.
pub(crate) fn push_at_once(shared: &Shared, pushable: PushableNow) -> Vec<Slot> {
    let mut pushed = Vec::new();
    for (endpoint, due) in pushable {
        let Some(down) = shared
            .terminals
            .priority_streams
            .lock()
            .expect("priority streams lock")
            .get(&endpoint)
            .cloned()
        else {
            continue;
        };
        let (slots, messages, _unsupported) = render(due);
        if messages.is_empty() {
            continue;
        }
        let request = pb::PushRequest {
            messages,
            carrier_id: shared.carrier_id.to_string(),
        };
        let counted = pushed_by_channel(&request);
        if down.try_send(request).is_ok() {
            pushed.extend(slots);
            count_pushed(shared, counted);
        }
    }
    pushed
}

/// Pushes the carrier's notices (sign-in codes) waiting for `endpoint`.
pub(super) async fn push_notices(
    shared: &Shared,
    endpoint: &str,
    down: &mpsc::Sender<pb::PushRequest>,
) -> anyhow::Result<()> {
    let notices = shared.terminals.take_notices(endpoint);
    if !notices.is_empty() {
        down.send(pb::PushRequest {
            messages: notices,
            carrier_id: String::new(),
        })
        .await?;
    }
    Ok(())
}

/// Pushes every delivery due in `lanes` for `endpoint` down `down`, a batch
/// at a time; whether anything was pushed.
pub(super) async fn push_due(
    shared: &Shared,
    endpoint: &str,
    lanes: Lanes,
    down: &mpsc::Sender<pb::PushRequest>,
) -> anyhow::Result<bool> {
    let mut pushed = false;
    loop {
        let due = shared
            .store
            .due_for_endpoint(
                endpoint,
                shared.gateways,
                shared.clock.now_ms(),
                lanes,
                PUSH_BATCH,
            )
            .await?;
        if due.is_empty() {
            break;
        }
        // Fewer than asked for: nothing more was due when it was read (what
        // becomes due later wakes the link again).
        let drained = due.len() < PUSH_BATCH as usize;
        let (slots, messages, unsupported) = render(due);
        if !unsupported.is_empty()
            && shared
                .store
                .mark_unsupported(&unsupported, shared.clock.now_ms())
                .await?
                > 0
        {
            shared.outbox_changed.send_modify(|g| *g += 1);
        }
        if messages.is_empty() {
            if drained {
                break;
            }
            continue;
        }
        let request = pb::PushRequest {
            messages,
            carrier_id: shared.carrier_id.to_string(),
        };
        let counted = pushed_by_channel(&request);
        down.send(request)
            .await
            .map_err(|_| anyhow::anyhow!("terminal stream closed"))?;
        shared.store.mark_pushed(&slots).await?;
        pushed = true;
        count_pushed(shared, counted);
        if drained {
            break;
        }
    }
    Ok(pushed)
}

/// How many messages of `request` go on each channel.
fn pushed_by_channel(request: &pb::PushRequest) -> HashMap<&'static str, u64> {
    let mut by_channel: HashMap<&'static str, u64> = HashMap::new();
    for message in &request.messages {
        *by_channel
            .entry(common::Channel::short_name_of(message.channel))
            .or_default() += 1;
    }
    by_channel
}

fn count_pushed(shared: &Shared, by_channel: HashMap<&'static str, u64>) {
    for (channel, count) in by_channel {
        shared.metrics.pushed.add(&[("channel", channel)], count);
    }
}

/// Each delivery through its channel's adapter: the pushed messages and
/// their slots, and the slots of what the carrier cannot carry (no address
/// on file), reported unsupported rather than pushed.
fn render(due: Vec<Outgoing>) -> (Vec<Slot>, Vec<pb::PushedMessage>, Vec<Slot>) {
    let mut slots = Vec::with_capacity(due.len());
    let mut unsupported = Vec::new();
    let mut messages = Vec::with_capacity(due.len());
    let traces = telemetry::step_per_message(
        "carrier.push",
        due.iter()
            .map(|d| (d.message_id.as_str(), d.trace_parent.as_str())),
    );
    for d in due {
        match channels::render(
            d.channel,
            &d.text,
            &d.media_url,
            &d.subject,
            &d.suggested_replies,
            &d.contact,
        ) {
            Ok(rendered) => {
                slots.push(d.slot);
                messages.push(pb::PushedMessage {
                    trace_parent: telemetry::passed_on(&traces, &d.message_id, d.trace_parent),
                    delivery_id: d.delivery_id.to_string(),
                    message_id: d.message_id,
                    user_id: d.user_id,
                    content: Some(common::Content {
                        text: d.text,
                        media_url: rendered.media_url,
                        subject: rendered.subject,
                        suggested_replies: rendered.suggested_replies,
                    }),
                    channel: d.channel as i32,
                    sms_segments: rendered.sms_segments,
                    address: rendered.address,
                });
            }
            Err(reason) => {
                tracing::debug!(
                    ?reason,
                    channel = d.channel,
                    "channel unsupported for this subscriber"
                );
                unsupported.push(d.slot);
            }
        }
    }
    (slots, messages, unsupported)
}
