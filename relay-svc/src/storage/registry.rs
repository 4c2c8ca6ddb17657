//! The three registries in SQL: contracts (D2), registrations (D1) and
//! consented profiles (D3), written in batches — one statement per chunk of
//! rows, never one per user.

use std::collections::{HashMap, HashSet};

use const_format::formatcp;
use sqlx::QueryBuilder;

use super::audit::{AuditEntry, AuditSteps};
use super::planning::{self, PlanSteps};
use super::states::{HANDED_OVER, SKIPPED, UNSENT};
use super::{ROWS_PER_STATEMENT, Store, WritePool, on_pool, transaction_steps};
use crate::credentials;
use crate::error::{Error, Result};
use crate::registry::{ConsentChange, Contract, NewRegistration, Profile, Unregistration};

transaction_steps! {
    /// What a consent change does inside its transaction.
    pub(crate) trait ConsentSteps {
        /// Records consent choices from `carrier_id` at `now` inside the caller's
        /// transaction (either backend): each `(enterprise_id, user_id, &Profile, text_version)` replaces
        /// the stored profile (an empty one deletes it) and appends a consent record
        /// of which fields were shared, never their values.
        async fn record_consent(
            &mut self,
            carrier_id: &str,
            changes: &[(&str, &str, &Profile, &str)],
            now: i64,
        ) -> Result<()> {
            let shared: Vec<&(&str, &str, &Profile, &str)> =
                changes.iter().filter(|(_, _, profile, _)| !profile.is_empty()).collect();
            if !shared.is_empty() {
                let mut query = QueryBuilder::new(
                    "INSERT INTO profiles (enterprise_id, user_id, gender, age_min, age_max, region, occupation, updated_at) ",
                );
                query.push_values(&shared, |mut row, (enterprise_id, user_id, profile, _)| {
                    row.push_bind(*enterprise_id)
                        .push_bind(*user_id)
                        .push_bind(profile.gender.map(|g| g.as_str()))
                        .push_bind(profile.age.map(|(min, _)| i64::from(min)))
                        .push_bind(profile.age.map(|(_, max)| i64::from(max)))
                        .push_bind(profile.region.as_deref())
                        .push_bind(profile.occupation.as_deref())
                        .push_bind(now);
                });
                query.push(
                    " ON CONFLICT (enterprise_id, user_id) DO UPDATE SET gender = excluded.gender, \
                     age_min = excluded.age_min, age_max = excluded.age_max, region = excluded.region, \
                     occupation = excluded.occupation, updated_at = excluded.updated_at",
                );
                query.build().execute(&mut *self).await?;
            }
            let declined: Vec<&(&str, &str, &Profile, &str)> =
                changes.iter().filter(|(_, _, profile, _)| profile.is_empty()).collect();
            if !declined.is_empty() {
                let mut query = QueryBuilder::new("DELETE FROM profiles WHERE (enterprise_id, user_id) IN (");
                query.push_values(&declined, |mut row, (enterprise_id, user_id, _, _)| {
                    row.push_bind(*enterprise_id).push_bind(*user_id);
                });
                query.push(")");
                query.build().execute(&mut *self).await?;
            }
            if !changes.is_empty() {
                let mut query = QueryBuilder::new(
                    "INSERT INTO consent_records (enterprise_id, user_id, carrier_id, fields, text_version, recorded_at) ",
                );
                query.push_values(changes, |mut row, (enterprise_id, user_id, profile, text_version)| {
                    row.push_bind(*enterprise_id)
                        .push_bind(*user_id)
                        .push_bind(carrier_id)
                        .push_bind(profile.shared_fields())
                        .push_bind(*text_version)
                        .push_bind(now);
                });
                query.build().execute(&mut *self).await?;
            }
            Ok(())
        }

        /// Stops what the relay would still send one person for `enterprise_id`
        /// (`None`: every enterprise), in the caller's transaction: attempts not yet
        /// handed over are skipped with `note` (and counted as skipped), and handed-over ones
        /// lose their timers, so no fallback or resend follows. `by_attributes`:
        /// only messages that chose their people by consented attributes.
        async fn stop_pending(
            &mut self,
            user_id: &str,
            enterprise_id: Option<&str>,
            by_attributes: bool,
            note: &str,
            now: i64,
        ) -> Result<()> {
            let messages: Vec<String> = sqlx::query_scalar(
                formatcp!("SELECT DISTINCT d.message_id FROM deliveries d JOIN messages m ON m.id = d.message_id
                 WHERE d.user_id = $1 AND (d.state IN {UNSENT} OR d.check_at IS NOT NULL)
                   AND ($2 = '' OR m.enterprise_id = $2) AND (m.by_attributes OR NOT $3)"),
            )
            .bind(user_id)
            .bind(enterprise_id.unwrap_or(""))
            .bind(by_attributes)
            .fetch_all(&mut *self)
            .await?;
            for message_id in &messages {
                sqlx::query(
                    formatcp!("UPDATE deliveries SET state = {SKIPPED}, note = $3 WHERE message_id = $1 AND user_id = $2 AND state IN {UNSENT}"),
                )
                .bind(message_id)
                .bind(user_id)
                .bind(note)
                .execute(&mut *self)
                .await?;
                // Handed-over attempts lose their timers and are never offered again.
                sqlx::query(
                    formatcp!("UPDATE deliveries SET check_at = NULL, offers = offers + 1000000 WHERE message_id = $1 AND user_id = $2 AND state = {HANDED_OVER}"),
                )
                    .bind(message_id)
                    .bind(user_id)
                    .execute(&mut *self)
                    .await?;
                self.execute_all(message_id, [planning::record_skips(message_id, now)])
                    .await?;
            }
            Ok(())
        }
    }
}

/// A registration's enterprise and user, and the ref the enterprise knows them by.
type Refs = HashMap<(String, String), String>;

transaction_steps! {
    /// What registering people does inside its transaction.
    trait RegistrationSteps {
        /// Refuses the first registration naming an unknown enterprise, a
        /// service not of its enterprise, or a user without a contract with
        /// `carrier_id`, naming its index.
        async fn check_registrations(
            &mut self,
            carrier_id: &str,
            registrations: &[NewRegistration],
        ) -> Result<()> {
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
                let ids: Vec<String> = query.build_query_scalar().fetch_all(&mut *self).await?;
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
                let rows: Vec<(String, String)> = query.build_query_as().fetch_all(&mut *self).await?;
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
                let users: Vec<String> = query.build_query_scalar().fetch_all(&mut *self).await?;
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
            Ok(())
        }

        /// Stores up to a statement's worth of `registrations` (a new ref for
        /// each new one, their services and consent); the refs of all.
        async fn insert_registrations(
            &mut self,
            carrier_id: &str,
            registrations: &[NewRegistration],
            now: i64,
        ) -> Result<Refs> {
            let fresh: Vec<String> = registrations
                .iter()
                .map(|_| credentials::random_hex(12).map(|hex| format!("r{hex}")))
                .collect::<Result<_, _>>()
                .map_err(|error| Error::Internal(error.into()))?;
            let mut query = QueryBuilder::new(
                "INSERT INTO registrations (enterprise_id, user_id, user_ref, registered_at) ",
            );
            query.push_values(registrations.iter().zip(&fresh), |mut row, (registration, user_ref)| {
                row.push_bind(&registration.enterprise_id)
                    .push_bind(&registration.user_id)
                    .push_bind(user_ref)
                    .push_bind(now);
            });
            query.push(" ON CONFLICT (enterprise_id, user_id) DO NOTHING");
            query.build().execute(&mut *self).await?;

            // A join against VALUES, not a row-value IN list: PostgreSQL plans the
            // latter as a scan of the whole table.
            let mut query = QueryBuilder::new(
                "SELECT r.enterprise_id, r.user_id, r.user_ref FROM registrations r JOIN (",
            );
            query.push_values(registrations, |mut row, registration| {
                row.push_bind(&registration.enterprise_id)
                    .push_bind(&registration.user_id);
            });
            query.push(") AS v ON r.enterprise_id = v.column1 AND r.user_id = v.column2");
            let rows: Vec<(String, String, String)> =
                query.build_query_as().fetch_all(&mut *self).await?;
            let refs = rows.into_iter().map(|(e, u, r)| ((e, u), r)).collect();

            let with_service: Vec<&NewRegistration> =
                registrations.iter().filter(|r| r.service_id.is_some()).collect();
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
                query.build().execute(&mut *self).await?;
            }

            let changes: Vec<_> = registrations
                .iter()
                .map(|r| (r.enterprise_id.as_str(), r.user_id.as_str(), &r.profile, r.text_version.as_str()))
                .collect();
            self.record_consent(carrier_id, &changes, now).await?;
            Ok(refs)
        }

        /// Erases `leave`'s person from one enterprise (or the hub): pending
        /// sends stopped, registrations, profiles and per-person rollups
        /// deleted, consent withdrawn on record, a tombstone kept and each of
        /// their `carriers` told; the registrations removed.
        async fn erase(
            &mut self,
            carrier_id: &str,
            carriers: &[String],
            leave: &Unregistration,
            now: i64,
        ) -> Result<u64> {
            let user = leave.user_id.as_str();
            let enterprise = leave.enterprise_id.as_deref().unwrap_or("");
            let registered: Vec<String> = sqlx::query_scalar(
                "SELECT enterprise_id FROM registrations WHERE user_id = $1 AND ($2 = '' OR enterprise_id = $2)",
            )
            .bind(user)
            .bind(enterprise)
            .fetch_all(&mut *self)
            .await?;
            self.stop_pending(user, leave.enterprise_id.as_deref(), false, "skipped: the person unregistered", now)
                .await?;
            for statement in [
                "DELETE FROM service_registrations WHERE user_id = $1 AND ($2 = '' OR enterprise_id = $2)",
                "DELETE FROM profiles WHERE user_id = $1 AND ($2 = '' OR enterprise_id = $2)",
                "DELETE FROM person_refs WHERE user_id = $1 AND ($2 = '' OR enterprise_id = $2)",
            ] {
                sqlx::query(statement).bind(user).bind(enterprise).execute(&mut *self).await?;
            }
            let removed = sqlx::query("DELETE FROM registrations WHERE user_id = $1 AND ($2 = '' OR enterprise_id = $2)")
                .bind(user)
                .bind(enterprise)
                .execute(&mut *self)
                .await?
                .rows_affected();
            if leave.enterprise_id.is_none() {
                for statement in [
                    "DELETE FROM person_channels WHERE user_id = $1",
                    "DELETE FROM person_hours WHERE user_id = $1",
                    "DELETE FROM person_places WHERE user_id = $1",
                    "DELETE FROM engagement WHERE user_id = $1",
                    "DELETE FROM contracts WHERE user_id = $1",
                ] {
                    sqlx::query(statement).bind(user).execute(&mut *self).await?;
                }
            }
            for enterprise_id in &registered {
                sqlx::query(
                    "INSERT INTO consent_records (enterprise_id, user_id, carrier_id, fields, text_version, recorded_at)
                     VALUES ($1, $2, $3, 'withdrawn', '', $4)",
                )
                .bind(enterprise_id)
                .bind(user)
                .bind(carrier_id)
                .bind(now)
                .execute(&mut *self)
                .await?;
            }
            sqlx::query(
                "INSERT INTO tombstones (user_hash, enterprise_id, carrier_id, erased_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(credentials::hash_secret(user))
            .bind(enterprise)
            .bind(carrier_id)
            .bind(now)
            .execute(&mut *self)
            .await?;
            let mut notice = QueryBuilder::new("INSERT INTO outbox (carrier_id, user_id, enterprise_id, created_at) ");
            notice.push_values(carriers, |mut row, carrier| {
                row.push_bind(carrier).push_bind(user).push_bind(enterprise).push_bind(now);
            });
            notice.build().execute(&mut *self).await?;
            Ok(removed)
        }
    }
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
            tx.check_registrations(carrier_id, registrations).await?;
            let mut refs = HashMap::new();
            for chunk in registrations.chunks(ROWS_PER_STATEMENT) {
                refs.extend(tx.insert_registrations(carrier_id, chunk, now).await?);
            }
            let entry = AuditEntry::new(
                format!("carrier:{carrier_id}"),
                "consent.recorded",
                "registrations",
                format!("{} registrations with their consent records", registrations.len()),
            );
            tx.append_audit(now, &[&entry]).await?;
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

    /// Replaces what one person shares with one enterprise; an empty
    /// profile withdraws consent and deletes the stored attributes. Either
    /// way, attempts of messages that chose them by attributes and are not
    /// yet handed over are skipped, in the same transaction, so the next
    /// targeting decision and every later send see the change.
    pub async fn change_consent(
        &self,
        carrier_id: &str,
        change: &ConsentChange,
        now: i64,
    ) -> Result<()> {
        let (user_id, enterprise_id) = (change.user_id.as_str(), change.enterprise_id.as_str());
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
            tx.record_consent(carrier_id, &[(enterprise_id, user_id, &change.profile, change.text_version.as_str())], now)
                .await?;
            tx.stop_pending(user_id, Some(enterprise_id), true, "skipped: the person changed what they share", now)
                .await?;
            let action = if change.profile.is_empty() { "consent.withdrawn" } else { "consent.changed" };
            let entry = AuditEntry::new(
                format!("carrier:{carrier_id}"),
                action,
                format!("enterprise:{enterprise_id}"),
                format!("fields: {}; text version {}", change.profile.shared_fields(), change.text_version),
            );
            tx.append_audit(now, &[&entry]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Removes registrations. Leaving one service removes only that
    /// service registration; leaving an enterprise erases the person from it
    /// (registration, service registrations, profile); leaving the hub
    /// erases them from every enterprise and drops their contracts and
    /// learned preferences. An erasure keeps a tombstone (a hash of the
    /// user id, never the id), skips what was still to be sent, queues a
    /// notice to each of the person's carriers, and is audited. Events and
    /// the statistics folded from them stay, so counts do not change.
    pub async fn unregister_users(
        &self,
        carrier_id: &str,
        unregistrations: &[Unregistration],
        now: i64,
    ) -> Result<u64> {
        let fence = self.rollup_fence(true);
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if let Some(fence) = fence {
                sqlx::query(fence).execute(&mut *tx).await?;
            }
            let mut removed = 0;
            let mut erased = 0;
            for leave in unregistrations {
                // Only users contracted with the calling carrier can be unregistered by it.
                let carriers: Vec<String> = sqlx::query_scalar(
                    "SELECT carrier_id FROM contracts WHERE user_id = $1 ORDER BY carrier_id",
                )
                .bind(&leave.user_id)
                .fetch_all(&mut *tx)
                .await?;
                if !carriers.iter().any(|c| c == carrier_id) {
                    continue;
                }
                let user = leave.user_id.as_str();
                if let (Some(enterprise_id), Some(service_id)) = (&leave.enterprise_id, &leave.service_id) {
                    removed += sqlx::query(
                        "DELETE FROM service_registrations WHERE service_id = $1 AND user_id = $2 AND enterprise_id = $3",
                    )
                    .bind(service_id)
                    .bind(user)
                    .bind(enterprise_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    continue;
                }
                removed += tx.erase(carrier_id, &carriers, leave, now).await?;
                erased += 1;
            }
            if erased > 0 {
                let entry = AuditEntry::new(
                    format!("carrier:{carrier_id}"),
                    "erasure",
                    "registrations",
                    format!("{erased} people erased from an enterprise or the hub; tombstones kept"),
                );
                tx.append_audit(now, &[&entry]).await?;
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
