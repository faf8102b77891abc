//! Cargo-installed tools (cargo-deb, cargo-fuzz) kept in `<target dir>/tools`, not in
//! `~/.cargo/bin`: CI's target dir is its cache, so a tool is compiled once per cache
//! rather than once per machine, and nothing is written outside the build's own
//! directories (a read-only toolchain, as `cargo xtask fresh-ci` mounts it, works).

use crate::{cargo, run, target_dir};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

/// One tool from crates.io, pinned so every machine builds the same one.
pub struct CargoTool {
    /// The crate, as `cargo install` names it.
    pub krate: &'static str,
    pub version: &'static str,
    /// The binary it installs.
    pub bin: &'static str,
}

/// Where the tools are installed (`--root`); their binaries are in `bin/`.
pub fn tools_root() -> PathBuf {
    target_dir().join("tools")
}

/// The tool's binary, installed (`cargo install --locked`) when missing or another
/// version.
pub fn ensure(t: &CargoTool) -> Result<PathBuf> {
    let root = tools_root();
    let bin = root.join("bin").join(t.bin);
    let stamp = root.join(format!("{}.version", t.krate));
    if bin.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(t.version) {
        return Ok(bin);
    }
    let t0 = Instant::now();
    eprintln!(
        "tools: installing {}@{} into {} (compiled once per target dir; a few minutes)",
        t.krate,
        t.version,
        root.display()
    );
    run(cargo()
        .args(["install", "--locked", "--force", "--root"])
        .arg(&root)
        .arg(format!("{}@{}", t.krate, t.version))
        // Its own build dir: a tool's dependencies are not the workspace's.
        .env("CARGO_TARGET_DIR", root.join("build")))
    .with_context(|| format!("installing {} from crates.io", t.krate))?;
    std::fs::write(&stamp, t.version)?;
    let _ = std::fs::remove_dir_all(root.join("build"));
    eprintln!("tools: {} installed in {:.0?}", t.krate, t0.elapsed());
    Ok(bin)
}

/// PATH with the tools' `bin/` first, for `cargo <tool>` subcommands.
pub fn path_with_tools() -> Result<std::ffi::OsString> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::join_paths(
        std::iter::once(tools_root().join("bin")).chain(std::env::split_paths(&path)),
    )?)
}
