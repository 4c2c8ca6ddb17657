//! The relay's gRPC edge: the three services it hosts, the credentials each
//! accepts, and the conversion of every request into validated domain types
//! (`TryFrom` on the way in, plain constructors on the way out). Nothing below
//! this module sees a prost type or a `tonic::Request`.

mod admin;
mod enterprise;
mod ingress;
mod market;
mod send_request;
mod webhooks;

use chukei_proto::auth;
use chukei_proto::clock::to_timestamp;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::validate;
use tonic::metadata::MetadataMap;

pub use admin::AdminService;
pub use enterprise::EnterpriseService;
pub use ingress::IngressService;

use crate::credentials;
use crate::error::{Error, Result};
use crate::registry::{Gender, Profile};
use crate::stats::{self, Dimension, Thresholds, Viewer};
use crate::storage::{AuditEntry, Explanation};
use crate::targeting::Channel;

pub use crate::service::{Market, Relay};

impl Relay {
    /// The enterprise whose API key the call presents, if it is within its
    /// call rate.
    async fn enterprise(&self, metadata: &MetadataMap) -> Result<String> {
        let key = auth::bearer(metadata)
            .ok_or(Error::Unauthenticated("authorization: missing API key"))?;
        self.enterprise_for_key(key).await
    }

    /// The carrier calling: its token, and under mutual TLS a client
    /// certificate naming it (`<carrier_id>.carrier.chukei`).
    async fn calling_carrier<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<String, tonic::Status> {
        let carrier_id = self.carrier(request.metadata()).await?;
        if self.carrier_certificates {
            chukei_proto::tls::require_peer(
                request,
                &chukei_proto::tls::carrier_name(&carrier_id),
            )?;
        }
        Ok(carrier_id)
    }

    /// The carrier whose token the call presents.
    async fn carrier(&self, metadata: &MetadataMap) -> Result<String> {
        let token = auth::bearer(metadata).ok_or(Error::Unauthenticated(
            "authorization: missing carrier token",
        ))?;
        self.store
            .carrier_by_token(&credentials::hash_secret(token))
            .await?
            .ok_or(Error::Unauthenticated(
                "authorization: unknown carrier token",
            ))
    }

    /// Checks the operator's token and records the access in the audit log.
    async fn admin(&self, metadata: &MetadataMap, call: &str) -> Result<()> {
        auth::require_secret(metadata, &self.admin_token).map_err(Error::Unauthenticated)?;
        let entry = AuditEntry::new("admin", format!("admin.{call}"), "", "");
        self.store.audit(self.clock.now_ms(), &entry).await
    }
}

/// A required, bounded string (see `chukei_proto::validate`).
fn required<'a>(field: &str, value: &'a str, max_len: usize) -> Result<&'a str> {
    Ok(validate::required(field, value, max_len)?)
}

/// An optional id: empty means absent.
fn optional(field: &str, value: &str, max_len: usize) -> Result<Option<String>> {
    Ok(validate::optional(field, value, max_len)?)
}

/// An operator-chosen id: a required slug of `a-z 0-9 - _`, at most 64 long.
fn slug<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    let value = required(field, value, 64)?;
    if !is_slug(value) {
        return Err(Error::invalid(
            field,
            "must be lowercase a-z, 0-9, '-' or '_'",
        ));
    }
    Ok(value)
}

