//! The integration harness: starts the relay, carriers and a terminal fleet
//! in-process on `127.0.0.1:0` listeners with temporary databases, and hands
//! out clients. Every service runs through the same `run` its binary calls.
//!
//! PostgreSQL: when `CHUKEI_TEST_DATABASE_URL` is set, [`Backend::Postgres`]
//! hubs get a fresh database each (created from that URL, dropped by
//! [`Hub::shutdown`]); when it is set and the server is unreachable, the
//! test fails. When it is unset, PostgreSQL variants return `None` and the
//! test says it skipped.
#![forbid(unsafe_code)]

mod acking;
mod backend;
pub mod binaries;
pub mod chaos;
pub mod http;
mod hub;
pub mod latency;
pub mod peers;
pub mod process;
mod running;
pub mod scene;
mod support;

pub use acking::AckingCarrier;
pub use backend::{Backend, Fixture, drop_postgres_database, postgres_database, store};
pub use hub::{CarrierNode, Hub, Settings, Tuning, wait_healthy, wait_healthy_for};
pub use support::{
    contract_and_register, contract_primary, eventually, init_logs, listed_refs, machine,
    refs_by_user, registered_users, send_request, sql_execute, sql_scalar,
};

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1::admin_client::AdminClient;
use chukei_proto::relay::v1::enterprise_api_client::EnterpriseApiClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const DELIVER_TOKEN: &str = "test-deliver-token-0123456789";
pub const CARRIER_ADMIN_TOKEN: &str = "test-carrier-admin-0123456789";
pub const POSTGRES_ENV: &str = "CHUKEI_TEST_DATABASE_URL";

pub type Enterprise = EnterpriseApiClient<InterceptedService<Channel, BearerInterceptor>>;
pub type Admin = AdminClient<InterceptedService<Channel, BearerInterceptor>>;
