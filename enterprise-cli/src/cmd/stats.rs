//! `stats`: sent, delivered, opened and open rate, grouped as asked.

use anyhow::Result;
use clap::Args;

use crate::output::print_stats;
use crate::{Client, Out, explain, stats_request};

#[derive(Args, Clone, Debug)]
pub struct Stats {
    /// Dimensions to group by, e.g. channel,hour (none: one total row).
    #[arg(long, value_delimiter = ',')]
    pub by: Vec<String>,
    /// Sends within this long before --until (e.g. 7d, 12h), or since an
    /// RFC 3339 instant.
    #[arg(long, default_value = "7d")]
    pub since: String,
    /// Sends before this RFC 3339 instant (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// IANA zone for hours, weekdays and days, e.g. Asia/Tokyo.
    #[arg(long, default_value = "UTC")]
    pub zone: String,
    /// Print CSV instead of a table.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
}

impl Stats {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        let request = stats_request(&self.by, &self.since, self.until.as_deref(), &self.zone)?;
        let stats = client
            .get_stats(request)
            .await
            .map_err(explain)?
            .into_inner();
        print_stats(&stats, json, self.csv, out)
    }
}
