//! `status`: a message's state and counts, once or until it is done.

use std::time::Duration;

use anyhow::Result;
use chukei_proto::relay::v1 as pb;
use clap::Args;

use crate::output::print_status;
use crate::{Client, Out, explain};

#[derive(Args, Clone, Debug)]
pub struct Status {
    pub message_id: String,
    /// Keep showing progress until every recipient is delivered (or failed).
    #[arg(long)]
    pub watch: bool,
    /// Between refreshes with --watch (ms).
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

impl Status {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        loop {
            let status = client
                .get_message(pb::GetMessageRequest {
                    message_id: self.message_id.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            print_status(&status, json, out)?;
            let done = status.state == pb::MessageState::HandedOver as i32
                && status.delivered + status.failed + status.expired + status.skipped
                    >= status.matched;
            if !self.watch || done {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(self.interval_ms)).await;
        }
    }
}
