//! What the enterprise console lists: an enterprise's messages, newest
//! first, and one message's funnel by channel (from the deduplicated events).

use super::{Store, on_pool};
use crate::error::Result;
use crate::receipts::EventKind;
use crate::targeting::Channel;

/// One message as the console's list shows it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageSummary {
    pub id: String,
    pub target_kind: String,
    pub state: i64,
    pub matched: Option<i64>,
    pub accepted_at: i64,
    /// The text's first characters.
    pub text: String,
}

/// One channel's row of a message's funnel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelFunnel {
    /// `None`: the carrier's default channel.
    pub channel: Option<Channel>,
    pub handed_over: u64,
    pub delivered: u64,
    pub opened: u64,
    pub failed: u64,
    pub expired: u64,
    pub unsupported: u64,
}

impl Store {
    /// `enterprise_id`'s messages accepted before `before` (ms; `i64::MAX`
    /// for the newest), newest first, at most `limit`.
    pub async fn recent_messages(
        &self,
        enterprise_id: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<MessageSummary>> {
        Ok(on_pool!(self, pool => sqlx::query_as(
            "SELECT id, target_kind, state, matched, accepted_at, SUBSTR(content_text, 1, 80) AS text
             FROM messages WHERE enterprise_id = $1 AND accepted_at < $2
             ORDER BY accepted_at DESC, id DESC LIMIT $3",
        )
        .bind(enterprise_id)
        .bind(before)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
    }

    /// Message `message_id`'s people per channel and event (each person
    /// counted once per kind, on the channel the event was on).
    pub async fn funnel_by_channel(&self, message_id: &str) -> Result<Vec<ChannelFunnel>> {
        let rows: Vec<(i64, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT channel, kind, COUNT(*) FROM events
             WHERE message_id = $1 AND user_id <> '' GROUP BY channel, kind ORDER BY channel",
        )
        .bind(message_id)
        .fetch_all(pool)
        .await)?;
        let mut funnel: Vec<ChannelFunnel> = Vec::new();
        for (channel, kind, count) in rows {
            let channel = Channel::from_number(channel);
            let row = match funnel.iter_mut().position(|f| f.channel == channel) {
                Some(at) => &mut funnel[at],
                None => {
                    funnel.push(ChannelFunnel {
                        channel,
                        ..ChannelFunnel::default()
                    });
                    funnel.last_mut().expect("just pushed")
                }
            };
            let count = count as u64;
            match EventKind::from_number(kind) {
                Some(EventKind::HandedOver) => row.handed_over += count,
                Some(EventKind::Delivered) => row.delivered += count,
                Some(EventKind::Opened) => row.opened += count,
                Some(EventKind::Failed) => row.failed += count,
                Some(EventKind::Expired) => row.expired += count,
                Some(EventKind::Unsupported) => row.unsupported += count,
                Some(EventKind::Skipped) | None => {}
            }
        }
        Ok(funnel)
    }
}
