//! The three registries in SQL: contracts (D2), registrations (D1) and
//! consented profiles (D3), written in batches — one statement per chunk of
//! rows, never one per user.

use std::collections::{HashMap, HashSet};

use sqlx::QueryBuilder;

use super::{ROWS_PER_STATEMENT, Store, WritePool, on_pool};
use crate::credentials;
use crate::error::{Error, Result};
use crate::registry::{Contract, NewRegistration, Profile, Unregistration};

/// Upserts profiles and appends one consent record per profile, in two
/// statements, inside the caller's transaction `$tx` (either backend).
macro_rules! upsert_profiles {
    ($tx:expr, $carrier_id:expr, $profiles:expr, $now:expr) => {{
        let profiles: Vec<(&str, &str, &Profile)> = $profiles.collect();
        if !profiles.is_empty() {
            let mut query = QueryBuilder::new(
                "INSERT INTO profiles (enterprise_id, user_id, gender, age_min, age_max, region, occupation, updated_at) ",
            );
            query.push_values(&profiles, |mut row, (enterprise_id, user_id, profile)| {
                row.push_bind(*enterprise_id)
                    .push_bind(*user_id)
                    .push_bind(profile.gender.map(|g| g.as_str()))
                    .push_bind(profile.age.map(|(min, _)| i64::from(min)))
                    .push_bind(profile.age.map(|(_, max)| i64::from(max)))
                    .push_bind(profile.region.as_deref())
                    .push_bind(profile.occupation.as_deref())
                    .push_bind($now);
            });
            query.push(
                " ON CONFLICT (enterprise_id, user_id) DO UPDATE SET gender = excluded.gender, \
                 age_min = excluded.age_min, age_max = excluded.age_max, region = excluded.region, \
                 occupation = excluded.occupation, updated_at = excluded.updated_at",
            );
            query.build().execute(&mut *$tx).await?;

            let mut query = QueryBuilder::new(
                "INSERT INTO consent_records (enterprise_id, user_id, carrier_id, fields, recorded_at) ",
            );
            query.push_values(&profiles, |mut row, (enterprise_id, user_id, profile)| {
                row.push_bind(*enterprise_id)
                    .push_bind(*user_id)
                    .push_bind($carrier_id)
                    .push_bind(profile.shared_fields())
                    .push_bind($now);
            });
            query.build().execute(&mut *$tx).await?;
        }
    }};
}

/// One row of `ListRegistrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationRow {
    pub user_ref: String,
    /// Empty: registered with the enterprise without naming a service.
    pub service_id: String,
    pub registered_at: i64,
}

