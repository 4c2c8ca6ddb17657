//! The webhook sender: finds endpoints due for an attempt, takes each for a
//! while (so one relay of several sends to it), and delivers its batches one
//! after the other until it has nothing left or an attempt fails. Each
//! endpoint is served by its own task, at most `concurrency` at once, so a
//! slow or failing endpoint never delays another's events.
//!
//! One POST per batch, over a connection of its own to the address the
//! endpoint's host resolved to — checked first, so a name that resolves to
//! the operator's own network is refused unless the operator allows it.
//! 2xx moves the endpoint's cursor past the batch; 410 disables the endpoint;
//! anything else (another status, a timeout, no connection) is retried on
//! the schedule, or later when the endpoint sent `Retry-After`, and the
//! endpoint is disabled once it has failed for `disable_after`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chukei_proto::clock::{Clock, rfc3339};
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Event, EventType, Payload, RetrySchedule, Target, check_url, event_id, is_internal};
use crate::metrics::RelayMetrics;
use crate::storage::Store;
use crate::storage::webhooks::{Attempt, Batch, EndpointRow, Next};

/// How the sender behaves (the relay's `--webhook-*` flags).
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Endpoints may point at loopback and private addresses (tests, or an
    /// operator whose enterprises sit on the same network).
    pub allow_internal: bool,
    pub schedule: RetrySchedule,
    /// How long one POST may take, connection included.
    pub timeout: Duration,
    /// How often the sender looks for due endpoints.
    pub poll: Duration,
    /// An endpoint failing this long (clock time) is disabled.
    pub disable_after: Duration,
    /// Endpoints served at once.
    pub concurrency: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            allow_internal: false,
            schedule: RetrySchedule::default(),
            timeout: Duration::from_secs(15),
            poll: Duration::from_millis(500),
            disable_after: Duration::from_secs(5 * 86_400),
            concurrency: 32,
        }
    }
}

/// What each endpoint's task needs.
#[derive(Clone)]
struct Sender {
    store: Store,
    clock: Clock,
    config: Arc<SenderConfig>,
    metrics: RelayMetrics,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// Starts the sender on its own task; it stops when `cancel` fires (a POST
/// in flight is dropped: its batch is sent again, under the same id).
pub fn start(
    store: Store,
    clock: Clock,
    config: SenderConfig,
    metrics: RelayMetrics,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let sender = Sender {
        store,
        clock,
        config: Arc::new(config),
        metrics,
        tls: chukei_proto::tls::system_roots_connector(),
    };
    tokio::spawn(run(sender, cancel))
}

async fn run(sender: Sender, cancel: CancellationToken) {
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(sender.config.poll) => {}
        }
        while tasks.try_join_next().is_some() {}
        // Whether the hub writes messages' own events (another relay may
        // have added the first endpoint).
        if let Err(error) = sender.store.refresh_webhooks_listening().await {
            tracing::warn!(%error, "looking up webhook endpoints failed, will retry");
        }
        let room = sender.config.concurrency.saturating_sub(tasks.len());
        if room == 0 {
            continue;
        }
        let due = match sender
            .store
            .due_webhooks(sender.clock.now_ms(), room as i64 * 2)
            .await
        {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "reading due webhook endpoints failed, will retry");
                continue;
            }
        };
        for id in due {
            if tasks.len() >= sender.config.concurrency {
                break;
            }
            if !busy.lock().expect("busy set").insert(id.clone()) {
                continue;
            }
            let (sender, busy) = (sender.clone(), busy.clone());
            tasks.spawn(async move {
                sender.serve(&id).await;
                busy.lock().expect("busy set").remove(&id);
            });
        }
    }
    tasks.shutdown().await;
}

impl Sender {
    /// How long an endpoint is taken for: one attempt, with room to record it.
    fn lease_ms(&self) -> i64 {
        (self.config.timeout.as_millis() as i64) * 2 + 5_000
    }

