//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (wire decoder, command
//! intake, the allow-list against a reference matcher), each replaying its corpus in `fuzz/corpus/<target>` and then fuzzing for a
//! fixed time. Needs the nightly toolchain; installs cargo-fuzz when missing.

use crate::tools::{self, CargoTool};
use crate::{root, run};
use anyhow::{Context, Result, bail};
use std::process::Command;

/// cargo-fuzz, pinned (installed into the target dir's tools, see tools.rs).
const CARGO_FUZZ: CargoTool = CargoTool {
    krate: "cargo-fuzz",
    version: "0.13.2",
    bin: "cargo-fuzz",
};

pub fn ensure_cargo_fuzz() -> Result<()> {
    tools::ensure(&CARGO_FUZZ).map(|_| ())
}

pub const TARGETS: &[&str] = &["wire_decode", "command_intake", "policy_check"];

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seconds of fuzzing per target, after the corpus replay.
    #[arg(long, default_value_t = 60)]
    pub seconds: u32,
    /// Only this target (default: all).
    #[arg(long)]
    pub target: Option<String>,
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn fuzz(a: &Args) -> Result<()> {
    if !has_nightly() {
        bail!("cargo fuzz needs the nightly toolchain: `rustup toolchain install nightly`");
    }
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = match &a.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("unknown fuzz target {t:?}: one of {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    for t in targets {
        let corpus = root().join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let before = std::fs::read_dir(&corpus)?.count();
        // A fuzz build of its own: sanitizers would invalidate the normal target dir.
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root())
            .env("PATH", tools::path_with_tools()?)
            .args(["run", "nightly", "cargo", "fuzz", "run", "--target-dir"])
            .arg(crate::target_dir().join("fuzz"))
            .arg(t)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", a.seconds))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        run(&mut cmd)
            .with_context(|| format!("fuzz target {t} found a crash (see fuzz/artifacts/{t})"))?;
        let after = std::fs::read_dir(&corpus)?.count();
        eprintln!(
            "fuzz {t}: corpus {before} -> {after} inputs after {} s",
            a.seconds
        );
    }
    Ok(())
}
