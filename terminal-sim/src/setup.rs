//! Fleet set-up against real carriers, all in batches: provision the
//! subscriber records (the carriers' back office, `CarrierAdmin`), attach the
//! fleet's terminal endpoint (`SubscriberApi.Attach`), and register users with
//! enterprises under the consent choices the model draws (`SubscriberApi.Register`,
//! through each user's primary carrier).

use std::collections::HashMap;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::carrier::v1::carrier_admin_client::CarrierAdminClient;
use chukei_proto::carrier::v1::subscriber_api_client::SubscriberApiClient;
use tonic::transport::Channel;

use crate::fleet::Fleet;

const CHUNK: usize = 5_000;

/// An enterprise the fleet registers with, and the services users may join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnterpriseChoice {
    pub enterprise_id: String,
    pub service_ids: Vec<String>,
}

impl EnterpriseChoice {
    /// Registration with the enterprise itself, no service.
    pub fn enterprise(enterprise_id: &str) -> Self {
        Self {
            enterprise_id: enterprise_id.to_owned(),
            service_ids: Vec::new(),
        }
    }
}

impl std::str::FromStr for EnterpriseChoice {
    type Err = String;

    /// `ENTERPRISE_ID` or `ENTERPRISE_ID:SERVICE_ID,SERVICE_ID`.
    fn from_str(value: &str) -> Result<Self, String> {
        let (enterprise, services) = value.split_once(':').unwrap_or((value, ""));
        if enterprise.is_empty() {
            return Err("expected ENTERPRISE_ID[:SERVICE_ID,…]".into());
        }
        Ok(Self {
            enterprise_id: enterprise.to_owned(),
            service_ids: services
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// Connects to every carrier's gRPC endpoint (`id → url`).
pub async fn connect(
    carriers: &HashMap<String, String>,
    tls: &chukei_proto::tls::TlsArgs,
) -> anyhow::Result<HashMap<String, Channel>> {
    let mut channels = HashMap::new();
    for (id, url) in carriers {
        let channel = tls.endpoint(url)?.connect().await?;
        channels.insert(id.clone(), channel);
    }
    Ok(channels)
}

/// Provisions every user's subscriber record at each of their carriers.
pub async fn provision(
    fleet: &Fleet,
    carriers: &HashMap<String, Channel>,
    admin_token: &str,
) -> anyhow::Result<()> {
    for (carrier_id, channel) in carriers {
        let subscribers: Vec<pb::Subscriber> = fleet
            .users
            .iter()
            .filter(|u| u.carriers.contains(carrier_id))
            .map(|u| u.subscriber(carrier_id))
            .collect();
        let mut client = CarrierAdminClient::with_interceptor(
            channel.clone(),
            BearerInterceptor::new(admin_token)?,
        )
        .max_encoding_message_size(64 * 1024 * 1024);
        for chunk in subscribers.chunks(CHUNK) {
            client
                .provision_subscribers(pb::ProvisionSubscribersRequest {
                    subscribers: chunk.to_vec(),
                })
                .await?;
        }
    }
    Ok(())
}

/// Attaches every user to each of their carriers at `endpoint`.
pub async fn attach(
    fleet: &Fleet,
    carriers: &HashMap<String, Channel>,
    endpoint: &str,
) -> anyhow::Result<()> {
    for (carrier_id, channel) in carriers {
        let users: Vec<String> = fleet
            .users
            .iter()
            .filter(|u| u.carriers.contains(carrier_id))
            .map(|u| u.user_id.clone())
            .collect();
        let mut client =
            SubscriberApiClient::new(channel.clone()).max_encoding_message_size(64 * 1024 * 1024);
        for chunk in users.chunks(CHUNK) {
            client
                .attach(pb::AttachRequest {
                    endpoint: endpoint.to_owned(),
                    user_ids: chunk.to_vec(),
                })
                .await?;
        }
    }
    Ok(())
}

/// Registers users with the enterprises (and services) their model chooses,
/// through their primary carrier. Returns how many registrations were made.
pub async fn register(
    fleet: &Fleet,
    carriers: &HashMap<String, Channel>,
    enterprises: &[EnterpriseChoice],
) -> anyhow::Result<usize> {
    let mut by_carrier: HashMap<&str, Vec<pb::SubscriberRegistration>> = HashMap::new();
    for user in &fleet.users {
        let Some(primary) = user.carriers.first() else {
            continue;
        };
        for enterprise in enterprises {
            let Some(consent) = user.consent_for(fleet.seed, &enterprise.enterprise_id) else {
                continue;
            };
            let registrations = by_carrier.entry(primary.as_str()).or_default();
            let services: Vec<&String> = enterprise
                .service_ids
                .iter()
                .filter(|s| user.joins_service(fleet.seed, s))
                .collect();
            if services.is_empty() {
                registrations.push(pb::SubscriberRegistration {
                    user_id: user.user_id.clone(),
                    enterprise_id: enterprise.enterprise_id.clone(),
                    service_id: String::new(),
                    consent: Some(consent),
                    text_version: String::new(),
                });
            }
            for service in services {
                registrations.push(pb::SubscriberRegistration {
                    user_id: user.user_id.clone(),
                    enterprise_id: enterprise.enterprise_id.clone(),
                    service_id: service.clone(),
                    consent: Some(consent),
                    text_version: String::new(),
                });
            }
        }
    }
    let mut total = 0;
    for (carrier_id, registrations) in by_carrier {
        let Some(channel) = carriers.get(carrier_id) else {
            anyhow::bail!("--carrier: no URL for carrier {carrier_id} used by the fleet");
        };
        let mut client =
            SubscriberApiClient::new(channel.clone()).max_encoding_message_size(64 * 1024 * 1024);
        let mut registrations = registrations;
        // Every simulated person is shown the carrier's consent text in force.
        let text_version = match registrations.first() {
            Some(first) => {
                client
                    .preview_consent(pb::PreviewConsentRequest {
                        user_id: first.user_id.clone(),
                        enterprise_id: first.enterprise_id.clone(),
                        consent: first.consent,
                    })
                    .await?
                    .into_inner()
                    .text_version
            }
            None => continue,
        };
        for registration in &mut registrations {
            registration.text_version.clone_from(&text_version);
        }
        for chunk in registrations.chunks(CHUNK) {
            total += client
                .register(pb::RegisterRequest {
                    registrations: chunk.to_vec(),
                })
                .await?
                .into_inner()
                .user_refs
                .len();
        }
    }
    Ok(total)
}

/// Withdraws the consent of the registered users the model chooses
/// (`share` of them, seeded), through their primary carrier. Returns how
/// many withdrew.
pub async fn withdraw(
    fleet: &Fleet,
    carriers: &HashMap<String, Channel>,
    enterprises: &[EnterpriseChoice],
    share: f64,
) -> anyhow::Result<usize> {
    let mut withdrawn = 0;
    let mut text_versions: HashMap<&str, String> = HashMap::new();
    for user in &fleet.users {
        let Some(primary) = user.carriers.first() else {
            continue;
        };
        for enterprise in enterprises {
            let enterprise_id = &enterprise.enterprise_id;
            if user.consent_for(fleet.seed, enterprise_id).is_none()
                || !user.withdraws(fleet.seed, enterprise_id, share)
            {
                continue;
            }
            let Some(channel) = carriers.get(primary) else {
                anyhow::bail!("--carrier: no URL for carrier {primary} used by the fleet");
            };
            let mut client = SubscriberApiClient::new(channel.clone());
            let nothing = pb::ConsentChoices::default();
            if !text_versions.contains_key(primary.as_str()) {
                let preview = client
                    .preview_consent(pb::PreviewConsentRequest {
                        user_id: user.user_id.clone(),
                        enterprise_id: enterprise_id.clone(),
                        consent: Some(nothing),
                    })
                    .await?
                    .into_inner();
                text_versions.insert(primary.as_str(), preview.text_version);
            }
            client
                .change_consent(pb::ChangeConsentRequest {
                    user_id: user.user_id.clone(),
                    enterprise_id: enterprise_id.clone(),
                    consent: Some(nothing),
                    text_version: text_versions[primary.as_str()].clone(),
                })
                .await?;
            withdrawn += 1;
        }
    }
    Ok(withdrawn)
}
