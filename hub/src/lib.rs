//! outpost-hub: the daemon (`serve`), the operator CLI, and the fleet PKI. `main.rs`
//! only parses flags; the pieces live here so tests and tools can reuse them.
//!
//! The daemon is built around one pure command state machine (`machine`), with a room
//! per concept around it: `ledger` (the one way a record changes), `delivery` (per
//! unit), `reports` (what units send), `registry` (who is enrolled, online, able),
//! `api` (operators), `store` (JetStream), `keys` (signing), `serve` (start and stop).

pub mod api;
pub mod cli;
pub mod conn;
pub mod delivery;
pub mod enroll;
pub mod keys;
pub mod ledger;
pub mod machine;
pub mod pki;
pub mod registry;
pub mod reports;
pub mod selector;
pub mod serve;
pub mod store;
