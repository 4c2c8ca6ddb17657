//! `explain`: why and how a message went (or did not go) to one ref.

use anyhow::Result;
use chukei_proto::relay::v1 as pb;
use clap::Args;

use crate::output::print_explanation;
use crate::{Client, Out, explain};

#[derive(Args, Clone, Debug)]
pub struct Explain {
    pub message_id: String,
    pub user_ref: String,
}

impl Explain {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        let explanation = client
            .explain_delivery(pb::ExplainDeliveryRequest {
                message_id: self.message_id.clone(),
                user_ref: self.user_ref.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner();
        print_explanation(&explanation, json, out)
    }
}
