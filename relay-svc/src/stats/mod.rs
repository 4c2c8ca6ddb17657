//! Statistics: what `GetStats` groups by, and how the rolled-up counts become
//! figures an enterprise can act on — every rate with its sample size and a
//! 95% Wilson interval, small samples marked, attribute and place cells below
//! the minimum cohort withheld.
//!
//! The counts come from the rollups the storage folds the events into
//! (`storage::stats`): a time cube (by hour of the send, channel, carrier,
//! place, open hour) and an audience cube (by day of the send, channel and
//! consented attributes); a breakdown reads the one that holds all its
//! dimensions, so attributes combine with channel, day and weekday (and each
//! other) only. Time is stored as hours or days since the epoch, so hours,
//! weekdays and days are read here in whatever zone the caller asks for.

use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::storage::{Cube, Reconciliation, SummedCells};

mod rows;

const HOUR_MS: i64 = 3_600_000;

/// What a breakdown groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    Channel,
    SendHour,
    OpenHour,
    Weekday,
    Day,
    Place,
    Gender,
    Age,
    Region,
    Occupation,
    User,
    Carrier,
}

impl Dimension {
    pub const ALL: [Self; 12] = [
        Self::Channel,
        Self::SendHour,
        Self::OpenHour,
        Self::Weekday,
        Self::Day,
        Self::Place,
        Self::Gender,
        Self::Age,
        Self::Region,
        Self::Occupation,
        Self::User,
        Self::Carrier,
    ];

    /// How the wire, the CLI and the column headers name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Channel => "channel",
            Self::SendHour => "hour",
            Self::OpenHour => "open_hour",
            Self::Weekday => "weekday",
            Self::Day => "day",
            Self::Place => "place",
            Self::Gender => "gender",
            Self::Age => "age",
            Self::Region => "region",
            Self::Occupation => "occupation",
            Self::User => "user",
            Self::Carrier => "carrier",
        }
    }

    /// The column of `cube` it is read from (`user` has its own table).
    fn column(self, cube: Cube) -> &'static str {
        match (self, cube) {
            (Self::Day | Self::Weekday, Cube::Audience) => "send_day",
            (Self::SendHour | Self::Weekday | Self::Day, Cube::Time) => "send_hour",
            (Self::Channel, _) => "channel",
            (Self::OpenHour, _) => "open_hour",
            (Self::Place, _) => "place",
            (Self::Gender, _) => "gender",
            (Self::Age, _) => "age_band",
            (Self::Region, _) => "region",
            (Self::Occupation, _) => "occupation",
            (Self::User, _) => "user_id",
            (Self::Carrier, _) => "carrier_id",
            (Self::SendHour, Cube::Audience) => unreachable!("refused by Query::new"),
        }
    }

    /// A consented attribute (read from the audience cube).
    pub fn is_attribute(self) -> bool {
        matches!(
            self,
            Self::Gender | Self::Age | Self::Region | Self::Occupation
        )
    }

    /// Whether a cell of this dimension can narrow down to a few people.
    fn describes_people(self) -> bool {
        matches!(
            self,
            Self::Place | Self::Gender | Self::Age | Self::Region | Self::Occupation
        )
    }
}

/// Who asks: an enterprise sees its own messages and never carriers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Viewer {
    Enterprise(String),
    /// The hub operator: every enterprise, or one.
    Operator(Option<String>),
}

impl Viewer {
    pub fn enterprise_id(&self) -> Option<&str> {
        match self {
            Self::Enterprise(id) => Some(id),
            Self::Operator(id) => id.as_deref(),
        }
    }
}

/// One breakdown request, validated.
#[derive(Clone, Debug)]
pub struct Query {
    pub by: Vec<Dimension>,
    /// Sends in `[since, until)`, unix ms.
    pub since: i64,
    pub until: i64,
    pub zone: TimeZone,
}

impl Query {
    /// Checks a request's shape for `viewer`; `field` prefixes error fields.
    pub fn new(
        by: Vec<Dimension>,
        since: i64,
        until: i64,
        zone: &str,
        viewer: &Viewer,
    ) -> Result<Self> {
        for (index, dimension) in by.iter().enumerate() {
            if by[..index].contains(dimension) {
                return Err(Error::invalid(
                    format!("by[{index}]"),
                    format!("{} is already listed", dimension.name()),
                ));
            }
            if *dimension == Dimension::Carrier && matches!(viewer, Viewer::Enterprise(_)) {
                return Err(Error::invalid(
                    format!("by[{index}]"),
                    "carrier: which carrier a person is with is not shown to enterprises",
                ));
            }
        }
        if by.contains(&Dimension::User)
            && by
                .iter()
                .any(|d| !matches!(d, Dimension::User | Dimension::Channel))
        {
            return Err(Error::invalid("by", "user combines only with channel"));
        }
        if let Some(attribute) = by.iter().find(|d| d.is_attribute()) {
            if let Some(other) = by.iter().find(|d| {
                !d.is_attribute()
                    && !matches!(d, Dimension::Channel | Dimension::Day | Dimension::Weekday)
            }) {
                return Err(Error::invalid(
                    "by",
                    format!(
                        "{} combines only with channel, day, weekday and the other attributes, not {}",
                        attribute.name(),
                        other.name()
                    ),
                ));
            }
        }
        if since >= until {
            return Err(Error::invalid("since", "must be before until"));
        }
        let zone = if zone.is_empty() {
            TimeZone::UTC
        } else {
            TimeZone::get(zone)
                .map_err(|_| Error::invalid("zone", format!("{zone:?} is not an IANA time zone")))?
        };
        Ok(Self {
            by,
            since,
            until,
            zone,
        })
    }
}

