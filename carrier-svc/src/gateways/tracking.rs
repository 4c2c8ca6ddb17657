//! Opens of e-mail: each mail carries a 1×1 image and, for its media, a
//! link through the carrier; fetching either is a read of that mail. Each
//! link names the mail's Message-ID (no address, no person) and is signed
//! with `--tracking-secret` (HMAC-SHA-256), so a guessed or altered link is
//! refused and fakes no read.
//!
//! `GET /o/<token>.gif` answers the image; `GET /c/<token>` redirects to the
//! link's target. Both report a read to the e-mail gateway.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use hmac::{KeyInit, Mac};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{GatewayArgs, Outcome, Report};
use chukei_proto::http::{Request, Response, response};

/// Signs and checks tracking links.
#[derive(Clone, Debug)]
pub struct Signer {
    key: Arc<[u8]>,
    /// The endpoint as mail readers reach it, without a trailing slash.
    base: Arc<str>,
}

/// The smallest transparent GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Bytes of the HMAC kept in a link.
const TAG_BYTES: usize = 16;
/// Bytes of the HMAC kept in a bounce address (a local part holds 64
/// characters at most).
const BOUNCE_TAG_BYTES: usize = 10;

impl Signer {
    /// The `--tracking-*` flags, each error naming its flag (the URL only
    /// when links are served).
    pub fn from_args(args: &GatewayArgs) -> anyhow::Result<Self> {
        let base = args.tracking_url.trim_end_matches('/');
        let links = args.tracking_listen.is_some() || !base.is_empty();
        if links
            && (!(base.starts_with("http://") || base.starts_with("https://"))
                || base.contains('?'))
        {
            anyhow::bail!("--tracking-url: must be an http(s) URL without a query");
        }
        if args.tracking_secret.len() < 32 {
            anyhow::bail!("--tracking-secret: must be at least 32 characters");
        }
        Ok(Self {
            key: args.tracking_secret.as_bytes().into(),
            base: base.into(),
        })
    }

    /// Whether mails carry tracking links (a `--tracking-url` is set).
    pub fn tracks(&self) -> bool {
        !self.base.is_empty()
    }

    /// The signed envelope sender (VERP) of delivery `delivery_id`'s mail:
    /// `b<delivery>.<tag>@domain`, the tag in lower-case hex (mail systems
    /// may change a local part's case).
    pub fn bounce_address(&self, delivery_id: u64, domain: &str) -> String {
        format!("{}@{domain}", self.bounce_local_part(delivery_id))
    }

