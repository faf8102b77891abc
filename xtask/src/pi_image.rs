//! `cargo xtask pi-image`: a Raspberry-Pi-like arm64 Debian 12 guest with systemd,
//! python3, sudo and an SSH server, for the Ansible test (issue 7) and anything a real
//! Pi OS install does. Recipe: ../shared/ARM64-VM.md (verified there; repeated here).
//!
//! mmdebstrap builds the root file system under qemu-user (binfmt), the guest's own
//! initramfs is cut down to what `-M virt` needs (the default walks every module under
//! emulation: 24 min instead of 5), and the result is an ext4 image the tests boot
//! through a fresh qcow2 overlay each run, so the base stays clean.
//!
//! Output in `<target dir>/qemu/pi-arm64/`: `vmlinuz`, `initrd.img`, `rootfs.ext4`,
//! `id_ed25519` (+ `.pub`, the test key baked into `root` and `pi`), `stamp`. The stamp
//! fingerprints the package list and the scripts; the image is rebuilt only when they
//! change (CI keeps the target dir, so a warm run does nothing).
//!
//! The guest looks like Raspberry Pi OS where Ansible can tell: aarch64, Debian
//! bookworm, systemd, hostname `raspberrypi`, user `pi` with passwordless sudo in
//! `/etc/sudoers.d/010_pi-nopasswd`. Root has no password; SSH by key only.

use crate::qemu::fnv;
use crate::{on_path, run, target_dir};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Rebuild even if the stamp matches.
    #[arg(long)]
    pub force: bool,
}

pub fn image_dir() -> PathBuf {
    target_dir().join("qemu").join("pi-arm64")
}

/// What is in the guest beyond `minbase`.
const PACKAGES: &str = "systemd-sysv,dbus,udev,openssh-server,python3,iproute2,sudo,\
                        linux-image-arm64,initramfs-tools,zstd";

/// initramfs-tools hook: only what a QEMU `-M virt` guest needs to mount its root.
const VIRT_HOOK: &str = r#"#!/bin/sh
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk ext4; do force_load "$m"; done
manual_add_modules virtio_mmio
"#;

/// Runs in the finished root file system (`$1`), with the public key as `$2`.
const CONFIGURE: &str = r#"#!/bin/sh
set -e
R="$1"; PUB="$2"
echo raspberrypi > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
printf '/dev/vda\t/\text4\trw,relatime,errors=remount-ro\t0\t1\n' > "$R/etc/fstab"
mkdir -p "$R/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' > "$R/etc/systemd/network/20-wired.network"
rm -f "$R/etc/resolv.conf"; echo 'nameserver 10.0.2.3' > "$R/etc/resolv.conf"
chroot "$R" systemctl enable systemd-networkd.service
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer systemd-networkd-wait-online.service man-db.timer e2scrub_all.timer fstrim.timer
install -d -m 700 "$R/root/.ssh"; install -m 600 "$PUB" "$R/root/.ssh/authorized_keys"
chroot "$R" useradd -m -s /bin/bash -G sudo pi
install -d -m 700 -o 1000 -g 1000 "$R/home/pi/.ssh"
install -m 600 -o 1000 -g 1000 "$PUB" "$R/home/pi/.ssh/authorized_keys"
echo 'pi ALL=(ALL) NOPASSWD: ALL' > "$R/etc/sudoers.d/010_pi-nopasswd"
chmod 440 "$R/etc/sudoers.d/010_pi-nopasswd"
: > "$R/etc/machine-id"; rm -f "$R/var/lib/dbus/machine-id"
"#;

