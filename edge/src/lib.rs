//! outpost-edge: the agent that runs on each unit. `main.rs` parses flags into a
//! [`config::Config`] and calls [`agent::run`]; everything else lives here so the fleet
//! simulator and tests can drive the same code.

/// This agent's version as it reports it in every hello and `--version`: the crate
/// version, or what the build stamped into `OUTPOST_VERSION` (release pipelines put
/// a build id there; the Ansible upgrade test builds a second, stamped binary).
pub const VERSION: &str = match option_env!("OUTPOST_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub mod agent;
pub mod config;
pub mod intake;
pub mod inventory;
pub mod methods;
pub mod policy;
pub mod state;
