//! Audiences: which people a target matches (registered with the
//! enterprise, in the service, matching the segment over consented
//! profiles, with their carriers), counted for quotes and held to the
//! minimum cohort so no answer singles a person out.

use sqlx::QueryBuilder;

use super::planning::{PlanSteps, Sql};
use super::{Param, ROWS_PER_STATEMENT, Store, on_pool, transaction_steps};
use crate::error::{Error, Result};
use crate::registry::Gender;
use crate::targeting::{Segment, Target};

/// A stored message's target, as expansion reads it back.
#[derive(Clone, Debug, Default)]
pub(super) struct StoredTarget {
    pub(super) is_segment: bool,
    pub(super) service_id: Option<String>,
    pub(super) gender: Option<String>,
    pub(super) age: Option<(i64, i64)>,
    pub(super) regions: Vec<String>,
    pub(super) occupations: Vec<String>,
}

/// How far back, and how many, earlier segment messages a new segment is
/// compared with.
const COHORT_LOOKBACK_MS: i64 = 30 * 86_400_000;
const COHORT_RECENT_SEGMENTS: i64 = 20;

/// A stored segment's columns: service, gender, age bounds, regions, occupations.
type RecentSegment = (
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    String,
    String,
);

impl StoredTarget {
    pub(super) fn of_segment(segment: &Segment) -> Self {
        Self {
            is_segment: true,
            service_id: segment.service_id.clone(),
            gender: segment.gender.map(|g| Gender::as_str(g).to_owned()),
            age: segment
                .age
                .map(|(min, max)| (i64::from(min), i64::from(max))),
            regions: segment.regions.clone(),
            occupations: segment.occupations.clone(),
        }
    }

