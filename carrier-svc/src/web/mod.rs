//! The subscribers' consent page (`--consent-listen`): a person signs in,
//! sees each enterprise they are registered with and exactly what it can
//! choose them by, changes the granularity of each attribute (previewing
//! the profile the relay would store first), withdraws, leaves an
//! enterprise or the hub, and reads the history of their own choices.
//! English and Japanese; server-rendered, no script.
//!
//! Every change goes through the same `SubscriberApi` handlers a terminal
//! calls, so validation, the consent text version and what is forwarded to
//! the relay are one piece of code.
//!
//! How a person signs in is the carrier's business (`--consent-sign-in`):
//! `code` sends a one-time code to the terminal the person's line is
//! attached to (what the simulator offers); `header` trusts the header
//! `--consent-user-header` carrying the subscriber id, set by the
//! operator's own login in front of this page (which must strip it from
//! what clients send).

mod pages;
mod sign_in;
mod text;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderName};
use axum::routing::{get, post};
use chukei_proto::web::Signer;
use tokio::net::TcpListener;

use crate::Shared;
use crate::subscribers::SubscriberService;

/// The consent page's flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ConsentPageArgs {
    /// Address the subscribers' consent page (HTTP) listens on; unset: no page.
    #[arg(long, env = "CHUKEI_CARRIER_CONSENT_LISTEN")]
    pub consent_listen: Option<SocketAddr>,

    /// How subscribers sign in to the consent page: `code` (a one-time code
    /// pushed to the terminal their line is attached to) or `header` (the
    /// operator's login in front of the page sets `--consent-user-header`).
    #[arg(long, env = "CHUKEI_CARRIER_CONSENT_SIGN_IN", default_value = "code")]
    pub consent_sign_in: String,

    /// With `--consent-sign-in header`: the request header that carries the
    /// signed-in subscriber's id. The proxy in front must set it and strip
    /// it from clients' requests.
    #[arg(
        long,
        env = "CHUKEI_CARRIER_CONSENT_USER_HEADER",
        default_value = "x-chukei-subscriber"
    )]
    pub consent_user_header: String,

    /// The key the page's session cookies and CSRF tokens are signed with
    /// (at least 32 characters); unset: a random key at each start, so
    /// everyone signs in again after a restart.
    #[arg(long, env = "CHUKEI_CARRIER_CONSENT_SECRET", hide_env_values = true)]
    pub consent_secret: Option<String>,

    /// Mark the page's cookies `Secure` (set it when the page is reached
    /// over https, as it should be).
    #[arg(long, env = "CHUKEI_CARRIER_CONSENT_SECURE_COOKIES")]
    pub consent_secure_cookies: bool,
}

impl Default for ConsentPageArgs {
    fn default() -> Self {
        Self {
            consent_listen: None,
            consent_sign_in: "code".to_owned(),
            consent_user_header: "x-chukei-subscriber".to_owned(),
            consent_secret: None,
            consent_secure_cookies: false,
        }
    }
}

impl ConsentPageArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.sign_in()?;
        if let Some(secret) = &self.consent_secret {
            if secret.len() < 32 {
                anyhow::bail!("--consent-secret: must be at least 32 characters");
            }
        }
        Ok(())
    }

    fn sign_in(&self) -> anyhow::Result<SignIn> {
        match self.consent_sign_in.as_str() {
            "code" => Ok(SignIn::Code),
            "header" => HeaderName::try_from(self.consent_user_header.as_str())
                .map(SignIn::Header)
                .map_err(|_| anyhow::anyhow!("--consent-user-header: not a valid header name")),
            _ => anyhow::bail!("--consent-sign-in: must be code or header"),
        }
    }
}

/// How a person proves who they are.
#[derive(Clone, Debug)]
enum SignIn {
    Code,
    Header(HeaderName),
}

