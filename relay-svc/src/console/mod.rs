//! The enterprise console (`/console` on the relay's port): server-rendered
//! pages over the same use cases and handlers as the gRPC and REST edges.
//! An enterprise signs in with one of its API keys and sees its messages,
//! each message's funnel by channel with rates and their intervals, open
//! rates by hour and channel, a recipient's decision trace, the quote
//! before a send, its monthly statement and the auction. The operator signs
//! in with the operator token and sees carriers, reconciliation findings
//! and revenue.
//!
//! Sessions are stateless, so any relay replica serves any page: the cookie
//! holds the credential the person typed (`HttpOnly`, `SameSite=Strict`,
//! path `/console`, `Secure` under TLS), checked again on every request, so
//! a revoked key ends its sessions at once. Each form's CSRF token is an
//! HMAC keyed by that credential. No personal data goes in a URL: a ref to
//! explain is posted.

mod billing;
mod charts;
mod enterprise;
mod messages;
mod operator;
mod send_form;
mod sending;

use askama::Template;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chukei_proto::web::Signer;

use crate::grpc::{AdminService, EnterpriseService};
use crate::service::Relay;

const SESSION_COOKIE: &str = "chukei_console";
const VISIT_COOKIE: &str = "chukei_console_visit";
/// How long a console session lasts (seconds).
const SESSION_SECS: u64 = 8 * 3_600;

/// What every console handler shares.
#[derive(Clone)]
struct Console {
    relay: Relay,
    api: EnterpriseService,
    admin: AdminService,
    secure: bool,
}

/// Who signed in, with the credential their calls carry.
#[derive(Clone)]
enum Who {
    Enterprise { enterprise_id: String, key: String },
    Operator { token: String },
}

impl Who {
    fn credential(&self) -> &str {
        match self {
            Self::Enterprise { key, .. } => key,
            Self::Operator { token } => token,
        }
    }

    /// The CSRF token of this session's forms.
    fn csrf(&self) -> String {
        Signer::new(Some(self.credential())).csrf("console")
    }

    fn csrf_ok(&self, token: &str) -> bool {
        Signer::new(Some(self.credential())).csrf_ok("console", token)
    }

    /// `message` as a call carrying this session's credential.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.credential()).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

impl Console {
    /// The signed-in session, checked against the keys as they are now.
    async fn who(&self, headers: &HeaderMap) -> Option<Who> {
        let cookie = chukei_proto::web::cookie(headers, SESSION_COOKIE)?;
        if let Some(key) = cookie.strip_prefix("e~") {
            let enterprise_id = self.relay.enterprise_for_key(key).await.ok()?;
            return Some(Who::Enterprise {
                enterprise_id,
                key: key.to_owned(),
            });
        }
        let token = cookie.strip_prefix("o~")?;
        chukei_proto::auth::constant_time_eq(token.as_bytes(), self.relay.admin_token.as_bytes())
            .then(|| Who::Operator {
                token: token.to_owned(),
            })
    }
}

/// The console's routes, served beside the REST and gRPC edges.
pub fn router(relay: Relay, secure: bool) -> Router {
    let console = Console {
        api: EnterpriseService(relay.clone()),
        admin: AdminService(relay.clone()),
        relay,
        secure,
    };
    Router::new()
        .route("/console", get(enterprise::start))
        .route("/console/style.css", get(style))
        .route("/console/sign-in", post(enterprise::sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/messages", get(messages::messages))
        .route("/console/messages/{message_id}", get(messages::message))
        .route(
            "/console/messages/{message_id}/explain",
            post(messages::explain),
        )
        .route("/console/stats", get(messages::stats))
        .route("/console/send", get(sending::compose))
        .route("/console/quote", post(sending::quote))
        .route("/console/send", post(sending::send))
        .route("/console/statement", get(billing::statement))
        .route("/console/auction", get(billing::auction))
        .route("/console/auction/bids", post(billing::bid))
        .route("/console/operator", get(operator::overview))
        .route("/console/{*rest}", get(not_found))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    for (name, value) in chukei_proto::web::security_headers() {
        response.headers_mut().insert(name, value);
    }
    response
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        chukei_proto::web::STYLE,
    )
}

fn render(template: impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "console: template failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// A page that says one thing (an error, a refusal, a missing page).
#[derive(Template)]
#[template(path = "console/message.html")]
struct MessagePage {
    nav: Nav,
    title: String,
    text: String,
}

/// What the page header shows: who is signed in and the CSRF token of the
/// sign-out form.
struct Nav {
    enterprise_id: String,
    operator: bool,
    csrf: String,
}

impl Nav {
    fn of(who: Option<&Who>) -> Self {
        match who {
            Some(Who::Enterprise { enterprise_id, .. }) => Self {
                enterprise_id: enterprise_id.clone(),
                operator: false,
                csrf: who.map(Who::csrf).unwrap_or_default(),
            },
            Some(Who::Operator { .. }) => Self {
                enterprise_id: String::new(),
                operator: true,
                csrf: who.map(Who::csrf).unwrap_or_default(),
            },
            None => Self {
                enterprise_id: String::new(),
                operator: false,
                csrf: String::new(),
            },
        }
    }

    fn signed_in(&self) -> bool {
        self.operator || !self.enterprise_id.is_empty()
    }
}

fn message_page(who: Option<&Who>, status: StatusCode, title: &str, text: String) -> Response {
    let mut response = render(MessagePage {
        nav: Nav::of(who),
        title: title.to_owned(),
        text,
    });
    *response.status_mut() = status;
    response
}

/// What a refused call shows: the status's own message (it names the
/// field), with the HTTP status the REST edge would answer.
fn refused(who: &Who, status: &tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::NotFound | tonic::Code::PermissionDenied => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unavailable | tonic::Code::Internal => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let title = if code == StatusCode::NOT_FOUND {
        "Not found"
    } else {
        "Refused"
    };
    message_page(Some(who), code, title, status.message().to_owned())
}

async fn not_found(State(console): State<Console>, headers: HeaderMap) -> Response {
    let who = console.who(&headers).await;
    message_page(
        who.as_ref(),
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.".to_owned(),
    )
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn sign_out(
    State(console): State<Console>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    let mut response = Redirect::to("/console").into_response();
    if let Some(who) = console.who(&headers).await {
        if who.csrf_ok(&form.csrf) {
            response = with_cookie(
                response,
                &chukei_proto::web::set_cookie(SESSION_COOKIE, "", "/console", 0, console.secure),
            );
        }
    }
    response
}
