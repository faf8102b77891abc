//! `cargo xtask package`: Debian packages with cargo-deb, from the binaries the other
//! chores build: `outpost-edge_<v>_{arm64,armhf,armel}.deb` from the static firmware
//! of `cargo xtask cross`, `outpost-hub_<v>_{amd64,arm64}.deb` from the host's release
//! build and the static arm64 hub of `cross --hub`. Each package is checked with
//! lintian (no errors allowed). What installs where: docs/packages.md.
//!
//! cargo-deb reads `[package.metadata.deb]` in `edge/Cargo.toml` and `hub/Cargo.toml`,
//! whose `target/release/` assets it resolves in `$CARGO_TARGET_DIR/<triple>/release/`:
//! so each package gets a staging target dir holding just the binary to ship, and
//! cargo-deb never builds anything (`--no-build`).

use crate::tools::{self, CargoTool};
use crate::{ansible, cargo, cross, run, show, target_dir};
use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// cargo-deb, pinned; installed into the target dir's tools (tools.rs).
const CARGO_DEB: CargoTool = CargoTool {
    krate: "cargo-deb",
    version: "3.8.0",
    bin: "cargo-deb",
};

/// The Debian revision of every package: the packaging of one upstream version.
const DEB_REVISION: &str = "1";

/// The workspace's version: what the binaries report unless stamped.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One agent package: Debian architecture, the firmware target it ships, and the
/// triple cargo-deb is told (it derives the architecture from it).
struct EdgeArch {
    deb: &'static str,
    triple: &'static str,
    /// armel: cargo-deb calls every `*hf` triple armhf, so it is told a soft-float
    /// triple; the binary is static, so the system's float ABI never meets it.
    label: &'static str,
}

