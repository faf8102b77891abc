//! Passes the target triple to the agent, which reports its CPU family from it: Rust's
//! `target_arch` says `arm` for both armv6 and armv7 builds, and an operator (or an
//! update) must know which of the two a unit runs.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=OUTPOST_TARGET={target}");
}
