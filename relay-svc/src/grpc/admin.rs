//! `chukei.relay.v1.Admin`: the hub operator's API (admin token).

use chukei_proto::relay::v1 as pb;
use tonic::{Request, Response, Status};

use chukei_proto::clock::to_timestamp;

use super::{
    Relay, explanation_to_wire, market, optional, required, slug, stats_query, stats_to_wire,
};
use crate::credentials;
use crate::error::Error;
use crate::stats::{self, Viewer};

#[derive(Clone, Debug)]
pub struct AdminService(pub Relay);

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(skip_all, fields(enterprise_id))]
    async fn create_enterprise(
        &self,
        request: Request<pb::CreateEnterpriseRequest>,
    ) -> Result<Response<pb::CreateEnterpriseResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "create_enterprise").await?;
        let request = request.into_inner();
        let name = required("name", &request.name, 200)?;
        let enterprise_id = match request.enterprise_id.as_str() {
            "" => credentials::new_id("ent"),
            chosen => slug("enterprise_id", chosen)?.to_owned(),
        };
        let api_key = credentials::new_api_key().map_err(|e| Error::Internal(e.into()))?;
        relay
            .store
            .create_enterprise(
                &enterprise_id,
                name,
                &credentials::hash_secret(&api_key),
                relay.clock.now_ms(),
            )
            .await?;
        tracing::Span::current().record("enterprise_id", enterprise_id.as_str());
        tracing::info!("enterprise created");
        Ok(Response::new(pb::CreateEnterpriseResponse {
            enterprise_id,
            api_key,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_service(
        &self,
        request: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::CreateServiceResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "create_service").await?;
        let request = request.into_inner();
        let enterprise_id = required("enterprise_id", &request.enterprise_id, 64)?;
        let name = required("name", &request.name, 200)?;
        let service_id = match request.service_id.as_str() {
            "" => credentials::new_id("svc"),
            chosen => slug("service_id", chosen)?.to_owned(),
        };
        relay
            .store
            .create_service(&service_id, enterprise_id, name, relay.clock.now_ms())
            .await?;
        Ok(Response::new(pb::CreateServiceResponse { service_id }))
    }

    #[tracing::instrument(skip_all, fields(carrier_id))]
    async fn register_carrier(
        &self,
        request: Request<pb::RegisterCarrierRequest>,
    ) -> Result<Response<pb::RegisterCarrierResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "register_carrier").await?;
        let request = request.into_inner();
        let carrier_id = slug("carrier_id", &request.carrier_id)?;
        let endpoint = required("endpoint", &request.endpoint, 256)?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            || endpoint.parse::<tonic::transport::Uri>().is_err()
        {
            return Err(Error::invalid("endpoint", "must be an http(s) URL").into());
        }
        if request.token.len() < 16 {
            return Err(Error::invalid("token", "must be at least 16 characters").into());
        }
        relay
            .store
            .upsert_carrier(
                carrier_id,
                endpoint,
                &credentials::hash_secret(&request.token),
                relay.clock.now_ms(),
            )
            .await?;
        tracing::Span::current().record("carrier_id", carrier_id);
        tracing::info!("carrier registered");
        relay.dispatch.carrier_changed(carrier_id).await;
        Ok(Response::new(pb::RegisterCarrierResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_carrier_stats(
        &self,
        request: Request<pb::GetCarrierStatsRequest>,
    ) -> Result<Response<pb::GetCarrierStatsResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "get_carrier_stats").await?;
        let message_id = &request.get_ref().message_id;
        let message_id = (!message_id.is_empty()).then_some(message_id.as_str());
        let carriers = relay.store.carrier_counts(message_id).await?;
        Ok(Response::new(pb::GetCarrierStatsResponse {
            carriers: carriers
                .into_iter()
                .map(|c| pb::CarrierStats {
                    connected: relay.dispatch.is_connected(&c.carrier_id),
                    carrier_id: c.carrier_id,
                    pending: c.pending,
                    handed_over: c.handed_over,
                    delivered: c.delivered,
                    opened: c.opened,
                    reported_sent: c.reported_sent,
                    reported_opened: c.reported_opened,
                    reported_sms_segments: c.reported_sms_segments,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn explain_delivery(
        &self,
        request: Request<pb::AdminExplainDeliveryRequest>,
    ) -> Result<Response<pb::DeliveryExplanation>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "explain_delivery").await?;
        let request = request.into_inner();
        let message_id = required("message_id", &request.message_id, 64)?;
        let user_id = required("user_id", &request.user_id, 128)?;
        let explanation = relay.store.explain(message_id, user_id).await?;
        Ok(Response::new(explanation_to_wire(
            message_id,
            explanation,
            true,
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn get_stats(
        &self,
        request: Request<pb::AdminGetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "get_stats").await?;
        let request = request.into_inner();
        let viewer = Viewer::Operator(optional("enterprise_id", &request.enterprise_id, 64)?);
        let query = stats_query(
            &request.query.unwrap_or_default(),
            &viewer,
            relay.clock.now_ms(),
            "query.",
        )?;
        let rows = relay.stats(&viewer, &query).await?;
        Ok(Response::new(stats_to_wire(&query, rows, relay.thresholds)))
    }

    #[tracing::instrument(skip_all)]
    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "reconcile").await?;
        let request = request.into_inner();
        let message_id = optional("message_id", &request.message_id, 64)?;
        let rows = relay
            .store
            .reconcile(message_id.as_deref(), request.all)
            .await?;
        Ok(Response::new(pb::ReconcileResponse {
            rows: rows
                .into_iter()
                .map(|row| pb::Reconciliation {
                    finding: stats::finding(&row),
                    carrier_id: row.carrier_id,
                    message_id: row.message_id,
                    counted_delivered: row.counted_delivered,
                    counted_opened: row.counted_opened,
                    reported_sent: row.reported_sent,
                    reported_opened: row.reported_opened,
                    reported_at: (row.reported_at > 0).then(|| to_timestamp(row.reported_at)),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn set_rate_card(
        &self,
        request: Request<pb::SetRateCardRequest>,
    ) -> Result<Response<pb::PriceTable>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "set_rate_card").await?;
        let card = market::rate_card_from_wire(request.get_ref())?;
        let zone = match request.get_ref().zone.as_str() {
            "" => relay.market.zone_name.to_string(),
            zone => zone.to_owned(),
        };
        let table = relay
            .store
            .set_rate_card(&card, &zone, relay.clock.now_ms())
            .await?;
        tracing::info!(
            version = table.id,
            dynamic = card.dynamic.is_some(),
            "rate card set"
        );
        Ok(Response::new(market::price_table_to_wire(Some(table))))
    }

    #[tracing::instrument(skip_all)]
    async fn get_prices(
        &self,
        request: Request<pb::GetPricesRequest>,
    ) -> Result<Response<pb::PriceTable>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "get_prices").await?;
        Ok(Response::new(relay.prices().await?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_revenue(
        &self,
        request: Request<pb::GetRevenueRequest>,
    ) -> Result<Response<pb::Revenue>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "get_revenue").await?;
        Ok(Response::new(relay.revenue(request.get_ref()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_statement(
        &self,
        request: Request<pb::AdminGetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "get_statement").await?;
        let request = request.into_inner();
        let enterprise_id = required("enterprise_id", &request.enterprise_id, 64)?;
        Ok(Response::new(
            relay.statement(enterprise_id, &request.month).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(slot_id))]
    async fn open_auction_slot(
        &self,
        request: Request<pb::OpenAuctionSlotRequest>,
    ) -> Result<Response<pb::AuctionSlot>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "open_auction_slot").await?;
        let now = relay.clock.now_ms();
        let slot = market::slot_from_wire(request.get_ref(), now)?;
        let slot_id = credentials::new_id("slot");
        tracing::Span::current().record("slot_id", slot_id.as_str());
        let row = relay.store.open_slot(&slot_id, &slot, now).await?;
        tracing::info!(
            capacity = slot.capacity,
            rule = slot.rule.as_str(),
            "auction slot opened"
        );
        Ok(Response::new(market::slot_to_wire(row, true)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_auction_slots(
        &self,
        request: Request<pb::ListAuctionSlotsRequest>,
    ) -> Result<Response<pb::ListAuctionSlotsResponse>, Status> {
        let relay = &self.0;
        relay
            .admin(request.metadata(), "list_auction_slots")
            .await?;
        Ok(Response::new(relay.list_slots(true).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn issue_api_key(
        &self,
        request: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "issue_api_key").await?;
        let request = request.into_inner();
        let enterprise_id = required("enterprise_id", &request.enterprise_id, 64)?;
        let now = relay.clock.now_ms();
        let others_expire_at = match &request.overlap {
            None => None,
            Some(overlap) => {
                Some(now + super::send_request::duration_ms("overlap", Some(overlap))?)
            }
        };
        let api_key = credentials::new_api_key().map_err(|e| Error::Internal(e.into()))?;
        let key_id = relay
            .store
            .add_api_key(
                enterprise_id,
                &credentials::hash_secret(&api_key),
                others_expire_at,
                now,
            )
            .await?;
        Ok(Response::new(pb::IssueApiKeyResponse { api_key, key_id }))
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "revoke_api_key").await?;
        let request = request.get_ref();
        let enterprise_id = required("enterprise_id", &request.enterprise_id, 64)?;
        let key_id = required("key_id", &request.key_id, 64)?;
        if !relay
            .store
            .revoke_api_key(enterprise_id, key_id, relay.clock.now_ms())
            .await?
        {
            return Err(Error::not_found("key_id", "no such live key of this enterprise").into());
        }
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "list_api_keys").await?;
        let enterprise_id = required("enterprise_id", &request.get_ref().enterprise_id, 64)?;
        let keys = relay.store.api_keys(enterprise_id).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys
                .into_iter()
                .map(|key| pb::ApiKeyInfo {
                    key_id: key.key_id,
                    created_at: Some(to_timestamp(key.created_at)),
                    expires_at: key.expires_at.map(to_timestamp),
                    revoked_at: key.revoked_at.map(to_timestamp),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn verify_audit_log(
        &self,
        request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "verify_audit_log").await?;
        let verification = relay.store.verify_audit().await?;
        let (first_broken_seq, reason) = verification
            .first_broken
            .map_or((0, ""), |(seq, reason)| (seq.max(0) as u64, reason));
        Ok(Response::new(pb::VerifyAuditLogResponse {
            entries: verification.entries,
            intact: verification.first_broken.is_none(),
            first_broken_seq,
            reason: reason.to_owned(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_audit_log(
        &self,
        request: Request<pb::ListAuditLogRequest>,
    ) -> Result<Response<pb::ListAuditLogResponse>, Status> {
        let relay = &self.0;
        relay.admin(request.metadata(), "list_audit_log").await?;
        let limit = match request.get_ref().limit {
            0 => 100,
            n => n.min(10_000),
        };
        let entries = relay.store.audit_entries(limit).await?;
        Ok(Response::new(pb::ListAuditLogResponse {
            entries: entries
                .into_iter()
                .map(|(seq, at, entry)| pb::AuditLogEntry {
                    seq: seq.max(0) as u64,
                    at: Some(to_timestamp(at)),
                    actor: entry.actor,
                    action: entry.action,
                    subject: entry.subject,
                    detail: entry.detail,
                })
                .collect(),
        }))
    }
}