    /// Delivers `id`'s batches while it takes them and has any.
    async fn serve(&self, id: &str) {
        loop {
            let now = self.clock.now_ms();
            let endpoint = match self.store.claim_webhook(id, now, self.lease_ms()).await {
                Ok(Some(endpoint)) => endpoint,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "taking a webhook endpoint failed, will retry");
                    return;
                }
            };
            match self.deliver_next(&endpoint).await {
                Ok(true) => continue,
                Ok(false) => return,
                Err(error) => {
                    tracing::warn!(%error, endpoint = %endpoint.id, "webhook delivery failed to record, will retry");
                    return;
                }
            }
        }
    }

    /// Sends the endpoint's next batch and records the outcome; whether to
    /// go on at once (delivered or skipped, and there may be more).
    async fn deliver_next(&self, endpoint: &EndpointRow) -> crate::error::Result<bool> {
        let fresh_id = crate::credentials::new_id("whmsg");
        let batch = match self.store.webhook_batch(endpoint, &fresh_id).await? {
            Next::Batch(batch) => batch,
            Next::Skipped => {
                self.store
                    .release_webhook(&endpoint.id, self.clock.now_ms())
                    .await?;
                return Ok(true);
            }
            Next::Idle => {
                // Nothing to send: free the endpoint for the next poll.
                self.store
                    .release_webhook(&endpoint.id, self.clock.now_ms())
                    .await?;
                return Ok(false);
            }
        };
        let body = payload(&batch);
        let started = Instant::now();
        let now = self.clock.now_ms();
        let outcome = self.post(endpoint, &batch.webhook_id, now, &body).await;
        let mut attempt = Attempt {
            webhook_id: &batch.webhook_id,
            at: now,
            events: batch.events.len() as i64,
            status: 0,
            duration_ms: started.elapsed().as_millis() as i64,
            error: "",
        };
        match outcome {
            Ok(Answer { status, .. }) if (200..300).contains(&status) => {
                attempt.status = i64::from(status);
                self.store
                    .webhook_delivered(&endpoint.id, &batch, &attempt)
                    .await?;
                self.metrics
                    .webhook_attempts
                    .inc(&[("outcome", "delivered")]);
                self.metrics
                    .webhook_events
                    .add(&[], batch.events.len() as u64);
                Ok(true)
            }
            Ok(Answer { status: 410, .. }) => {
                attempt.status = 410;
                attempt.error = "410 Gone: the endpoint asked not to be called again";
                self.store
                    .webhook_failed(&endpoint.id, &attempt, now, Some(attempt.error))
                    .await?;
                self.metrics
                    .webhook_attempts
                    .inc(&[("outcome", "disabled")]);
                tracing::info!(endpoint = %endpoint.id, "webhook endpoint answered 410: disabled");
                Ok(false)
            }
            Ok(answer) => {
                attempt.status = i64::from(answer.status);
                let error_text = format!("answered {}", answer.status);
                self.failed(endpoint, attempt, &error_text, answer.retry_after)
                    .await
            }
            Err(error) => self.failed(endpoint, attempt, &error, None).await,
        }
    }

    /// Records a failed attempt (`error_text`): retried on the schedule (or
    /// when the endpoint's `retry_after` says), or the endpoint disabled once
    /// it has failed for longer than allowed.
    async fn failed<'a>(
        &self,
        endpoint: &EndpointRow,
        mut attempt: Attempt<'a>,
        error_text: &'a str,
        retry_after: Option<Duration>,
    ) -> crate::error::Result<bool> {
        attempt.error = error_text;
        let now = attempt.at;
        let failures = endpoint.failures as u64 + 1;
        let wait = self.config.schedule.after(failures, retry_after);
        let failing_since = endpoint.failing_since.unwrap_or(now);
        let give_up = now - failing_since >= self.config.disable_after.as_millis() as i64;
        let reason = give_up.then(|| {
            format!(
                "failing since {} ms ago; last: {error_text}",
                now - failing_since
            )
        });
        self.store
            .webhook_failed(
                &endpoint.id,
                &attempt,
                now + wait.as_millis() as i64,
                reason.as_deref(),
            )
            .await?;
        let outcome = if give_up { "disabled" } else { "failed" };
        self.metrics.webhook_attempts.inc(&[("outcome", outcome)]);
        Ok(false)
    }

    /// One signed POST of `body` to the endpoint, within the timeout.
    async fn post(
        &self,
        endpoint: &EndpointRow,
        webhook_id: &str,
        now: i64,
        body: &[u8],
    ) -> Result<Answer, String> {
        let target = check_url(&endpoint.url).map_err(|e| e.to_string())?;
        let timestamp = now.div_euclid(1000);
        let signature =
            super::signature(&endpoint.signing_secrets(now), webhook_id, timestamp, body);
        let request = hyper::Request::post(&target.path)
            .header(hyper::header::HOST, host_header(&target))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "chukei-relay-webhooks/1")
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        tokio::time::timeout(self.config.timeout, self.exchange(&target, request))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.config.timeout)))
    }

    async fn exchange(
        &self,
        target: &Target,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<Answer, String> {
        let addr = self.resolve(target).await?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if target.tls {
            let connector = self
                .tls
                .clone()
                .ok_or("no trusted root certificates for https")?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("the host is not a TLS name: {e}"))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(hyper_util::rt::TokioIo::new(stream), request).await
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), request).await
        }
    }

    /// The address to call: the first the host resolves to, refused when any
    /// of them is internal and the operator did not allow that.
    async fn resolve(&self, target: &Target) -> Result<SocketAddr, String> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("resolving the host: {e}"))?
            .collect();
        if !self.config.allow_internal && addrs.iter().any(|a| is_internal(a.ip())) {
            return Err(
                "the host resolves to an internal address (loopback, private, link-local)"
                    .to_owned(),
            );
        }
        addrs
            .first()
            .copied()
            .ok_or_else(|| "the host resolves to no address".to_owned())
    }
}

