//! Signing in with a one-time code (`--consent-sign-in code`): the person
//! gives their phone number, the carrier pushes a 6-digit code to the
//! terminal that line is attached to, and the code opens a session cookie.
//! The answer is the same whether the number is ours or not; a code is good
//! for 5 minutes and 5 tries; codes live in this process only.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::Form;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::Digest;

use super::pages::{self, CodePage, Lang, redirect_home, render, with_cookie};
use super::{Page, SESSION_COOKIE, SignIn, wall_ms};

const CODE_TTL_MS: i64 = 5 * 60_000;
const MAX_TRIES: u32 = 5;
/// How long a session lasts.
const SESSION_MS: i64 = 30 * 60_000;
/// At most this many codes wait at once (a flood of sign-ins cannot grow memory).
const MAX_PENDING: usize = 10_000;
pub(super) const PENDING_COOKIE: &str = "chukei_pending";

/// Codes sent and not used yet, by sign-in attempt.
#[derive(Debug, Default)]
pub(super) struct Codes(Mutex<HashMap<String, Pending>>);

#[derive(Debug)]
struct Pending {
    /// None: the number is not ours (every code is wrong).
    user_id: Option<String>,
    code_hash: [u8; 32],
    expires_ms: i64,
    tries: u32,
}

fn hash(code: &str) -> [u8; 32] {
    sha2::Sha256::digest(code.as_bytes()).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS gives random bytes");
    hex::encode(buf)
}

fn six_digits() -> String {
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).expect("the OS gives random bytes");
    format!("{:06}", u32::from_le_bytes(buf) % 1_000_000)
}

/// What happened to a code tried.
enum Checked {
    SignedIn(String),
    Wrong,
    Expired,
}

impl Codes {
    fn add(&self, user_id: Option<String>, code: &str, now: i64) -> String {
        let attempt = random_hex(16);
        let mut codes = self.0.lock().expect("codes lock");
        codes.retain(|_, p| p.expires_ms > now);
        if codes.len() >= MAX_PENDING {
            // Full of live codes: the oldest to expire goes.
            if let Some(oldest) = codes
                .iter()
                .min_by_key(|(_, p)| p.expires_ms)
                .map(|(k, _)| k.clone())
            {
                codes.remove(&oldest);
            }
        }
        codes.insert(
            attempt.clone(),
            Pending {
                user_id,
                code_hash: hash(code),
                expires_ms: now + CODE_TTL_MS,
                tries: 0,
            },
        );
        attempt
    }

    fn check(&self, attempt: &str, code: &str, now: i64) -> Checked {
        let mut codes = self.0.lock().expect("codes lock");
        let Some(pending) = codes.get_mut(attempt) else {
            return Checked::Expired;
        };
        if pending.expires_ms <= now || pending.tries >= MAX_TRIES {
            codes.remove(attempt);
            return Checked::Expired;
        }
        pending.tries += 1;
        match &pending.user_id {
            Some(user_id) if hash(code.trim()) == pending.code_hash => {
                let user_id = user_id.clone();
                codes.remove(attempt);
                Checked::SignedIn(user_id)
            }
            _ => Checked::Wrong,
        }
    }
}

/// A number as people type it: spaces, hyphens and brackets dropped; a
/// national number (leading 0) read as Japanese.
fn normalise_phone(input: &str) -> String {
    let compact: String = input
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '\u{3000}'))
        .collect();
    match compact.strip_prefix('0') {
        Some(national) if !national.starts_with('0') => format!("+81{national}"),
        _ => compact,
    }
}

#[derive(Deserialize)]
pub(super) struct PhoneForm {
    phone: String,
    csrf: String,
}

