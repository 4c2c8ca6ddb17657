//! Compose → quote → send: the quote (recipients and price) is shown before
//! anything is sent, and the send carries the idempotency key fixed when
//! the quote was made, so sending the quoted message twice sends it once.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chukei_proto::relay::v1::enterprise_api_server::EnterpriseApi;

use super::enterprise::{channel_name, checked, enterprise};
use super::send_form::SendForm;
use super::{Console, Nav, Who, render};

#[derive(Template)]
#[template(path = "console/compose.html")]
struct ComposePage {
    nav: Nav,
    csrf: String,
    form: SendForm,
    error: Option<String>,
}

fn compose_page(who: &Who, form: SendForm, error: Option<String>) -> Response {
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let mut response = render(ComposePage {
        nav: Nav::of(Some(who)),
        csrf: who.csrf(),
        form,
        error,
    });
    *response.status_mut() = status;
    response
}

pub(super) async fn compose(State(console): State<Console>, headers: HeaderMap) -> Response {
    match enterprise(&console, &headers).await {
        Ok(who) => compose_page(
            &who,
            SendForm {
                target: "all".to_owned(),
                policy: "default".to_owned(),
                window: "none".to_owned(),
                window_zone: console.relay.market.zone_name.to_string(),
                ..SendForm::default()
            },
            None,
        ),
        Err(response) => *response,
    }
}

#[derive(Template)]
#[template(path = "console/quote.html")]
struct QuotePage {
    nav: Nav,
    csrf: String,
    recipients: u64,
    zone: String,
    price_table: u64,
    prepaid: bool,
    delivered: (i64, i64),
    opened: (i64, i64),
    lines: Vec<(&'static str, u32, i64, i64)>,
    hidden: Vec<(&'static str, String)>,
}

pub(super) async fn quote(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(mut form): Form<SendForm>,
) -> Response {
    let who = match checked(&console, &headers, &form.csrf).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    // The key the send will carry: sending the quoted message twice sends it once.
    form.idempotency_key = crate::credentials::new_id("console");
    let request = match form.request(console.relay.clock.now_ms()) {
        Ok(request) => request,
        Err(error) => return compose_page(&who, form, Some(error.0)),
    };
    let quote = match console.api.quote_message(who.request(request)).await {
        Ok(quote) => quote.into_inner(),
        Err(status) => return compose_page(&who, form, Some(status.message().to_owned())),
    };
    render(QuotePage {
        nav: Nav::of(Some(&who)),
        csrf: who.csrf(),
        recipients: quote.recipients,
        zone: quote.zone,
        price_table: quote.price_table,
        prepaid: quote.prepaid,
        delivered: (quote.delivered_low, quote.delivered_high),
        opened: (quote.opened_low, quote.opened_high),
        lines: quote
            .lines
            .iter()
            .map(|l| {
                (
                    channel_name(l.channel),
                    l.slot,
                    l.delivered_price,
                    l.opened_price,
                )
            })
            .collect(),
        hidden: form.hidden(),
    })
}

pub(super) async fn send(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(form): Form<SendForm>,
) -> Response {
    let who = match checked(&console, &headers, &form.csrf).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    if form.idempotency_key.is_empty() {
        return compose_page(
            &who,
            form,
            Some("Quote the message before sending it.".to_owned()),
        );
    }
    let request = match form.request(console.relay.clock.now_ms()) {
        Ok(request) => request,
        Err(error) => return compose_page(&who, form, Some(error.0)),
    };
    match console.api.send_message(who.request(request)).await {
        Ok(sent) => {
            tracing::info!("console: message sent");
            Redirect::to(&format!(
                "/console/messages/{}",
                sent.into_inner().message_id
            ))
            .into_response()
        }
        Err(status) => compose_page(&who, form, Some(status.message().to_owned())),
    }
}
