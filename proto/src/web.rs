//! What the two web pages share — a carrier's consent page and the relay's
//! enterprise console: sessions in signed cookies, CSRF tokens, the cookie
//! and security headers every page answers with, and the style sheet.
//!
//! Pages are server-rendered HTML with plain forms: no script runs, so the
//! content security policy allows none. Every form that changes something
//! carries a CSRF token bound to the session; cookies are `HttpOnly`,
//! `SameSite=Strict`, and `Secure` when the page is served over TLS.

use std::sync::Arc;

use hmac::{KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The style sheet both pages link (`/…/style.css`).
pub const STYLE: &str = include_str!("web.css");

/// Signs session values with a key (HMAC-SHA-256), so a cookie cannot be
/// forged or altered, and derives each session's CSRF token.
#[derive(Clone)]
pub struct Signer {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer with `secret`, or with a random key when none is given
    /// (sessions then end when the process does).
    pub fn new(secret: Option<&str>) -> Self {
        let key: Vec<u8> = match secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => {
                let mut key = vec![0u8; 32];
                getrandom::fill(&mut key).expect("the OS gives random bytes");
                key
            }
        };
        Self { key: key.into() }
    }

    fn tag(&self, purpose: &str, value: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// `value` (no `.` in it) sealed until `expires_ms`: `value.expiry.tag`.
    pub fn seal(&self, value: &str, expires_ms: i64) -> String {
        let body = format!("{value}.{expires_ms}");
        let tag = self.tag("session", &body);
        format!("{body}.{tag}")
    }

    /// The value of a sealed `cookie` if its tag is right and it has not
    /// expired at `now_ms`.
    pub fn open(&self, cookie: &str, now_ms: i64) -> Option<String> {
        let (body, tag) = cookie.rsplit_once('.')?;
        let (value, expires) = body.rsplit_once('.')?;
        let expires: i64 = expires.parse().ok()?;
        (same(&self.tag("session", body), tag) && now_ms < expires).then(|| value.to_owned())
    }

    /// The CSRF token of `session` (the session cookie's value): only who
    /// holds the key can make it, and it changes with the session.
    pub fn csrf(&self, session: &str) -> String {
        self.tag("csrf", session)
    }

    /// Whether `token` is `session`'s CSRF token.
    pub fn csrf_ok(&self, session: &str, token: &str) -> bool {
        same(&self.csrf(session), token)
    }
}

fn same(a: &str, b: &str) -> bool {
    crate::auth::constant_time_eq(a.as_bytes(), b.as_bytes())
}

/// The value of cookie `name` in a request's headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, scoped to `path`,
/// kept `max_age_secs` (0 deletes it), `Secure` when served over TLS.
pub fn set_cookie(name: &str, value: &str, path: &str, max_age_secs: u64, secure: bool) -> String {
    format!(
        "{name}={value}; Path={path}; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The headers every page answers with: no script, no framing, no
/// referrer (page URLs stay on the site), nothing cached.
pub fn security_headers() -> [(HeaderName, HeaderValue); 5] {
    [
        (
            http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                 frame-ancestors 'none'; base-uri 'none'",
            ),
        ),
        (
            http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            http::header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ),
        (
            http::header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ),
    ]
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM` in `zone` (an IANA name;
/// UTC when unknown), for people to read.
pub fn local_time(ms: i64, zone: &str) -> String {
    let Ok(instant) = jiff::Timestamp::from_millisecond(ms) else {
        return String::new();
    };
    let zone = jiff::tz::TimeZone::get(zone).unwrap_or(jiff::tz::TimeZone::UTC);
    instant
        .to_zoned(zone)
        .strftime("%Y-%m-%d %H:%M %Z")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_until_it_expires_and_not_when_altered() {
        let signer = Signer::new(Some("a secret of the operator's, long enough"));
        let sealed = signer.seal("u000001", 2_000);
        assert_eq!(signer.open(&sealed, 1_999).as_deref(), Some("u000001"));
        assert_eq!(signer.open(&sealed, 2_000), None);
        let altered = sealed.replacen("u000001", "u000002", 1);
        assert_eq!(signer.open(&altered, 1_000), None);
        let longer = sealed.replacen(".2000.", ".9999.", 1);
        assert_eq!(signer.open(&longer, 1_000), None);
        let other = Signer::new(None);
        assert_eq!(other.open(&sealed, 1_000), None);
    }

    #[test]
    fn a_csrf_token_belongs_to_one_session() {
        let signer = Signer::new(None);
        let token = signer.csrf("session-a");
        assert!(signer.csrf_ok("session-a", &token));
        assert!(!signer.csrf_ok("session-b", &token));
        assert!(!signer.csrf_ok("session-a", ""));
    }

    #[test]
    fn times_read_in_the_zone_asked_for() {
        assert_eq!(local_time(0, "Asia/Tokyo"), "1970-01-01 09:00 JST");
        assert_eq!(local_time(0, "Nowhere/Else"), "1970-01-01 00:00 UTC");
    }

    #[test]
    fn cookies_are_found_among_several() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("lang=ja; chukei_session=abc.1.f"),
        );
        assert_eq!(cookie(&headers, "chukei_session"), Some("abc.1.f"));
        assert_eq!(cookie(&headers, "lang"), Some("ja"));
        assert_eq!(cookie(&headers, "missing"), None);
    }
}
