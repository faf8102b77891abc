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
    if a.quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}