const EDGE: [EdgeArch; 3] = [
    EdgeArch {
        deb: "arm64",
        triple: "aarch64-unknown-linux-musl",
        label: "aarch64-unknown-linux-musl",
    },
    EdgeArch {
        deb: "armhf",
        triple: "armv7-unknown-linux-musleabihf",
        label: "armv7-unknown-linux-musleabihf",
    },
    EdgeArch {
        deb: "armel",
        triple: "arm-unknown-linux-musleabihf",
        label: "arm-unknown-linux-musleabi",
    },
];

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Package the agent as this version (stamped into the binary, which reports it
    /// to the hub), e.g. `0.1.1` or `0.1.0+build.7`; the hub packages keep the
    /// workspace's version. [default: the workspace's version]
    #[arg(long, value_name = "VERSION")]
    pub version: Option<String>,
    /// Only these Debian architectures (arm64, armhf, armel, amd64); repeatable.
    #[arg(long = "arch", value_name = "ARCH", value_parser = ["arm64", "armhf", "armel", "amd64"])]
    pub arches: Vec<String>,
    /// Only the agent's packages.
    #[arg(long)]
    pub edge_only: bool,
    /// Package the binaries already built (`cargo xtask cross` / `ansible-prep`)
    /// instead of building them first: what CI does right after building them.
    #[arg(long)]
    pub prebuilt: bool,
    /// Where the .deb files go [default: <target dir>/debian].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

impl Args {
    /// What CI packages: every package at the workspace's version, then the arm64
    /// agent at the upgrade version for the package test (tests/it/package.rs).
    pub fn for_ci() -> Vec<Args> {
        let base = Args {
            version: None,
            arches: vec![],
            edge_only: false,
            prebuilt: true,
            out: None,
        };
        vec![
            base.clone(),
            Args {
                version: Some(ansible::UPGRADE_VERSION.into()),
                arches: vec!["arm64".into()],
                edge_only: true,
                ..base
            },
        ]
    }
}

pub fn out_dir() -> PathBuf {
    target_dir().join("debian")
}

/// `0.1.0` -> `0.1.0-1`; a semver pre-release (`0.2.0-rc.1`) sorts before its release
/// in Debian only with `~`. Build metadata (`+...`) sorts after the plain version in
/// both, and a `-` in it is no pre-release.
pub fn deb_version(v: &str) -> String {
    let (core, build) = v.split_once('+').map_or((v, None), |(c, b)| (c, Some(b)));
    let mut d = core.replacen('-', "~", 1);
    if let Some(b) = build {
        d = format!("{d}+{b}");
    }
    format!("{d}-{DEB_REVISION}")
}

/// lintian (apt) and cargo-deb (crates.io), installed when missing.
pub fn ensure_tools() -> Result<PathBuf> {
    if crate::on_path("lintian").is_none() {
        cross::install("the package checks", &["lintian"], &[])?;
    }
    tools::ensure(&CARGO_DEB)
}

/// One package made.
pub struct Made {
    pub path: PathBuf,
    pub bytes: u64,
}

/// Every package `a` asks for, checked; CI passes several (see [`Args::for_ci`]).
pub fn package(runs: &[Args]) -> Result<Vec<Made>> {
    let t0 = Instant::now();
    let cargo_deb = ensure_tools()?;
    let mut made = vec![];
    for a in runs {
        made.extend(package_one(a, &cargo_deb)?);
    }
    eprintln!("\npackage: {} packages in {:.0?}", made.len(), t0.elapsed());
    for m in &made {
        eprintln!(
            "  {:<44} {:>9} bytes",
            m.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            m.bytes
        );
    }
    Ok(made)
}

fn package_one(a: &Args, cargo_deb: &Path) -> Result<Vec<Made>> {
    let version = a.version.clone().unwrap_or_else(|| VERSION.to_string());
    ensure!(
        !version.is_empty()
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+-~".contains(c))
            && version.starts_with(|c: char| c.is_ascii_digit()),
        "--version {version:?}: a package version starts with a digit and holds only letters, digits and . + - ~"
    );
    let wanted = |arch: &str| a.arches.is_empty() || a.arches.iter().any(|x| x == arch);
    let out = a.out.clone().unwrap_or_else(out_dir);
    std::fs::create_dir_all(&out)?;
    let stamped = version != VERSION;

    // The agents: the tests' firmware dir at the workspace's version, the upgrade
    // build's dir at its version, a dir per version otherwise.
    let edge: Vec<&EdgeArch> = EDGE.iter().filter(|e| wanted(e.deb)).collect();
    let bins = if !stamped {
        cross::binaries_dir()
    } else if version == ansible::UPGRADE_VERSION {
        ansible::upgrade_dir()
    } else {
        target_dir().join("arm-stamped").join(&version)
    };
    let missing: Vec<String> = edge
        .iter()
        .filter(|e| !a.prebuilt || !bins.join(e.triple).join("outpost-edge").is_file())
        .map(|e| e.triple.to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "package: building the agent {version} for {}",
            missing.join(", ")
        );
        cross::cross(cross::Args {
            targets: missing,
            stamp: stamped.then(|| version.clone()),
            out: stamped.then(|| bins.clone()),
            ..Default::default()
        })?;
    }
    let mut made = vec![];
    for e in &edge {
        let bin = bins.join(e.triple).join("outpost-edge");
        let m = deb(
            cargo_deb,
            "outpost-edge",
            e.label,
            &bin,
            &version,
            false,
            &out,
        )?;
        index(&out, "outpost-edge", &version, e.deb, &m.path)?;
        made.push(m);
    }

    if !a.edge_only {
        if wanted("amd64") {
            // The host's hub: the speed profile, linked against the host's glibc
            // (cargo-deb's $auto works out the dependencies).
            if !a.prebuilt || !target_dir().join("release/outpost-hub").is_file() {
                run(cargo().args(["build", "--release", "-p", "outpost-hub"]))?;
            }
            let bin = target_dir().join("release/outpost-hub");
            let m = deb(
                cargo_deb,
                "outpost-hub",
                "x86_64-unknown-linux-gnu",
                &bin,
                VERSION,
                true,
                &out,
            )?;
            index(&out, "outpost-hub", VERSION, "amd64", &m.path)?;
            made.push(m);
        }
        if wanted("arm64") {
            let t = "aarch64-unknown-linux-musl";
            let bin = cross::binaries_dir().join(t).join("outpost-hub");
            if !a.prebuilt || !bin.is_file() {
                cross::cross(cross::Args {
                    targets: vec![t.into()],
                    hub: true,
                    ..Default::default()
                })?;
            }
            let m = deb(cargo_deb, "outpost-hub", t, &bin, VERSION, false, &out)?;
            index(&out, "outpost-hub", VERSION, "arm64", &m.path)?;
            made.push(m);
        }
    }
    for m in &made {
        lintian(&m.path)?;
    }
    Ok(made)
}

