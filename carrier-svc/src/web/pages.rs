//! The consent page's pages: what a signed-in subscriber sees and the forms
//! that change it. Every change calls the `SubscriberApi` handler a terminal
//! would, in process.

use askama::Template;
use axum::Form;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chukei_proto::carrier::v1 as pb;
use chukei_proto::carrier::v1::subscriber_api_server::SubscriberApi;
use serde::Deserialize;

use super::text::{self, Text};
pub(super) use super::views::CodePage;
use super::views::SignInPage;
use super::views::{
    ChoiceView, EnterprisePage, EnterpriseRow, HistoryPage, HistoryView, HomePage, MessagePage,
    PreviewPage, choices_in_words, profile_rows, summary,
};
use super::{Page, Visitor, wall_ms};
use crate::consent;

const VISIT_COOKIE: &str = "chukei_visit";
const HISTORY_ROWS: i64 = 200;

/// The language a page is shown in.
pub(super) struct Lang(pub &'static Text);

impl<S: Send + Sync> FromRequestParts<S> for Lang {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(text::for_request(
            lang_query(parts.uri.query()),
            &parts.headers,
        )))
    }
}

fn lang_query(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("lang="))
        .filter(|lang| matches!(*lang, "ja" | "en"))
}

/// Security headers on every answer; a `?lang=` choice kept in a cookie.
pub(super) async fn with_security_headers(request: Request, next: Next) -> Response {
    let chosen = lang_query(request.uri().query()).map(str::to_owned);
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in chukei_proto::web::security_headers() {
        headers.insert(name, value);
    }
    if let Some(lang) = chosen {
        if let Ok(value) = HeaderValue::from_str(&format!(
            "lang={lang}; Path=/; Max-Age=31536000; SameSite=Strict"
        )) {
            headers.append(header::SET_COOKIE, value);
        }
    }
    response
}

pub(super) fn render(template: impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "consent page: template failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

pub(super) fn with_cookie(mut response: Response, cookie: Option<String>) -> Response {
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

pub(super) fn redirect_home() -> Response {
    Redirect::to("/").into_response()
}

/// A visitor who has not signed in: the session their sign-in form's CSRF
/// token is bound to, and the cookie to set when it is new.
pub(super) fn anonymous(page: &Page, headers: &HeaderMap) -> (String, Option<String>) {
    let now = wall_ms();
    if let Some(visit) = chukei_proto::web::cookie(headers, VISIT_COOKIE) {
        if page.signer.open(visit, now).is_some() {
            return (visit.to_owned(), None);
        }
    }
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS gives random bytes");
    let visit = page.signer.seal(&hex::encode(nonce), now + 3_600_000);
    let cookie = chukei_proto::web::set_cookie(VISIT_COOKIE, &visit, "/", 3_600, page.secure);
    (visit, Some(cookie))
}

pub(super) fn failure(t: &'static Text) -> Response {
    let mut response = render(MessagePage {
        t,
        signed_in: false,
        sign_out: false,
        csrf: String::new(),
        title: t.failed,
        class: "error",
        text: t.failed,
    });
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
}

/// Which granularities a choice form asked for.
#[derive(Deserialize)]
pub(super) struct ChoiceForm {
    csrf: String,
    gender: String,
    age: String,
    region: String,
    occupation: String,
    #[serde(default)]
    text_version: String,
}

impl ChoiceForm {
    fn choices(&self) -> pb::ConsentChoices {
        pb::ConsentChoices {
            gender: self.gender == "share",
            age: match self.age.as_str() {
                "exact" => pb::AgeGranularity::Exact,
                "decade" => pb::AgeGranularity::Decade,
                _ => pb::AgeGranularity::None,
            } as i32,
            region: match self.region.as_str() {
                "city" => pb::RegionGranularity::City,
                "prefecture" => pb::RegionGranularity::Prefecture,
                _ => pb::RegionGranularity::None,
            } as i32,
            occupation: self.occupation == "share",
        }
    }
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
    #[serde(default)]
    confirm: String,
}

#[derive(Deserialize)]
pub(super) struct Done {
    done: Option<String>,
}

fn notice(t: &'static Text, done: Option<&str>) -> Option<&'static str> {
    match done? {
        "saved" => Some(t.saved),
        "left" => Some(t.left_enterprise),
        _ => None,
    }
}

/// The signed-in visitor, or the sign-in form.
fn signed_in(page: &Page, t: &'static Text, headers: &HeaderMap) -> Result<Visitor, Box<Response>> {
    if let Some(visitor) = page.visitor(headers) {
        return Ok(visitor);
    }
    if !matches!(page.sign_in, super::SignIn::Code) {
        // The operator's login in front of the page did not say who this is.
        return Err(Box::new(StatusCode::UNAUTHORIZED.into_response()));
    }
    Err(Box::new(sign_in_page(page, t, headers, None)))
}

/// The sign-in form (with `error`), its CSRF token bound to the visit.
pub(super) fn sign_in_page(
    page: &Page,
    t: &'static Text,
    headers: &HeaderMap,
    error: Option<&'static str>,
) -> Response {
    let (visit, set_visit) = anonymous(page, headers);
    with_cookie(render(SignInPage::new(t, page, &visit, error)), set_visit)
}

/// A checked form: the visitor, or what to answer instead.
fn checked(
    page: &Page,
    t: &'static Text,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Visitor, Box<Response>> {
    let visitor = signed_in(page, t, headers)?;
    if !page.signer.csrf_ok(&visitor.session, csrf) {
        return Err(Box::new(render(MessagePage {
            t,
            signed_in: true,
            sign_out: page.sign_out(),
            csrf: page.signer.csrf(&visitor.session),
            title: t.form_expired,
            class: "error",
            text: t.form_expired,
        })));
    }
    Ok(visitor)
}

impl Page {
    fn sign_out(&self) -> bool {
        matches!(self.sign_in, super::SignIn::Code)
    }

    /// The profile `choices` would share of `user_id` with `enterprise_id`.
    async fn preview(
        &self,
        user_id: &str,
        enterprise_id: &str,
        choices: pb::ConsentChoices,
    ) -> Result<pb::ConsentPreview, tonic::Status> {
        Ok(self
            .api
            .preview_consent(tonic::Request::new(pb::PreviewConsentRequest {
                user_id: user_id.to_owned(),
                enterprise_id: enterprise_id.to_owned(),
                consent: Some(choices),
            }))
            .await?
            .into_inner())
    }
}

fn zone(t: &Text) -> &'static str {
    if t.lang == "ja" { "Asia/Tokyo" } else { "UTC" }
}

fn status_failure(t: &'static Text, status: &tonic::Status) -> Response {
    tracing::warn!(code = ?status.code(), "consent page: a change was refused");
    failure(t)
}

pub(super) async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        chukei_proto::web::STYLE,
    )
}

