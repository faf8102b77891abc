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

/// The target triple this agent was built for (from `build.rs`).
pub const TARGET: &str = env!("OUTPOST_TARGET");

/// The CPU family the agent reports in its hello: the triple's first part, with
/// 32-bit ARM told apart (`armv7`, and `armv6` for `arm-…`, the Pi Zero and Pi 1
/// build), since the two need different binaries. Else Rust's `target_arch`.
pub fn arch() -> &'static str {
    match TARGET.split('-').next() {
        Some("arm") => "armv6",
        Some(a) if a.starts_with("armv7") => "armv7",
        _ => std::env::consts::ARCH,
    }
}

pub mod agent;
pub mod child_env;
pub mod clock;
pub mod config;
pub mod intake;
pub mod inventory;
pub mod methods;
pub mod policy;
pub mod protected;
pub mod state;
pub mod trust;

#[cfg(test)]
mod tests {
    #[test]
    fn arch_names_the_build() {
        // Host builds keep Rust's name; the ARM names are checked under qemu-user.
        if !super::TARGET.starts_with("arm") {
            assert_eq!(super::arch(), std::env::consts::ARCH);
        }
        assert!(!super::TARGET.is_empty());
    }
}
