//! The use cases, one implementation each, that the edges call: accepting
//! a message, quoting one, the auction's terms. They take and return domain
//! types; who the caller is (API keys, certificates) and the wire formats
//! stay at the edge (`grpc/`). A use case that only reads one thing is the
//! store's call, made by the edge directly.

use std::sync::Arc;

use chukei_proto::clock::Clock;
use tokio::sync::Notify;

use crate::auction::{self, Terms};
use crate::dispatch::DispatchHandle;
use crate::error::{Error, Result};
use crate::policy::{AttentionConfig, PolicyKind};
use crate::pricing::{self, Quote};
use crate::stats::{self, Query, Thresholds, Viewer};
use crate::storage::webhooks::EndpointRow;
use crate::storage::{AuditEntry, Lane, Store, StoredMessage};
use crate::targeting::{Channel, MessageState, NewMessage, Target};
use crate::webhooks::{self, EventType};

/// What every use case (and so every edge handler) shares.
#[derive(Clone, Debug)]
pub struct Relay {
    pub store: Store,
    pub clock: Clock,
    pub dispatch: DispatchHandle,
    /// Wakes the campaign expander.
    pub expand: Arc<Notify>,
    pub admin_token: Arc<str>,
    pub message_ttl_ms: i64,
    pub attention: AttentionConfig,
    pub thresholds: Thresholds,
    pub metrics: crate::metrics::RelayMetrics,
    pub market: Market,
    /// Calls a second each enterprise may make (`None`: no limit).
    pub limits: Option<Arc<crate::limits::RateLimits>>,
    /// Carriers must present a client certificate naming them (mutual TLS).
    pub carrier_certificates: bool,
    /// Webhook endpoints may point at loopback and private addresses.
    pub webhook_allow_private: bool,
}

/// The billing and auction settings the edge applies.
#[derive(Clone, Debug)]
pub struct Market {
    /// Price slots and billing months are local to this zone.
    pub zone_name: Arc<str>,
    pub zone: jiff::tz::TimeZone,
    pub unbid: crate::auction::Unbid,
}

/// A quote and the zone its slots are local to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub quote: Quote,
    pub zone: String,
}

impl Relay {
    /// Accepts `message` of `enterprise_id` under a new id: held to the
    /// auction's terms, durable before it returns; a segment is checked
    /// against the minimum cohort and its attribute use audited in the
    /// accepting transaction (`Store::accept_on_terms`). Wakes whoever
    /// works on it next: the expander, or the dispatchers.
    pub async fn send(&self, enterprise_id: &str, message: &NewMessage) -> Result<StoredMessage> {
        let now = self.clock.now_ms();
        let expires_at = self.expires_at(message, now)?;
        let terms = self.terms(enterprise_id, message, now, expires_at).await?;
        let stored = self
            .store
            .accept_on_terms(
                enterprise_id,
                &crate::credentials::new_id("msg"),
                message,
                now,
                expires_at,
                &self.attention,
                &terms,
                self.thresholds.min_cohort,
            )
            .await?;
        if stored.created {
            self.metrics
                .accepted
                .inc(&[("target", message.target.kind())]);
            tracing::info!(target_kind = message.target.kind(), matched = ?stored.row.matched, "message accepted");
            match (stored.row.state, &message.target) {
                (MessageState::Accepted, _) => self.expand.notify_one(),
                // Handed to its carriers' dispatchers with its commit.
                _ if stored.dispatched => {}
                // Its attempts are in the priority lane (`plan_targeted`).
                (_, Target::Refs(_)) => self.dispatch.new_work_in(Lane::Priority),
                // A campaign on a winning bid, expanded at once.
                _ => self.dispatch.new_work_in(Lane::Bulk),
            }
        }
        Ok(stored)
    }

    /// `query`'s rows for `viewer`, from the rollups. An enterprise's use of
    /// its people's attributes is on the audit log before it is answered.
    pub async fn stats(&self, viewer: &Viewer, query: &Query) -> Result<Vec<stats::Row>> {
        if let Viewer::Enterprise(enterprise_id) = viewer {
            let attributes: Vec<&str> = query
                .by
                .iter()
                .filter(|d| d.is_attribute())
                .map(|d| d.name())
                .collect();
            if !attributes.is_empty() {
                let entry = AuditEntry::new(
                    format!("enterprise:{enterprise_id}"),
                    "attributes.used",
                    "statistics",
                    format!("purpose: statistics; fields: {}", attributes.join(",")),
                );
                self.store.audit(self.clock.now_ms(), &entry).await?;
            }
        }
        breakdown(&self.store, viewer, query, self.thresholds).await
    }

