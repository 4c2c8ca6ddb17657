//! The chaos run's webhook receiver and invariant I7: every event reaches
//! the enterprise's endpoint at least once, unchanged. The receiver fails
//! on purpose — every fifth request answered 503, every seventh dropped
//! unanswered, as a receiver that crashed — while the relays are killed
//! and restarted around it, and keeps every request it read. I7 counts the
//! events in the relay's database that never arrived, the events whose
//! copies differ, the events that arrived but are not in the database, and
//! the requests whose signature does not verify.

use std::sync::atomic::AtomicU64;

use serde_json::Value;

use super::*;
use crate::http::{Post, call, serve_posts};

/// The receiver: what it read, and the endpoint's signing secret.
pub(super) struct Receiver {
    posts: Arc<Mutex<Vec<Post>>>,
    secret: String,
}

impl Receiver {
    /// Starts the receiver and adds it as an endpoint of the enterprise
    /// whose key is `api_key`, at the relay `relay_url`.
    pub(super) async fn start(relay_url: &str, api_key: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks", listener.local_addr()?);
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let (kept, count) = (posts.clone(), Arc::new(AtomicU64::new(0)));
        serve_posts(listener, move |post| {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            kept.lock().unwrap().push(post);
            match n {
                n if n % 7 == 0 => None,
                n if n % 5 == 0 => Some(503),
                _ => Some(204),
            }
        });
        let auth = format!("Bearer {api_key}");
        let reply = call(
            relay_url,
            "POST",
            "/v1/webhooks",
            &[("Authorization", auth.as_str())],
            Some(&serde_json::json!({"url": url})),
        )
        .await;
        anyhow::ensure!(reply.status == 201, "adding the endpoint: {}", reply.body);
        let secret = reply.json()["secret"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(Self { posts, secret })
    }

    /// I7, once every event in the database arrived or `within` passed.
    pub(super) async fn violations(&self, db: &Db, within: Duration) -> anyhow::Result<u64> {
        // (message, "ref:kind") of every event an endpoint is sent: a
        // registered person's (not of a message sent by attributes), and
        // the message's own (ref "").
        let expected: HashSet<(String, String)> = db
            .pairs(
                "SELECT e.message_id, COALESCE(r.user_ref, '') || ':' || CAST(e.kind AS TEXT)
                 FROM events e JOIN messages m ON m.id = e.message_id
                 LEFT JOIN registrations r ON r.enterprise_id = m.enterprise_id AND r.user_id = e.user_id
                 WHERE (r.user_ref IS NOT NULL AND NOT m.by_attributes) OR e.user_id = ''",
            )
            .await?
            .into_iter()
            .collect();
        let deadline = Instant::now() + within;
        loop {
            let (received, differing, bad_signatures) = self.received();
            let missing = expected.difference(&received).count() as u64;
            if missing == 0 || Instant::now() > deadline {
                if missing > 0 {
                    eprintln!("chaos: {missing} webhook events never arrived");
                }
                let made_up = received.difference(&expected).count() as u64;
                return Ok(missing + made_up + differing + bad_signatures);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What arrived: (message, "ref:kind") of each event, how many events
    /// came with different contents under one id, and how many requests
    /// failed verification.
    fn received(&self) -> (HashSet<(String, String)>, u64, u64) {
        let posts = self.posts.lock().unwrap().clone();
        let mut seen: HashMap<String, Value> = HashMap::new();
        let mut keys = HashSet::new();
        let (mut differing, mut bad) = (0, 0);
        for post in posts {
            let (Some(id), Some(timestamp), Some(signatures)) = (
                post.header("webhook-id"),
                post.header("webhook-timestamp")
                    .and_then(|t| t.parse::<i64>().ok()),
                post.header("webhook-signature"),
            ) else {
                bad += 1;
                continue;
            };
            let expected =
                relay_svc::webhooks::signature(&[&self.secret], id, timestamp, &post.body);
            if !signatures.split(' ').any(|s| s == expected) {
                bad += 1;
                continue;
            }
            let body: Value = serde_json::from_slice(&post.body).unwrap_or_default();
            for event in body["data"].as_array().into_iter().flatten() {
                let event_id = event["id"].as_str().unwrap_or_default().to_owned();
                if let Some(first) = seen.get(&event_id) {
                    differing += u64::from(first != event);
                    continue;
                }
                let kind = event["type"]
                    .as_str()
                    .and_then(relay_svc::webhooks::EventType::from_name)
                    .map_or(0, |t| t.number());
                keys.insert((
                    event["message_id"].as_str().unwrap_or_default().to_owned(),
                    format!("{}:{kind}", event["user_ref"].as_str().unwrap_or_default()),
                ));
                seen.insert(event_id, event.clone());
            }
        }
        (keys, differing, bad)
    }
}
