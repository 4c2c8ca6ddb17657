//! `send`: one message, a quote for it, or one message per line of a file.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::output::{print_quote, state_name};
use crate::{Client, Out, batch, explain, send_request};

#[derive(Args, Clone, Debug)]
pub struct SendArgs {
    /// The message text.
    #[arg(long, required_unless_present = "from_file")]
    pub text: Option<String>,
    /// One message per line of this file, over one stream: CSV with a header
    /// row (columns ref, text, and optionally idempotency_key, subject,
    /// channel) or JSON lines ({"ref": …, "text": …}); the other options are
    /// every line's template. Each line's key defaults to FILE-NAME:LINE, so
    /// sending the file again sends nothing twice.
    #[arg(long, conflicts_with_all = ["all", "service", "segment", "refs", "quote", "idempotency_key"])]
    pub from_file: Option<std::path::PathBuf>,
    /// Where --from-file writes each line's outcome, as JSON lines (default:
    /// FILE.results.jsonl).
    #[arg(long, requires = "from_file")]
    pub results: Option<std::path::PathBuf>,
    #[arg(long)]
    pub media_url: Option<String>,
    /// E-mail subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// An RCS suggested reply (repeat for several).
    #[arg(long = "reply")]
    pub replies: Vec<String>,
    /// rcs, sms, sns or email (default: each carrier's default).
    #[arg(long, conflicts_with = "channels")]
    pub channel: Option<String>,
    /// Channels in order for the policy, e.g. rcs,sms.
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// fixed, most-used, fallback, multi, resend or best (default: fixed).
    #[arg(long)]
    pub policy: Option<String>,
    /// fallback/resend: how long an attempt waits for an open, e.g. 30m, 2h.
    #[arg(long)]
    pub timeout: Option<String>,
    /// resend: at most this many extra sends.
    #[arg(long)]
    pub max_resends: Option<u32>,
    /// resend: keep sending until `opened` (default) or `delivered`.
    #[arg(long)]
    pub resend_until: Option<String>,
    /// A daily local window "18:00-21:00" (with --zone), or an absolute one
    /// "2026-11-27T09:00:00Z/2026-11-27T12:00:00Z".
    #[arg(long)]
    pub window: Option<String>,
    /// IANA zone of a daily window, e.g. Asia/Tokyo.
    #[arg(long, default_value = "UTC")]
    pub zone: String,
    /// Where the window is applied: relay (held before hand-over) or carrier.
    #[arg(long, default_value = "relay")]
    pub window_at: String,
    /// Not delivered within this long after sending: expired, e.g. 2d.
    #[arg(long, conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Not delivered by this instant (RFC 3339): expired.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// A follow-up text sent to each person who opens the message.
    #[arg(long)]
    pub follow_up: Option<String>,
    /// How long after the open the follow-up goes, e.g. 1h.
    #[arg(long, default_value = "0s", requires = "follow_up")]
    pub follow_up_delay: String,
    /// The follow-up's channel (default: the channel opened).
    #[arg(long, requires = "follow_up")]
    pub follow_up_channel: Option<String>,
    /// low, normal or high: low is the first a tired person stops getting.
    #[arg(long)]
    pub priority: Option<String>,
    /// Send each person at the hour of day they open most, within this
    /// horizon (at most 24h), e.g. 24h.
    #[arg(long, conflicts_with_all = ["window", "place_hour_min_rate"])]
    pub best_hour_within: Option<String>,
    /// Only people whose current place opens at least this share (0–1) at some
    /// hour within --place-hour-within, each at the best such hour.
    #[arg(long, conflicts_with = "window")]
    pub place_hour_min_rate: Option<f64>,
    /// The horizon of --place-hour-min-rate (at most 24h).
    #[arg(long, default_value = "24h", requires = "place_hour_min_rate")]
    pub place_hour_within: String,
    /// Deliver over every carrier a person is contracted with, not only the primary.
    #[arg(long)]
    pub all_carriers: bool,
    /// Makes a retry safe: the same key and message give the same message id (default: fresh).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A winning bid id: the message goes in the bid's slot and draws on its capacity.
    #[arg(long)]
    pub bid: Option<String>,
    /// Price the message for its current target instead of sending it.
    #[arg(long)]
    pub quote: bool,
    /// Everyone registered with you.
    #[arg(long, conflicts_with_all = ["service", "segment", "refs"])]
    pub all: bool,
    /// Everyone registered with this service.
    #[arg(long, conflicts_with_all = ["segment", "refs"])]
    pub service: Option<String>,
    /// An attribute segment, e.g. "gender=f,age=30-39,region=tokyo|osaka,occupation=engineer".
    #[arg(long, conflicts_with = "refs")]
    pub segment: Option<String>,
    /// Specific users, by your refs.
    pub refs: Vec<String>,
}

impl SendArgs {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        if self.quote {
            let quote = client
                .quote_message(send_request(self)?)
                .await
                .map_err(explain)?
                .into_inner();
            return print_quote(&quote, json, out);
        }
        if let Some(file) = &self.from_file {
            return batch::send_file(client, self, file, out).await;
        }
        let response = client
            .send_message(send_request(self)?)
            .await
            .map_err(explain)?
            .into_inner();
        if json {
            writeln!(
                out,
                "{}",
                json!({
                    "message_id": response.message_id,
                    "state": state_name(response.state),
                    "matched": response.matched,
                })
            )?;
        } else {
            writeln!(out, "message_id  {}", response.message_id)?;
            writeln!(out, "state       {}", state_name(response.state))?;
            let matched = response
                .matched
                .map_or_else(|| "(being extracted)".to_owned(), |m| m.to_string());
            writeln!(out, "matched     {matched}")?;
        }
        Ok(())
    }
}
