//! A breakdown's rows from summed rollup groups: each column's value as a
//! label in the viewer's zone, open hours spread over their base groups,
//! estimates with intervals, small cohorts withheld.

use std::collections::{BTreeMap, HashSet};

use chukei_proto::common::v1::Channel as WireChannel;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::{Dimension, HOUR_MS, Query, Row, Thresholds, wilson};
use crate::storage::{Cube, SummedCells};

/// A label and the position it sorts at (numeric where the label is).
type Label = (i64, String);

/// Turns summed rollup groups into labelled, estimated, suppressed rows.
pub(super) fn fold(
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
        spread_open_hours(&mut groups, &bases, position);
    }
    to_rows(query, groups, thresholds)
}

/// With open hours in the key: every group of sends and deliveries without
/// opens gets a row of its own (open hour "-"), and each open hour's row
/// shows its base group's sends and deliveries.
fn spread_open_hours(
    groups: &mut BTreeMap<Vec<Label>, [u64; 3]>,
    bases: &BTreeMap<Vec<Label>, [u64; 2]>,
    position: usize,
) {
    {
        let opened_bases: std::collections::BTreeSet<Vec<Label>> = groups
            .keys()
            .map(|key| {
                let mut base = key.clone();
                base.remove(position);
                base
            })
            .collect();
        for (base, [sent, delivered]) in bases {
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
}

/// The groups as rows: estimated, flagged when the sample is small, and
/// withheld where they would describe too few people.
fn to_rows(
    query: &Query,
    groups: BTreeMap<Vec<Label>, [u64; 3]>,
    thresholds: Thresholds,
) -> Vec<Row> {
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
    use crate::stats::Viewer;

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
