//! The carrier's subscriber side: `CarrierAdmin` (the operator provisions
//! subscribers, whose contracts go to the relay) and `SubscriberApi`
//! (terminals attach, and register with enterprises under their consent
//! choices — only consented attributes are forwarded).

use chukei_proto::auth;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::relay::v1 as relay;
use chukei_proto::validate;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::consent;
use crate::error::{Error, Result};
use crate::model::Subscriber;
use crate::storage::consents::{ConsentAction, ConsentChange};

const MAX_ROWS: usize = 10_000;
/// Rows per call to the relay's ingress.
const INGRESS_CHUNK: usize = 5_000;

#[derive(Clone, Debug)]
pub struct SubscriberService(pub Shared);

#[derive(Clone, Debug)]
pub struct AdminService(pub Shared);

fn required<'a>(field: &str, value: &'a str, max_len: usize) -> Result<&'a str> {
    Ok(validate::required(field, value, max_len)?)
}

fn bounded<T>(field: &str, rows: &[T]) -> Result<()> {
    Ok(validate::bounded(field, rows, MAX_ROWS)?)
}

impl TryFrom<(usize, pb::Subscriber)> for Subscriber {
    type Error = Error;

    fn try_from((index, s): (usize, pb::Subscriber)) -> Result<Self> {
        let field = |name: &str| format!("subscribers[{index}].{name}");
        let birth_date = required(&field("birth_date"), &s.birth_date, 10)?;
        let valid_date = birth_date.len() == 10
            && birth_date.chars().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    c == '-'
                } else {
                    c.is_ascii_digit()
                }
            });
        if !valid_date {
            return Err(Error::invalid(field("birth_date"), "must be YYYY-MM-DD"));
        }
        if !(0..=3).contains(&s.gender) {
            return Err(Error::invalid(
                field("gender"),
                format!("unknown gender {}", s.gender),
            ));
        }
        Ok(Self {
            user_id: required(&field("user_id"), &s.user_id, 128)?.to_owned(),
            phone_number: phone_number(&field("phone_number"), &s.phone_number)?,
            name: required(&field("name"), &s.name, 200)?.to_owned(),
            gender: s.gender,
            birth_date: birth_date.to_owned(),
            region: required(&field("region"), &s.region, 128)?.to_lowercase(),
            occupation: required(&field("occupation"), &s.occupation, 64)?.to_lowercase(),
            primary: s.primary,
            email: optional_contact(&field("email"), &s.email, |e| {
                e.split_once('@')
                    .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
            })?,
            sns_handle: optional_contact(&field("sns_handle"), &s.sns_handle, |h| {
                !h.chars().any(char::is_whitespace)
            })?,
        })
    }
}

/// An optional contact detail: empty, or bounded and shaped as `valid` says.
/// An E.164 number: '+' then 8 to 15 ASCII digits. Full-width or other
/// non-ASCII digits, spaces and dashes are refused, not guessed at.
pub(crate) fn phone_number(field: &str, value: &str) -> Result<String> {
    let value = required(field, value, 64)?;
    let digits = value.strip_prefix('+').unwrap_or("");
    if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(
            field,
            "must be E.164: '+' then 8 to 15 ASCII digits",
        ));
    }
    Ok(value.to_owned())
}

fn optional_contact(field: &str, value: &str, valid: impl Fn(&str) -> bool) -> Result<String> {
    if value.is_empty() {
        return Ok(String::new());
    }
    if value.len() > 254 || !valid(value) {
        return Err(Error::invalid(field, "is malformed"));
    }
    Ok(value.to_owned())
}

#[tonic::async_trait]
impl pb::carrier_admin_server::CarrierAdmin for AdminService {
    #[tracing::instrument(skip_all)]
    async fn provision_subscribers(
        &self,
        request: Request<pb::ProvisionSubscribersRequest>,
    ) -> Result<Response<pb::ProvisionSubscribersResponse>, Status> {
        let shared = &self.0;
        shared.admin(request.metadata())?;
        let request = request.into_inner();
        bounded("subscribers", &request.subscribers)?;
        let subscribers = request
            .subscribers
            .into_iter()
            .enumerate()
            .map(Subscriber::try_from)
            .collect::<Result<Vec<_>>>()?;
        shared
            .store
            .upsert_subscribers(&subscribers, shared.clock.now_ms())
            .await
            .map_err(Error::from)?;
        // Durable here first; a failed push to the relay is retried by calling again.
        for chunk in subscribers.chunks(INGRESS_CHUNK) {
            let contracts = chunk
                .iter()
                .map(|s| relay::Contract {
                    user_id: s.user_id.clone(),
                    primary: s.primary,
                    active: true,
                })
                .collect();
            shared
                .relay
                .clone()
                .upsert_contracts(relay::UpsertContractsRequest { contracts })
                .await
                .map_err(Error::Relay)?;
        }
        tracing::info!(provisioned = subscribers.len(), "subscribers provisioned");
        Ok(Response::new(pb::ProvisionSubscribersResponse {
            provisioned: subscribers.len() as u32,
        }))
    }

