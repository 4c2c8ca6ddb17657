//! `chukei.relay.v1.EnterpriseApi`: the enterprise's view. The tenant is the
//! API key's enterprise; an enterprise only ever sees its own refs and counts.

use chukei_proto::clock::to_timestamp;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use tonic::{Request, Response, Status};

use super::{Relay, age_range, gender, occupation, optional, region, required};
use crate::credentials;
use crate::error::{Error, Result};
use crate::targeting::{self, Channel, Content, MessageState, NewMessage, Segment, Target};

const MAX_PAGE_SIZE: u32 = 1_000;

#[derive(Clone, Debug)]
pub struct EnterpriseService(pub Relay);

impl TryFrom<pb::SendMessageRequest> for NewMessage {
    type Error = Error;

    fn try_from(request: pb::SendMessageRequest) -> Result<Self> {
        let idempotency_key =
            required("idempotency_key", &request.idempotency_key, 128)?.to_owned();
        let content = request
            .content
            .ok_or_else(|| Error::invalid("content", "is required"))?;
        if content.text.trim().is_empty() {
            return Err(Error::invalid("content.text", "must not be empty"));
        }
        if content.text.len() > targeting::MAX_TEXT_BYTES {
            return Err(Error::invalid(
                "content.text",
                format!("must be at most {} bytes", targeting::MAX_TEXT_BYTES),
            ));
        }
        let media_url_ok = content.media_url.is_empty()
            || content.media_url.starts_with("https://")
            || content.media_url.starts_with("http://");
        if !media_url_ok {
            return Err(Error::invalid(
                "content.media_url",
                "must be an http(s) URL",
            ));
        }
        let channel = match common::Channel::try_from(request.channel) {
            Ok(common::Channel::Unspecified) => None,
            Ok(common::Channel::Rcs) => Some(Channel::Rcs),
            Ok(common::Channel::Sms) => Some(Channel::Sms),
            Ok(common::Channel::Sns) => Some(Channel::Sns),
            Ok(common::Channel::Email) => Some(Channel::Email),
            Err(_) => {
                return Err(Error::invalid(
                    "channel",
                    format!("unknown channel {}", request.channel),
                ));
            }
        };
        let target = match request.target.and_then(|t| t.kind) {
            None => return Err(Error::invalid("target", "is required")),
            Some(pb::target::Kind::Refs(list)) => {
                if list.refs.is_empty() {
                    return Err(Error::invalid("target.refs", "must name at least one ref"));
                }
                if list.refs.len() > targeting::MAX_REFS {
                    return Err(Error::invalid(
                        "target.refs",
                        format!("must name at most {} refs", targeting::MAX_REFS),
                    ));
                }
                let mut seen = std::collections::HashSet::with_capacity(list.refs.len());
                let mut refs = Vec::with_capacity(list.refs.len());
                for (index, user_ref) in list.refs.iter().enumerate() {
                    let user_ref = required(&format!("target.refs[{index}]"), user_ref, 64)?;
                    if seen.insert(user_ref) {
                        refs.push(user_ref.to_owned());
                    }
                }
                Target::Refs(refs)
            }
            Some(pb::target::Kind::AllRegistered(true)) => Target::AllRegistered,
            Some(pb::target::Kind::AllRegistered(false)) => {
                return Err(Error::invalid(
                    "target.all_registered",
                    "must be true when given",
                ));
            }
            Some(pb::target::Kind::ServiceId(service_id)) => {
                Target::Service(required("target.service_id", &service_id, 64)?.to_owned())
            }
            Some(pb::target::Kind::Segment(segment)) => {
                Target::Segment(segment_from_wire(segment)?)
            }
        };
        Ok(Self {
            idempotency_key,
            target,
            content: Content {
                text: content.text,
                media_url: content.media_url,
            },
            channel,
            all_carriers: request.all_carriers,
        })
    }
}