impl Store {
    /// Records the calling carrier's contracts. A contract marked primary makes
    /// every other contract of that user non-primary.
    pub async fn upsert_contracts(
        &self,
        carrier_id: &str,
        contracts: &[Contract],
        now: i64,
    ) -> Result<u64> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for chunk in contracts.chunks(ROWS_PER_STATEMENT) {
                let ended: Vec<&Contract> = chunk.iter().filter(|c| !c.active).collect();
                if !ended.is_empty() {
                    let mut query = QueryBuilder::new("DELETE FROM contracts WHERE carrier_id = ");
                    query.push_bind(carrier_id).push(" AND user_id IN (");
                    let mut list = query.separated(", ");
                    for contract in &ended {
                        list.push_bind(&contract.user_id);
                    }
                    query.push(")");
                    query.build().execute(&mut *tx).await?;
                }
                let primaries: Vec<&Contract> =
                    chunk.iter().filter(|c| c.active && c.primary).collect();
                if !primaries.is_empty() {
                    let mut query = QueryBuilder::new(
                        "UPDATE contracts SET is_primary = FALSE WHERE carrier_id <> ",
                    );
                    query.push_bind(carrier_id).push(" AND user_id IN (");
                    let mut list = query.separated(", ");
                    for contract in &primaries {
                        list.push_bind(&contract.user_id);
                    }
                    query.push(")");
                    query.build().execute(&mut *tx).await?;
                }
                let active: Vec<&Contract> = chunk.iter().filter(|c| c.active).collect();
                if !active.is_empty() {
                    let mut query = QueryBuilder::new(
                        "INSERT INTO contracts (user_id, carrier_id, is_primary, updated_at) ",
                    );
                    query.push_values(&active, |mut row, contract| {
                        row.push_bind(&contract.user_id)
                            .push_bind(carrier_id)
                            .push_bind(contract.primary)
                            .push_bind(now);
                    });
                    query.push(
                        " ON CONFLICT (user_id, carrier_id) DO UPDATE SET \
                         is_primary = excluded.is_primary, updated_at = excluded.updated_at",
                    );
                    query.build().execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(contracts.len() as u64)
        })
    }

    /// Registers users with enterprises (and services), storing the consented
    /// profiles and a consent record of which fields were shared. Every user
    /// must be contracted with the calling carrier. Returns the refs in order.
    pub async fn register_users(
        &self,
        carrier_id: &str,
        registrations: &[NewRegistration],
        now: i64,
    ) -> Result<Vec<String>> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;

            // Validate every reference before writing anything.
            let enterprise_ids: HashSet<&str> =
                registrations.iter().map(|r| r.enterprise_id.as_str()).collect();
            let mut known_enterprises = HashSet::new();
            for chunk in enterprise_ids.iter().collect::<Vec<_>>().chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new("SELECT id FROM enterprises WHERE id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(**id);
                }
                query.push(")");
                let ids: Vec<String> = query.build_query_scalar().fetch_all(&mut *tx).await?;
                known_enterprises.extend(ids);
            }
            let service_ids: HashSet<&str> =
                registrations.iter().filter_map(|r| r.service_id.as_deref()).collect();
            let mut service_owner = HashMap::new();
            for chunk in service_ids.iter().collect::<Vec<_>>().chunks(ROWS_PER_STATEMENT) {
                let mut query =
                    QueryBuilder::new("SELECT id, enterprise_id FROM services WHERE id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(**id);
                }
                query.push(")");
                let rows: Vec<(String, String)> = query.build_query_as().fetch_all(&mut *tx).await?;
                service_owner.extend(rows);
            }
            let mut contracted = HashSet::new();
            for chunk in registrations.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new("SELECT user_id FROM contracts WHERE carrier_id = ");
                query.push_bind(carrier_id).push(" AND user_id IN (");
                let mut list = query.separated(", ");
                for registration in chunk {
                    list.push_bind(&registration.user_id);
                }
                query.push(")");
                let users: Vec<String> = query.build_query_scalar().fetch_all(&mut *tx).await?;
                contracted.extend(users);
            }
            for (index, registration) in registrations.iter().enumerate() {
                if !known_enterprises.contains(&registration.enterprise_id) {
                    return Err(Error::not_found(
                        format!("registrations[{index}].enterprise_id"),
                        "no such enterprise",
                    ));
                }
                if let Some(service_id) = &registration.service_id {
                    if service_owner.get(service_id) != Some(&registration.enterprise_id) {
                        return Err(Error::not_found(
                            format!("registrations[{index}].service_id"),
                            "no such service of this enterprise",
                        ));
                    }
                }
                if !contracted.contains(&registration.user_id) {
                    return Err(Error::not_found(
                        format!("registrations[{index}].user_id"),
                        "no contract with the calling carrier",
                    ));
                }
            }

            let mut refs = HashMap::new();
            for chunk in registrations.chunks(ROWS_PER_STATEMENT) {
                let fresh: Vec<String> = chunk
                    .iter()
                    .map(|_| credentials::random_hex(12).map(|hex| format!("r{hex}")))
                    .collect::<Result<_, _>>()
                    .map_err(|error| Error::Internal(error.into()))?;
                let mut query = QueryBuilder::new(
                    "INSERT INTO registrations (enterprise_id, user_id, user_ref, registered_at) ",
                );
                query.push_values(chunk.iter().zip(&fresh), |mut row, (registration, user_ref)| {
                    row.push_bind(&registration.enterprise_id)
                        .push_bind(&registration.user_id)
                        .push_bind(user_ref)
                        .push_bind(now);
                });
                query.push(" ON CONFLICT (enterprise_id, user_id) DO NOTHING");
                query.build().execute(&mut *tx).await?;

                // A join against VALUES, not a row-value IN list: PostgreSQL plans the
                // latter as a scan of the whole table.
                let mut query = QueryBuilder::new(
                    "SELECT r.enterprise_id, r.user_id, r.user_ref FROM registrations r JOIN (",
                );
                query.push_values(chunk, |mut row, registration| {
                    row.push_bind(&registration.enterprise_id)
                        .push_bind(&registration.user_id);
                });
                query.push(") AS v ON r.enterprise_id = v.column1 AND r.user_id = v.column2");
                let rows: Vec<(String, String, String)> =
                    query.build_query_as().fetch_all(&mut *tx).await?;
                refs.extend(rows.into_iter().map(|(e, u, r)| ((e, u), r)));

                let with_service: Vec<&NewRegistration> =
                    chunk.iter().filter(|r| r.service_id.is_some()).collect();
                if !with_service.is_empty() {
                    let mut query = QueryBuilder::new(
                        "INSERT INTO service_registrations (service_id, user_id, enterprise_id, registered_at) ",
                    );
                    query.push_values(&with_service, |mut row, registration| {
                        row.push_bind(registration.service_id.as_deref())
                            .push_bind(&registration.user_id)
                            .push_bind(&registration.enterprise_id)
                            .push_bind(now);
                    });
                    query.push(" ON CONFLICT (service_id, user_id) DO NOTHING");
                    query.build().execute(&mut *tx).await?;
                }

                upsert_profiles!(tx, carrier_id, chunk.iter().map(|r| (r.enterprise_id.as_str(), r.user_id.as_str(), &r.profile)), now);
            }
            tx.commit().await?;
            registrations
                .iter()
                .map(|r| {
                    refs.get(&(r.enterprise_id.clone(), r.user_id.clone()))
                        .cloned()
                        .ok_or_else(|| Error::Internal(anyhow::anyhow!("registration vanished")))
                })
                .collect()
        })
    }

    /// Replaces the profile one user shares with one enterprise.
    pub async fn put_profile(
        &self,
        carrier_id: &str,
        user_id: &str,
        enterprise_id: &str,
        profile: &Profile,
        now: i64,
    ) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let registered: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(1 AS BIGINT) FROM registrations r JOIN contracts c ON c.user_id = r.user_id
                 WHERE r.enterprise_id = $1 AND r.user_id = $2 AND c.carrier_id = $3",
            )
            .bind(enterprise_id)
            .bind(user_id)
            .bind(carrier_id)
            .fetch_optional(&mut *tx)
            .await?;
            if registered.is_none() {
                return Err(Error::not_found(
                    "user_id",
                    "not registered with this enterprise through the calling carrier",
                ));
            }
            upsert_profiles!(tx, carrier_id, std::iter::once((enterprise_id, user_id, profile)), now);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Removes registrations; leaving the enterprise as a whole also deletes
    /// its service registrations and the profile shared with it.
    pub async fn unregister_users(
        &self,
        carrier_id: &str,
        unregistrations: &[Unregistration],
        now: i64,
    ) -> Result<u64> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut removed = 0;
            for leave in unregistrations {
                // Only users contracted with the calling carrier can be unregistered by it.
                let contracted: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(1 AS BIGINT) FROM contracts WHERE carrier_id = $1 AND user_id = $2",
                )
                .bind(carrier_id)
                .bind(&leave.user_id)
                .fetch_optional(&mut *tx)
                .await?;
                if contracted.is_none() {
                    continue;
                }
                if let Some(service_id) = &leave.service_id {
                    removed += sqlx::query(
                        "DELETE FROM service_registrations WHERE service_id = $1 AND user_id = $2 AND enterprise_id = $3",
                    )
                    .bind(service_id)
                    .bind(&leave.user_id)
                    .bind(&leave.enterprise_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    continue;
                }
                for statement in [
                    "DELETE FROM service_registrations WHERE enterprise_id = $1 AND user_id = $2",
                    "DELETE FROM profiles WHERE enterprise_id = $1 AND user_id = $2",
                ] {
                    sqlx::query(statement)
                        .bind(&leave.enterprise_id)
                        .bind(&leave.user_id)
                        .execute(&mut *tx)
                        .await?;
                }
                removed += sqlx::query("DELETE FROM registrations WHERE enterprise_id = $1 AND user_id = $2")
                    .bind(&leave.enterprise_id)
                    .bind(&leave.user_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(
                    "INSERT INTO consent_records (enterprise_id, user_id, carrier_id, fields, recorded_at)
                     VALUES ($1, $2, $3, 'withdrawn', $4)",
                )
                .bind(&leave.enterprise_id)
                .bind(&leave.user_id)
                .bind(carrier_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(removed)
        })
    }

    /// A page of an enterprise's registrations, ordered by ref then service.
    pub async fn list_registrations(
        &self,
        enterprise_id: &str,
        service_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<RegistrationRow>> {
        let (after_ref, after_service) = after.unwrap_or(("", ""));
        let rows: Vec<(String, String, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT user_ref, service_id, registered_at FROM (
                 SELECT r.user_ref AS user_ref, COALESCE(s.service_id, '') AS service_id,
                        COALESCE(s.registered_at, r.registered_at) AS registered_at
                 FROM registrations r
                 LEFT JOIN service_registrations s
                   ON s.enterprise_id = r.enterprise_id AND s.user_id = r.user_id
                 WHERE r.enterprise_id = $1
             ) AS listed
             WHERE ($2 = '' OR service_id = $2)
               AND (user_ref > $3 OR (user_ref = $3 AND service_id > $4))
             ORDER BY user_ref, service_id
             LIMIT $5",
        )
        .bind(enterprise_id)
        .bind(service_id.unwrap_or(""))
        .bind(after_ref)
        .bind(after_service)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(user_ref, service_id, registered_at)| RegistrationRow {
                user_ref,
                service_id,
                registered_at,
            })
            .collect())
    }

    /// The hub user behind one of the enterprise's refs.
    pub async fn user_for_ref(
        &self,
        enterprise_id: &str,
        user_ref: &str,
    ) -> Result<Option<String>> {
        Ok(on_pool!(self, pool => sqlx::query_scalar(
            "SELECT user_id FROM registrations WHERE enterprise_id = $1 AND user_ref = $2",
        )
        .bind(enterprise_id)
        .bind(user_ref)
        .fetch_optional(pool)
        .await)?)
    }
}
