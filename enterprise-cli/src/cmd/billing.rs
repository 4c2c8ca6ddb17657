//! `prices` and `billing`: the prices in force, and a month's charges.

use anyhow::Result;
use chukei_proto::relay::v1 as pb;
use clap::Args;

use crate::output::{print_prices, print_statement};
use crate::{Client, Out, explain};

/// The prices in force.
pub(crate) async fn prices(client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
    let table = client
        .get_prices(pb::GetPricesRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    print_prices(&table, json, out)
}

#[derive(Args, Clone, Debug)]
pub struct Billing {
    /// The month, e.g. 2026-11.
    #[arg(long)]
    pub month: String,
}

impl Billing {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        let statement = client
            .get_statement(pb::GetStatementRequest {
                month: self.month.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner();
        print_statement(&statement, json, out)
    }
}
