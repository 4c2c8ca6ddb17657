//! Enterprises, their services, and carriers: who may call the relay and with
//! which credential (stored as SHA-256 hashes only).

use super::{Store, is_unique_violation, on_pool};
use crate::error::{Error, Result};

/// A carrier as the relay's dispatchers need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarrierEndpoint {
    pub carrier_id: String,
    pub endpoint: String,
}

impl Store {
    pub async fn create_enterprise(
        &self,
        id: &str,
        name: &str,
        api_key_hash: &str,
        now: i64,
    ) -> Result<()> {
        let inserted = on_pool!(self, pool => sqlx::query(
            "INSERT INTO enterprises (id, name, api_key_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(name)
        .bind(api_key_hash)
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match inserted {
            Ok(_) => Ok(()),
            Err(error) if is_unique_violation(&error) => Err(Error::already_exists(
                "enterprise_id",
                "an enterprise with this id exists",
            )),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn create_service(
        &self,
        id: &str,
        enterprise_id: &str,
        name: &str,
        now: i64,
    ) -> Result<()> {
        let inserted = on_pool!(self, pool => sqlx::query(
            "INSERT INTO services (id, enterprise_id, name, created_at)
             SELECT $1, id, $3, $4 FROM enterprises WHERE id = $2",
        )
        .bind(id)
        .bind(enterprise_id)
        .bind(name)
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match inserted {
            Ok(1) => Ok(()),
            Ok(_) => Err(Error::not_found("enterprise_id", "no such enterprise")),
            Err(error) if is_unique_violation(&error) => {
                let id_taken = on_pool!(self, pool => sqlx::query("SELECT 1 FROM services WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await
                    .map(|row| row.is_some()))?;
                Err(if id_taken {
                    Error::already_exists("service_id", "a service with this id exists")
                } else {
                    Error::already_exists(
                        "name",
                        "the enterprise already has a service of this name",
                    )
                })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Registers a carrier, or updates its endpoint and token.
    pub async fn upsert_carrier(
        &self,
        carrier_id: &str,
        endpoint: &str,
        token_hash: &str,
        now: i64,
    ) -> Result<()> {
        let upserted = on_pool!(self, pool => sqlx::query(
            "INSERT INTO carriers (id, endpoint, token_hash, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET endpoint = excluded.endpoint, token_hash = excluded.token_hash",
        )
        .bind(carrier_id)
        .bind(endpoint)
        .bind(token_hash)
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match upserted {
            Ok(_) => Ok(()),
            Err(error) if is_unique_violation(&error) => Err(Error::already_exists(
                "token",
                "another carrier uses this token",
            )),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn carriers(&self) -> Result<Vec<CarrierEndpoint>> {
        let rows: Vec<(String, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, endpoint FROM carriers ORDER BY id",
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(carrier_id, endpoint)| CarrierEndpoint {
                carrier_id,
                endpoint,
            })
            .collect())
    }

    pub async fn carrier_endpoint(&self, carrier_id: &str) -> Result<Option<String>> {
        let endpoint = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT endpoint FROM carriers WHERE id = $1",
        )
        .bind(carrier_id)
        .fetch_optional(pool)
        .await)?;
        Ok(endpoint)
    }

    /// The enterprise whose API key hashes to `api_key_hash`.
    pub async fn enterprise_by_key(&self, api_key_hash: &str) -> Result<Option<String>> {
        let id = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM enterprises WHERE api_key_hash = $1",
        )
        .bind(api_key_hash)
        .fetch_optional(pool)
        .await)?;
        Ok(id)
    }

    /// The carrier whose token hashes to `token_hash`.
    pub async fn carrier_by_token(&self, token_hash: &str) -> Result<Option<String>> {
        let id = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM carriers WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(pool)
        .await)?;
        Ok(id)
    }
}

impl Store {
    /// Takes or renews lease `name` for `owner` until `now + ttl_ms`: granted
    /// when nobody holds it, `owner` already does, or the holder's lease
    /// expired. Returns whether `owner` holds it now.
    pub async fn hold_lease(&self, name: &str, owner: &str, now: i64, ttl_ms: i64) -> Result<bool> {
        let held: Option<String> = on_pool!(self, pool => sqlx::query_scalar(
            "INSERT INTO leases (name, owner, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
             WHERE leases.owner = excluded.owner OR leases.expires_at < $4
             RETURNING owner",
        )
        .bind(name)
        .bind(owner)
        .bind(now + ttl_ms)
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        Ok(held.is_some())
    }

    /// Gives up every lease `owner` holds.
    pub async fn release_leases(&self, owner: &str) -> Result<()> {
        on_pool!(self, pool => sqlx::query("DELETE FROM leases WHERE owner = $1")
            .bind(owner)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