fn segment_from_wire(segment: pb::Segment) -> Result<Segment> {
    let parsed = Segment {
        gender: gender("target.segment.gender", segment.gender)?,
        age: age_range("target.segment.age", segment.age_min, segment.age_max)?,
        regions: segment
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| region(&format!("target.segment.regions[{i}]"), r))
            .collect::<Result<_>>()?,
        occupations: segment
            .occupations
            .iter()
            .enumerate()
            .map(|(i, o)| occupation(&format!("target.segment.occupations[{i}]"), o))
            .collect::<Result<_>>()?,
        service_id: optional("target.segment.service_id", &segment.service_id, 64)?,
    };
    if !parsed.has_criteria() {
        return Err(Error::invalid(
            "target.segment",
            "must give at least one of gender, age, regions, occupations",
        ));
    }
    if parsed.regions.len() > 64 || parsed.occupations.len() > 64 {
        return Err(Error::invalid(
            "target.segment",
            "at most 64 regions and 64 occupations",
        ));
    }
    Ok(parsed)
}

fn state_to_wire(state: MessageState) -> pb::MessageState {
    match state {
        MessageState::Accepted => pb::MessageState::Accepted,
        MessageState::Expanded => pb::MessageState::Expanded,
        MessageState::HandedOver => pb::MessageState::HandedOver,
    }
}

#[tonic::async_trait]
impl pb::enterprise_api_server::EnterpriseApi for EnterpriseService {
    #[tracing::instrument(skip_all, fields(enterprise_id, message_id))]
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        tracing::Span::current().record("enterprise_id", enterprise_id.as_str());
        let message = NewMessage::try_from(request.into_inner())?;
        let now = relay.clock.now_ms();
        let stored = relay
            .store
            .accept_message(
                &enterprise_id,
                &credentials::new_id("msg"),
                &message,
                now,
                now + relay.message_ttl_ms,
            )
            .await?;
        tracing::Span::current().record("message_id", stored.row.message_id.as_str());
        if stored.created {
            tracing::info!(target_kind = message.target.kind(), matched = ?stored.row.matched, "message accepted");
            match stored.row.state {
                MessageState::Accepted => relay.expand.notify_one(),
                _ => relay.dispatch.new_work(),
            }
        }
        Ok(Response::new(pb::SendMessageResponse {
            message_id: stored.row.message_id,
            state: state_to_wire(stored.row.state) as i32,
            matched: stored.row.matched,
            accepted_at: Some(to_timestamp(stored.row.accepted_at)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::MessageStatus>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let message_id = required("message_id", &request.get_ref().message_id, 64)?;
        let row = relay
            .store
            .message(&enterprise_id, message_id)
            .await?
            .ok_or_else(|| Error::not_found("message_id", "no such message"))?;
        let counts = relay.store.message_counts(message_id).await?;
        let matched = row.matched.unwrap_or(0);
        let state = if row.state == MessageState::Expanded && counts.handed_over >= matched {
            MessageState::HandedOver
        } else {
            row.state
        };
        Ok(Response::new(pb::MessageStatus {
            message_id: row.message_id,
            state: state_to_wire(state) as i32,
            matched,
            handed_over: counts.handed_over,
            delivered: counts.delivered,
            opened: counts.opened,
            failed: counts.failed,
            accepted_at: Some(to_timestamp(row.accepted_at)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_registrations(
        &self,
        request: Request<pb::ListRegistrationsRequest>,
    ) -> Result<Response<pb::ListRegistrationsResponse>, Status> {
        let relay = &self.0;
        let enterprise_id = relay.enterprise(request.metadata()).await?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => 100,
            size if size > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE}"),
                )
                .into());
            }
            size => size,
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(
                request
                    .page_token
                    .split_once('/')
                    .ok_or_else(|| Error::invalid("page_token", "malformed"))?,
            )
        };
        let service_id = optional("service_id", &request.service_id, 64)?;
        let rows = relay
            .store
            .list_registrations(&enterprise_id, service_id.as_deref(), after, page_size)
            .await?;
        let next_page_token = if rows.len() == page_size as usize {
            rows.last()
                .map(|row| format!("{}/{}", row.user_ref, row.service_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRegistrationsResponse {
            registrations: rows
                .into_iter()
                .map(|row| pb::Registration {
                    user_ref: row.user_ref,
                    service_id: row.service_id,
                    registered_at: Some(to_timestamp(row.registered_at)),
                })
                .collect(),
            next_page_token,
        }))
    }
}
