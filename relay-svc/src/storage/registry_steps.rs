//! What the registries' write paths do inside their transactions: consent
//! recorded (and what it stops), registrations checked and stored, a person
//! erased from an enterprise or the hub.

use std::collections::{HashMap, HashSet};

use const_format::formatcp;
use sqlx::QueryBuilder;

use super::audience::UserRange;
use super::planning::{self, PlanSteps};
use super::states::{HANDED_OVER, SKIPPED, UNSENT};
use super::{ROWS_PER_STATEMENT, transaction_steps};
use crate::credentials;
use crate::error::{Error, Result};
use crate::registry::{NewRegistration, Profile, Unregistration};

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
                query.build().persistent(false).execute(&mut *self).await?;
            }
            let declined: Vec<&(&str, &str, &Profile, &str)> =
                changes.iter().filter(|(_, _, profile, _)| profile.is_empty()).collect();
            if !declined.is_empty() {
                let mut query = QueryBuilder::new("DELETE FROM profiles WHERE (enterprise_id, user_id) IN (");
                query.push_values(&declined, |mut row, (enterprise_id, user_id, _, _)| {
                    row.push_bind(*enterprise_id).push_bind(*user_id);
                });
                query.push(")");
                query.build().persistent(false).execute(&mut *self).await?;
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
                query.build().persistent(false).execute(&mut *self).await?;
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
                self.execute_all(message_id, [planning::record_skips(message_id, now, &UserRange::EVERYONE)])
                    .await?;
            }
            Ok(())
        }
    }
}

/// A registration's enterprise and user, and the ref the enterprise knows them by.
pub(super) type Refs = HashMap<(String, String), String>;

transaction_steps! {
    /// What registering people does inside its transaction.
    pub(super) trait RegistrationSteps {
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
                let ids: Vec<String> = query.build_query_scalar().persistent(false).fetch_all(&mut *self).await?;
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
                let rows: Vec<(String, String)> = query.build_query_as().persistent(false).fetch_all(&mut *self).await?;
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
                let users: Vec<String> = query.build_query_scalar().persistent(false).fetch_all(&mut *self).await?;
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
            query.build().persistent(false).execute(&mut *self).await?;

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
                query.build_query_as().persistent(false).fetch_all(&mut *self).await?;
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
                query.build().persistent(false).execute(&mut *self).await?;
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
            notice.build().persistent(false).execute(&mut *self).await?;
            Ok(removed)
        }
    }
}
