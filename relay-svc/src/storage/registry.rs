//! The three registries in SQL: contracts (D2), registrations (D1) and
//! consented profiles (D3), written in batches — one statement per chunk of
//! rows, never one per user.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, QueryBuilder};

use super::audit::{AuditEntry, AuditSteps};
use super::registry_steps::{ConsentSteps, RegistrationSteps};
use super::{ROWS_PER_STATEMENT, Store, WritePool, on_pool, on_write};
use crate::error::{Error, Result};
use crate::registry::{ConsentChange, Contract, NewRegistration, Unregistration};

/// One row of `ListRegistrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationRow {
    pub user_ref: String,
    /// Empty: registered with the enterprise without naming a service.
    pub service_id: String,
    pub registered_at: i64,
}

/// A registry write of at least this many rows is part of a bulk import,
/// after which the registries' statistics are looked at (a catalog query,
/// ~0.7 ms); a trickle of smaller writes is autovacuum's to follow.
const BULK_WRITE: usize = 100;

/// Fewer changed rows than this never make a registry's statistics stale
/// ([`Store::keep_statistics_of_registries`]).
const REGISTRY_CHANGES: i64 = 1_000;

impl Store {
    /// Records the calling carrier's contracts. A contract marked primary makes
    /// every other contract of that user non-primary.
    pub async fn upsert_contracts(
        &self,
        carrier_id: &str,
        contracts: &[Contract],
        now: i64,
    ) -> Result<u64> {
        on_write!(self, pool => {
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
                    query.build().persistent(false).execute(&mut *tx).await?;
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
                    query.build().persistent(false).execute(&mut *tx).await?;
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
                    query.build().persistent(false).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, Error>(())
        })?;
        self.registry_written(contracts.len()).await;
        Ok(contracts.len() as u64)
    }

    /// Keeps PostgreSQL's statistics of the registries in step with bulk
    /// registrations, after each bulk registry write ([`BULK_WRITE`]) and
    /// before a campaign's first step: a table where more rows changed since they were last
    /// gathered than half the rows they count (and at least
    /// [`REGISTRY_CHANGES`]) is analyzed again, so a table filled from
    /// empty is analyzed about once per doubling. A failure is logged, not
    /// returned: the write is done, and the plans it leaves are slow, not
    /// wrong. SQLite plans without statistics, so there it does nothing.
    ///
    /// Autovacuum would do it a minute or more later. Until then the
    /// statements were planned for the tables as they were before the
    /// import: a campaign sent right after it read each step's boundary
    /// (the 2,000th registration after the cursor) as a bitmap scan of
    /// every registration past the cursor and a sort (98,000 rows, ~50 ms
    /// a step at 100k registered), and a carrier's contract upload made
    /// its other contracts non-primary by a scan of every contract (73 ms
    /// per 1,000 at 1M).
    pub async fn keep_statistics_of_registries(&self) {
        match self.analyze_stale_registries().await {
            Ok(gathered) if !gathered.is_empty() => {
                tracing::debug!(tables = ?gathered, "gathered the statistics of the registries");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "could not gather the statistics of the registries")
            }
        }
    }

    /// After a registry write of `rows`: a bulk one ([`BULK_WRITE`]) is
    /// followed by [`Store::keep_statistics_of_registries`].
    async fn registry_written(&self, rows: usize) {
        if rows >= BULK_WRITE {
            self.keep_statistics_of_registries().await;
        }
    }

    /// [`Store::keep_statistics_of_registries`]: the tables it analyzed.
    async fn analyze_stale_registries(&self) -> Result<Vec<String>> {
        let Self::Postgres(pool, _) = self else {
            return Ok(Vec::new());
        };
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT s.relname::TEXT FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
             WHERE s.schemaname = current_schema()
               AND s.relname IN ('registrations', 'service_registrations', 'contracts', 'profiles')
               AND s.n_mod_since_analyze >= $1
               AND s.n_mod_since_analyze * 2 > GREATEST(c.reltuples, 0)",
        )
        .bind(REGISTRY_CHANGES)
        .fetch_all(pool)
        .await?;
        for table in &stale {
            // The names come from the list above, never from a caller.
            sqlx::query(AssertSqlSafe(format!("ANALYZE {table}")))
                .execute(pool)
                .await?;
        }
        Ok(stale)
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
        let refs = on_write!(self, pool => {
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
            Ok::<_, Error>(refs)
        })?;
        self.registry_written(registrations.len()).await;
        registrations
            .iter()
            .map(|r| {
                refs.get(&(r.enterprise_id.clone(), r.user_id.clone()))
                    .cloned()
                    .ok_or_else(|| Error::Internal(anyhow::anyhow!("registration vanished")))
            })
            .collect()
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
        on_write!(self, pool => {
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
        on_write!(self, pool => {
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