pub(super) async fn not_found(lang: Lang) -> Response {
    let t = lang.0;
    let mut response = render(MessagePage {
        t,
        signed_in: false,
        sign_out: false,
        csrf: String::new(),
        title: "404",
        class: "error",
        text: t.not_registered,
    });
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

pub(super) async fn home(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Query(done): Query<Done>,
) -> Response {
    let t = lang.0;
    let visitor = match signed_in(&page, t, &headers) {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    let consents = match page.shared.store.consents(&visitor.user_id).await {
        Ok(consents) => consents,
        Err(error) => {
            tracing::warn!(%error, "consent page: reading consents failed");
            return failure(t);
        }
    };
    let ids: Vec<&str> = consents.iter().map(|c| c.enterprise_id.as_str()).collect();
    let mut names = page.names(&ids).await;
    let mut rows = Vec::with_capacity(consents.len());
    for consent in consents {
        let shared = match page
            .preview(&visitor.user_id, &consent.enterprise_id, consent.choices())
            .await
        {
            Ok(preview) => summary(t, &preview.profile.unwrap_or_default()),
            Err(status) => return status_failure(t, &status),
        };
        rows.push(EnterpriseRow {
            name: names
                .remove(&consent.enterprise_id)
                .unwrap_or_else(|| consent.enterprise_id.clone()),
            updated: chukei_proto::web::local_time(consent.updated_at, zone(t)),
            enterprise_id: consent.enterprise_id,
            shared,
        });
    }
    render(HomePage {
        t,
        signed_in: true,
        sign_out: page.sign_out(),
        csrf: page.signer.csrf(&visitor.session),
        notice: match done.done.as_deref() {
            Some("left_hub") => Some(t.left_hub),
            other => notice(t, other),
        },
        rows,
    })
}

pub(super) async fn enterprise(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Path(enterprise_id): Path<String>,
    Query(done): Query<Done>,
) -> Response {
    let t = lang.0;
    let visitor = match signed_in(&page, t, &headers) {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    let consents = match page.shared.store.consents(&visitor.user_id).await {
        Ok(consents) => consents,
        Err(error) => {
            tracing::warn!(%error, "consent page: reading consents failed");
            return failure(t);
        }
    };
    let Some(consent) = consents
        .into_iter()
        .find(|c| c.enterprise_id == enterprise_id)
    else {
        return not_found(lang).await;
    };
    let choices = consent.choices();
    let preview = match page
        .preview(&visitor.user_id, &enterprise_id, choices)
        .await
    {
        Ok(preview) => preview,
        Err(status) => return status_failure(t, &status),
    };
    render(EnterprisePage {
        t,
        signed_in: true,
        sign_out: page.sign_out(),
        csrf: page.signer.csrf(&visitor.session),
        notice: notice(t, done.done.as_deref()),
        profile: profile_rows(t, &preview.profile.unwrap_or_default()),
        choices: ChoiceView::of(&choices),
        text_version: consent::TEXT_VERSION,
        name: page.name(&enterprise_id).await,
        enterprise_id,
    })
}

/// A checked form about `enterprise_id`: the visitor, if they are
/// registered with it through us; else what to answer.
async fn checked_for(
    page: &Page,
    t: &'static Text,
    headers: &HeaderMap,
    csrf: &str,
    enterprise_id: &str,
) -> Result<Visitor, Box<Response>> {
    let visitor = checked(page, t, headers, csrf)?;
    match page.shared.store.consents(&visitor.user_id).await {
        Ok(consents) if consents.iter().any(|c| c.enterprise_id == enterprise_id) => Ok(visitor),
        Ok(_) => Err(Box::new(not_found(Lang(t)).await)),
        Err(error) => {
            tracing::warn!(%error, "consent page: reading consents failed");
            Err(Box::new(failure(t)))
        }
    }
}

pub(super) async fn preview(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Path(enterprise_id): Path<String>,
    Form(form): Form<ChoiceForm>,
) -> Response {
    let t = lang.0;
    let visitor = match checked_for(&page, t, &headers, &form.csrf, &enterprise_id).await {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    let choices = form.choices();
    let preview = match page
        .preview(&visitor.user_id, &enterprise_id, choices)
        .await
    {
        Ok(preview) => preview,
        Err(status) => return status_failure(t, &status),
    };
    let profile = preview.profile.unwrap_or_default();
    // The text names the enterprise as people know it; its version is the
    // one the API's preview gives.
    let name = page.name(&enterprise_id).await;
    let consent_text = if t.lang == "ja" {
        consent::consent_text_ja(&name, &profile)
    } else {
        consent::consent_text(&name, &profile)
    };
    render(PreviewPage {
        t,
        signed_in: true,
        sign_out: page.sign_out(),
        csrf: page.signer.csrf(&visitor.session),
        profile: profile_rows(t, &profile),
        consent_text,
        text_version: preview.text_version,
        choices: ChoiceView::of(&choices),
        name,
        enterprise_id,
    })
}

pub(super) async fn change(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Path(enterprise_id): Path<String>,
    Form(form): Form<ChoiceForm>,
) -> Response {
    let t = lang.0;
    let visitor = match checked_for(&page, t, &headers, &form.csrf, &enterprise_id).await {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    let changed = page
        .api
        .change_consent(tonic::Request::new(pb::ChangeConsentRequest {
            user_id: visitor.user_id,
            enterprise_id: enterprise_id.clone(),
            consent: Some(form.choices()),
            text_version: form.text_version.clone(),
        }))
        .await;
    match changed {
        Ok(_) => Redirect::to(&format!("/enterprises/{enterprise_id}?done=saved")).into_response(),
        Err(status) => status_failure(t, &status),
    }
}

pub(super) async fn leave(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Path(enterprise_id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let t = lang.0;
    let visitor = match checked_for(&page, t, &headers, &form.csrf, &enterprise_id).await {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    let left = page
        .api
        .unregister(tonic::Request::new(pb::UnregisterRequest {
            user_id: visitor.user_id,
            enterprise_id,
            service_id: String::new(),
        }))
        .await;
    match left {
        Ok(_) => Redirect::to("/?done=left").into_response(),
        Err(status) => status_failure(t, &status),
    }
}

pub(super) async fn leave_hub(
    State(page): State<Page>,
    lang: Lang,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let t = lang.0;
    let visitor = match checked(&page, t, &headers, &form.csrf) {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    if form.confirm != "yes" {
        return Redirect::to("/").into_response();
    }
    let left = page
        .api
        .unregister(tonic::Request::new(pb::UnregisterRequest {
            user_id: visitor.user_id,
            enterprise_id: String::new(),
            service_id: String::new(),
        }))
        .await;
    match left {
        Ok(_) => Redirect::to("/?done=left_hub").into_response(),
        Err(status) => status_failure(t, &status),
    }
}

pub(super) async fn history(State(page): State<Page>, lang: Lang, headers: HeaderMap) -> Response {
    let t = lang.0;
    let visitor = match signed_in(&page, t, &headers) {
        Ok(visitor) => visitor,
        Err(response) => return *response,
    };
    let rows = match page
        .shared
        .store
        .consent_history(&visitor.user_id, HISTORY_ROWS)
        .await
    {
        Ok(rows) => rows,
        Err(error) => {
            tracing::warn!(%error, "consent page: reading the history failed");
            return failure(t);
        }
    };
    let mut ids: Vec<&str> = rows.iter().map(|r| r.enterprise_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.retain(|id| !id.is_empty());
    let names = page.names(&ids).await;
    let mut views = Vec::with_capacity(rows.len());
    for row in rows {
        let name = names
            .get(&row.enterprise_id)
            .cloned()
            .unwrap_or_else(|| row.enterprise_id.clone());
        let shared = if matches!(row.action.as_str(), "registered" | "changed" | "withdrew") {
            choices_in_words(t, &row.choices())
        } else {
            String::new()
        };
        views.push(HistoryView {
            at: chukei_proto::web::local_time(row.at, zone(t)),
            enterprise: if row.enterprise_id.is_empty() {
                t.hub.to_owned()
            } else if row.service_id.is_empty() {
                name
            } else {
                format!("{name} / {}", row.service_id)
            },
            action: t.action(&row.action),
            shared,
        });
    }
    render(HistoryPage {
        t,
        signed_in: true,
        sign_out: page.sign_out(),
        csrf: page.signer.csrf(&visitor.session),
        rows: views,
    })
}