    fn from_columns(
        (service_id, gender, age_min, age_max, regions, occupations): RecentSegment,
    ) -> Self {
        let list = |joined: String| -> Vec<String> {
            joined
                .split('\n')
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Self {
            is_segment: true,
            service_id,
            gender,
            age: age_min.zip(age_max),
            regions: list(regions),
            occupations: list(occupations),
        }
    }
}

/// How many people `target` matches that `except` does not, counted up to
/// `cap` only.
fn differing(
    enterprise_id: &str,
    target: &StoredTarget,
    except: Option<&StoredTarget>,
    cap: u64,
) -> Sql {
    let mut sql =
        Sql::new("SELECT COUNT(*) FROM (SELECT user_id FROM (SELECT r.user_id AS user_id");
    campaign_source(&mut sql, enterprise_id, false, target, &UserRange::EVERYONE);
    if let Some(except) = except {
        sql.push(" EXCEPT SELECT r.user_id");
        campaign_source(&mut sql, enterprise_id, false, except, &UserRange::EVERYONE);
    }
    let cap = sql.bind(Param::Int(cap as i64));
    sql.push(&format!(") AS matched LIMIT {cap}) AS capped"));
    sql
}

transaction_steps! {
    /// The minimum-cohort rule, on a pool connection (a quote) or inside the
    /// accepting transaction (a send, so it sees every segment message
    /// accepted before it).
    pub(super) trait AudienceSteps {
        /// See [`Store::check_cohort`].
        async fn check_cohort(
            &mut self,
            enterprise_id: &str,
            segment: &Segment,
            min_cohort: u64,
            now: i64,
        ) -> Result<()> {
            let target = StoredTarget::of_segment(segment);
            let everyone = StoredTarget {
                service_id: segment.service_id.clone(),
                ..StoredTarget::default()
            };
            let refuse = |reason: &str| {
                Err(Error::refused(
                    "target.segment",
                    format!("{reason} (minimum cohort {min_cohort}); widen or change the segment"),
                ))
            };
            let matched = differing(enterprise_id, &target, None, min_cohort);
            if self.count(matched).await? < min_cohort {
                return refuse("matches too few people");
            }
            let left_out = differing(enterprise_id, &everyone, Some(&target), min_cohort);
            if self.count(left_out).await? < min_cohort {
                return refuse("leaves too few people out");
            }
            let recent: Vec<RecentSegment> = sqlx::query_as(
                "SELECT target_service_id, seg_gender, seg_age_min, seg_age_max, seg_regions, seg_occupations
                 FROM messages WHERE enterprise_id = $1 AND target_kind = 'segment' AND accepted_at >= $2
                 ORDER BY accepted_at DESC LIMIT $3",
            )
            .bind(enterprise_id)
            .bind(now - COHORT_LOOKBACK_MS)
            .bind(COHORT_RECENT_SEGMENTS)
            .fetch_all(&mut *self)
            .await?;
            for earlier in recent {
                let earlier = StoredTarget::from_columns(earlier);
                let only_new = differing(enterprise_id, &target, Some(&earlier), min_cohort);
                let only_earlier = differing(enterprise_id, &earlier, Some(&target), min_cohort);
                let difference = self.count(only_new).await? + self.count(only_earlier).await?;
                if difference > 0 && difference < min_cohort {
                    return refuse("differs from an earlier segment message by too few people");
                }
            }
            Ok(())
        }
    }
}

impl Store {
    /// How many people `target` of `enterprise_id` matches now (a person
    /// with several carriers is one), as `SendMessage` would extract them;
    /// unregistered refs and foreign services are refused the same way.
    pub async fn count_recipients(&self, enterprise_id: &str, target: &Target) -> Result<u64> {
        let stored = match target {
            Target::Refs(refs) => {
                let mut found = std::collections::HashSet::with_capacity(refs.len());
                for chunk in refs.chunks(ROWS_PER_STATEMENT) {
                    let rows: Vec<String> = on_pool!(self, pool => {
                        let mut query = QueryBuilder::new(
                            "SELECT user_ref FROM registrations WHERE enterprise_id = ",
                        );
                        query.push_bind(enterprise_id).push(" AND user_ref IN (");
                        let mut list = query.separated(", ");
                        for user_ref in chunk {
                            list.push_bind(user_ref);
                        }
                        query.push(")");
                        query.build_query_scalar().fetch_all(pool).await
                    })?;
                    found.extend(rows);
                }
                if let Some(index) = refs.iter().position(|r| !found.contains(r)) {
                    return Err(Error::not_found(
                        format!("target.refs[{index}]"),
                        "not registered with this enterprise",
                    ));
                }
                return Ok(refs.len() as u64);
            }
            Target::AllRegistered => StoredTarget::default(),
            Target::Service(service) => StoredTarget {
                service_id: Some(service.clone()),
                ..StoredTarget::default()
            },
            Target::Segment(segment) => StoredTarget::of_segment(segment),
        };
        if let Some(service_id) = &stored.service_id {
            let owned: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(
                "SELECT CAST(1 AS BIGINT) FROM services WHERE id = $1 AND enterprise_id = $2",
            )
            .bind(service_id)
            .bind(enterprise_id)
            .fetch_optional(pool)
            .await)?;
            if owned.is_none() {
                let field = if stored.is_segment {
                    "target.segment.service_id"
                } else {
                    "target.service_id"
                };
                return Err(Error::not_found(
                    field,
                    "no such service of this enterprise",
                ));
            }
        }
        let mut sql = Sql::new("SELECT COUNT(DISTINCT c.user_id)");
        campaign_source(
            &mut sql,
            enterprise_id,
            false,
            &stored,
            &UserRange::EVERYONE,
        );
        on_pool!(self, pool => pool.acquire().await?.count(sql).await)
    }

    /// Refuses an attribute segment that could single people out, without
    /// saying how many it matches: it must match at least `min_cohort`
    /// people, leave at least `min_cohort` of its audience (the enterprise's
    /// registered people, or the service's) outside it, and differ from each
    /// of the enterprise's segment messages of the last 30 days by none or
    /// at least `min_cohort` people — so no two answers differ by fewer.
    /// For a quote; a send checks inside its accepting transaction
    /// ([`Store::accept_on_terms`]), where no concurrent send can slip by.
    pub async fn check_cohort(
        &self,
        enterprise_id: &str,
        segment: &Segment,
        min_cohort: u64,
        now: i64,
    ) -> Result<()> {
        on_pool!(self, pool => {
            let mut connection = pool.acquire().await?;
            connection
                .check_cohort(enterprise_id, segment, min_cohort, now)
                .await
        })
    }
}

