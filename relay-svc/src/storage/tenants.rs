//! Enterprises, their services, and carriers: who may call the relay and with
//! which credential (stored as SHA-256 hashes only).

use super::{Store, WritePool, is_unique_violation, on_pool, on_write};
use crate::error::{Error, Result};

/// One of an enterprise's API keys, without the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub key_id: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A key's public id: a prefix of its hash, enough to name it, useless to
/// present.
fn key_id(api_key_hash: &str) -> String {
    format!("key_{}", &api_key_hash[..12.min(api_key_hash.len())])
}

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
        let inserted: std::result::Result<(), sqlx::Error> = on_write!(self, pool => async {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "INSERT INTO enterprises (id, name, api_key_hash, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(name)
            .bind(api_key_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO api_keys (key_hash, key_id, enterprise_id, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(api_key_hash)
            .bind(key_id(api_key_hash))
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }.await);
        self.keys_changed();
        match inserted {
            Ok(()) => Ok(()),
            Err(error) if is_unique_violation(&error) => Err(Error::already_exists(
                "enterprise_id",
                "an enterprise with this id exists",
            )),
            Err(error) => Err(error.into()),
        }
    }

    /// Adds a key to `enterprise_id`. The keys it already has stay valid
    /// until `others_expire_at` (rotation with overlap); `None` leaves them.
    /// Returns the new key's id; an unknown enterprise is "not found".
    pub async fn add_api_key(
        &self,
        enterprise_id: &str,
        api_key_hash: &str,
        others_expire_at: Option<i64>,
        now: i64,
    ) -> Result<String> {
        let id = key_id(api_key_hash);
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let inserted = sqlx::query(
                "INSERT INTO api_keys (key_hash, key_id, enterprise_id, created_at)
                 SELECT $1, $2, id, $4 FROM enterprises WHERE id = $3",
            )
            .bind(api_key_hash)
            .bind(&id)
            .bind(enterprise_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(Error::not_found("enterprise_id", "no such enterprise"));
            }
            if let Some(at) = others_expire_at {
                sqlx::query(
                    "UPDATE api_keys SET expires_at = $1
                     WHERE enterprise_id = $2 AND key_id <> $3 AND revoked_at IS NULL
                       AND (expires_at IS NULL OR expires_at > $1)",
                )
                .bind(at)
                .bind(enterprise_id)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            self.keys_changed();
            Ok(id)
        })
    }

    /// Revokes one of the enterprise's keys at once. False: no such key of
    /// this enterprise (or already revoked).
    pub async fn revoke_api_key(
        &self,
        enterprise_id: &str,
        key_id: &str,
        now: i64,
    ) -> Result<bool> {
        let revoked = on_write!(self, pool => sqlx::query(
            "UPDATE api_keys SET revoked_at = $1
             WHERE enterprise_id = $2 AND key_id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(enterprise_id)
        .bind(key_id)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))?;
        self.keys_changed();
        Ok(revoked > 0)
    }

    /// The enterprise's keys: id, created, expires, revoked.
    pub async fn api_keys(&self, enterprise_id: &str) -> Result<Vec<ApiKeyRow>> {
        let rows: Vec<(String, i64, Option<i64>, Option<i64>)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT key_id, created_at, expires_at, revoked_at FROM api_keys
             WHERE enterprise_id = $1 ORDER BY created_at, key_id",
        )
        .bind(enterprise_id)
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(key_id, created_at, expires_at, revoked_at)| ApiKeyRow {
                key_id,
                created_at,
                expires_at,
                revoked_at,
            })
            .collect())
    }

    pub async fn create_service(
        &self,
        id: &str,
        enterprise_id: &str,
        name: &str,
        now: i64,
    ) -> Result<()> {
        let inserted = on_write!(self, pool => sqlx::query(
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
        let upserted = on_write!(self, pool => sqlx::query(
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

    /// The display names of those of `ids` that are enterprises.
    pub async fn enterprise_names(&self, ids: &[String]) -> Result<Vec<(String, String)>> {
        let mut names = Vec::with_capacity(ids.len());
        for id in ids {
            let name: Option<String> = on_pool!(self, pool => sqlx::query_scalar(
                "SELECT name FROM enterprises WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await)?;
            if let Some(name) = name {
                names.push((id.clone(), name));
            }
        }
        Ok(names)
    }

    /// The enterprise whose live API key (neither revoked nor expired at
    /// `now`) hashes to `api_key_hash`: from the keys read lately
    /// (`key_cache.rs`), else read and kept.
    pub async fn enterprise_by_key(&self, api_key_hash: &str, now: i64) -> Result<Option<String>> {
        let cached = on_pool!(self, _pool, groups => groups.keys.get(api_key_hash, now));
        if cached.is_some() {
            return Ok(cached);
        }
        let found: Option<(String, Option<i64>)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT enterprise_id, expires_at FROM api_keys
             WHERE key_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(api_key_hash)
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        Ok(found.map(|(enterprise_id, expires_at)| {
            on_pool!(self, _pool, groups => groups.keys.put(api_key_hash, &enterprise_id, expires_at));
            enterprise_id
        }))
    }

    /// This replica changed the keys: what it kept of them goes.
    fn keys_changed(&self) {
        on_pool!(self, _pool, groups => groups.keys.clear());
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
    ///
    /// It joins the accepts' group commit (`group.rs`), whose lock is first
    /// come, first served: on SQLite a write of its own would wait for the
    /// write lock in the busy handler's sleeps while group after group takes
    /// it, and under a flat-out load of targeted messages renewals waited up
    /// to the lease's whole time to live. It goes ahead without counting as
    /// a targeted accept for bulk work's slices ([`Group::join_for_control`](super::group::Group::join_for_control)).
    pub async fn hold_lease(&self, name: &str, owner: &str, now: i64, ttl_ms: i64) -> Result<bool> {
        on_pool!(self, pool, groups => {
            let mut tx = groups.accepts.join_for_control(pool).await?;
            let held: Option<String> = sqlx::query_scalar(
                "INSERT INTO leases (name, owner, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE leases.owner = excluded.owner OR leases.expires_at < $4
                 RETURNING owner",
            )
            .bind(name)
            .bind(owner)
            .bind(now + ttl_ms)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(held.is_some())
        })
    }

    /// Gives up every lease `owner` holds.
    pub async fn release_leases(&self, owner: &str) -> Result<()> {
        on_write!(self, pool => sqlx::query("DELETE FROM leases WHERE owner = $1")
            .bind(owner)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