pub(super) async fn send_code(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Form(form): Form<PhoneForm>,
) -> Response {
    let t = lang.0;
    if !matches!(page.sign_in, SignIn::Code) {
        return redirect_home();
    }
    let (visit, _) = pages::anonymous(&page, &headers);
    if !page.signer.csrf_ok(&visit, &form.csrf) {
        return pages::sign_in_page(&page, t, &headers, Some(t.form_expired));
    }
    let phone = normalise_phone(&form.phone);
    if crate::subscribers::phone_number("phone", &phone).is_err() {
        return pages::sign_in_page(&page, t, &headers, Some(t.phone_hint));
    }
    let now = wall_ms();
    let code = six_digits();
    let user_id = match page.shared.store.subscriber_by_phone(&phone).await {
        Ok(user_id) => user_id,
        Err(error) => {
            tracing::warn!(%error, "consent page: subscriber lookup failed");
            return pages::failure(t);
        }
    };
    let attempt = page.codes.add(user_id.clone(), &code, now);
    if let Some(user_id) = &user_id {
        match page.shared.store.endpoint_of(user_id) {
            Some(endpoint) => {
                let text = format!(
                    "Consent page code: {code} (5 min) / 同意ページの確認コード: {code}(5分間有効)"
                );
                page.shared
                    .terminals
                    .notify(&endpoint, user_id, &attempt[..12], text)
                    .await;
            }
            None => tracing::info!("consent page: sign-in code not sent, no terminal attached"),
        }
    }
    let pending = page.signer.seal(&attempt, now + CODE_TTL_MS);
    let cookie = chukei_proto::web::set_cookie(
        PENDING_COOKIE,
        &pending,
        "/",
        (CODE_TTL_MS / 1000) as u64,
        page.secure,
    );
    with_cookie(
        render(CodePage {
            t,
            signed_in: false,
            sign_out: false,
            csrf: page.signer.csrf(&pending),
            error: None,
        }),
        Some(cookie),
    )
}

#[derive(Deserialize)]
pub(super) struct CodeForm {
    code: String,
    csrf: String,
}

pub(super) async fn check_code(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let t = lang.0;
    let now = wall_ms();
    let pending = chukei_proto::web::cookie(&headers, PENDING_COOKIE).unwrap_or("");
    let attempt = page.signer.open(pending, now);
    let (Some(attempt), true) = (attempt, page.signer.csrf_ok(pending, &form.csrf)) else {
        return pages::sign_in_page(&page, t, &headers, Some(t.code_expired));
    };
    match page.codes.check(&attempt, &form.code, now) {
        Checked::SignedIn(user_id) => {
            let session = page.signer.seal(&user_id, now + SESSION_MS);
            let mut response = redirect_home();
            for cookie in [
                chukei_proto::web::set_cookie(
                    SESSION_COOKIE,
                    &session,
                    "/",
                    (SESSION_MS / 1000) as u64,
                    page.secure,
                ),
                chukei_proto::web::set_cookie(PENDING_COOKIE, "", "/", 0, page.secure),
            ] {
                response = with_cookie(response, Some(cookie));
            }
            tracing::info!("consent page: signed in");
            response
        }
        Checked::Wrong => render(CodePage {
            t,
            signed_in: false,
            sign_out: false,
            csrf: page.signer.csrf(pending),
            error: Some(t.code_wrong),
        }),
        Checked::Expired => pages::sign_in_page(&page, t, &headers, Some(t.code_expired)),
    }
}

#[derive(Deserialize)]
pub(super) struct CsrfOnly {
    csrf: String,
}

pub(super) async fn sign_out(
    State(page): State<Page>,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> Response {
    let mut response = redirect_home();
    if let Some(visitor) = page.visitor(&headers) {
        if page.signer.csrf_ok(&visitor.session, &form.csrf) {
            response = with_cookie(
                response,
                Some(chukei_proto::web::set_cookie(
                    SESSION_COOKIE,
                    "",
                    "/",
                    0,
                    page.secure,
                )),
            );
        }
    }
    response.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_as_people_type_them() {
        assert_eq!(normalise_phone("090-1234-5678"), "+819012345678");
        assert_eq!(normalise_phone("+81 90 1234 5678"), "+819012345678");
        assert_eq!(normalise_phone("(03) 1234 5678"), "+81312345678");
        assert_eq!(normalise_phone("0081..."), "0081...");
    }

    #[test]
    fn a_code_signs_in_once_and_gives_up_after_five_tries() {
        let codes = Codes::default();
        let attempt = codes.add(Some("u1".into()), "123456", 0);
        assert!(matches!(codes.check(&attempt, "000000", 1), Checked::Wrong));
        assert!(matches!(codes.check(&attempt, " 123456 ", 2), Checked::SignedIn(u) if u == "u1"));
        assert!(matches!(
            codes.check(&attempt, "123456", 3),
            Checked::Expired
        ));

        let attempt = codes.add(Some("u1".into()), "123456", 0);
        for _ in 0..MAX_TRIES {
            assert!(matches!(codes.check(&attempt, "999999", 1), Checked::Wrong));
        }
        assert!(matches!(
            codes.check(&attempt, "123456", 1),
            Checked::Expired
        ));

        let unknown = codes.add(None, "123456", 0);
        assert!(matches!(codes.check(&unknown, "123456", 1), Checked::Wrong));
        let late = codes.add(Some("u1".into()), "123456", 0);
        assert!(matches!(
            codes.check(&late, "123456", CODE_TTL_MS),
            Checked::Expired
        ));
    }
}
