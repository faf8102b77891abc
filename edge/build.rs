//! Passes build facts to the agent:
//! - the target triple, from which it reports its CPU family: Rust's `target_arch`
//!   says `arm` for both armv6 and armv7 builds, and an operator (or an update) must
//!   know which of the two a unit runs;
//! - the build time, its floor for the clock when it checks certificates (a Pi with
//!   no RTC boots in 1970; ADR 0011). `SOURCE_DATE_EPOCH` (seconds) wins, for
//!   reproducible builds; else the time the build script ran.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=OUTPOST_TARGET={target}");
    let ms = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| s * 1000)
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=OUTPOST_BUILD_TIME_MS={ms}");
}