fn is_slug(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// A region path: lowercase segments of `a-z 0-9 - _` joined by `/`.
fn region(field: &str, value: &str) -> Result<String> {
    let value = required(field, value, 128)?;
    let valid = value
        .split('/')
        .all(|segment| !segment.is_empty() && is_slug(segment));
    if !valid {
        return Err(Error::invalid(
            field,
            "must be lowercase segments of a-z, 0-9, '-' or '_' separated by '/'",
        ));
    }
    Ok(value.to_owned())
}

fn occupation(field: &str, value: &str) -> Result<String> {
    required(field, value, 64).map(|v| v.to_lowercase())
}

fn gender(field: &str, value: i32) -> Result<Option<Gender>> {
    match common::Gender::try_from(value) {
        Ok(common::Gender::Unspecified) => Ok(None),
        Ok(common::Gender::Female) => Ok(Some(Gender::Female)),
        Ok(common::Gender::Male) => Ok(Some(Gender::Male)),
        Ok(common::Gender::Other) => Ok(Some(Gender::Other)),
        Err(_) => Err(Error::invalid(field, format!("unknown gender {value}"))),
    }
}

/// A wire channel named `field`; unspecified is `None`.
fn channel_from_wire(field: &str, number: i32) -> Result<Option<Channel>> {
    match common::Channel::try_from(number) {
        Ok(common::Channel::Unspecified) => Ok(None),
        Ok(common::Channel::Rcs) => Ok(Some(Channel::Rcs)),
        Ok(common::Channel::Sms) => Ok(Some(Channel::Sms)),
        Ok(common::Channel::Sns) => Ok(Some(Channel::Sns)),
        Ok(common::Channel::Email) => Ok(Some(Channel::Email)),
        Err(_) => Err(Error::invalid(field, format!("unknown channel {number}"))),
    }
}

fn age_range(field: &str, min: Option<u32>, max: Option<u32>) -> Result<Option<(u32, u32)>> {
    match (min, max) {
        (None, None) => Ok(None),
        (Some(min), Some(max)) if min <= max && max <= 150 => Ok(Some((min, max))),
        (Some(_), Some(_)) => Err(Error::invalid(
            field,
            "age_min must not exceed age_max, and ages must be at most 150",
        )),
        _ => Err(Error::invalid(
            field,
            "give both age_min and age_max, or neither",
        )),
    }
}

fn profile_from_wire(field: &str, profile: Option<common::ConsentedProfile>) -> Result<Profile> {
    let Some(profile) = profile else {
        return Ok(Profile::default());
    };
    Ok(Profile {
        gender: gender(&format!("{field}.gender"), profile.gender)?,
        age: age_range(&format!("{field}.age"), profile.age_min, profile.age_max)?,
        region: if profile.region.is_empty() {
            None
        } else {
            Some(region(&format!("{field}.region"), &profile.region)?)
        },
        occupation: if profile.occupation.is_empty() {
            None
        } else {
            Some(occupation(
                &format!("{field}.occupation"),
                &profile.occupation,
            )?)
        },
    })
}

/// The wire form of a decision trace; carriers are shown to the operator only.
fn explanation_to_wire(
    message_id: &str,
    explanation: Explanation,
    show_carriers: bool,
) -> pb::DeliveryExplanation {
    pb::DeliveryExplanation {
        message_id: message_id.to_owned(),
        plan: explanation.plan,
        attempts: explanation
            .attempts
            .into_iter()
            .map(|attempt| pb::DeliveryAttempt {
                attempt: attempt.attempt,
                channel: Channel::number(attempt.channel) as i32,
                state: attempt.state.to_owned(),
                not_before: Some(to_timestamp(attempt.not_before)),
                handed_over_at: attempt.handed_over_at.map(to_timestamp),
                reason: attempt.reason,
                carrier_id: if show_carriers {
                    attempt.carrier_id
                } else {
                    String::new()
                },
            })
            .collect(),
        events: explanation
            .events
            .into_iter()
            .map(|event| pb::TraceEvent {
                kind: event.kind.as_str().to_owned(),
                at: Some(to_timestamp(event.at)),
                channel: Channel::number(event.channel) as i32,
            })
            .collect(),
    }
}

/// A `GetStats` request for `viewer`, validated; `field` prefixes error
/// fields (`query.` for the operator's wrapper).
fn stats_query(
    request: &pb::GetStatsRequest,
    viewer: &Viewer,
    now: i64,
    prefix: &str,
) -> Result<stats::Query> {
    let by = request
        .by
        .iter()
        .enumerate()
        .map(|(index, value)| {
            pb::StatsDimension::try_from(*value)
                .ok()
                .and_then(dimension_from_wire)
                .ok_or_else(|| Error::invalid(format!("{prefix}by[{index}]"), "unknown dimension"))
        })
        .collect::<Result<Vec<_>>>()?;
    const WEEK_MS: i64 = 7 * 24 * 3_600_000;
    let until = match &request.until {
        Some(at) => validate::instant(&format!("{prefix}until"), at)?,
        None => now,
    };
    let since = match (&request.since, &request.lookback) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                format!("{prefix}lookback"),
                "give since or lookback, not both",
            ));
        }
        (Some(since), None) => validate::instant(&format!("{prefix}since"), since)?,
        (None, Some(lookback)) => {
            if lookback.seconds <= 0 {
                return Err(Error::invalid(
                    format!("{prefix}lookback"),
                    "must be positive",
                ));
            }
            until.saturating_sub(lookback.seconds.saturating_mul(1000))
        }
        (None, None) => until - WEEK_MS,
    };
    stats::Query::new(by, since, until, &request.zone, viewer).map_err(|error| match error {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: format!("{prefix}{field}"),
            reason,
        },
        other => other,
    })
}

/// A breakdown on the wire.
fn stats_to_wire(
    query: &stats::Query,
    rows: Vec<stats::Row>,
    thresholds: Thresholds,
) -> pb::GetStatsResponse {
    pb::GetStatsResponse {
        columns: query.by.iter().map(|d| d.name().to_owned()).collect(),
        rows: rows
            .into_iter()
            .map(|row| pb::StatsRow {
                key: row.key,
                sent: row.sent,
                delivered: row.delivered,
                opened: row.opened,
                open_rate: row.estimate.map(|e| pb::RateEstimate {
                    rate: e.rate,
                    low: e.low,
                    high: e.high,
                }),
                low_sample: row.low_sample,
                suppressed: row.suppressed,
            })
            .collect(),
        min_cohort: thresholds.min_cohort as u32,
        min_sample: thresholds.min_sample as u32,
    }
}

fn dimension_from_wire(wire: pb::StatsDimension) -> Option<Dimension> {
    use pb::StatsDimension as W;
    Some(match wire {
        W::Unspecified => return None,
        W::Channel => Dimension::Channel,
        W::SendHour => Dimension::SendHour,
        W::OpenHour => Dimension::OpenHour,
        W::Weekday => Dimension::Weekday,
        W::Day => Dimension::Day,
        W::Place => Dimension::Place,
        W::Gender => Dimension::Gender,
        W::Age => Dimension::Age,
        W::Region => Dimension::Region,
        W::Occupation => Dimension::Occupation,
        W::User => Dimension::User,
        W::Carrier => Dimension::Carrier,
    })
}
