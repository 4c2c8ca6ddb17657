//! Small helpers every test file uses: waiting for a condition, logs,
//! the machine a figure was measured on, requests and expectations from
//! the fleet model, and raw SQL below the storage seam.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use chukei_proto::relay::v1 as pb;
use terminal_sim::fleet::{Fleet, SimUser};

use crate::*;

/// The machine a figure was measured on: cores, CPU model, memory.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .map_or_else(String::new, |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}, {memory}")
}

/// Waits (bounded) until `check` returns `Some`; fails with `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs of every in-process service, captured per test (`RUST_LOG`, default warn).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A `SendMessage` request (primary carriers only).
pub fn send_request(
    idempotency_key: &str,
    target: pb::target::Kind,
    text: &str,
    channel: chukei_proto::common::v1::Channel,
) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        idempotency_key: idempotency_key.into(),
        target: Some(pb::Target { kind: Some(target) }),
        content: Some(chukei_proto::common::v1::Content {
            text: text.into(),
            ..Default::default()
        }),
        channel: channel as i32,
        ..Default::default()
    }
}

/// `people`, each with a primary contract on `carrier_id`, straight
/// through the store.
pub async fn contract_primary(
    store: &relay_svc::storage::Store,
    carrier_id: &str,
    people: &[String],
    now: i64,
) -> anyhow::Result<()> {
    let contracts: Vec<relay_svc::registry::Contract> = people
        .iter()
        .map(|user| relay_svc::registry::Contract {
            user_id: user.clone(),
            primary: true,
            active: true,
        })
        .collect();
    store.upsert_contracts(carrier_id, &contracts, now).await?;
    Ok(())
}

/// `people`, each with a primary contract on `carrier_id` and registered
/// with `enterprise_id` (no service, no consented attributes), straight
/// through the store.
pub async fn contract_and_register(
    store: &relay_svc::storage::Store,
    carrier_id: &str,
    enterprise_id: &str,
    people: &[String],
    now: i64,
) -> anyhow::Result<()> {
    use relay_svc::registry::{NewRegistration, Profile};
    contract_primary(store, carrier_id, people, now).await?;
    let registrations: Vec<NewRegistration> = people
        .iter()
        .map(|user| NewRegistration {
            user_id: user.clone(),
            enterprise_id: enterprise_id.into(),
            service_id: None,
            profile: Profile::default(),
            text_version: "v1".into(),
        })
        .collect();
    store
        .register_users(carrier_id, &registrations, now)
        .await?;
    Ok(())
}

/// Collects registrations the fleet model makes, for computing expectations.
pub fn registered_users(
    fleet: &Fleet,
    enterprise_id: &str,
) -> HashMap<String, terminal_sim::fleet::SimUser> {
    fleet
        .users
        .iter()
        .filter(|u| u.consent_for(fleet.seed, enterprise_id).is_some())
        .map(|u| (u.user_id.clone(), u.clone()))
        .collect()
}

/// The refs on the first page of the enterprise's registrations (up to
/// `page_size`; 0: the relay's default), as the enterprise sees them.
pub async fn listed_refs(client: &mut Enterprise, page_size: u32) -> anyhow::Result<Vec<String>> {
    Ok(client
        .list_registrations(pb::ListRegistrationsRequest {
            page_size,
            ..Default::default()
        })
        .await?
        .into_inner()
        .registrations
        .into_iter()
        .map(|r| r.user_ref)
        .collect())
}

/// The enterprise's refs for the users the fleet registered with it. An
/// enterprise cannot map refs back to people; the test asks the carriers,
/// where registering again is idempotent and answers with the same refs.
pub async fn refs_by_user(
    hub: &Hub,
    fleet: &Fleet,
    enterprise_id: &str,
) -> HashMap<String, String> {
    let users: Vec<&SimUser> = fleet
        .users
        .iter()
        .filter(|u| u.consent_for(fleet.seed, enterprise_id).is_some())
        .collect();
    let mut refs = HashMap::new();
    for carrier in &hub.carriers {
        let mut client =
            chukei_proto::carrier::v1::subscriber_api_client::SubscriberApiClient::connect(
                carrier.url(),
            )
            .await
            .unwrap();
        let mine: Vec<&&SimUser> = users
            .iter()
            .filter(|u| u.carriers[0] == carrier.carrier_id)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let response = client
            .register(chukei_proto::carrier::v1::RegisterRequest {
                registrations: mine
                    .iter()
                    .map(|u| chukei_proto::carrier::v1::SubscriberRegistration {
                        user_id: u.user_id.clone(),
                        enterprise_id: enterprise_id.into(),
                        service_id: String::new(),
                        consent: u.consent_for(fleet.seed, enterprise_id),
                        text_version: carrier_svc::consent::TEXT_VERSION.into(),
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner();
        for (user, user_ref) in mine.iter().zip(response.user_refs) {
            refs.insert(user.user_id.clone(), user_ref);
        }
    }
    refs
}

/// Raw SQL below the storage seam, for tests that look at (or tamper with)
/// what the relay stored: `sql` with `$1` bound to `bind`, one integer back.
pub async fn sql_scalar(store: &relay_svc::storage::Store, sql: &str, bind: &str) -> i64 {
    use relay_svc::storage::Store;
    let sql = || sqlx::AssertSqlSafe(sql.to_owned());
    match store {
        Store::Sqlite(pool, _) => sqlx::query_scalar(sql()).bind(bind).fetch_one(pool).await,
        Store::Postgres(pool, _) => sqlx::query_scalar(sql()).bind(bind).fetch_one(pool).await,
    }
    .expect("the query runs")
}

/// Runs one statement below the storage seam; the database's answer.
pub async fn sql_execute(store: &relay_svc::storage::Store, sql: &str) -> Result<u64, sqlx::Error> {
    use relay_svc::storage::Store;
    let sql = || sqlx::AssertSqlSafe(sql.to_owned());
    match store {
        Store::Sqlite(pool, _) => sqlx::query(sql())
            .execute(pool)
            .await
            .map(|d| d.rows_affected()),
        Store::Postgres(pool, _) => sqlx::query(sql())
            .execute(pool)
            .await
            .map(|d| d.rows_affected()),
    }
}