/// What an endpoint answered.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
}

async fn send<IO>(io: IO, request: hyper::Request<Full<Bytes>>) -> Result<Answer, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let retry_after = response
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Ok(Answer {
        status: response.status().as_u16(),
        retry_after,
    })
}

fn host_header(target: &Target) -> String {
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    let default = if target.tls { 443 } else { 80 };
    if target.port == default {
        host
    } else {
        format!("{host}:{}", target.port)
    }
}

/// The JSON body of a batch: the same bytes on every attempt.
pub fn payload(batch: &Batch) -> Vec<u8> {
    let mut next = batch.first_sequence.clone();
    let data: Vec<Event> = batch
        .events
        .iter()
        .filter_map(|e| {
            let event_type = EventType::from_kind(e.kind)?;
            let sequence = next.entry(e.message_id.clone()).or_insert(1);
            let message_event = e.user_ref.is_empty();
            let event = Event {
                id: event_id(&e.message_id, &e.user_ref, event_type),
                event_type,
                message_id: e.message_id.clone(),
                user_ref: (!message_event).then(|| e.user_ref.clone()),
                occurred_at: rfc3339(e.at),
                sequence: (*sequence).max(1) as u64,
                channel: crate::content::Channel::from_number(e.channel),
                counts: e
                    .detail
                    .as_deref()
                    .and_then(|detail| serde_json::from_str(detail).ok()),
            };
            *sequence += 1;
            Some(event)
        })
        .collect();
    let newest = batch.events.iter().map(|e| e.at).max().unwrap_or(0);
    let payload = Payload {
        payload_type: "events.batch".to_owned(),
        timestamp: rfc3339(newest),
        data,
    };
    serde_json::to_vec(&payload).expect("a payload serializes")
}
