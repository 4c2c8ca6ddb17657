//! Chukei's wire contracts and the few wire-level pieces every process shares.
//!
//! The generated modules mirror the proto packages (`chukei.relay.v1` is
//! [`relay::v1`]). Besides them this crate owns: the injectable [`clock`] (and the
//! conversion of its instants to `google.protobuf.Timestamp`), bearer-token
//! metadata ([`auth`]), deterministic randomness ([`rng`]), the scaffolding
//! every gRPC server shares ([`server`]:
//! health, reflection, shutdown signals) and [`telemetry`] set-up. It must never
//! hold business logic: services convert these types to their own domain types
//! at their gRPC edge.

pub mod auth;
pub mod clock;
pub mod codec;
pub mod crash;
pub mod deliver;
pub mod http;
pub mod metrics;
pub mod push;
pub mod rng;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod turn;
pub mod validate;
pub mod web;
pub mod window;

#[allow(unreachable_pub, clippy::all, clippy::pedantic)]
pub mod common {
    pub mod v1 {
        tonic::include_proto!("chukei.common.v1");
    }
}

impl common::v1::Channel {
    /// The short name flags, tables and logs use: `rcs`, `sms`, `sns`,
    /// `email` (`default` for unspecified: the carrier's default channel).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified => "default",
            Self::Rcs => "rcs",
            Self::Sms => "sms",
            Self::Sns => "sns",
            Self::Email => "email",
        }
    }

    /// The channel a short name names; `None` for anything else.
    pub fn from_short_name(name: &str) -> Option<Self> {
        [Self::Rcs, Self::Sms, Self::Sns, Self::Email]
            .into_iter()
            .find(|channel| channel.short_name() == name)
    }

    /// The short name of a wire value (`?` for an unknown one).
    pub fn short_name_of(number: i32) -> &'static str {
        Self::try_from(number).map_or("?", Self::short_name)
    }
}

#[allow(unreachable_pub, clippy::all, clippy::pedantic)]
pub mod relay {
    pub mod v1 {
        tonic::include_proto!("chukei.relay.v1");
    }
}

#[allow(unreachable_pub, clippy::all, clippy::pedantic)]
pub mod carrier {
    pub mod v1 {
        tonic::include_proto!("chukei.carrier.v1");
    }
}

#[allow(unreachable_pub, clippy::all, clippy::pedantic)]
pub mod terminal {
    pub mod v1 {
        tonic::include_proto!("chukei.terminal.v1");
    }
}

/// The encoded descriptor set of every Chukei proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chukei_descriptor.bin"));

/// The standard gRPC health protocol's client side, for readiness checks.
pub mod health {
    pub use tonic_health::pb::HealthCheckRequest;
    pub use tonic_health::pb::health_check_response::ServingStatus;
    pub use tonic_health::pb::health_client::HealthClient;
}