impl Query {
    /// The cube that holds every dimension asked for: attributes live in the
    /// audience cube (by day), everything else in the time cube (by hour).
    pub fn cube(&self) -> Cube {
        if self.by.iter().any(|d| d.is_attribute()) {
            Cube::Audience
        } else {
            Cube::Time
        }
    }
}

/// The operator's thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Attribute and place cells with fewer events than this are withheld.
    pub min_cohort: u64,
    /// Rates over fewer deliveries than this are marked low-sample.
    pub min_sample: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_cohort: 10,
            min_sample: 30,
        }
    }
}

/// An open rate with its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

/// One line of a breakdown.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// One label per requested dimension.
    pub key: Vec<String>,
    pub sent: u64,
    pub delivered: u64,
    pub opened: u64,
    pub estimate: Option<Estimate>,
    pub low_sample: bool,
    pub suppressed: bool,
}

/// The 95% Wilson score interval of `successes` out of `trials` (none for
/// zero trials): honest at small samples and near 0 or 1, where the normal
/// approximation claims too much.
pub fn wilson(successes: u64, trials: u64) -> Option<Estimate> {
    if trials == 0 {
        return None;
    }
    const Z: f64 = 1.959_963_984_540_054;
    let n = trials as f64;
    let p = successes.min(trials) as f64 / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * ((p * (1.0 - p) + z2 / (4.0 * n)) / n).sqrt() / (1.0 + z2 / n);
    Some(Estimate {
        rate: p,
        // Exact at the edges, where rounding would leave a speck.
        low: if successes == 0 {
            0.0
        } else {
            (centre - half).max(0.0)
        },
        high: if successes >= trials {
            1.0
        } else {
            (centre + half).min(1.0)
        },
    })
}

/// The rollup columns `query` sums, and whether it is by person (the
/// `person_channels` sums) rather than a cube's cells.
pub fn columns(query: &Query) -> (Vec<&'static str>, bool) {
    if query.by.contains(&Dimension::User) {
        let columns = if query.by.contains(&Dimension::Channel) {
            vec!["user_id", "channel"]
        } else {
            vec!["user_id"]
        };
        return (columns, true);
    }
    let cube = query.cube();
    let mut columns: Vec<&'static str> = Vec::new();
    for dimension in &query.by {
        if !columns.contains(&dimension.column(cube)) {
            columns.push(dimension.column(cube));
        }
    }
    (columns, false)
}

/// The rows of `query`'s answer from the groups summed over `columns`.
pub fn rows(
    query: &Query,
    columns: &[&str],
    summed: Vec<SummedCells>,
    thresholds: Thresholds,
) -> Vec<Row> {
    rows::fold(query, columns, summed, thresholds)
}

/// A reconciliation row in words: what the difference between the carrier's
/// report and the relay's count of its receipts means.
pub fn finding(row: &Reconciliation) -> String {
    if row.reported_at == 0 {
        return "the carrier has not reported on this message yet".to_owned();
    }
    let mut parts = Vec::new();
    for (what, counted, reported) in [
        ("deliveries", row.counted_delivered, row.reported_sent),
        ("opens", row.counted_opened, row.reported_opened),
    ] {
        match reported.cmp(&counted) {
            std::cmp::Ordering::Less => parts.push(format!(
                "carrier under-reports {what} by {}",
                counted - reported
            )),
            std::cmp::Ordering::Greater => parts.push(format!(
                "carrier reports {} {what} the relay has no receipt for",
                reported - counted
            )),
            std::cmp::Ordering::Equal => {}
        }
    }
    if parts.is_empty() {
        return "agrees".to_owned();
    }
    let mut finding = parts.join("; ");
    if row.all_carriers {
        finding.push_str(
            " (sent over every carrier: a person reached twice is counted at the first carrier only)",
        );
    }
    finding
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_textbook_values() {
        // 8 of 10: the standard worked example, [0.490, 0.943].
        let e = wilson(8, 10).unwrap();
        assert!(
            (e.low - 0.4902).abs() < 1e-3 && (e.high - 0.9433).abs() < 1e-3,
            "{e:?}"
        );
        let none = wilson(0, 50).unwrap();
        assert_eq!(none.low, 0.0);
        assert!(none.high > 0.05 && none.high < 0.08, "{none:?}");
        assert!(wilson(0, 0).is_none());
    }
}
