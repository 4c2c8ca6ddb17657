//! `chukei.relay.v1.CarrierIngress`: carriers feed the registries. The
//! calling carrier is the token's carrier; a carrier can only speak for users
//! contracted with it.

use chukei_proto::relay::v1 as pb;
use tonic::{Request, Response, Status};

use super::{Relay, optional, profile_from_wire, required};
use crate::error::{Error, Result};
use crate::registry::{ConsentChange, Contract, NewRegistration, Unregistration};

/// The most rows one ingress call may carry.
const MAX_ROWS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct IngressService(pub Relay);

/// The consent text version a person was shown: required, short, printable.
fn text_version(field: &str, value: &str) -> Result<String> {
    let value = required(field, value, 64)?;
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value.to_owned())
}

fn bounded<T>(field: &str, rows: &[T]) -> Result<()> {
    Ok(chukei_proto::validate::bounded(field, rows, MAX_ROWS)?)
}

impl TryFrom<(usize, pb::Contract)> for Contract {
    type Error = Error;

    fn try_from((index, contract): (usize, pb::Contract)) -> Result<Self> {
        Ok(Self {
            user_id: required(
                &format!("contracts[{index}].user_id"),
                &contract.user_id,
                128,
            )?
            .to_owned(),
            primary: contract.primary,
            active: contract.active,
        })
    }
}

impl TryFrom<(usize, pb::UserRegistration)> for NewRegistration {
    type Error = Error;

    fn try_from((index, registration): (usize, pb::UserRegistration)) -> Result<Self> {
        let field = format!("registrations[{index}]");
        Ok(Self {
            user_id: required(&format!("{field}.user_id"), &registration.user_id, 128)?.to_owned(),
            enterprise_id: required(
                &format!("{field}.enterprise_id"),
                &registration.enterprise_id,
                64,
            )?
            .to_owned(),
            service_id: optional(&format!("{field}.service_id"), &registration.service_id, 64)?,
            profile: profile_from_wire(&format!("{field}.profile"), registration.profile)?,
            text_version: text_version(
                &format!("{field}.text_version"),
                &registration.text_version,
            )?,
        })
    }
}

#[tonic::async_trait]
impl pb::carrier_ingress_server::CarrierIngress for IngressService {
    #[tracing::instrument(skip_all, fields(carrier_id))]
    async fn upsert_contracts(
        &self,
        request: Request<pb::UpsertContractsRequest>,
    ) -> Result<Response<pb::UpsertContractsResponse>, Status> {
        let relay = &self.0;
        let carrier_id = relay.calling_carrier(&request).await?;
        tracing::Span::current().record("carrier_id", carrier_id.as_str());
        let request = request.into_inner();
        bounded("contracts", &request.contracts)?;
        let contracts = request
            .contracts
            .into_iter()
            .enumerate()
            .map(Contract::try_from)
            .collect::<Result<Vec<_>>>()?;
        let upserted = relay
            .store
            .upsert_contracts(&carrier_id, &contracts, relay.clock.now_ms())
            .await?;
        tracing::info!(upserted, "contracts upserted");
        Ok(Response::new(pb::UpsertContractsResponse {
            upserted: upserted as u32,
        }))
    }

    #[tracing::instrument(skip_all, fields(carrier_id))]
    async fn register_users(
        &self,
        request: Request<pb::RegisterUsersRequest>,
    ) -> Result<Response<pb::RegisterUsersResponse>, Status> {
        let relay = &self.0;
        let carrier_id = relay.calling_carrier(&request).await?;
        tracing::Span::current().record("carrier_id", carrier_id.as_str());
        let request = request.into_inner();
        bounded("registrations", &request.registrations)?;
        let registrations = request
            .registrations
            .into_iter()
            .enumerate()
            .map(NewRegistration::try_from)
            .collect::<Result<Vec<_>>>()?;
        let user_refs = relay
            .store
            .register_users(&carrier_id, &registrations, relay.clock.now_ms())
            .await?;
        tracing::info!(registered = user_refs.len(), "users registered");
        Ok(Response::new(pb::RegisterUsersResponse { user_refs }))
    }

    #[tracing::instrument(skip_all, fields(carrier_id))]
    async fn unregister_users(
        &self,
        request: Request<pb::UnregisterUsersRequest>,
    ) -> Result<Response<pb::UnregisterUsersResponse>, Status> {
        let relay = &self.0;
        let carrier_id = relay.calling_carrier(&request).await?;
        let request = request.into_inner();
        bounded("unregistrations", &request.unregistrations)?;
        let leaving = request
            .unregistrations
            .into_iter()
            .enumerate()
            .map(|(index, leave)| {
                let field = format!("unregistrations[{index}]");
                Ok(Unregistration {
                    user_id: required(&format!("{field}.user_id"), &leave.user_id, 128)?.to_owned(),
                    enterprise_id: optional(
                        &format!("{field}.enterprise_id"),
                        &leave.enterprise_id,
                        64,
                    )?,
                    service_id: optional(&format!("{field}.service_id"), &leave.service_id, 64)?,
                })
                .and_then(|leave: Unregistration| {
                    if leave.enterprise_id.is_none() && leave.service_id.is_some() {
                        return Err(Error::invalid(
                            format!("{field}.service_id"),
                            "a service is left within an enterprise: give enterprise_id too",
                        ));
                    }
                    Ok(leave)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let removed = relay
            .store
            .unregister_users(&carrier_id, &leaving, relay.clock.now_ms())
            .await?;
        // Erasure notices wait in the outbox for the carriers' streams.
        relay.dispatch.new_work();
        Ok(Response::new(pb::UnregisterUsersResponse {
            removed: removed as u32,
        }))
    }

    #[tracing::instrument(skip_all, fields(carrier_id))]
    async fn put_profile(
        &self,
        request: Request<pb::PutProfileRequest>,
    ) -> Result<Response<pb::PutProfileResponse>, Status> {
        let relay = &self.0;
        let carrier_id = relay.calling_carrier(&request).await?;
        let request = request.into_inner();
        let change = ConsentChange {
            user_id: required("user_id", &request.user_id, 128)?.to_owned(),
            enterprise_id: required("enterprise_id", &request.enterprise_id, 64)?.to_owned(),
            profile: profile_from_wire("profile", request.profile)?,
            text_version: text_version("text_version", &request.text_version)?,
        };
        relay
            .store
            .change_consent(&carrier_id, &change, relay.clock.now_ms())
            .await?;
        Ok(Response::new(pb::PutProfileResponse {}))
    }

    async fn describe_enterprises(
        &self,
        request: Request<pb::DescribeEnterprisesRequest>,
    ) -> Result<Response<pb::DescribeEnterprisesResponse>, Status> {
        let relay = &self.0;
        relay.calling_carrier(&request).await?;
        let request = request.into_inner();
        chukei_proto::validate::bounded("enterprise_ids", &request.enterprise_ids, 100)
            .map_err(crate::error::Error::from)?;
        for (index, id) in request.enterprise_ids.iter().enumerate() {
            required(&format!("enterprise_ids[{index}]"), id, 64)?;
        }
        let names = relay
            .store
            .enterprise_names(&request.enterprise_ids)
            .await?;
        Ok(Response::new(pb::DescribeEnterprisesResponse {
            enterprises: names
                .into_iter()
                .map(|(enterprise_id, name)| pb::EnterpriseName {
                    enterprise_id,
                    name,
                })
                .collect(),
        }))
    }
}
