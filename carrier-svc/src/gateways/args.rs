//! The gateways' flags, checked.

use std::net::SocketAddr;

use super::{smpp, smtp, tracking};
use crate::model::{CHANNEL_EMAIL, CHANNEL_SMS, ChannelSet};

/// The gateways' flags (`CHUKEI_CARRIER_SMPP_*`, `CHUKEI_CARRIER_SMTP_*`,
/// `CHUKEI_CARRIER_TRACKING_*`). Without `--smpp-url` SMS goes to terminals;
/// without `--smtp-url`, e-mail does.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// The SMSC SMS goes to: `smpp://host:port`, or `smpps://host:port` over
    /// TLS (verified against the system's roots). Unset: SMS goes to terminals.
    #[arg(long, env = "CHUKEI_CARRIER_SMPP_URL")]
    pub smpp_url: Option<String>,

    /// The system_id this carrier binds with.
    #[arg(long, env = "CHUKEI_CARRIER_SMPP_SYSTEM_ID", default_value = "")]
    pub smpp_system_id: String,

    /// The bind password.
    #[arg(
        long,
        env = "CHUKEI_CARRIER_SMPP_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub smpp_password: String,

    /// The bind's system_type (empty for most SMSCs).
    #[arg(long, env = "CHUKEI_CARRIER_SMPP_SYSTEM_TYPE", default_value = "")]
    pub smpp_system_type: String,

    /// The sender of every SMS: a number, or up to 11 letters and digits.
    #[arg(
        long,
        env = "CHUKEI_CARRIER_SMPP_SOURCE_ADDR",
        default_value = "Chukei"
    )]
    pub smpp_source_addr: String,

    /// submit_sm awaiting their response at once (the SMPP window).
    #[arg(long, env = "CHUKEI_CARRIER_SMPP_WINDOW", default_value_t = 10)]
    pub smpp_window: u32,

    /// submit_sm per second at most (0: as many as the window allows).
    #[arg(long, env = "CHUKEI_CARRIER_SMPP_MAX_PER_SEC", default_value_t = 0)]
    pub smpp_max_per_sec: u32,

    /// Seconds between enquire_link keep-alives.
    #[arg(
        long,
        env = "CHUKEI_CARRIER_SMPP_ENQUIRE_LINK_SECS",
        default_value_t = 30
    )]
    pub smpp_enquire_link_secs: u64,

    /// The mail server e-mail goes to: `smtp://host:port` (STARTTLS when
    /// the server offers it, `?tls=required` to insist), or
    /// `smtps://host:port`. Unset: e-mail goes to terminals.
    #[arg(long, env = "CHUKEI_CARRIER_SMTP_URL")]
    pub smtp_url: Option<String>,

    /// SMTP AUTH user (empty: no authentication).
    #[arg(long, env = "CHUKEI_CARRIER_SMTP_USER", default_value = "")]
    pub smtp_user: String,

    #[arg(
        long,
        env = "CHUKEI_CARRIER_SMTP_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub smtp_password: String,

    /// The From of every mail, e.g. `Example <news@mail.example.jp>`; its
    /// domain names the Message-IDs.
    #[arg(long, env = "CHUKEI_CARRIER_MAIL_FROM", default_value = "")]
    pub mail_from: String,

    /// Where the open pixel and the click redirect are served (HTTP).
    /// Unset: mails carry no pixel, and opens of e-mail are not counted.
    #[arg(long, env = "CHUKEI_CARRIER_TRACKING_LISTEN")]
    pub tracking_listen: Option<SocketAddr>,

    /// The tracking endpoint's address as a mail reader reaches it, e.g.
    /// `https://t.carrier.example`.
    #[arg(long, env = "CHUKEI_CARRIER_TRACKING_URL", default_value = "")]
    pub tracking_url: String,

    /// The key tracking links and bounce addresses are signed with (at
    /// least 32 characters), so a guessed link cannot fake a read nor a
    /// forged bounce fail a delivery.
    #[arg(
        long,
        env = "CHUKEI_CARRIER_TRACKING_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub tracking_secret: String,

    /// Where bounces of accepted mail are received (SMTP): route
    /// `--bounce-domain` here. Unset: only refusals in the SMTP transaction
    /// fail a mail.
    #[arg(long, env = "CHUKEI_CARRIER_BOUNCE_LISTEN")]
    pub bounce_listen: Option<SocketAddr>,

    /// The domain of the signed envelope senders (VERP) mails go with, e.g.
    /// `bounces.carrier.example`; its mail must reach `--bounce-listen`.
    #[arg(long, env = "CHUKEI_CARRIER_BOUNCE_DOMAIN", default_value = "")]
    pub bounce_domain: String,
}

impl Default for GatewayArgs {
    /// No gateway: every channel goes to terminals.
    fn default() -> Self {
        Self {
            smpp_url: None,
            smpp_system_id: String::new(),
            smpp_password: String::new(),
            smpp_system_type: String::new(),
            smpp_source_addr: "Chukei".into(),
            smpp_window: 10,
            smpp_max_per_sec: 0,
            smpp_enquire_link_secs: 30,
            smtp_url: None,
            smtp_user: String::new(),
            smtp_password: String::new(),
            mail_from: String::new(),
            tracking_listen: None,
            tracking_url: String::new(),
            tracking_secret: String::new(),
            bounce_listen: None,
            bounce_domain: String::new(),
        }
    }
}

impl GatewayArgs {
    /// Checks every flag a configured gateway needs; each error names its flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.smpp_url {
            smpp::SmppSettings::from_args(self, url)?;
        }
        if let Some(url) = &self.smtp_url {
            smtp::SmtpSettings::from_args(self, url)?;
        }
        if self.bounce_listen.is_some() == self.bounce_domain.is_empty() {
            anyhow::bail!("--bounce-domain: needed with --bounce-listen, and only with it");
        }
        if !self.bounce_domain.is_empty()
            && !self.bounce_domain.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            anyhow::bail!("--bounce-domain: must be a domain name, e.g. bounces.carrier.example");
        }
        if self.signs() {
            tracking::Signer::from_args(self)?;
        }
        Ok(())
    }

    /// Whether anything is signed: tracking links or bounce addresses.
    pub(super) fn signs(&self) -> bool {
        self.tracking_listen.is_some()
            || !self.tracking_url.is_empty()
            || self.bounce_listen.is_some()
    }

    /// The channels a gateway serves (the terminals get the others).
    pub fn channels(&self) -> ChannelSet {
        let mut set = ChannelSet::EMPTY;
        if self.smpp_url.is_some() {
            set = set.with(CHANNEL_SMS);
        }
        if self.smtp_url.is_some() {
            set = set.with(CHANNEL_EMAIL);
        }
        set
    }
}
