//! One module per enterprise command (the `cmd/` layout of mini-redis):
//! each holds the command's flags and its `run`, which calls the relay and
//! writes a table or JSON.

pub mod auction;
pub mod billing;
pub mod explain;
pub mod registrations;
pub mod send;
pub mod stats;
pub mod status;
pub mod webhooks;