/// `packages.tsv` beside the packages: package, the version its binary reports,
/// Debian architecture, file name; one line each, the newest build of each kept.
/// tests/it/package.rs finds its packages there.
pub const INDEX: &str = "packages.tsv";

fn index(out: &Path, pkg: &str, version: &str, arch: &str, deb: &Path) -> Result<()> {
    let path = out.join(INDEX);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let key = format!("{pkg}\t{version}\t{arch}\t");
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| !l.starts_with(&key))
        .map(String::from)
        .collect();
    lines.push(format!("{key}{}", file_name(deb)));
    std::fs::write(&path, lines.join("\n") + "\n")?;
    Ok(())
}

/// One package: stage the binary where cargo-deb looks for it, then run cargo-deb.
fn deb(
    cargo_deb: &Path,
    pkg: &str,
    triple: &str,
    bin: &Path,
    version: &str,
    strip: bool,
    out: &Path,
) -> Result<Made> {
    ensure!(
        bin.is_file(),
        "{} is missing: build it first (cargo xtask cross{})",
        bin.display(),
        if pkg == "outpost-hub" { " --hub" } else { "" }
    );
    let stage = target_dir()
        .join("debian/stage")
        .join(format!("{pkg}-{triple}"));
    let _ = std::fs::remove_dir_all(&stage);
    let dir = stage.join(triple).join("release");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(bin, dir.join(pkg)).with_context(|| format!("staging {}", bin.display()))?;
    let dv = deb_version(version);
    let mut cmd = Command::new(cargo_deb);
    cmd.current_dir(crate::root())
        .args(["-p", pkg, "--no-build", "--target", triple])
        .args(["--deb-version", &dv])
        .arg(if strip { "--strip" } else { "--no-strip" })
        .arg("--output")
        .arg(out)
        .env("CARGO_TARGET_DIR", &stage);
    eprintln!("$ {}", show(&cmd));
    let o = cmd.output().context("cannot run cargo-deb")?;
    if !o.status.success() {
        bail!(
            "cargo-deb failed for {pkg} ({triple}):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let path = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo-deb named no .deb: {text}"))?;
    let path = if path.is_absolute() {
        path
    } else {
        crate::root().join(path)
    };
    let bytes = std::fs::metadata(&path)
        .with_context(|| path.display().to_string())?
        .len();
    eprintln!("package: {} ({bytes} bytes)", path.display());
    if let Ok(c) = Command::new("dpkg-deb").arg("-c").arg(&path).output() {
        for l in String::from_utf8_lossy(&c.stdout).lines() {
            // Permissions, owner and the path: what a reader checks.
            let f: Vec<&str> = l.split_whitespace().collect();
            if let (Some(mode), Some(p)) = (f.first(), f.last())
                && !mode.starts_with('d')
            {
                eprintln!("    {mode} {p}");
            }
        }
    }
    Ok(Made { path, bytes })
}

/// lintian's verdict: errors fail the build, warnings are printed.
fn lintian(deb: &Path) -> Result<()> {
    let mut cmd = Command::new("lintian");
    cmd.args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb);
    eprintln!("$ {}", show(&cmd));
    let o = cmd.output().context("cannot run lintian")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let tags: Vec<&str> = text
        .lines()
        .filter(|l| l.len() > 2 && l.as_bytes()[1] == b':')
        .collect();
    if tags.is_empty() {
        eprintln!("lintian: {}: clean", file_name(deb));
    } else {
        eprintln!("lintian: {}:", file_name(deb));
        for t in &tags {
            eprintln!("  {t}");
        }
    }
    ensure!(
        o.status.success(),
        "lintian found errors in {}:\n{text}",
        deb.display()
    );
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_order_like_semver() {
        assert_eq!(deb_version("0.1.0"), "0.1.0-1");
        assert_eq!(deb_version("0.2.0-rc.1"), "0.2.0~rc.1-1");
        assert_eq!(deb_version("0.1.0+upgrade"), "0.1.0+upgrade-1");
        assert_eq!(deb_version("0.2.0-rc.1+b-7"), "0.2.0~rc.1+b-7-1");
    }
}
