//! E-mail to a mail server over SMTP (with `lettre`): one message per
//! recipient, to the address the person gave their carrier, with a
//! Message-ID the carrier maps back (`<d{delivery}.{message}@{domain}>`).
//! The server's 2xx is delivery at the carrier's edge; a permanent refusal
//! (5xx) fails the delivery, with the reply code kept (never the reply text,
//! which may quote the address); a transient one (4xx) or a lost connection
//! puts it off. With tracking configured (`tracking`), the HTML part carries
//! the open pixel and its media link goes through the carrier.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::tracking::Signer;
use super::{GatewayArgs, GatewayMetrics, Handed};
use crate::channels::Rendered;
use crate::model::Outgoing;

/// A mail server's settings, checked.
#[derive(Clone, Debug)]
pub struct SmtpSettings {
    url: String,
    user: String,
    password: String,
    from: Mailbox,
    /// The From's domain: names the Message-IDs.
    domain: String,
    /// The domain of signed envelope senders (bounces come back there);
    /// empty: the From is the envelope sender.
    bounce_domain: String,
}

impl SmtpSettings {
    /// The `--smtp-*` and `--mail-from` flags, each error naming its flag.
    pub fn from_args(args: &GatewayArgs, url: &str) -> anyhow::Result<Self> {
        if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
            anyhow::bail!("--smtp-url: must be smtp://host:port or smtps://host:port");
        }
        let from: Mailbox = args.mail_from.parse().map_err(|_| {
            anyhow::anyhow!(
                "--mail-from: must be an address, e.g. `Example <news@mail.example.jp>`"
            )
        })?;
        let domain = from.email.domain().to_owned();
        if AsyncSmtpTransport::<Tokio1Executor>::from_url(url).is_err() {
            anyhow::bail!("--smtp-url: not a URL lettre can connect to");
        }
        Ok(Self {
            url: url.to_owned(),
            user: args.smtp_user.clone(),
            password: args.smtp_password.clone(),
            from,
            domain,
            bounce_domain: args.bounce_domain.clone(),
        })
    }
}

/// The e-mail gateway.
#[derive(Clone)]
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    settings: SmtpSettings,
    signer: Option<Signer>,
    metrics: GatewayMetrics,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("domain", &self.settings.domain)
            .finish_non_exhaustive()
    }
}

impl Smtp {
    pub fn new(
        settings: SmtpSettings,
        signer: Option<Signer>,
        metrics: GatewayMetrics,
    ) -> anyhow::Result<Self> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&settings.url)?
            .timeout(Some(Duration::from_secs(30)));
        if !settings.user.is_empty() {
            builder = builder.credentials(Credentials::new(
                settings.user.clone(),
                settings.password.clone(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            settings,
            signer,
            metrics,
        })
    }

    /// Sends the mail; its Message-ID is the id the gateway keeps.
    pub async fn hand(&self, outgoing: &Outgoing, rendered: &Rendered) -> Handed {
        let id = format!(
            "d{}.{}@{}",
            outgoing.delivery_id, outgoing.message_id, self.settings.domain
        );
        let Ok(to) = rendered.address.parse::<Mailbox>() else {
            self.count("invalid-address");
            return Handed::Refused("the subscriber's e-mail address is not valid".into());
        };
        let (plain, html) = self.bodies(&id, &outgoing.text, &rendered.media_url);
        let envelope_sender = match &self.signer {
            Some(signer) if !self.settings.bounce_domain.is_empty() => signer
                .bounce_address(outgoing.delivery_id, &self.settings.bounce_domain)
                .parse()
                .ok(),
            _ => Some(self.settings.from.email.clone()),
        };
        let Ok(envelope) = Envelope::new(envelope_sender, vec![to.email.clone()]) else {
            return Handed::Refused("no envelope for the mail".into());
        };
        let message = Message::builder()
            .from(self.settings.from.clone())
            .to(to)
            .subject(&rendered.subject)
            .message_id(Some(format!("<{id}>")))
            .multipart(MultiPart::alternative_plain_html(plain, html));
        let message = match message {
            Ok(message) => message,
            Err(error) => return Handed::Refused(format!("the mail could not be built: {error}")),
        };
        let sent = self
            .transport
            .send_raw(&envelope, &message.formatted())
            .await;
        match sent {
            Ok(response) => {
                self.count(&response.code().to_string());
                Handed::Delivered(vec![id])
            }
            Err(error) => {
                let code = error
                    .status()
                    .map_or_else(|| "no reply".to_owned(), |code| code.to_string());
                self.count(&code);
                if error.is_permanent() {
                    Handed::Refused(format!("SMTP {code}"))
                } else {
                    Handed::Later(format!("SMTP {code}"))
                }
            }
        }
    }

    /// The text and HTML parts: the message, its media link (through the
    /// carrier when tracked) and, when tracked, the open pixel.
    fn bodies(&self, id: &str, text: &str, media_url: &str) -> (String, String) {
        let signer = self.signer.as_ref().filter(|signer| signer.tracks());
        let link = match (signer, media_url) {
            (_, "") => None,
            (Some(signer), url) => Some(signer.click_url(id, url)),
            (None, url) => Some(url.to_owned()),
        };
        let mut plain = text.to_owned();
        let mut html = format!(
            "<!doctype html><html><body><p>{}</p>",
            escape(text).replace('\n', "<br>")
        );
        if let Some(link) = &link {
            plain.push_str("\n\n");
            plain.push_str(link);
            html.push_str(&format!(
                "<p><a href=\"{}\">{}</a></p>",
                escape(link),
                escape(media_url)
            ));
        }
        if let Some(signer) = signer {
            html.push_str(&format!(
                "<img src=\"{}\" width=\"1\" height=\"1\" alt=\"\">",
                escape(&signer.open_url(id))
            ));
        }
        html.push_str("</body></html>");
        (plain, html)
    }

    fn count(&self, status: &str) {
        self.metrics
            .submits
            .inc(&[("gateway", "smtp"), ("status", status)]);
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
