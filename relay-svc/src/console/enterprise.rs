//! What the enterprise's pages share (who is signed in, checked forms, how
//! numbers, channels and times are shown) and signing in. The pages are in
//! `messages` (the list, a message's funnel and decision trace, open rates),
//! `sending` (compose → quote → send) and `billing` (statement, auction).

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chukei_proto::common::v1::Channel as WireChannel;
use chukei_proto::web::Signer;
use serde::Deserialize;

use super::{
    Console, Nav, SESSION_COOKIE, SESSION_SECS, VISIT_COOKIE, Who, message_page, render,
    with_cookie,
};

/// The signed-in enterprise, or where to go instead.
pub(super) async fn enterprise(
    console: &Console,
    headers: &HeaderMap,
) -> Result<Who, Box<Response>> {
    match console.who(headers).await {
        Some(who @ Who::Enterprise { .. }) => Ok(who),
        Some(Who::Operator { .. }) => {
            Err(Box::new(Redirect::to("/console/operator").into_response()))
        }
        None => Err(Box::new(Redirect::to("/console").into_response())),
    }
}

/// A form's session and CSRF token checked: the enterprise, or the answer.
pub(super) async fn checked(
    console: &Console,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Who, Box<Response>> {
    let who = enterprise(console, headers).await?;
    if !who.csrf_ok(csrf) {
        return Err(Box::new(message_page(
            Some(&who),
            StatusCode::FORBIDDEN,
            "Form expired",
            "The form was not this session's. Nothing was changed; please try again.".to_owned(),
        )));
    }
    Ok(who)
}

pub(super) fn percent(estimate: Option<crate::stats::Estimate>) -> String {
    estimate.map_or_else(String::new, |e| {
        format!(
            "{:.1}% ({:.1}–{:.1}%)",
            e.rate * 100.0,
            e.low * 100.0,
            e.high * 100.0
        )
    })
}

pub(super) fn channel_name(number: i32) -> &'static str {
    match WireChannel::try_from(number) {
        Ok(WireChannel::Unspecified) | Err(_) => "carrier default",
        Ok(channel) => channel.short_name(),
    }
}

pub(super) fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp.map_or_else(String::new, |t| {
        chukei_proto::web::local_time(chukei_proto::clock::from_timestamp(t), "UTC")
    })
}

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    nav: Nav,
    csrf: String,
    error: Option<&'static str>,
}

fn sign_in_page(console: &Console, headers: &HeaderMap, error: Option<&'static str>) -> Response {
    let visit = chukei_proto::web::cookie(headers, VISIT_COOKIE)
        .filter(|v| v.len() == 32)
        .map(str::to_owned);
    let (visit, new) = match visit {
        Some(visit) => (visit, false),
        None => {
            let mut nonce = [0u8; 16];
            getrandom::fill(&mut nonce).expect("the OS gives random bytes");
            (hex::encode(nonce), true)
        }
    };
    let mut response = render(SignInPage {
        nav: Nav::of(None),
        csrf: Signer::new(Some(&visit)).csrf("visit"),
        error,
    });
    if error.is_some() {
        *response.status_mut() = StatusCode::UNAUTHORIZED;
    }
    if new {
        response = with_cookie(
            response,
            &chukei_proto::web::set_cookie(VISIT_COOKIE, &visit, "/console", 3_600, console.secure),
        );
    }
    response
}

pub(super) async fn start(State(console): State<Console>, headers: HeaderMap) -> Response {
    match console.who(&headers).await {
        Some(Who::Enterprise { .. }) => Redirect::to("/console/messages").into_response(),
        Some(Who::Operator { .. }) => Redirect::to("/console/operator").into_response(),
        None => sign_in_page(&console, &headers, None),
    }
}

#[derive(Deserialize)]
pub(super) struct SignInForm {
    credential: String,
    csrf: String,
}

pub(super) async fn sign_in(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let visit = chukei_proto::web::cookie(&headers, VISIT_COOKIE).unwrap_or("");
    if visit.is_empty() || !Signer::new(Some(visit)).csrf_ok("visit", &form.csrf) {
        return sign_in_page(
            &console,
            &headers,
            Some("The form had expired. Please sign in again."),
        );
    }
    let credential = form.credential.trim();
    let value = if chukei_proto::auth::constant_time_eq(
        credential.as_bytes(),
        console.relay.admin_token.as_bytes(),
    ) {
        format!("o~{credential}")
    } else if console.relay.enterprise_for_key(credential).await.is_ok() {
        format!("e~{credential}")
    } else {
        tracing::info!("console: sign-in refused");
        return sign_in_page(&console, &headers, Some("That key is not valid."));
    };
    if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
    {
        return sign_in_page(&console, &headers, Some("That key is not valid."));
    }
    with_cookie(
        Redirect::to("/console").into_response(),
        &chukei_proto::web::set_cookie(
            SESSION_COOKIE,
            &value,
            "/console",
            SESSION_SECS,
            console.secure,
        ),
    )
}

pub(super) fn this_month(console: &Console) -> String {
    let now = jiff::Timestamp::from_millisecond(console.relay.clock.now_ms())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(console.relay.market.zone.clone());
    format!("{:04}-{:02}", now.year(), now.month())
}
