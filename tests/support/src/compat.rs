//! Binaries of a released commit, for the mixed-version tests (tests/it/compat.rs,
//! issue 14): the source is checked out of this repository's history with
//! `git archive`, built once in a target dir of its own (the current workspace's would
//! mix the two crates of the same name) and cached as `<target>/compat/<commit>/bin`.
//! A later run finds the binaries there and builds nothing.

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The last commit that spoke only protocol version 1: the one before issue 14's
/// first change. Its agent and hub are what a fleet runs before the upgrade.
pub const PROTOCOL_1: &str = "07d79b951aaacb5129399df532fc9c13c5fdbfef";

/// A released build: its hub (also the operator CLI) and its agent.
pub struct Release {
    pub commit: &'static str,
    pub hub: PathBuf,
    pub edge: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn git(args: &[&str]) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(repo()).args(args);
    c
}

/// The commit's object is in this clone, or fetched into it (a shallow clone).
fn have_commit(commit: &str) -> Result<()> {
    let has = |c: &str| {
        git(&["cat-file", "-e", &format!("{c}^{{commit}}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has(commit) {
        return Ok(());
    }
    eprintln!("compat: {commit} is not in this clone; fetching it from origin");
    let _ = git(&["fetch", "--quiet", "origin", commit]).status();
    ensure!(
        has(commit),
        "the mixed-version tests build the release at commit {commit} from this \
         repository's history, and this clone does not have it (a shallow clone?): \
         clone without --depth, or run `git fetch --unshallow`"
    );
    Ok(())
}

/// The agent and hub of `commit`, built on first use (a few minutes, once per
/// target dir; later calls return at once). Safe to call from several test
/// processes at a time: one builds, the others wait for it.
pub fn release(commit: &'static str) -> Result<Release> {
    let target = crate::bin_dir()
        .parent()
        .context("target dir")?
        .to_path_buf();
    let dir = target.join("compat").join(commit);
    let bin = dir.join("bin");
    let found = Release {
        commit,
        hub: bin.join("outpost-hub"),
        edge: bin.join("outpost-edge"),
    };
    if found.hub.exists() && found.edge.exists() {
        return Ok(found);
    }
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::File::create(dir.join("lock"))?;
    lock.lock().context("lock the compat build")?;
    if found.hub.exists() && found.edge.exists() {
        return Ok(found);
    }
    have_commit(commit)?;
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let tar = dir.join("src.tar");
    let st = git(&["archive", "--format=tar", "-o"])
        .arg(&tar)
        .arg(commit)
        .status()?;
    ensure!(st.success(), "git archive {commit} failed");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .status()?;
    ensure!(st.success(), "cannot unpack {}", tar.display());
    let _ = std::fs::remove_file(&tar);

    eprintln!(
        "compat: building the agent and hub of {commit} (once; a few minutes) in {}",
        dir.display()
    );
    let build = dir.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(&src)
        .args([
            "build",
            "--locked",
            "-p",
            "outpost-hub",
            "-p",
            "outpost-edge",
        ])
        .env("CARGO_TARGET_DIR", &build)
        // A one-off build: no incremental cache, no debug info (faster, smaller).
        .env("CARGO_INCREMENTAL", "0")
        .env("CARGO_PROFILE_DEV_DEBUG", "0");
    // What `cargo test` set for this process is about the current workspace.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
            ]
            .contains(&k.as_str())
        {
            c.env_remove(k);
        }
    }
    let st = c.status().context("run cargo")?;
    if !st.success() {
        bail!("building {commit} failed: see the cargo output above");
    }
    std::fs::create_dir_all(&bin)?;
    for name in ["outpost-hub", "outpost-edge"] {
        // Copied to a temporary name first: a binary is either whole or absent.
        let tmp = bin.join(format!(".{name}.tmp"));
        std::fs::copy(build.join("debug").join(name), &tmp)?;
        std::fs::rename(&tmp, bin.join(name))?;
    }
    // The binaries are all that is kept: the build dir is a few GB.
    let _ = std::fs::remove_dir_all(&build);
    let _ = std::fs::remove_dir_all(&src);
    Ok(found)
}