    async fn get_counts(
        &self,
        request: Request<pb::GetCountsRequest>,
    ) -> Result<Response<pb::GetCountsResponse>, Status> {
        let shared = &self.0;
        shared.admin(request.metadata())?;
        let message_id = &request.get_ref().message_id;
        let (counts, held) = shared
            .store
            .counts((!message_id.is_empty()).then_some(message_id.as_str()))
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::GetCountsResponse {
            counts: counts
                .into_iter()
                .map(crate::relay_link::count_to_wire)
                .collect(),
            held,
        }))
    }
}

#[tonic::async_trait]
impl pb::subscriber_api_server::SubscriberApi for SubscriberService {
    #[tracing::instrument(skip_all)]
    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let shared = &self.0;
        let request = request.into_inner();
        let endpoint = required("endpoint", &request.endpoint, 256)?;
        if !endpoint.starts_with("http") || endpoint.parse::<tonic::transport::Uri>().is_err() {
            return Err(Error::invalid("endpoint", "must be an http(s) URL").into());
        }
        bounded("user_ids", &request.user_ids)?;
        let ids: Vec<&str> = request.user_ids.iter().map(String::as_str).collect();
        let known = shared.store.subscribers(&ids).await.map_err(Error::from)?;
        if let Some(index) = ids.iter().position(|id| !known.contains_key(*id)) {
            return Err(Error::not_found(
                format!("user_ids[{index}]"),
                "not a subscriber of this carrier",
            )
            .into());
        }
        shared
            .store
            .attach(endpoint, &request.user_ids, shared.clock.now_ms())
            .await
            .map_err(Error::from)?;
        shared.terminals.ensure(endpoint).await;
        tracing::info!(attached = ids.len(), "terminals attached");
        Ok(Response::new(pb::AttachResponse {
            attached: ids.len() as u32,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let shared = &self.0;
        let request = request.into_inner();
        bounded("registrations", &request.registrations)?;
        let ids: Vec<&str> = request
            .registrations
            .iter()
            .map(|r| r.user_id.as_str())
            .collect();
        let known = shared.store.subscribers(&ids).await.map_err(Error::from)?;
        let now = shared.clock.now_ms();
        let mut forwarded = Vec::with_capacity(request.registrations.len());
        for (index, registration) in request.registrations.iter().enumerate() {
            let Some(subscriber) = known.get(&registration.user_id) else {
                return Err(Error::not_found(
                    format!("registrations[{index}].user_id"),
                    "not a subscriber of this carrier",
                )
                .into());
            };
            required(
                &format!("registrations[{index}].enterprise_id"),
                &registration.enterprise_id,
                64,
            )?;
            current_text(
                &format!("registrations[{index}].text_version"),
                &registration.text_version,
            )?;
            let choices = registration.consent.unwrap_or_default();
            forwarded.push(relay::UserRegistration {
                user_id: registration.user_id.clone(),
                enterprise_id: registration.enterprise_id.clone(),
                service_id: registration.service_id.clone(),
                profile: Some(consent::consented_profile(subscriber, &choices, now)),
                text_version: registration.text_version.clone(),
            });
        }
        let mut user_refs = Vec::with_capacity(forwarded.len());
        for chunk in forwarded.chunks(INGRESS_CHUNK) {
            let response = shared
                .relay
                .clone()
                .register_users(relay::RegisterUsersRequest {
                    registrations: chunk.to_vec(),
                })
                .await
                .map_err(Error::Relay)?;
            user_refs.extend(response.into_inner().user_refs);
        }
        let changes: Vec<ConsentChange> = request
            .registrations
            .iter()
            .map(|r| ConsentChange {
                user_id: &r.user_id,
                enterprise_id: &r.enterprise_id,
                service_id: &r.service_id,
                action: ConsentAction::Registered,
                choices: r.consent.unwrap_or_default(),
                text_version: &r.text_version,
            })
            .collect();
        shared
            .store
            .record_consent_changes(&changes, now)
            .await
            .map_err(Error::from)?;
        tracing::info!(registered = user_refs.len(), "registrations forwarded");
        Ok(Response::new(pb::RegisterResponse { user_refs }))
    }

    async fn preview_consent(
        &self,
        request: Request<pb::PreviewConsentRequest>,
    ) -> Result<Response<pb::ConsentPreview>, Status> {
        let shared = &self.0;
        let request = request.into_inner();
        let (enterprise_id, profile) = shared
            .profile_for(
                &request.user_id,
                &request.enterprise_id,
                &request.consent.unwrap_or_default(),
            )
            .await?;
        Ok(Response::new(pb::ConsentPreview {
            text: consent::consent_text(enterprise_id, &profile),
            text_version: consent::TEXT_VERSION.to_owned(),
            profile: Some(profile),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn change_consent(
        &self,
        request: Request<pb::ChangeConsentRequest>,
    ) -> Result<Response<pb::ChangeConsentResponse>, Status> {
        let shared = &self.0;
        let request = request.into_inner();
        current_text("text_version", &request.text_version)?;
        let (enterprise_id, profile) = shared
            .profile_for(
                &request.user_id,
                &request.enterprise_id,
                &request.consent.unwrap_or_default(),
            )
            .await?;
        shared
            .relay
            .clone()
            .put_profile(relay::PutProfileRequest {
                user_id: request.user_id.clone(),
                enterprise_id: enterprise_id.to_owned(),
                profile: Some(profile.clone()),
                text_version: request.text_version.clone(),
            })
            .await
            .map_err(Error::Relay)?;
        let choices = request.consent.unwrap_or_default();
        let shares_nothing = profile == chukei_proto::common::v1::ConsentedProfile::default();
        shared
            .store
            .record_consent_changes(
                &[ConsentChange {
                    user_id: &request.user_id,
                    enterprise_id,
                    service_id: "",
                    action: if shares_nothing {
                        ConsentAction::Withdrew
                    } else {
                        ConsentAction::Changed
                    },
                    choices,
                    text_version: &request.text_version,
                }],
                shared.clock.now_ms(),
            )
            .await
            .map_err(Error::from)?;
        tracing::info!("consent change forwarded");
        Ok(Response::new(pb::ChangeConsentResponse {
            profile: Some(profile),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn unregister(
        &self,
        request: Request<pb::UnregisterRequest>,
    ) -> Result<Response<pb::UnregisterResponse>, Status> {
        let shared = &self.0;
        let request = request.into_inner();
        let user_id = required("user_id", &request.user_id, 128)?;
        validate::optional("enterprise_id", &request.enterprise_id, 64).map_err(Error::from)?;
        validate::optional("service_id", &request.service_id, 64).map_err(Error::from)?;
        if request.enterprise_id.is_empty() && !request.service_id.is_empty() {
            return Err(Error::invalid(
                "service_id",
                "a service is left within an enterprise: give enterprise_id too",
            )
            .into());
        }
        if shared
            .store
            .subscribers(&[user_id])
            .await
            .map_err(Error::from)?
            .is_empty()
        {
            return Err(Error::not_found("user_id", "not a subscriber of this carrier").into());
        }
        let removed = shared
            .relay
            .clone()
            .unregister_users(relay::UnregisterUsersRequest {
                unregistrations: vec![relay::UserUnregistration {
                    user_id: user_id.to_owned(),
                    enterprise_id: request.enterprise_id.clone(),
                    service_id: request.service_id.clone(),
                }],
            })
            .await
            .map_err(Error::Relay)?
            .into_inner()
            .removed;
        shared
            .store
            .record_consent_changes(
                &[ConsentChange {
                    user_id,
                    enterprise_id: &request.enterprise_id,
                    service_id: &request.service_id,
                    action: if request.enterprise_id.is_empty() {
                        ConsentAction::LeftHub
                    } else {
                        ConsentAction::Left
                    },
                    choices: pb::ConsentChoices::default(),
                    text_version: "",
                }],
                shared.clock.now_ms(),
            )
            .await
            .map_err(Error::from)?;
        tracing::info!(removed, "unregistration forwarded");
        Ok(Response::new(pb::UnregisterResponse { removed }))
    }
}

/// A consent choice must have been made on the text in force.
fn current_text(field: &str, version: &str) -> Result<()> {
    required(field, version, 64)?;
    if version != consent::TEXT_VERSION {
        return Err(Error::refused(
            field,
            format!(
                "the consent text shown was not the one in force ({}): preview it again",
                consent::TEXT_VERSION
            ),
        ));
    }
    Ok(())
}

impl Shared {
    /// The profile `choices` would share of subscriber `user_id` with
    /// `enterprise_id` (both checked), as of now.
    async fn profile_for<'a>(
        &self,
        user_id: &str,
        enterprise_id: &'a str,
        choices: &pb::ConsentChoices,
    ) -> Result<(&'a str, chukei_proto::common::v1::ConsentedProfile)> {
        let user_id = required("user_id", user_id, 128)?;
        let enterprise_id = required("enterprise_id", enterprise_id, 64)?;
        let known = self.store.subscribers(&[user_id]).await?;
        let subscriber = known
            .get(user_id)
            .ok_or_else(|| Error::not_found("user_id", "not a subscriber of this carrier"))?;
        Ok((
            enterprise_id,
            consent::consented_profile(subscriber, choices, self.clock.now_ms()),
        ))
    }

    fn admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<()> {
        auth::require_secret(metadata, &self.admin_token).map_err(Error::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_e164_in_ascii_digits() {
        assert_eq!(phone_number("p", "+819012345678").unwrap(), "+819012345678");
        for bad in [
            "+８１９０１２３４５６７８",
            "09012345678",
            "+81 90 1234 5678",
            "+81-90-1234-5678",
            "+1234567",
            "+1234567890123456",
            "+٠١٢٣٤٥٦٧٨٩",
        ] {
            let error = phone_number("subscribers[0].phone_number", bad).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("subscribers[0].phone_number: must be E.164"),
                "{bad}: {error}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn no_number_with_a_non_ascii_character_is_accepted(text in "\\PC{0,20}") {
            let accepted = phone_number("p", &text).is_ok();
            if accepted {
                proptest::prop_assert!(text.trim().is_ascii());
            }
        }
    }
}