    fn bounce_local_part(&self, delivery_id: u64) -> String {
        let tag = self
            .mac(format!("bounce:{delivery_id}").as_bytes())
            .finalize()
            .into_bytes();
        let hex: String = tag[..BOUNCE_TAG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("b{delivery_id}.{hex}")
    }

    /// The delivery a bounce address's local part names, if its tag verifies.
    pub fn verify_bounce(&self, local_part: &str) -> Option<u64> {
        let local_part = local_part.to_ascii_lowercase();
        let (delivery, _) = local_part.strip_prefix('b')?.split_once('.')?;
        let delivery_id: u64 = delivery.parse().ok()?;
        // Compared in constant time through the MAC.
        let tag = local_part.rsplit_once('.')?.1;
        let bytes: Option<Vec<u8>> = (0..tag.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(tag.get(i..i + 2)?, 16).ok())
            .collect();
        let bytes = bytes?;
        (bytes.len() == BOUNCE_TAG_BYTES).then_some(())?;
        self.mac(format!("bounce:{delivery_id}").as_bytes())
            .verify_truncated_left(&bytes)
            .ok()?;
        Some(delivery_id)
    }

    /// The image link of the mail `message_id` names.
    pub fn open_url(&self, message_id: &str) -> String {
        format!("{}/o/{}.gif", self.base, self.token(message_id.as_bytes()))
    }

    /// A link through the carrier to `target`, counted as a read of the mail.
    pub fn click_url(&self, message_id: &str, target: &str) -> String {
        let payload = format!("{message_id}\n{target}");
        format!("{}/c/{}", self.base, self.token(payload.as_bytes()))
    }

    fn mac(&self, payload: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(payload);
        mac
    }

    fn token(&self, payload: &[u8]) -> String {
        let tag = self.mac(payload).finalize().into_bytes();
        format!(
            "{}.{}",
            BASE64URL.encode(payload),
            BASE64URL.encode(&tag[..TAG_BYTES])
        )
    }

    /// The payload of a token signed with this key.
    fn verify(&self, token: &str) -> Option<String> {
        let (payload, tag) = token.split_once('.')?;
        let payload = BASE64URL.decode(payload).ok()?;
        let tag = BASE64URL.decode(tag).ok()?;
        (tag.len() == TAG_BYTES).then_some(())?;
        self.mac(&payload).verify_truncated_left(&tag).ok()?;
        String::from_utf8(payload).ok()
    }

    /// What a request asks: the read it reports and the answer it gets.
    fn answer(&self, path: &str) -> Option<(String, Response)> {
        if let Some(token) = path.strip_prefix("/o/") {
            let message_id = self.verify(token.strip_suffix(".gif").unwrap_or(token))?;
            let mut image = response(200, "image/gif", PIXEL);
            image.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            return Some((message_id, image));
        }
        let token = path.strip_prefix("/c/")?;
        let payload = self.verify(token)?;
        let (message_id, target) = payload.split_once('\n')?;
        let location = http::HeaderValue::from_str(target).ok()?;
        let mut redirect = response(302, "text/plain", "");
        redirect
            .headers_mut()
            .insert(http::header::LOCATION, location);
        Some((message_id.to_owned(), redirect))
    }
}

/// Serves the tracking links on `listener` until `cancel`; each valid one
/// fetched reports a read to `reports`.
pub async fn serve(
    listener: TcpListener,
    signer: Signer,
    reports: mpsc::Sender<Report>,
    cancel: CancellationToken,
) {
    chukei_proto::http::serve(listener, cancel, move |request: Request| {
        let signer = signer.clone();
        let reports = reports.clone();
        async move {
            if request.method() != http::Method::GET {
                return response(405, "text/plain", "GET only\n");
            }
            match signer.answer(request.uri().path()) {
                Some((message_id, answer)) => {
                    let read = Report::new(message_id, Outcome::Read, String::new(), None);
                    if reports.send(read).await.is_err() {
                        return response(503, "text/plain", "shutting down\n");
                    }
                    answer
                }
                None => response(404, "text/plain", "not found\n"),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> Signer {
        Signer::from_args(&GatewayArgs {
            tracking_url: "https://t.example/".into(),
            tracking_secret: secret.into(),
            ..GatewayArgs::default()
        })
        .unwrap()
    }

    #[test]
    fn signed_links_are_answered_and_others_are_not() {
        let signer = signer(&"k".repeat(32));
        let open = signer.open_url("d7.m1@mail.example");
        let path = open.strip_prefix("https://t.example").unwrap();
        let (id, answer) = signer.answer(path).unwrap();
        assert_eq!(id, "d7.m1@mail.example");
        assert_eq!(answer.status(), 200);

        let click = signer.click_url("d7.m1@mail.example", "https://shop.example/a?b=1");
        let (id, answer) = signer
            .answer(click.strip_prefix("https://t.example").unwrap())
            .unwrap();
        assert_eq!(id, "d7.m1@mail.example");
        assert_eq!(answer.headers()["location"], "https://shop.example/a?b=1");

        // Another key's link, a tampered id, a guessed tag: refused.
        let other = signer_with_other_key(path);
        assert!(other.is_none());
        let (payload, tag) = path.trim_start_matches("/o/").split_once('.').unwrap();
        let forged = format!("/o/{}.{tag}", BASE64URL.encode("d8.m1@mail.example"));
        assert!(signer.answer(&forged).is_none());
        assert!(
            signer
                .answer(&format!("/o/{payload}.AAAAAAAAAAAAAAAAAAAAAA.gif"))
                .is_none()
        );
        assert!(signer.answer("/o/.gif").is_none());
    }

    fn signer_with_other_key(path: &str) -> Option<(String, Response)> {
        signer(&"x".repeat(32)).answer(path)
    }

    #[test]
    fn bounce_addresses_verify_and_forged_ones_do_not() {
        let signer = signer(&"k".repeat(32));
        let address = signer.bounce_address(4_294_967_301, "bounces.example");
        let local = address.split('@').next().unwrap();
        assert!(local.len() <= 64);
        assert_eq!(signer.verify_bounce(local), Some(4_294_967_301));
        assert_eq!(
            signer.verify_bounce(&local.to_ascii_uppercase()),
            Some(4_294_967_301)
        );
        let other = local.replacen("b4294967301", "b4294967302", 1);
        assert_eq!(signer.verify_bounce(&other), None);
        assert_eq!(signer.verify_bounce("b1.00"), None);
        assert_eq!(signer.verify_bounce("postmaster"), None);
    }

    #[test]
    fn flags_are_checked() {
        let args = |url: &str, secret: &str| GatewayArgs {
            tracking_url: url.into(),
            tracking_secret: secret.into(),
            ..GatewayArgs::default()
        };
        let error = Signer::from_args(&args("https://t.example", "short")).unwrap_err();
        assert!(error.to_string().starts_with("--tracking-secret:"));
        let error = Signer::from_args(&args("t.example", &"k".repeat(32))).unwrap_err();
        assert!(error.to_string().starts_with("--tracking-url:"));
    }
}
