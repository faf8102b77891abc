//! `cargo xtask qemu-image`: a whole ARM64 Linux unit for qemu-system-aarch64 (issue 5,
//! docs/qemu.md).
//!
//! The guest is Debian's arm64 kernel plus an initramfs with busybox-static:arm64, the
//! virtio (pci, net, blk) and ext4 modules with their dependencies, the aarch64 agent
//! from `cargo xtask cross`, and an init that brings up the network, mounts the
//! persistent disk (`/dev/vda`, ext4) at `/data`, and supervises the agent. Nothing
//! about a particular fleet is in it: a test appends a second cpio with `/config/`
//! (edge.toml, ca.pem, node.nk) at boot, so the base is built once.
//!
//! Everything lands in `<target dir>/qemu/`: `debs/` (the downloaded packages) and
//! `aarch64/` (`vmlinuz`, `base.cpio.gz`, `kernel-release`, `stamp`). The stamp records
//! the package versions, the agent binary and this file's init script; the base is
//! rebuilt only when one of them changes. CI caches the target dir, so a warm run
//! downloads nothing.

use crate::{cross, on_path, run, show, target_dir};
use anyhow::{Context, Result, bail};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Rebuild the base even if its stamp matches.
    #[arg(long)]
    pub force: bool,
}

/// What the VM tests read: everything for one architecture's guest.
pub fn image_dir() -> PathBuf {
    target_dir().join("qemu").join("aarch64")
}

const TRIPLE: &str = "aarch64-unknown-linux-musl";

/// Modules the guest loads, by name; their dependencies come from `modules.dep`.
/// crc32c is not a link-time dependency of ext4 (it is asked for through the crypto
/// API), so it is listed by hand.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// The guest's /init. `/config/` comes from the per-run cpio; `/data` is the
/// persistent disk. The agent's output goes to `/data/agent.log`; the console ends in
/// a shell (echo off) the tests drive.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run /data
mount -t tmpfs tmp /tmp
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko || echo "[init] insmod $m failed"; done
hostname "$(cat /config/node 2>/dev/null || echo outpost-vm)"
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /data; then
  echo "[init] cannot mount /dev/vda: the agent's state is not persistent"
fi
echo "[init] network up, /data mounted, uptime $(cut -d' ' -f1 /proc/uptime) s"
if [ -f /config/edge.toml ]; then
  . /config/env
  (
    n=0
    while true; do
      n=$((n+1))
      echo "[init] starting the agent (run $n) at uptime $(cut -d' ' -f1 /proc/uptime)" >> /data/agent.log
      /bin/outpost-edge run --config /config/edge.toml $AGENT_ARGS >> /data/agent.log 2>&1 < /dev/null
      echo "[init] the agent exited with $? at uptime $(cut -d' ' -f1 /proc/uptime)" >> /data/agent.log
      sleep 1
    done
  ) &
else
  echo "[init] no /config/edge.toml: not starting the agent"
fi
stty -echo 2>/dev/null
export PS1= PS2=
echo "OUTPOST-VM-READY uptime $(cut -d' ' -f1 /proc/uptime)"
while true; do sh; done
"#;

