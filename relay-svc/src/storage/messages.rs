//! Messages: acceptance (durable before the answer, idempotent by key) and
//! expansion — extract the recipients and identify their carriers in one
//! `INSERT … SELECT`, never a loop of queries.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, QueryBuilder};

use super::{ROWS_PER_STATEMENT, Store, WritePool, is_unique_violation, on_pool};
use crate::error::{Error, Result};
use crate::registry::Gender;
use crate::targeting::{Channel, MessageState, NewMessage, Target};

/// A message as the enterprise sees it: its state and counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    pub message_id: String,
    pub state: MessageState,
    pub matched: Option<u64>,
    pub accepted_at: i64,
}

/// What `accept` stored, or found stored under the same key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub row: MessageRow,
    /// True when this call stored it; false when it replays an earlier call.
    pub created: bool,
}

/// A bind value for statements whose shape depends on the target.
enum Param {
    Text(String),
    Int(i64),
    Bool(bool),
}

impl Store {
    /// Stores a message durably (one transaction, committed before the
    /// caller answers). A refs target is validated and expanded in the same
    /// transaction; other targets are left `Accepted` for the expander.
    pub async fn accept_message(
        &self,
        enterprise_id: &str,
        message_id: &str,
        message: &NewMessage,
        now: i64,
        expires_at: i64,
    ) -> Result<StoredMessage> {
        let fingerprint = message.fingerprint();
        if let Some(found) = self.replay(enterprise_id, message, &fingerprint).await? {
            return Ok(found);
        }
        let (service_id, segment) = match &message.target {
            Target::Service(service) => (Some(service.as_str()), None),
            Target::Segment(segment) => (segment.service_id.as_deref(), Some(segment)),
            _ => (None, None),
        };
        let result: Result<StoredMessage> = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if let Some(service_id) = service_id {
                let owned: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(1 AS BIGINT) FROM services WHERE id = $1 AND enterprise_id = $2",
                )
                .bind(service_id)
                .bind(enterprise_id)
                .fetch_optional(&mut *tx)
                .await?;
                if owned.is_none() {
                    let field = if segment.is_some() { "target.segment.service_id" } else { "target.service_id" };
                    return Err(Error::not_found(field, "no such service of this enterprise"));
                }
            }
            let recipients = match &message.target {
                Target::Refs(refs) => {
                    let mut users = HashMap::with_capacity(refs.len());
                    for chunk in refs.chunks(ROWS_PER_STATEMENT) {
                        let mut query = QueryBuilder::new(
                            "SELECT user_ref, user_id FROM registrations WHERE enterprise_id = ",
                        );
                        query.push_bind(enterprise_id).push(" AND user_ref IN (");
                        let mut list = query.separated(", ");
                        for user_ref in chunk {
                            list.push_bind(user_ref);
                        }
                        query.push(")");
                        let rows: Vec<(String, String)> = query.build_query_as().fetch_all(&mut *tx).await?;
                        users.extend(rows);
                    }
                    if let Some(index) = refs.iter().position(|r| !users.contains_key(r)) {
                        return Err(Error::not_found(
                            format!("target.refs[{index}]"),
                            "not registered with this enterprise",
                        ));
                    }
                    Some(users.into_values().collect::<Vec<_>>())
                }
                _ => None,
            };
            let inserted = sqlx::query(
                "INSERT INTO messages (id, enterprise_id, idempotency_key, fingerprint, target_kind,
                    target_service_id, seg_gender, seg_age_min, seg_age_max, seg_regions, seg_occupations,
                    content_text, media_url, channel, all_carriers, state, matched, accepted_at,
                    not_before, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 1, NULL, $16, $16, $17)",
            )
            .bind(message_id)
            .bind(enterprise_id)
            .bind(&message.idempotency_key)
            .bind(&fingerprint)
            .bind(message.target.kind())
            .bind(service_id)
            .bind(segment.and_then(|s| s.gender).map(Gender::as_str))
            .bind(segment.and_then(|s| s.age).map(|(min, _)| i64::from(min)))
            .bind(segment.and_then(|s| s.age).map(|(_, max)| i64::from(max)))
            .bind(segment.map(|s| s.regions.join("\n")))
            .bind(segment.map(|s| s.occupations.join("\n")))
            .bind(&message.content.text)
            .bind(&message.content.media_url)
            .bind(Channel::number(message.channel))
            .bind(message.all_carriers)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(error) if is_unique_violation(&error) => {
                    // A concurrent call with the same key won; answer as it did.
                    drop(tx);
                    return self
                        .replay(enterprise_id, message, &fingerprint)
                        .await?
                        .ok_or_else(|| Error::Internal(anyhow::anyhow!("idempotent message vanished")));
                }
                Err(error) => return Err(error.into()),
            }
            let mut matched = None;
            if let Some(users) = recipients {
                for chunk in users.chunks(ROWS_PER_STATEMENT) {
                    let mut query = QueryBuilder::new(
                        "INSERT INTO deliveries (message_id, user_id, carrier_id, state) SELECT ",
                    );
                    query
                        .push_bind(message_id)
                        .push(", c.user_id, c.carrier_id, 0 FROM contracts c WHERE (c.is_primary OR ")
                        .push_bind(message.all_carriers)
                        .push(") AND c.user_id IN (");
                    let mut list = query.separated(", ");
                    for user in chunk {
                        list.push_bind(user);
                    }
                    query.push(") ON CONFLICT DO NOTHING");
                    query.build().execute(&mut *tx).await?;
                }
                let count: i64 = sqlx::query_scalar(
                    "SELECT COUNT(DISTINCT user_id) FROM deliveries WHERE message_id = $1",
                )
                .bind(message_id)
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query("UPDATE messages SET state = 2, matched = $2 WHERE id = $1")
                    .bind(message_id)
                    .bind(count)
                    .execute(&mut *tx)
                    .await?;
                matched = Some(count as u64);
            }
            tx.commit().await?;
            Ok(StoredMessage {
                row: MessageRow {
                    message_id: message_id.to_owned(),
                    state: if matched.is_some() { MessageState::Expanded } else { MessageState::Accepted },
                    matched,
                    accepted_at: now,
                },
                created: true,
            })
        });
        result
    }

    /// The stored answer for an idempotency key, or an error when the key was
    /// used for a different message.
    async fn replay(
        &self,
        enterprise_id: &str,
        message: &NewMessage,
        fingerprint: &str,
    ) -> Result<Option<StoredMessage>> {
        let found: Option<(String, String, i64, Option<i64>, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, fingerprint, state, matched, accepted_at FROM messages
             WHERE enterprise_id = $1 AND idempotency_key = $2",
        )
        .bind(enterprise_id)
        .bind(&message.idempotency_key)
        .fetch_optional(pool)
        .await)?;
        match found {
            None => Ok(None),
            Some((_, stored, ..)) if stored != fingerprint => Err(Error::already_exists(
                "idempotency_key",
                "already used for a different message",
            )),
            Some((message_id, _, state, matched, accepted_at)) => Ok(Some(StoredMessage {
                row: MessageRow {
                    message_id,
                    state: MessageState::from_number(state),
                    matched: matched.map(|m| m as u64),
                    accepted_at,
                },
                created: false,
            })),
        }
    }

    /// One of the enterprise's messages; another enterprise's is "not found".
    pub async fn message(
        &self,
        enterprise_id: &str,
        message_id: &str,
    ) -> Result<Option<MessageRow>> {
        let found: Option<(i64, Option<i64>, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT state, matched, accepted_at FROM messages WHERE id = $1 AND enterprise_id = $2",
        )
        .bind(message_id)
        .bind(enterprise_id)
        .fetch_optional(pool)
        .await)?;
        Ok(found.map(|(state, matched, accepted_at)| MessageRow {
            message_id: message_id.to_owned(),
            state: MessageState::from_number(state),
            matched: matched.map(|m| m as u64),
            accepted_at,
        }))
    }

    /// Messages accepted but not yet expanded, oldest first.
    pub async fn messages_to_expand(&self, limit: u32) -> Result<Vec<String>> {
        let ids = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM messages WHERE state = 1 ORDER BY accepted_at, id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?;
        Ok(ids)
    }

    /// Extracts the recipients of an accepted message and identifies their
    /// carriers, in one transaction: one `INSERT … SELECT` for the deliveries,
    /// then the matched count. Running it twice is harmless. Returns the
    /// number of users matched.
    pub async fn expand_message(&self, message_id: &str) -> Result<u64> {
        type Row = (
            String,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            bool,
            i64,
        );
        let found: Option<Row> = on_pool!(self, pool => sqlx::query_as(
            "SELECT enterprise_id, target_kind, target_service_id, seg_gender, seg_age_min, seg_age_max,
                    seg_regions, seg_occupations, all_carriers, state
             FROM messages WHERE id = $1",
        )
        .bind(message_id)
        .fetch_optional(pool)
        .await)?;
        let Some((
            enterprise_id,
            kind,
            service_id,
            gender,
            age_min,
            age_max,
            regions,
            occupations,
            all_carriers,
            state,
        )) = found
        else {
            return Err(Error::not_found("message_id", "no such message"));
        };
        if state != 1 {
            return Ok(0);
        }

        let mut params = vec![
            Param::Text(message_id.to_owned()),
            Param::Bool(all_carriers),
            Param::Text(enterprise_id),
        ];
        let next = |params: &mut Vec<Param>, param: Param| {
            params.push(param);
            format!("${}", params.len())
        };
        let mut sql = String::from(
            "INSERT INTO deliveries (message_id, user_id, carrier_id, state)
             SELECT $1, r.user_id, c.carrier_id, 0
             FROM registrations r
             JOIN contracts c ON c.user_id = r.user_id AND (c.is_primary OR $2)",
        );
        let mut filters = vec!["r.enterprise_id = $3".to_owned()];
        if let Some(service_id) = service_id {
            let p = next(&mut params, Param::Text(service_id));
            sql.push_str(&format!(
                " JOIN service_registrations s ON s.user_id = r.user_id AND s.enterprise_id = r.enterprise_id AND s.service_id = {p}"
            ));
        }
        if kind == "segment" {
            sql.push_str(
                " JOIN profiles p ON p.enterprise_id = r.enterprise_id AND p.user_id = r.user_id",
            );
            if let Some(gender) = gender {
                let p = next(&mut params, Param::Text(gender));
                filters.push(format!("p.gender = {p}"));
            }
            if let (Some(min), Some(max)) = (age_min, age_max) {
                let min = next(&mut params, Param::Int(min));
                let max = next(&mut params, Param::Int(max));
                filters.push(format!("p.age_min >= {min} AND p.age_max <= {max}"));
            }
            let regions: Vec<String> = regions
                .unwrap_or_default()
                .split('\n')
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect();
            if !regions.is_empty() {
                let any: Vec<String> = regions
                    .into_iter()
                    .map(|region| {
                        let exact = next(&mut params, Param::Text(region.clone()));
                        let below = next(&mut params, Param::Text(format!("{region}/")));
                        let len = next(&mut params, Param::Int(region.len() as i64 + 1));
                        format!("p.region = {exact} OR substr(p.region, 1, CAST({len} AS INTEGER)) = {below}")
                    })
                    .collect();
                filters.push(format!("({})", any.join(" OR ")));
            }
            let occupations: Vec<String> = occupations
                .unwrap_or_default()
                .split('\n')
                .filter(|o| !o.is_empty())
                .map(str::to_owned)
                .collect();
            if !occupations.is_empty() {
                let any: Vec<String> = occupations
                    .into_iter()
                    .map(|occupation| next(&mut params, Param::Text(occupation)))
                    .collect();
                filters.push(format!("p.occupation IN ({})", any.join(", ")));
            }
        }
        sql.push_str(" WHERE ");
        sql.push_str(&filters.join(" AND "));
        sql.push_str(" ON CONFLICT DO NOTHING");

        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for param in params {
                query = match param {
                    Param::Text(text) => query.bind(text),
                    Param::Int(int) => query.bind(int),
                    Param::Bool(flag) => query.bind(flag),
                };
            }
            query.execute(&mut *tx).await?;
            let matched: i64 = sqlx::query_scalar(
                "SELECT COUNT(DISTINCT user_id) FROM deliveries WHERE message_id = $1",
            )
            .bind(message_id)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("UPDATE messages SET state = 2, matched = $2 WHERE id = $1 AND state = 1")
                .bind(message_id)
                .bind(matched)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(matched as u64)
        })
    }
}