/// What every page handler shares.
#[derive(Clone, Debug)]
struct Page {
    shared: Shared,
    api: SubscriberService,
    signer: Signer,
    sign_in: SignIn,
    codes: Arc<sign_in::Codes>,
    secure: bool,
    /// Enterprises' display names from the relay, kept once asked for.
    names: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

/// Who is asking: the subscriber and the session their CSRF tokens are bound to.
#[derive(Clone, Debug)]
struct Visitor {
    user_id: String,
    session: String,
}

const SESSION_COOKIE: &str = "chukei_consent";

impl Page {
    fn visitor(&self, headers: &HeaderMap) -> Option<Visitor> {
        match &self.sign_in {
            SignIn::Header(name) => {
                let user_id = headers.get(name)?.to_str().ok()?.trim();
                (!user_id.is_empty()).then(|| Visitor {
                    user_id: user_id.to_owned(),
                    session: format!("header:{user_id}"),
                })
            }
            SignIn::Code => {
                let cookie = chukei_proto::web::cookie(headers, SESSION_COOKIE)?;
                let user_id = self.signer.open(cookie, wall_ms())?;
                Some(Visitor {
                    user_id,
                    session: cookie.to_owned(),
                })
            }
        }
    }
}

/// Names kept at most; past it the cache starts again.
const NAMES_KEPT: usize = 10_000;

impl Page {
    /// The display names of `ids` (an id stands for itself when the relay
    /// does not know it or cannot be asked now).
    async fn names(&self, ids: &[&str]) -> std::collections::HashMap<String, String> {
        let missing: Vec<String> = {
            let names = self.names.lock().expect("names lock");
            ids.iter()
                .filter(|id| !names.contains_key(**id))
                .map(|id| (*id).to_owned())
                .collect()
        };
        if !missing.is_empty() {
            let asked = self
                .shared
                .relay
                .clone()
                .describe_enterprises(chukei_proto::relay::v1::DescribeEnterprisesRequest {
                    enterprise_ids: missing.into_iter().take(100).collect(),
                })
                .await;
            match asked {
                Ok(answer) => {
                    let mut names = self.names.lock().expect("names lock");
                    if names.len() > NAMES_KEPT {
                        names.clear();
                    }
                    for e in answer.into_inner().enterprises {
                        names.insert(e.enterprise_id, e.name);
                    }
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), "consent page: enterprise names unavailable");
                }
            }
        }
        let names = self.names.lock().expect("names lock");
        ids.iter()
            .map(|id| {
                let name = names.get(*id).cloned().unwrap_or_else(|| (*id).to_owned());
                ((*id).to_owned(), name)
            })
            .collect()
    }

    async fn name(&self, id: &str) -> String {
        self.names(&[id])
            .await
            .remove(id)
            .unwrap_or_else(|| id.to_owned())
    }
}

/// Real time: sessions and codes expire by the wall clock, whatever clock
/// the carrier's deliveries run on.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Serves the consent page on `args.consent_listen` (when set) until the
/// carrier stops.
pub async fn start(shared: &Shared, args: &ConsentPageArgs) -> anyhow::Result<()> {
    let Some(addr) = args.consent_listen else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "consent page listening");
    let page = Page {
        shared: shared.clone(),
        api: SubscriberService(shared.clone()),
        signer: Signer::new(args.consent_secret.as_deref()),
        sign_in: args.sign_in()?,
        codes: Arc::default(),
        secure: args.consent_secure_cookies,
        names: Arc::default(),
    };
    let router = router(page);
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "consent page stopped");
        }
    });
    Ok(())
}

fn router(page: Page) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/style.css", get(pages::style))
        .route("/sign-in", post(sign_in::send_code))
        .route("/sign-in/code", post(sign_in::check_code))
        .route("/sign-out", post(sign_in::sign_out))
        .route("/enterprises/{enterprise_id}", get(pages::enterprise))
        .route("/enterprises/{enterprise_id}/preview", post(pages::preview))
        .route("/enterprises/{enterprise_id}/consent", post(pages::change))
        .route("/enterprises/{enterprise_id}/leave", post(pages::leave))
        .route("/history", get(pages::history))
        .route("/leave-hub", post(pages::leave_hub))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn(pages::with_security_headers))
        .with_state(page)
}