pub fn qemu_image(args: &Args) -> Result<PathBuf> {
    let t0 = Instant::now();
    ensure_tools()?;
    let debs = target_dir().join("qemu").join("debs");
    std::fs::create_dir_all(&debs)?;
    let kernel_pkg = kernel_package()?;
    let kernel_deb = download(&debs, &kernel_pkg)?;
    let busybox_deb = download(&debs, "busybox-static:arm64")?;

    let agent = cross::binaries_dir().join(TRIPLE).join("outpost-edge");
    if !agent.is_file() {
        eprintln!("qemu-image: {} is missing: building it", agent.display());
        cross::cross(cross::Args {
            targets: vec![TRIPLE.into()],
            ..Default::default()
        })?;
    }
    let meta = std::fs::metadata(&agent).with_context(|| agent.display().to_string())?;
    let agent_id = format!(
        "{} bytes, modified {:?}",
        meta.len(),
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    );

    let out = image_dir();
    std::fs::create_dir_all(&out)?;
    let stamp = format!(
        "kernel: {}\nbusybox: {}\nagent: {agent_id}\ninit: {:016x}\nmodules: {}\n",
        file_name(&kernel_deb),
        file_name(&busybox_deb),
        fnv(INIT.as_bytes()),
        MODULES.join(" ")
    );
    let stamp_file = out.join("stamp");
    if !args.force
        && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str())
        && out.join("vmlinuz").is_file()
        && out.join("base.cpio.gz").is_file()
    {
        eprintln!(
            "qemu-image: {} is up to date ({:.1?})",
            out.display(),
            t0.elapsed()
        );
        return Ok(out);
    }
    let _ = std::fs::remove_file(&stamp_file);

    let work = target_dir().join("qemu").join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let kroot = work.join("kernel");
    let broot = work.join("busybox");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&kernel_deb)
        .arg(&kroot))?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&busybox_deb)
        .arg(&broot))?;

    let release = std::fs::read_dir(kroot.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules/<release>")?;
    let moddir = kroot.join("lib/modules").join(&release);
    let order = module_order(&moddir, MODULES)?;

    let initrd = work.join("initrd");
    for d in [
        "bin",
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "lib/modules",
        "config",
    ] {
        std::fs::create_dir_all(initrd.join(d))?;
    }
    copy_mode(
        &broot.join("bin/busybox"),
        &initrd.join("bin/busybox"),
        0o755,
    )?;
    copy_mode(&agent, &initrd.join("bin/outpost-edge"), 0o755)?;
    let mut names = vec![];
    for rel in &order {
        let name = module_name(rel);
        copy_mode(
            &moddir.join(rel),
            &initrd.join("lib/modules").join(format!("{name}.ko")),
            0o644,
        )?;
        names.push(name);
    }
    std::fs::write(initrd.join("etc/modules.order"), names.join("\n") + "\n")?;
    std::fs::write(initrd.join("etc/kernel-release"), format!("{release}\n"))?;
    std::fs::write(
        initrd.join("etc/hosts"),
        "127.0.0.1 localhost\n10.0.2.2 hub\n",
    )?;
    let init = initrd.join("init");
    std::fs::write(&init, INIT)?;
    set_mode(&init, 0o755)?;

    // newc cpio, owned by root, in a stable order; gzip -1 (the kernel has RD_GZIP).
    let cpio = out.join("base.cpio.gz.tmp");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 > \"$0\"")
        .arg(&cpio)
        .current_dir(&initrd))?;
    std::fs::rename(&cpio, out.join("base.cpio.gz"))?;
    let vmlinuz = kroot.join("boot").join(format!("vmlinuz-{release}"));
    std::fs::copy(&vmlinuz, out.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    std::fs::write(out.join("kernel-release"), format!("{release}\n"))?;
    std::fs::write(&stamp_file, stamp)?;
    let _ = std::fs::remove_dir_all(&work);
    let size = std::fs::metadata(out.join("base.cpio.gz"))?.len();
    eprintln!(
        "qemu-image: {} (kernel {release}, modules {}, initramfs {:.1} MiB) in {:.1?}",
        out.display(),
        names.join(" "),
        size as f64 / 1048576.0,
        t0.elapsed()
    );
    Ok(out)
}

/// qemu-system-aarch64, cpio, socat, mkfs.ext4 and the arm64 package lists, installing what is
/// missing (as root or in CI; elsewhere it says what to run).
pub fn ensure_tools() -> Result<()> {
    let mut apt = vec![];
    for (tool, pkg) in [
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("cpio", "cpio"),
        // The guest reaches the broker through a guestfwd that runs socat.
        ("socat", "socat"),
        ("mkfs.ext4", "e2fsprogs"),
        ("dpkg-deb", "dpkg"),
    ] {
        if on_path(tool).is_none() && !Path::new("/usr/sbin").join(tool).is_file() {
            apt.push(pkg);
        }
    }
    let arches = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("dpkg is missing: this needs a Debian host")?;
    let has_arm64 = String::from_utf8_lossy(&arches.stdout)
        .lines()
        .any(|l| l.trim() == "arm64");
    let allowed = is_root() || std::env::var_os("CI").is_some();
    if !has_arm64 || !apt.is_empty() {
        let mut cmds = vec![];
        if !has_arm64 {
            let mut c = Command::new("dpkg");
            c.args(["--add-architecture", "arm64"]);
            cmds.push(c);
        }
        let mut c = Command::new("apt-get");
        c.args(["update", "-q"]);
        cmds.push(c);
        if !apt.is_empty() {
            let mut c = Command::new("apt-get");
            c.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&apt)
                .env("DEBIAN_FRONTEND", "noninteractive");
            cmds.push(c);
        }
        if !allowed {
            bail!(
                "the VM image needs these steps first (run as root, or set CI):\n  {}",
                cmds.iter().map(show).collect::<Vec<_>>().join("\n  ")
            );
        }
        for mut c in cmds {
            run(&mut c)?;
        }
    }
    Ok(())
}

