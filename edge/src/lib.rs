//! outpost-edge: the agent that runs on each unit. `main.rs` parses flags into a
//! [`config::Config`] and calls [`agent::run`]; everything else lives here so the fleet
//! simulator and tests can drive the same code.

pub mod agent;
pub mod config;
pub mod intake;
pub mod inventory;
pub mod methods;
pub mod policy;
pub mod state;