/// `FROM … WHERE …` selecting a campaign's recipients (contracts aliased `c`):
/// registered with the enterprise, in the service, matching the segment over
/// consented profiles.
pub(super) fn campaign_source(
    sql: &mut Sql,
    enterprise_id: &str,
    all_carriers: bool,
    target: &StoredTarget,
    users: &UserRange,
) {
    let all = sql.bind(Param::Bool(all_carriers));
    sql.push(&format!(
        " FROM registrations r JOIN contracts c ON c.user_id = r.user_id AND (c.is_primary OR {all})"
    ));
    if let Some(service_id) = &target.service_id {
        let p = sql.bind(Param::Text(service_id.clone()));
        sql.push(&format!(
            " JOIN service_registrations s ON s.user_id = r.user_id AND s.enterprise_id = r.enterprise_id AND s.service_id = {p}"
        ));
    }
    let enterprise = sql.bind(Param::Text(enterprise_id.to_owned()));
    let mut filters = vec![format!("r.enterprise_id = {enterprise}")];
    if target.is_segment {
        sql.push(" JOIN profiles p ON p.enterprise_id = r.enterprise_id AND p.user_id = r.user_id");
        if let Some(gender) = &target.gender {
            let p = sql.bind(Param::Text(gender.clone()));
            filters.push(format!("p.gender = {p}"));
        }
        if let Some((min, max)) = target.age {
            let min = sql.bind(Param::Int(min));
            let max = sql.bind(Param::Int(max));
            filters.push(format!("p.age_min >= {min} AND p.age_max <= {max}"));
        }
        if !target.regions.is_empty() {
            let any: Vec<String> = target
                .regions
                .iter()
                .map(|region| {
                    let exact = sql.bind(Param::Text(region.clone()));
                    let below = sql.bind(Param::Text(format!("{region}/")));
                    let len = sql.bind(Param::Int(region.len() as i64 + 1));
                    format!("p.region = {exact} OR substr(p.region, 1, CAST({len} AS INTEGER)) = {below}")
                })
                .collect();
            filters.push(format!("({})", any.join(" OR ")));
        }
        if !target.occupations.is_empty() {
            let any: Vec<String> = target
                .occupations
                .iter()
                .map(|occupation| sql.bind(Param::Text(occupation.clone())))
                .collect();
            filters.push(format!("p.occupation IN ({})", any.join(", ")));
        }
    }
    sql.push(" WHERE ");
    sql.push(&filters.join(" AND "));
    // The step's bounds on the contracts too, a key range of their primary
    // key (user, carrier): PostgreSQL does not carry a range from one side
    // of a join to the other, and without it hashed all 1M contracts for
    // each step of 2,000 people (~230 ms a step at 1M; `docs/benchmarks.md`).
    for column in ["r.user_id", "c.user_id"] {
        let range = users.filter(sql, column);
        sql.push(&range);
    }
}

/// The people one step of a campaign's expansion covers: the enterprise's
/// registrations with user ids after `after` (exclusive) through `through`
/// (inclusive), in user id order; a bound that is absent does not limit.
/// A range is a key range of `registrations (enterprise_id, user_id)` and of
/// `deliveries (message_id, user_id, …)`, so a step reads only its own rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct UserRange {
    pub(super) after: Option<String>,
    pub(super) through: Option<String>,
}

impl UserRange {
    /// Everyone: no bound.
    pub(super) const EVERYONE: Self = Self {
        after: None,
        through: None,
    };

    /// ` AND {column} > $n AND {column} <= $m`, for the bounds there are,
    /// bound into `sql`.
    pub(super) fn filter(&self, sql: &mut Sql, column: &str) -> String {
        let mut text = String::new();
        if let Some(after) = &self.after {
            let p = sql.bind(Param::Text(after.clone()));
            text.push_str(&format!(" AND {column} > {p}"));
        }
        if let Some(through) = &self.through {
            let p = sql.bind(Param::Text(through.clone()));
            text.push_str(&format!(" AND {column} <= {p}"));
        }
        text
    }

    /// The same bounds, pushed onto a query being built.
    pub(super) fn push<DB: sqlx::Database>(&self, query: &mut QueryBuilder<DB>, column: &str)
    where
        for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    {
        if let Some(after) = &self.after {
            query
                .push(format!(" AND {column} > "))
                .push_bind(after.clone());
        }
        if let Some(through) = &self.through {
            query
                .push(format!(" AND {column} <= "))
                .push_bind(through.clone());
        }
    }
}