/// The versioned kernel package behind the `linux-image-arm64` metapackage.
fn kernel_package() -> Result<String> {
    let o = Command::new("apt-cache")
        .args(["depends", "linux-image-arm64:arm64"])
        .output()?;
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(|p| {
            if p.contains(':') {
                p.to_string()
            } else {
                format!("{p}:arm64")
            }
        })
        .with_context(|| {
            format!("apt knows no linux-image-arm64:arm64 (is arm64 added and `apt-get update` run?):\n{text}")
        })
}

/// `apt-get download pkg` into `dir`, unless the candidate version is already there.
fn download(dir: &Path, pkg: &str) -> Result<PathBuf> {
    let o = Command::new("apt-cache").args(["policy", pkg]).output()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .with_context(|| format!("apt has no candidate for {pkg}:\n{text}"))?
        .to_string();
    let name = pkg.split(':').next().unwrap_or(pkg);
    // apt-get download escapes the epoch's colon as %3a.
    let file = format!("{name}_{}_arm64.deb", version.replace(':', "%3a"));
    let path = dir.join(&file);
    if path.is_file() {
        return Ok(path);
    }
    run(Command::new("apt-get")
        .args(["download", "-q"])
        .arg(format!("{name}:arm64={version}"))
        .current_dir(dir))?;
    if !path.is_file() {
        bail!("apt-get download {pkg} did not leave {}", path.display());
    }
    Ok(path)
}

/// The modules to load, dependencies first, as paths relative to the modules dir.
/// The package has no modules.dep (depmod makes it at install time), so each module's
/// `depends=` comes from its own `.modinfo` strings.
fn module_order(moddir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let mut by_name: HashMap<String, String> = HashMap::new();
    let mut dirs = vec![moddir.join("kernel")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "ko") {
                let rel = p.strip_prefix(moddir)?.to_string_lossy().into_owned();
                by_name.insert(module_name(&rel).replace('-', "_"), rel);
            }
        }
    }
    let mut order = vec![];
    let mut seen = BTreeSet::new();
    let mut stack: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|w| (w.replace('-', "_"), false))
        .collect();
    while let Some((name, deps_done)) = stack.pop() {
        let rel = by_name.get(&name).with_context(|| {
            format!("module {name} is not in the kernel package (built in, or renamed?)")
        })?;
        if deps_done {
            order.push(rel.clone());
            continue;
        }
        if !seen.insert(name.clone()) {
            continue;
        }
        stack.push((name, true));
        let bytes = std::fs::read(moddir.join(rel))?;
        for d in modinfo_depends(&bytes).into_iter().rev() {
            if !seen.contains(&d) {
                stack.push((d, false));
            }
        }
    }
    Ok(order)
}

/// The `depends=` value of a module's modinfo (NUL-separated `key=value` strings).
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return vec![];
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

fn module_name(rel: &str) -> String {
    let f = rel.rsplit('/').next().unwrap_or(rel);
    f.strip_suffix(".ko")
        .or_else(|| f.split(".ko.").next())
        .unwrap_or(f)
        .to_string()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn copy_mode(from: &Path, to: &Path, mode: u32) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    set_mode(to, mode)
}

pub(crate) fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// FNV-1a: a stable fingerprint of the init script for the stamp.
pub(crate) fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

pub(crate) fn is_root() -> bool {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_is_read() {
        let ko = b"\x7fELF...\0license=GPL\0depends=jbd2,mbcache,crc16\0intree=Y\0";
        assert_eq!(modinfo_depends(ko), ["jbd2", "mbcache", "crc16"]);
        assert!(modinfo_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
    }
}
