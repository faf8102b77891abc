//! outpost-hub: the daemon (`serve`), the operator CLI, and the fleet PKI. `main.rs`
//! only parses flags; the pieces live here so tests and tools can reuse them.

pub mod cli;
pub mod conn;
pub mod enroll;
pub mod pki;
pub mod serve;
pub mod store;
