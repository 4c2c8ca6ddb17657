//! What each subscriber shares with each enterprise, as this carrier
//! forwarded it, and the history of their choices: what the consent page
//! shows. The relay holds the profile itself; these rows are the carrier's
//! record of the person's choices, written once the relay accepted them.

use chukei_proto::carrier::v1::{AgeGranularity, ConsentChoices, RegionGranularity};

use sqlx::QueryBuilder;

use super::{ROWS_PER_STATEMENT, Result, Store};

/// A change a subscriber made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsentAction {
    Registered,
    Changed,
    /// Changed to sharing nothing.
    Withdrew,
    /// Left an enterprise, or one of its services.
    Left,
    LeftHub,
}

impl ConsentAction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Changed => "changed",
            Self::Withdrew => "withdrew",
            Self::Left => "left",
            Self::LeftHub => "left_hub",
        }
    }
}

/// A subscriber's current choices for one enterprise.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct ConsentRow {
    pub enterprise_id: String,
    pub gender: bool,
    pub age: i64,
    pub region: i64,
    pub occupation: bool,
    pub text_version: String,
    pub updated_at: i64,
}

impl ConsentRow {
    pub fn choices(&self) -> ConsentChoices {
        choices(self.gender, self.age, self.region, self.occupation)
    }
}

/// One entry of a subscriber's own history.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct HistoryRow {
    pub enterprise_id: String,
    pub service_id: String,
    pub action: String,
    pub gender: bool,
    pub age: i64,
    pub region: i64,
    pub occupation: bool,
    pub text_version: String,
    pub at: i64,
}

impl HistoryRow {
    pub fn choices(&self) -> ConsentChoices {
        choices(self.gender, self.age, self.region, self.occupation)
    }
}

fn choices(gender: bool, age: i64, region: i64, occupation: bool) -> ConsentChoices {
    ConsentChoices {
        gender,
        age: age as i32,
        region: region as i32,
        occupation,
    }
}

/// Unspecified granularities are stored as what they mean: not shared.
fn stored(choices: &ConsentChoices) -> (bool, i64, i64, bool) {
    let age = match AgeGranularity::try_from(choices.age) {
        Ok(AgeGranularity::Exact) => AgeGranularity::Exact,
        Ok(AgeGranularity::Decade) => AgeGranularity::Decade,
        _ => AgeGranularity::None,
    };
    let region = match RegionGranularity::try_from(choices.region) {
        Ok(RegionGranularity::City) => RegionGranularity::City,
        Ok(RegionGranularity::Prefecture) => RegionGranularity::Prefecture,
        _ => RegionGranularity::None,
    };
    (
        choices.gender,
        age as i64,
        region as i64,
        choices.occupation,
    )
}

/// One change to record: `choices` for registering or changing; for
/// leaving, what was left (`service_id` empty: the enterprise;
/// `enterprise_id` empty too: the hub).
#[derive(Clone, Debug)]
pub struct ConsentChange<'a> {
    pub user_id: &'a str,
    pub enterprise_id: &'a str,
    pub service_id: &'a str,
    pub action: ConsentAction,
    pub choices: ConsentChoices,
    pub text_version: &'a str,
}

impl Store {
    /// Records `changes` (made at `now`, already accepted by the relay): the
    /// current choices per enterprise and a history entry each, a statement
    /// per chunk of rows, in one transaction.
    pub async fn record_consent_changes(
        &self,
        changes: &[ConsentChange<'_>],
        now: i64,
    ) -> Result<()> {
        let (mut tx, _turn) = self.begin_write().await?;
        for chunk in changes.chunks(ROWS_PER_STATEMENT) {
            let kept: Vec<&ConsentChange> = chunk
                .iter()
                .filter(|c| {
                    matches!(
                        c.action,
                        ConsentAction::Registered
                            | ConsentAction::Changed
                            | ConsentAction::Withdrew
                    )
                })
                .collect();
            if !kept.is_empty() {
                let mut query = QueryBuilder::new(
                    "INSERT INTO consents (user_id, enterprise_id, gender, age, region, occupation, text_version, updated_at) ",
                );
                query.push_values(&kept, |mut row, change| {
                    let (gender, age, region, occupation) = stored(&change.choices);
                    row.push_bind(change.user_id)
                        .push_bind(change.enterprise_id)
                        .push_bind(gender)
                        .push_bind(age)
                        .push_bind(region)
                        .push_bind(occupation)
                        .push_bind(change.text_version)
                        .push_bind(now);
                });
                query.push(
                    " ON CONFLICT (user_id, enterprise_id) DO UPDATE SET gender = excluded.gender, age = excluded.age,
                      region = excluded.region, occupation = excluded.occupation,
                      text_version = excluded.text_version, updated_at = excluded.updated_at",
                );
                query.build().execute(&mut *tx).await?;
            }
            for change in chunk {
                match change.action {
                    ConsentAction::LeftHub => {
                        sqlx::query("DELETE FROM consents WHERE user_id = $1")
                            .bind(change.user_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    ConsentAction::Left if change.service_id.is_empty() => {
                        sqlx::query(
                            "DELETE FROM consents WHERE user_id = $1 AND enterprise_id = $2",
                        )
                        .bind(change.user_id)
                        .bind(change.enterprise_id)
                        .execute(&mut *tx)
                        .await?;
                    }
                    _ => {}
                }
            }
            let mut query = QueryBuilder::new(
                "INSERT INTO consent_history (user_id, enterprise_id, service_id, action, gender, age, region, occupation, text_version, at) ",
            );
            query.push_values(chunk, |mut row, change| {
                let (gender, age, region, occupation) = stored(&change.choices);
                row.push_bind(change.user_id)
                    .push_bind(change.enterprise_id)
                    .push_bind(change.service_id)
                    .push_bind(change.action.name())
                    .push_bind(gender)
                    .push_bind(age)
                    .push_bind(region)
                    .push_bind(occupation)
                    .push_bind(change.text_version)
                    .push_bind(now);
            });
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    /// The enterprises `user_id` shares with through this carrier, by id.
    pub async fn consents(&self, user_id: &str) -> Result<Vec<ConsentRow>> {
        sqlx::query_as(
            "SELECT enterprise_id, gender, age, region, occupation, text_version, updated_at
             FROM consents WHERE user_id = $1 ORDER BY enterprise_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
    }

    /// `user_id`'s choices, newest first (at most `limit`).
    pub async fn consent_history(&self, user_id: &str, limit: i64) -> Result<Vec<HistoryRow>> {
        sqlx::query_as(
            "SELECT enterprise_id, service_id, action, gender, age, region, occupation, text_version, at
             FROM consent_history WHERE user_id = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// The subscriber with this phone number (E.164), if any.
    pub async fn subscriber_by_phone(&self, phone_number: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT user_id FROM subscribers WHERE phone_number = $1")
            .bind(phone_number)
            .fetch_optional(&self.pool)
            .await
    }
}