pub fn pi_image(args: &Args) -> Result<PathBuf> {
    let t0 = Instant::now();
    ensure_tools()?;
    let out = image_dir();
    std::fs::create_dir_all(&out)?;
    let stamp = format!(
        "packages: {PACKAGES}\nhook: {:016x}\nconfigure: {:016x}\n",
        fnv(VIRT_HOOK.as_bytes()),
        fnv(CONFIGURE.as_bytes())
    );
    let stamp_file = out.join("stamp");
    let parts = ["vmlinuz", "initrd.img", "rootfs.ext4", "id_ed25519"];
    if !args.force
        && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str())
        && parts.iter().all(|p| out.join(p).is_file())
    {
        eprintln!(
            "pi-image: {} is up to date ({:.1?})",
            out.display(),
            t0.elapsed()
        );
        return Ok(out);
    }
    let _ = std::fs::remove_file(&stamp_file);
    ensure_binfmt()?;

    let work = out.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let key = out.join("id_ed25519");
    if !key.is_file() {
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "outpost-pi-image",
                "-f",
            ])
            .arg(&key))?;
    }
    let hook = work.join("zz-virt-hook");
    let configure = work.join("configure.sh");
    std::fs::write(&hook, VIRT_HOOK)?;
    std::fs::write(&configure, CONFIGURE)?;
    crate::qemu::set_mode(&hook, 0o755)?;
    crate::qemu::set_mode(&configure, 0o755)?;

    let (mirror, security) = mirrors();
    let rootfs = work.join("rootfs");
    eprintln!("pi-image: building an arm64 Debian 12 root file system (about 5 minutes)");
    run(Command::new("mmdebstrap")
        .args(["--arch=arm64", "--variant=minbase", "--quiet"])
        .arg(format!("--include={PACKAGES}"))
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--setup-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" \"$1/etc/initramfs-tools/hooks\"",
            "--setup-hook=echo MODULES=list > \"$1/etc/initramfs-tools/conf.d/zz-virt.conf\"",
        ])
        .arg(format!(
            "--setup-hook=install -m 755 {} \"$1/etc/initramfs-tools/hooks/zz-virt\"",
            hook.display()
        ))
        .arg(format!(
            "--customize-hook={} \"$1\" {}.pub",
            configure.display(),
            key.display()
        ))
        .arg("bookworm")
        .arg(&rootfs)
        .arg(format!("deb {mirror} bookworm main"))
        .arg(format!("deb {mirror} bookworm-updates main"))
        .arg(format!("deb {security} bookworm-security main")))?;

    for (glob, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let found = std::fs::read_dir(rootfs.join("boot"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| file_name(p).starts_with(glob))
            .with_context(|| format!("no /boot/{glob}* in the root file system"))?;
        std::fs::copy(&found, out.join(name))
            .with_context(|| format!("copying {}", found.display()))?;
    }
    let image = out.join("rootfs.ext4");
    let _ = std::fs::remove_file(&image);
    run(Command::new(mkfs())
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&rootfs)
        .arg(&image)
        .arg("2G"))?;
    std::fs::remove_dir_all(&work)?;
    std::fs::write(&stamp_file, stamp)?;
    eprintln!("pi-image: built {} in {:.0?}", out.display(), t0.elapsed());
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn mkfs() -> PathBuf {
    on_path("mkfs.ext4").unwrap_or_else(|| PathBuf::from("/usr/sbin/mkfs.ext4"))
}

/// The Debian mirrors apt already uses here (deb822 `URIs:` or one-line sources).
pub fn mirrors() -> (String, String) {
    let mut uris = vec![];
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(u) = line.strip_prefix("URIs:") {
                uris.extend(u.split_whitespace().map(String::from));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                uris.extend(
                    rest.split_whitespace()
                        .find(|w| w.contains("://"))
                        .map(String::from),
                );
            }
        }
    }
    let pick = |security: bool, fallback: &str| {
        uris.iter()
            .find(|u| {
                let u = u.trim_end_matches('/');
                u.ends_with("debian-security") == security && u.contains("debian")
            })
            .cloned()
            .unwrap_or_else(|| fallback.to_string())
    };
    (
        pick(false, "http://deb.debian.org/debian"),
        pick(true, "http://deb.debian.org/debian-security"),
    )
}

pub fn ensure_tools() -> Result<()> {
    let mut apt = vec![];
    for (tool, pkg) in [
        ("mmdebstrap", "mmdebstrap"),
        // mmdebstrap asks it whether the kernel can run arm64 binaries (via binfmt).
        ("arch-test", "arch-test"),
        ("qemu-aarch64-static", "qemu-user-static"),
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("qemu-img", "qemu-utils"),
        ("ssh-keygen", "openssh-client"),
        ("ssh", "openssh-client"),
    ] {
        if on_path(tool).is_none() && !apt.contains(&pkg) {
            apt.push(pkg);
        }
    }
    if !mkfs().is_file() {
        apt.push("e2fsprogs");
    }
    if apt.is_empty() {
        return Ok(());
    }
    crate::cross::install("the Pi image", &apt, &[])
}

/// mmdebstrap runs arm64 maintainer scripts through the kernel's binfmt_misc and
/// qemu-user; containers often start with it unmounted or unregistered.
pub fn ensure_binfmt() -> Result<()> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    if dir.join("qemu-aarch64").is_file() {
        return Ok(());
    }
    if !dir.join("register").exists() {
        run(Command::new("mount").args([
            "-t",
            "binfmt_misc",
            "binfmt_misc",
            "/proc/sys/fs/binfmt_misc",
        ]))
        .context("mounting binfmt_misc (needs root)")?;
    }
    // Registrations belong to the kernel, not to a mount: one made elsewhere (the host
    // of a chroot or namespace where binfmt_misc was not mounted yet) shows up now.
    if dir.join("qemu-aarch64").is_file() {
        return Ok(());
    }
    let conf = Path::new("/usr/lib/binfmt.d/qemu-aarch64.conf");
    let rule = std::fs::read_to_string(conf)
        .with_context(|| format!("{} (from qemu-user-static)", conf.display()))?;
    match std::fs::write(dir.join("register"), rule.trim()) {
        // Registered meanwhile (another build, or the check above raced): fine.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        r => r.context("registering qemu-aarch64 with binfmt_misc (needs root)")?,
    }
    eprintln!("pi-image: registered qemu-aarch64 with binfmt_misc");
    Ok(())
}