    /// When `message` expires: as asked (in the future), or the relay's
    /// default time to live from `now`.
    fn expires_at(&self, message: &NewMessage, now: i64) -> Result<i64> {
        match message.timing.expires_at {
            Some(at) if at <= now => Err(Error::invalid("expires_at", "must be in the future")),
            Some(at) => Ok(at),
            None => Ok(now + self.message_ttl_ms),
        }
    }

    /// What `message` would cost, on the same terms [`Relay::send`] would
    /// apply; a segment is held to the minimum cohort first, as a send is.
    pub async fn quote(&self, enterprise_id: &str, message: &NewMessage) -> Result<Quoted> {
        let now = self.clock.now_ms();
        if let Target::Segment(segment) = &message.target {
            self.store
                .check_cohort(enterprise_id, segment, self.thresholds.min_cohort, now)
                .await?;
        }
        let expires_at = self.expires_at(message, now)?;
        let terms = self.terms(enterprise_id, message, now, expires_at).await?;
        let recipients = self
            .store
            .count_recipients(enterprise_id, &message.target)
            .await?;
        let table = self.store.price_table(None).await?;
        let zone = table
            .as_ref()
            .and_then(|t| jiff::tz::TimeZone::get(&t.zone).ok())
            .unwrap_or_else(|| self.market.zone.clone());
        // Whichever channels the policy may use: a multi-channel send is
        // charged once, on the channel it is delivered on.
        let channels: Vec<Channel> = match (terms.channel, message.policy.kind) {
            (Some(channel), _) => vec![channel],
            (None, PolicyKind::Best) if message.policy.channels.is_empty() => {
                pricing::PRICED_CHANNELS.to_vec()
            }
            _ => message.policy.channels.clone(),
        };
        // When first sends may happen: at once, in the next window opening,
        // or within a per-person send time's horizon.
        let window = terms.window.as_ref().or(message.timing.window.as_ref());
        let (from, until) = match (window, message.timing.send_time) {
            (Some(window), _) => window
                .opening(now)
                .map_or((now, now), |(open, close)| (open.max(now), close)),
            (None, Some(send_time)) => (now, now + send_time.within_ms()),
            (None, None) => (now, now),
        };
        let slots = pricing::slots_between(from, until, &zone);
        let quote = Quote::new(
            recipients,
            table.as_ref().map(|t| (t.id, &t.prices)),
            &channels,
            &slots,
            terms.bid_id.is_some(),
        );
        Ok(Quoted {
            quote,
            zone: table.map(|t| t.zone).unwrap_or_default(),
        })
    }

    /// The auction's terms for `message` of `enterprise_id` at `now`.
    pub(crate) async fn terms(
        &self,
        enterprise_id: &str,
        message: &NewMessage,
        now: i64,
        expires_at: i64,
    ) -> Result<Terms> {
        if let Some(bid_id) = &message.bid_id {
            let bid = self.store.bid(enterprise_id, bid_id).await?;
            return auction::terms_for_bid(message, bid.as_ref(), now);
        }
        let channels = if message.policy.kind == PolicyKind::Best {
            Vec::new()
        } else {
            message.policy.channels.clone()
        };
        let slots = self
            .store
            .slots_for_send(&channels, now, expires_at)
            .await?;
        if slots.is_empty() {
            return Ok(Terms::default());
        }
        auction::terms_without_bid(message, &slots, now, expires_at, self.market.unbid)
    }

