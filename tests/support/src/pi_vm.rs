//! A Raspberry-Pi-like arm64 Debian VM (`cargo xtask pi-image`: systemd, SSH, python3,
//! user `pi` with passwordless sudo) booted under qemu-system-aarch64 for the tests that
//! install onto a unit the way an operator does: the Ansible test and the package test.
//!
//! Each boot gets a fresh qcow2 overlay on the base image, so the base stays clean.
//! SSH listens on a loopback port; `restrict=on` keeps the guest off every network but
//! SSH and the forwards a test adds (e.g. a `guestfwd` to the host's broker).

use crate::Proc;
use anyhow::{Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The files of `cargo xtask pi-image` in `<target>/qemu/pi-arm64/`.
pub const IMAGE_FILES: [&str; 4] = ["rootfs.ext4", "vmlinuz", "initrd.img", "id_ed25519"];

/// What the host needs to boot one (besides the image).
pub const HOST_TOOLS: [&str; 5] = ["qemu-system-aarch64", "qemu-img", "ssh", "scp", "socat"];

/// Where the broker is for the guest when a test forwards it (`guestfwd`).
pub const HOST_BROKER_ADDR: &str = "10.0.2.100";

pub const SSH_OPTS: [&str; 8] = [
    "-q",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=5",
    "-o",
    "StrictHostKeyChecking=no",
    "-oUserKnownHostsFile=/dev/null",
];

pub struct PiVm {
    pub name: String,
    pub ssh_port: u16,
    pub proc: Proc,
    /// The test key baked into the image (root and pi).
    pub key: PathBuf,
    launched: Instant,
}

impl PiVm {
    /// Boot `image` (a `pi-image` directory) with its overlay and console log in `dir`;
    /// `net_extra` is appended to the `-netdev user` options (forwards).
    pub fn boot(name: &str, image: &Path, dir: &Path, net_extra: &str) -> Result<PiVm> {
        let overlay = dir.join(format!("{name}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image.join("rootfs.ext4"))
            .arg(&overlay)
            .status()?;
        ensure!(st.success(), "qemu-img create failed");
        let ssh_port = crate::free_port();
        let mut cmd = Command::new("qemu-system-aarch64");
        // `max` without pointer authentication and SVE, which no Pi 3/4 core has
        // (emulating them costs on every kernel entry): aarch64 like a Pi to every
        // program, and about a third faster under TCG than cortex-a53.
        cmd.args([
            "-M",
            "virt",
            "-cpu",
            "max,pauth=off,sve=off",
            "-smp",
            "1",
            "-m",
            "768",
        ])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .args(["-append", "root=/dev/vda rw console=ttyAMA0 quiet"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22{net_extra}"
        ))
        // romfile=: no iPXE option ROM (not installed everywhere, never needed).
        .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        let proc = Proc::spawn(name, cmd, dir.join(format!("{name}.console.log")))?;
        Ok(PiVm {
            name: name.into(),
            ssh_port,
            proc,
            key: image.join("id_ed25519"),
            launched: Instant::now(),
        })
    }

    /// Wait for SSH; how long after the launch it came.
    pub fn wait_ssh(&mut self, limit: Duration) -> Result<Duration> {
        let t0 = self.launched;
        while t0.elapsed() < limit {
            if let Some(st) = self.proc.try_wait()? {
                bail!(
                    "{}: qemu exited ({st}) before SSH came up:\n{}",
                    self.name,
                    self.proc.log_text()
                );
            }
            let st = self
                .ssh_cmd("true")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if st.success() {
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        bail!("{}: no SSH after {limit:?}", self.name)
    }

    fn ssh_cmd(&self, cmd: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(SSH_OPTS)
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &self.ssh_port.to_string(), "pi@127.0.0.1", cmd])
            .stdin(Stdio::null());
        c
    }

    /// Run a shell command as `pi` (prefix `sudo` for root); its output, whatever the
    /// exit status.
    pub fn ssh(&self, cmd: &str) -> Result<Output> {
        Ok(self.ssh_cmd(cmd).output()?)
    }

    /// Run a shell command that must succeed; its stdout.
    pub fn sh(&self, cmd: &str) -> Result<String> {
        let o = self.ssh(cmd)?;
        ensure!(
            o.status.success(),
            "{}: `{cmd}` failed ({}):\n{}{}",
            self.name,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Copy files into a directory on the guest (as `pi`).
    pub fn copy_in(&self, files: &[&Path], dest: &str) -> Result<()> {
        let st = Command::new("scp")
            .args(SSH_OPTS)
            .arg("-i")
            .arg(&self.key)
            .args(["-P", &self.ssh_port.to_string()])
            .args(files)
            .arg(format!("pi@127.0.0.1:{dest}"))
            .stdin(Stdio::null())
            .status()?;
        ensure!(st.success(), "{}: scp to {dest} failed", self.name);
        Ok(())
    }
}

/// The package's file from `packages.tsv` (package, agent version, arch, file), which
/// `cargo xtask package` keeps beside the packages.
pub fn deb_for(dir: &Path, pkg: &str, version: &str, arch: &str) -> Option<PathBuf> {
    let index = std::fs::read_to_string(dir.join("packages.tsv")).ok()?;
    index.lines().find_map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        (f.len() == 4 && f[0] == pkg && f[1] == version && f[2] == arch)
            .then(|| dir.join(f[3]))
            .filter(|p| p.is_file())
    })
}

/// The Debian version in a package's file name (`outpost-edge_0.1.0-1_arm64.deb`).
pub fn deb_version(deb: &Path) -> Option<String> {
    let name = deb.file_name()?.to_str()?;
    name.split('_').nth(1).map(str::to_string)
}
