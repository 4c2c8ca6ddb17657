//! The simulation's deterministic randomness: the hub's shared generator.

pub use chukei_proto::rng::Rng;
