//! `registrations`: your registered users, by ref, a page or all pages.

use anyhow::Result;
use chukei_proto::relay::v1 as pb;
use clap::Args;
use serde_json::json;

use crate::{Client, Out, explain};

#[derive(Args, Clone, Debug)]
pub struct Registrations {
    /// Only users of this service.
    #[arg(long)]
    pub service: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Follow every page instead of printing the first.
    #[arg(long)]
    pub all_pages: bool,
}

impl Registrations {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        let mut token = String::new();
        let mut rows = Vec::new();
        loop {
            let page = client
                .list_registrations(pb::ListRegistrationsRequest {
                    page_size: self.page_size,
                    page_token: token.clone(),
                    service_id: self.service.clone().unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            rows.extend(page.registrations);
            token = page.next_page_token;
            if token.is_empty() || !self.all_pages {
                break;
            }
        }
        if json {
            let rows: Vec<_> = rows
                .iter()
                .map(|r| json!({"user_ref": r.user_ref, "service_id": r.service_id, "registered_at": r.registered_at.as_ref().map(|t| t.seconds)}))
                .collect();
            writeln!(
                out,
                "{}",
                json!({"registrations": rows, "next_page_token": token})
            )?;
        } else {
            writeln!(
                out,
                "{:<28}  {:<40}  registered_at",
                "user_ref", "service_id"
            )?;
            for r in &rows {
                let service = if r.service_id.is_empty() {
                    "-"
                } else {
                    &r.service_id
                };
                writeln!(
                    out,
                    "{:<28}  {:<40}  {}",
                    r.user_ref,
                    service,
                    r.registered_at.as_ref().map_or(0, |t| t.seconds)
                )?;
            }
            if !token.is_empty() {
                writeln!(out, "(more: --all-pages)")?;
            }
        }
        Ok(())
    }
}
