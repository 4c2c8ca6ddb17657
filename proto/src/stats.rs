//! `GetStats` as both clients of the relay present it: the dimension names
//! (`--by` on the command line, `by=` over REST) and the CSV form of an
//! answer.

use crate::relay::v1 as pb;

/// Each dimension by the name the relay gives its column.
pub const DIMENSIONS: [(&str, pb::StatsDimension); 11] = [
    ("channel", pb::StatsDimension::Channel),
    ("hour", pb::StatsDimension::SendHour),
    ("open_hour", pb::StatsDimension::OpenHour),
    ("weekday", pb::StatsDimension::Weekday),
    ("day", pb::StatsDimension::Day),
    ("place", pb::StatsDimension::Place),
    ("gender", pb::StatsDimension::Gender),
    ("age", pb::StatsDimension::Age),
    ("region", pb::StatsDimension::Region),
    ("occupation", pb::StatsDimension::Occupation),
    ("user", pb::StatsDimension::User),
];

/// The dimension called `name`.
pub fn dimension(name: &str) -> Option<pb::StatsDimension> {
    DIMENSIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, dimension)| *dimension)
}

/// Every dimension's name, comma-separated (for an error that lists them).
pub fn dimension_names() -> String {
    DIMENSIONS.map(|(name, _)| name).join(", ")
}

/// The answer as CSV: the columns, then sent, delivered, opened, open_rate,
/// low, high (4 decimals; empty without deliveries), low_sample, suppressed.
pub fn csv(stats: &pb::GetStatsResponse) -> String {
    let mut header: Vec<String> = stats.columns.iter().map(|c| csv_field(c)).collect();
    header.extend(
        [
            "sent",
            "delivered",
            "opened",
            "open_rate",
            "low",
            "high",
            "low_sample",
            "suppressed",
        ]
        .map(String::from),
    );
    let mut text = header.join(",") + "\n";
    for row in &stats.rows {
        let mut fields: Vec<String> = row.key.iter().map(|k| csv_field(k)).collect();
        fields.extend([
            row.sent.to_string(),
            row.delivered.to_string(),
            row.opened.to_string(),
        ]);
        match row.open_rate {
            Some(r) => fields.extend([r.rate, r.low, r.high].map(|v| format!("{v:.4}"))),
            None => fields.extend(["", "", ""].map(String::from)),
        }
        fields.extend([row.low_sample.to_string(), row.suppressed.to_string()]);
        text.push_str(&fields.join(","));
        text.push('\n');
    }
    text
}

/// A CSV field, quoted when it must be.
pub fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_with_and_without_a_rate() {
        let stats = pb::GetStatsResponse {
            columns: vec!["region".into()],
            rows: vec![
                pb::StatsRow {
                    key: vec!["tokyo, chiyoda".into()],
                    sent: 10,
                    delivered: 8,
                    opened: 4,
                    open_rate: Some(pb::RateEstimate {
                        rate: 0.5,
                        low: 0.2,
                        high: 0.8,
                    }),
                    low_sample: true,
                    suppressed: false,
                },
                pb::StatsRow {
                    key: vec!["-".into()],
                    ..Default::default()
                },
            ],
            min_cohort: 5,
            min_sample: 30,
        };
        assert_eq!(
            csv(&stats),
            "region,sent,delivered,opened,open_rate,low,high,low_sample,suppressed\n\
             \"tokyo, chiyoda\",10,8,4,0.5000,0.2000,0.8000,true,false\n\
             -,0,0,0,,,,false,false\n"
        );
        assert_eq!(dimension("hour"), Some(pb::StatsDimension::SendHour));
        assert_eq!(dimension("colour"), None);
    }
}
