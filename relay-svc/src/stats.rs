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

use std::collections::{BTreeMap, HashSet};

use chukei_proto::common::v1::Channel as WireChannel;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::storage::{Cube, Reconciliation, Store, SummedCells};

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
    fn enterprise_id(&self) -> Option<&str> {
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
    fn cube(&self) -> Cube {
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

/// Answers `query` for `viewer` from the rollups.
pub async fn breakdown(
    store: &Store,
    viewer: &Viewer,
    query: &Query,
    thresholds: Thresholds,
) -> Result<Vec<Row>> {
    let enterprise = viewer.enterprise_id();
    let (columns, summed) = if query.by.contains(&Dimension::User) {
        let by_channel = query.by.contains(&Dimension::Channel);
        let columns = if by_channel {
            vec!["user_id", "channel"]
        } else {
            vec!["user_id"]
        };
        (columns, store.sum_people(enterprise, by_channel).await?)
    } else {
        let cube = query.cube();
        let mut columns: Vec<&str> = Vec::new();
        for dimension in &query.by {
            if !columns.contains(&dimension.column(cube)) {
                columns.push(dimension.column(cube));
            }
        }
        let unit = cube.time_unit_ms();
        let since = query.since.div_euclid(unit);
        let until = (query.until + unit - 1).div_euclid(unit);
        let summed = store
            .sum_cells(cube, enterprise, &columns, since, until)
            .await?;
        (columns, summed)
    };
    Ok(fold(query, &columns, summed, thresholds))
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

/// A label and the position it sorts at (numeric where the label is).
type Label = (i64, String);

/// Turns summed rollup groups into labelled, estimated, suppressed rows.
fn fold(
    query: &Query,
    columns: &[&str],
    summed: Vec<SummedCells>,
    thresholds: Thresholds,
) -> Vec<Row> {
    let open_hour_at = query.by.iter().position(|d| *d == Dimension::OpenHour);
    // With open hours, sends and deliveries (which have none) belong to the
    // group without the open hour, and each open hour shows its opens of it.
    let mut groups: BTreeMap<Vec<Label>, [u64; 3]> = BTreeMap::new();
    let mut bases: BTreeMap<Vec<Label>, [u64; 2]> = BTreeMap::new();
    for cells in summed {
        let key: Vec<Label> = query
            .by
            .iter()
            .map(|dimension| {
                let column = if query.by.contains(&Dimension::User) {
                    dimension.column(Cube::Time)
                } else {
                    dimension.column(query.cube())
                };
                let index = columns
                    .iter()
                    .position(|c| *c == column)
                    .expect("every dimension's column was selected");
                label(*dimension, &cells.values[index], &query.zone)
            })
            .collect();
        match open_hour_at {
            Some(position) => {
                let mut base = key.clone();
                base.remove(position);
                let totals = bases.entry(base).or_default();
                totals[0] += cells.sent;
                totals[1] += cells.delivered;
                if cells.opened > 0 {
                    groups.entry(key).or_default()[2] += cells.opened;
                }
            }
            None => {
                let counts = groups.entry(key).or_default();
                counts[0] += cells.sent;
                counts[1] += cells.delivered;
                counts[2] += cells.opened;
            }
        }
    }
    if let Some(position) = open_hour_at {
        let opened_bases: std::collections::BTreeSet<Vec<Label>> = groups
            .keys()
            .map(|key| {
                let mut base = key.clone();
                base.remove(position);
                base
            })
            .collect();
        for (base, [sent, delivered]) in &bases {
            if !opened_bases.contains(base) {
                let mut key = base.clone();
                key.insert(position, (-1, "-".to_owned()));
                groups.insert(key, [*sent, *delivered, 0]);
            }
        }
        for (key, counts) in groups.iter_mut() {
            let mut base = key.clone();
            base.remove(position);
            if let Some([sent, delivered]) = bases.get(&base) {
                counts[0] = *sent;
                counts[1] = *delivered;
            }
        }
    }
    let about_people = query.by.iter().any(|d| d.describes_people());
    let size = |[sent, delivered, opened]: [u64; 3]| sent.max(delivered).max(opened);
    let withheld = if about_people {
        withheld_cells(
            groups.iter().map(|(key, counts)| (key, size(*counts))),
            thresholds.min_cohort,
        )
    } else {
        HashSet::new()
    };
    groups
        .into_iter()
        .map(|(key, [sent, delivered, opened])| {
            let hidden = withheld.contains(&key);
            let key = key.into_iter().map(|(_, label)| label).collect();
            if hidden {
                return Row {
                    key,
                    sent: 0,
                    delivered: 0,
                    opened: 0,
                    estimate: None,
                    low_sample: false,
                    suppressed: true,
                };
            }
            Row {
                key,
                sent,
                delivered,
                opened,
                estimate: wilson(opened, delivered),
                low_sample: delivered < thresholds.min_sample,
                suppressed: false,
            }
        })
        .collect()
}

/// The cells of a breakdown about people to withhold: every cell below
/// `min_cohort` (primary suppression), and then, while the withheld cells
/// together stay below `min_cohort`, the smallest shown cells too
/// (secondary suppression) — otherwise a withheld cell could be recovered
/// by subtracting the shown ones from a total the enterprise knows.
fn withheld_cells<'a, K: Ord + Clone + std::hash::Hash + 'a>(
    cells: impl Iterator<Item = (&'a K, u64)>,
    min_cohort: u64,
) -> HashSet<K> {
    let mut cells: Vec<(&K, u64)> = cells.collect();
    cells.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    let mut withheld = HashSet::new();
    let mut withheld_size = 0;
    for (key, size) in cells {
        let needed = size < min_cohort || (!withheld.is_empty() && withheld_size < min_cohort);
        if !needed {
            break;
        }
        withheld.insert(key.clone());
        withheld_size += size;
    }
    withheld
}

/// How `value` (a rollup column's text) reads for `dimension`.
fn label(dimension: Dimension, value: &str, zone: &TimeZone) -> Label {
    let number = value.parse::<i64>().ok();
    let local = |hour: i64| {
        Timestamp::from_millisecond(hour * HOUR_MS)
            .ok()
            .map(|at| at.to_zoned(zone.clone()))
    };
    let unknown = || (i64::MIN, "-".to_owned());
    match dimension {
        Dimension::Channel => {
            let n = number.unwrap_or(0);
            (n, WireChannel::short_name_of(n as i32).to_owned())
        }
        Dimension::SendHour | Dimension::OpenHour => {
            match number.filter(|h| *h >= 0).and_then(local) {
                Some(at) => (i64::from(at.hour()), format!("{:02}", at.hour())),
                None => unknown(),
            }
        }
        Dimension::Weekday => match number.and_then(local) {
            Some(at) => {
                let day = at.weekday();
                (
                    i64::from(day.to_monday_zero_offset()),
                    format!("{day:?}")[..3].to_owned(),
                )
            }
            None => unknown(),
        },
        Dimension::Day => match number.and_then(local) {
            Some(at) => (0, at.date().to_string()),
            None => unknown(),
        },
        Dimension::Age => match number.filter(|a| *a >= 0) {
            Some(decade) => (decade, format!("{decade}s")),
            None => unknown(),
        },
        _ if value.is_empty() => unknown(),
        _ => (0, value.to_owned()),
    }
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

    fn cells(values: &[&str], sent: u64, delivered: u64, opened: u64) -> SummedCells {
        SummedCells {
            values: values.iter().map(|v| v.to_string()).collect(),
            sent,
            delivered,
            opened,
        }
    }

    #[test]
    fn hours_and_weekdays_are_read_in_the_requested_zone() {
        // Hour 0 of the epoch: 1970-01-01 00:00 UTC, a Thursday; 09:00 in Tokyo.
        let viewer = Viewer::Operator(None);
        let tokyo = Query::new(
            vec![Dimension::Weekday, Dimension::SendHour],
            0,
            1,
            "Asia/Tokyo",
            &viewer,
        )
        .unwrap();
        let rows = fold(
            &tokyo,
            &["send_hour"],
            vec![cells(&["0"], 10, 10, 5), cells(&["20"], 4, 4, 0)],
            Thresholds::default(),
        );
        let keys: Vec<Vec<String>> = rows.iter().map(|r| r.key.clone()).collect();
        assert_eq!(keys, vec![vec!["Thu", "09"], vec!["Fri", "05"]]);
    }

    #[test]
    fn open_hours_share_their_groups_deliveries() {
        let viewer = Viewer::Operator(None);
        let query = Query::new(
            vec![Dimension::Channel, Dimension::OpenHour],
            0,
            1,
            "",
            &viewer,
        )
        .unwrap();
        let rows = fold(
            &query,
            &["channel", "open_hour"],
            vec![
                cells(&["1", "-1"], 100, 90, 0),
                cells(&["1", "10"], 0, 0, 30),
                cells(&["1", "11"], 0, 0, 15),
                cells(&["2", "-1"], 20, 20, 0),
            ],
            Thresholds::default(),
        );
        let summary: Vec<(Vec<String>, u64, u64)> = rows
            .iter()
            .map(|r| (r.key.clone(), r.delivered, r.opened))
            .collect();
        assert_eq!(
            summary,
            vec![
                (vec!["rcs".into(), "10".into()], 90, 30),
                (vec!["rcs".into(), "11".into()], 90, 15),
                (vec!["sms".into(), "-".into()], 20, 0),
            ]
        );
    }

    #[test]
    fn small_attribute_cells_are_withheld_and_small_samples_marked() {
        let viewer = Viewer::Enterprise("e".into());
        let query = Query::new(vec![Dimension::Gender], 0, 1, "", &viewer).unwrap();
        let rows = fold(
            &query,
            &["gender"],
            vec![
                cells(&["f"], 12, 12, 3),
                cells(&["m"], 11, 11, 2),
                cells(&["x"], 3, 3, 1),
                cells(&[""], 40, 40, 8),
            ],
            Thresholds::default(),
        );
        assert_eq!(rows[0].key, vec!["-"]);
        assert!(!rows[0].low_sample && rows[0].estimate.is_some());
        assert!(rows[1].low_sample && !rows[1].suppressed);
        // x (3) is below the cohort; m (11), the next smallest, is withheld
        // too, or x would be the total less the rest.
        for row in &rows[2..] {
            assert!(row.suppressed && row.estimate.is_none() && row.opened == 0);
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        let enterprise = Viewer::Enterprise("e".into());
        let error = |by: Vec<Dimension>, zone: &str, since: i64| {
            Query::new(by, since, 10, zone, &enterprise)
                .unwrap_err()
                .to_string()
        };
        assert!(error(vec![Dimension::Carrier], "", 0).starts_with("by[0]: carrier"));
        assert!(error(vec![Dimension::User, Dimension::Place], "", 0).starts_with("by: user"));
        assert!(
            error(vec![Dimension::Gender, Dimension::SendHour], "", 0)
                .starts_with("by: gender combines only with channel, day, weekday")
        );
        assert!(error(vec![Dimension::Channel, Dimension::Channel], "", 0).starts_with("by[1]"));
        assert!(error(vec![], "Mars/Olympus", 0).starts_with("zone:"));
        assert!(error(vec![], "", 10).starts_with("since:"));
    }

    #[test]
    fn a_withheld_cell_cannot_be_recovered_by_subtraction() {
        let cells = [("a", 3_u64), ("b", 40), ("c", 25), ("d", 12)];
        let withheld = withheld_cells(cells.iter().map(|(k, n)| (k, *n)), 10);
        // a (3) alone could be recovered from the total: d (12) goes too.
        assert_eq!(withheld, HashSet::from(["a", "d"]));
        let all_large = [("a", 10_u64), ("b", 40)];
        assert!(withheld_cells(all_large.iter().map(|(k, n)| (k, *n)), 10).is_empty());
        let two_small = [("a", 6_u64), ("b", 5), ("c", 40)];
        assert_eq!(
            withheld_cells(two_small.iter().map(|(k, n)| (k, *n)), 10),
            HashSet::from(["a", "b"])
        );
    }
}
