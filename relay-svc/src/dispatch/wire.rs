//! The Deliver protocol's version-2 wire form on the relay's side: a batch's
//! due deliveries packed per message, and packed receipt records back into
//! the relay's receipts.

use std::collections::HashMap;

use chukei_proto::carrier::v1 as pb;
use chukei_proto::clock::{from_timestamp, to_timestamp};
use chukei_proto::common::v1 as common;
use chukei_proto::deliver;
use chukei_proto::telemetry;
use chukei_proto::window::Window;

use crate::receipts::{CountReport, EventKind, MessageCount, Receipt};
use crate::storage::DueDelivery;
use crate::targeting::Channel;

/// Windows passed to carriers, decoded once per stored form (a zone lookup is
/// not free, and a campaign's deliveries all share one).
#[derive(Debug, Default)]
pub(super) struct WindowCache(HashMap<String, Option<common::DeliveryWindow>>);

impl WindowCache {
    fn get(&mut self, stored: String) -> Option<common::DeliveryWindow> {
        self.0
            .entry(stored)
            .or_insert_with_key(|stored| match Window::decode(stored) {
                Ok(window) => Some(window.to_wire()),
                Err(error) => {
                    tracing::error!(%error, "stored window unreadable; delivering without it");
                    None
                }
            })
            .clone()
    }
}

/// A batch's deliveries packed per message (version 2 of the Deliver
/// protocol): each message's content and instructions once, its recipients as
/// columns, in the order the deliveries came (id order).
pub(super) fn pack(
    due: Vec<DueDelivery>,
    priority: bool,
    windows: &mut WindowCache,
    traces: &HashMap<String, String>,
) -> Vec<pb::MessageDeliveries> {
    let mut records: Vec<pb::MessageDeliveries> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for delivery in due {
        let index = match index_of.get(&delivery.message_id) {
            Some(&index) => index,
            None => {
                index_of.insert(delivery.message_id.clone(), records.len());
                let message = &delivery.message;
                records.push(pb::MessageDeliveries {
                    trace_parent: telemetry::passed_on(
                        traces,
                        &delivery.message_id,
                        message.trace_parent.clone(),
                    ),
                    message_id: delivery.message_id.clone(),
                    content: Some(common::Content {
                        text: message.content.text.clone(),
                        media_url: message.content.media_url.clone(),
                        subject: message.content.subject.clone(),
                        suggested_replies: message.content.suggested_replies.clone(),
                    }),
                    expires_at: Some(to_timestamp(message.expires_at)),
                    window: message.carrier_window.clone().and_then(|w| windows.get(w)),
                    single_attempt: message.single_attempt,
                    priority,
                    channel: Channel::number(delivery.channel) as i32,
                    not_before_ms: delivery.not_before,
                    ..Default::default()
                });
                records.len() - 1
            }
        };
        let record = &mut records[index];
        let channel = Channel::number(delivery.channel) as u8;
        // A column is written out only once a delivery differs from the
        // record's shared value; the entries before it take that value.
        if !record.channels.is_empty() || channel as i32 != record.channel {
            record
                .channels
                .resize(record.delivery_ids.len(), record.channel as u8);
            record.channels.push(channel);
        }
        if !record.not_before_each_ms.is_empty() || delivery.not_before != record.not_before_ms {
            let shared = record.not_before_ms;
            record
                .not_before_each_ms
                .resize(record.delivery_ids.len(), shared);
            record.not_before_each_ms.push(delivery.not_before);
        }
        record.delivery_ids.push(delivery.id as u64);
        record.user_ids.push(delivery.user_id);
    }
    records
}

/// The receipts of packed records the relay can use; a malformed record or
/// a receipt of an unknown kind is dropped (logged), the rest are kept.
pub(super) fn receipts_from_wire(records: Vec<pb::MessageReceipts>) -> Vec<Receipt> {
    let mut receipts = Vec::new();
    for mut record in records {
        let len = match deliver::receipts_len(&record) {
            Ok(len) => len,
            Err(error) => {
                tracing::warn!(%error, "malformed receipt record dropped");
                continue;
            }
        };
        for i in 0..len {
            let kind = match common::ReceiptKind::try_from(i32::from(record.kinds[i])) {
                Ok(common::ReceiptKind::Delivered) => EventKind::Delivered,
                Ok(common::ReceiptKind::Opened) => EventKind::Opened,
                Ok(common::ReceiptKind::Failed) => EventKind::Failed,
                Ok(common::ReceiptKind::Unsupported) => EventKind::Unsupported,
                Ok(common::ReceiptKind::Expired) => EventKind::Expired,
                _ => {
                    tracing::warn!(kind = record.kinds[i], "receipt of unknown kind dropped");
                    continue;
                }
            };
            if record.user_ids[i].is_empty() {
                tracing::warn!("receipt without a user dropped");
                continue;
            }
            receipts.push(Receipt {
                delivery_id: match record.delivery_ids[i] {
                    0 => None,
                    id => i64::try_from(id).ok(),
                },
                message_id: record.message_id.clone(),
                user_id: std::mem::take(&mut record.user_ids[i]),
                kind,
                channel: Channel::from_number(i64::from(record.channels[i])),
                at: record.at_ms[i],
                region: deliver::region(&record, i).to_owned(),
            });
        }
    }
    receipts
}

/// A carrier's count report; stamped `now` when it names no time.
pub(super) fn count_report_from_wire(report: pb::CountReport, now: i64) -> CountReport {
    CountReport {
        at: report.at.as_ref().map_or(now, from_timestamp),
        counts: report
            .counts
            .into_iter()
            .map(|c| MessageCount {
                message_id: c.message_id,
                sent: c.sent,
                opened: c.opened,
                sms_segments: c.sms_segments,
                unsupported: c.unsupported,
                expired: c.expired,
            })
            .collect(),
    }
}
