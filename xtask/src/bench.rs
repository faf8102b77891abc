//! `cargo xtask bench`: release builds, then `outpost-bench` against a real
//! nats-server and hub; writes docs/benchmarks.md.

use crate::{cargo, ensure_nats_server, root, run, target_dir};
use anyhow::Result;
use std::process::Command;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Smaller runs (fan-out to 1,000 only), for a quick check.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the table.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: String,
    /// Run these sections only, comma-separated: wire, floor, seq, pipe, fan, start, views, agent
    /// (for profiling; the table then holds only their rows).
    #[arg(long, value_name = "SECTIONS")]
    pub only: Option<String>,
}

/// The agent whose footprint the bench measures, when it could be built.
const FIRMWARE_AGENT_ENV: &str = "OUTPOST_FIRMWARE_AGENT";

/// The agent as the units run it (static musl, `release-edge`), built for this
/// machine's CPU so its RSS is measured natively instead of through qemu-user. Needs
/// rustup's x86_64 musl std; without it the bench measures the glibc `release` build
/// and says so.
fn firmware_agent() -> Option<std::path::PathBuf> {
    const TRIPLE: &str = "x86_64-unknown-linux-musl";
    let mut c = cargo();
    c.args(["build", "--profile", crate::cross::FIRMWARE_PROFILE])
        .args(["-p", "outpost-edge", "--target", TRIPLE]);
    // ring's C: Debian has no x86_64-linux-musl-gcc unless musl-tools is installed;
    // gcc builds ring's self-contained C for a static musl link just as well.
    if crate::on_path("x86_64-linux-musl-gcc").is_none() {
        c.env("CC_x86_64_unknown_linux_musl", "gcc");
    }
    match run(&mut c) {
        Ok(()) => Some(
            target_dir()
                .join(TRIPLE)
                .join(crate::cross::FIRMWARE_PROFILE)
                .join("outpost-edge"),
        ),
        Err(e) => {
            eprintln!(
                "bench: no {TRIPLE} firmware build ({e:#}); the footprint rows measure the glibc release build"
            );
            None
        }
    }
}

pub fn bench(a: &Args) -> Result<()> {
    ensure_nats_server()?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "outpost-hub",
        "-p",
        "outpost-edge",
    ]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "outpost-tests",
        "--bin",
        "outpost-bench",
    ]))?;
    let mut cmd = Command::new(target_dir().join("release/outpost-bench"));
    cmd.current_dir(root()).args(["--out", &a.out]);
    if let Some(agent) = firmware_agent() {
        cmd.env(FIRMWARE_AGENT_ENV, agent);
    }
    if a.quick {
        cmd.arg("--quick");
    }
    if let Some(only) = &a.only {
        cmd.args(["--only", only]);
    }
    run(&mut cmd)
}