    /// Adds a webhook endpoint of `enterprise_id` for `types` (every type
    /// when empty), of one message when `message_id` is not empty; returns it
    /// with its signing secret, which is shown this once. A URL whose host
    /// resolves to an internal address is refused unless the operator
    /// allows that; the sender checks again at every attempt.
    pub async fn add_webhook(
        &self,
        enterprise_id: &str,
        url: &str,
        types: &[EventType],
        message_id: &str,
    ) -> Result<(EndpointRow, String)> {
        let target = webhooks::check_url(url)?;
        if !self.webhook_allow_private {
            let addrs = tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|_| Error::invalid("url", "the host does not resolve"))?;
            if addrs.into_iter().any(|a| webhooks::is_internal(a.ip())) {
                return Err(Error::invalid(
                    "url",
                    "the host resolves to an internal address (loopback, private, link-local)",
                ));
            }
        }
        if !message_id.is_empty() {
            self.store
                .message(enterprise_id, message_id)
                .await?
                .ok_or_else(|| Error::not_found("message_id", "no such message"))?;
        }
        let types = if types.is_empty() {
            &EventType::ALL[..]
        } else {
            types
        };
        let secret = webhooks::new_secret()?;
        let id = crate::credentials::new_id("whe");
        let now = self.clock.now_ms();
        let endpoint = self
            .store
            .create_webhook(
                &id,
                enterprise_id,
                url,
                EventType::bits(types),
                message_id,
                &secret,
                now,
            )
            .await?;
        let entry = AuditEntry::new(
            format!("enterprise:{enterprise_id}"),
            "webhook.added",
            &id,
            "",
        );
        self.store.audit(now, &entry).await?;
        Ok((endpoint, secret))
    }

    /// A new signing secret for an endpoint (shown this once); the old one
    /// keeps signing beside it for `overlap`, so receivers can switch over.
    pub async fn rotate_webhook_secret(
        &self,
        enterprise_id: &str,
        id: &str,
        overlap: std::time::Duration,
    ) -> Result<(EndpointRow, String)> {
        let secret = webhooks::new_secret()?;
        let now = self.clock.now_ms();
        let until = now + overlap.as_millis() as i64;
        let endpoint = self
            .store
            .rotate_webhook_secret(enterprise_id, id, &secret, until)
            .await?;
        let entry = AuditEntry::new(
            format!("enterprise:{enterprise_id}"),
            "webhook.secret_rotated",
            id,
            "",
        );
        self.store.audit(now, &entry).await?;
        Ok((endpoint, secret))
    }

    /// Removes an endpoint; nothing more is sent to it.
    pub async fn remove_webhook(&self, enterprise_id: &str, id: &str) -> Result<()> {
        self.store.delete_webhook(enterprise_id, id).await?;
        let entry = AuditEntry::new(
            format!("enterprise:{enterprise_id}"),
            "webhook.removed",
            id,
            "",
        );
        self.store.audit(self.clock.now_ms(), &entry).await
    }

    /// The enterprise whose API key `key` is, if it is within its call rate
    /// (the edges take the key from their own headers).
    pub async fn enterprise_for_key(&self, key: &str) -> Result<String> {
        let enterprise_id = self
            .store
            .enterprise_by_key(&crate::credentials::hash_secret(key), self.clock.now_ms())
            .await?
            .ok_or(Error::Unauthenticated("authorization: unknown API key"))?;
        self.take_call(&enterprise_id)?;
        Ok(enterprise_id)
    }

    /// Counts one call of `enterprise_id` against its rate limit.
    pub(crate) fn take_call(&self, enterprise_id: &str) -> Result<()> {
        if let Some(limits) = &self.limits {
            limits
                .take(enterprise_id)
                .map_err(|retry_after| Error::RateLimited { retry_after })?;
        }
        Ok(())
    }
}

/// `query`'s rows for `viewer` from the rollups of `store`: what `stats`
/// says to sum, summed by the store, then folded into rows by `stats`.
pub async fn breakdown(
    store: &Store,
    viewer: &Viewer,
    query: &Query,
    thresholds: Thresholds,
) -> Result<Vec<stats::Row>> {
    let enterprise = viewer.enterprise_id();
    let (columns, by_person) = stats::columns(query);
    let summed = if by_person {
        let by_channel = query.by.contains(&stats::Dimension::Channel);
        store.sum_people(enterprise, by_channel).await?
    } else {
        let cube = query.cube();
        let unit = cube.time_unit_ms();
        let since = query.since.div_euclid(unit);
        let until = (query.until + unit - 1).div_euclid(unit);
        store
            .sum_cells(cube, enterprise, &columns, since, until)
            .await?
    };
    Ok(stats::rows(query, &columns, summed, thresholds))
}
