//! `cargo xtask cross`: the agent as static ARM firmware, built with local tools (no
//! Docker; docs/cross.md), proven static and ARM by reading its ELF headers, held to a
//! size budget, and copied to `<target dir>/arm/<triple>/outpost-edge` for the
//! qemu-user tests.
//!
//! Two routes, both verified on Debian 12 (see ../shared/CROSS.md):
//! - rustup: rustup's prebuilt musl std + Debian's `aarch64-linux-gnu-gcc` as link
//!   driver. Fast, aarch64 only, and only if `rustup target add` can fetch the std.
//! - debian: Debian's `rustc-web` rebuilds std for the target (`-Zbuild-std`) and zig
//!   compiles C and links against its own musl. Works for every target, from apt and
//!   PyPI alone; slower (std is compiled too). Settings in `.cargo/cross-debian.toml`.

use crate::qemu::is_root;
use crate::{cargo, on_path, root, run, show, target_dir};
use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The size budget of the stripped `release-edge` agent: units boot from SD cards and
/// update over slow links, and the agent is one of many things on them.
pub const BUDGET_BYTES: u64 = 5 * 1024 * 1024 / 2;

/// The profile that makes firmware (opt-level z, fat LTO, strip, panic abort).
pub const FIRMWARE_PROFILE: &str = "release-edge";

/// The PyPI zig that the debian route was verified with.
pub const ZIG_PIN: &str = "ziglang==0.17.1";

/// Oldest Debian rustc that builds the workspace (the workspace's rust-version).
const MIN_DEBIAN_RUSTC: (u32, u32) = (1, 89);

/// How long `rustup target add` may take before we give up on it: on some machines it
/// hangs on the download instead of failing.
const RUSTUP_ADD_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the tests look for the binaries when this is not set: `<target dir>/arm`.
pub const BINARIES_DIR_ENV: &str = "OUTPOST_ARM_BINARIES_DIR";

/// One firmware target.
#[derive(Debug)]
pub struct Target {
    pub triple: &'static str,
    /// The units it is for.
    pub units: &'static str,
    /// qemu-user binary and CPU model that stand in for a real unit.
    pub qemu: &'static str,
    pub qemu_cpu: &'static str,
    elf_bits: u8,
    elf_machine: u16,
    /// Tag_CPU_arch values (ARM EABI attributes) the unit's CPU can run; None for aarch64.
    arm_cpu_arch: Option<&'static [u64]>,
}

pub const TARGETS: [Target; 3] = [
    Target {
        triple: "aarch64-unknown-linux-musl",
        units: "Pi 3/4/5 and Zero 2 W, 64-bit OS",
        qemu: "qemu-aarch64-static",
        qemu_cpu: "cortex-a53",
        elf_bits: 64,
        elf_machine: EM_AARCH64,
        arm_cpu_arch: None,
    },
    Target {
        triple: "armv7-unknown-linux-musleabihf",
        units: "Pi 2/3/4/5, 32-bit OS",
        qemu: "qemu-arm-static",
        qemu_cpu: "cortex-a7",
        elf_bits: 32,
        elf_machine: EM_ARM,
        // Anything up to v7 (10), never v8 (14).
        arm_cpu_arch: Some(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    },
    Target {
        triple: "arm-unknown-linux-musleabihf",
        units: "Pi Zero/Zero W/1 (ARM1176JZF-S, ARMv6 + VFPv2)",
        qemu: "qemu-arm-static",
        qemu_cpu: "arm1176",
        elf_bits: 32,
        elf_machine: EM_ARM,
        // The ARM1176 is v6KZ (7), which includes v6K (9) but not v6T2/Thumb-2 (8).
        arm_cpu_arch: Some(&[1, 2, 3, 4, 5, 6, 7, 9]),
    },
];

pub fn target(triple: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.triple == triple)
}

/// The directory the firmware is copied to, and the tests read from.
pub fn binaries_dir() -> PathBuf {
    std::env::var_os(BINARIES_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("arm"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Route {
    /// rustup for aarch64 when its musl std is (or can be) installed, debian otherwise.
    Auto,
    /// rustup's prebuilt aarch64 musl std + Debian's aarch64-linux-gnu-gcc (aarch64 only).
    Rustup,
    /// Debian rustc-web + -Zbuild-std + zig (every target).
    Debian,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Auto => "auto",
            Route::Rustup => "rustup",
            Route::Debian => "debian",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A target triple to build; repeatable [default: all three].
    #[arg(long = "target", value_name = "TRIPLE", value_parser = [
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
        "arm-unknown-linux-musleabihf",
    ])]
    pub targets: Vec<String>,
    /// Cargo profile; the size budget and the copy for the tests apply to release-edge only.
    #[arg(long, alias = "release-profile", value_name = "PROFILE", default_value = FIRMWARE_PROFILE)]
    pub profile: String,
    /// Which toolchain builds the aarch64 agent (the 32-bit ones always use debian).
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub route: Route,
    /// Also build `outpost-hub` for these targets (a Pi as the hub of a small fleet,
    /// or an ARM server); copied beside the agent.
    #[arg(long)]
    pub hub: bool,
    /// Stamp this version into the agent instead of the crate's (it reports it in
    /// every hello and `--version`), e.g. `0.1.0+build.42`.
    #[arg(long, value_name = "VERSION")]
    pub stamp: Option<String>,
    /// Copy the binaries to `<DIR>/<triple>/` instead of the tests' binaries dir.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            targets: vec![],
            profile: FIRMWARE_PROFILE.into(),
            route: Route::Auto,
            hub: false,
            stamp: None,
            out: None,
        }
    }
}

/// What one target's build produced.
#[derive(Debug)]
pub struct Built {
    pub target: &'static Target,
    pub route: Route,
    pub path: PathBuf,
    pub bytes: u64,
    pub build_time: Duration,
}

pub fn cross(args: Args) -> Result<Vec<Built>> {
    let t0 = Instant::now();
    let targets: Vec<&'static Target> = if args.targets.is_empty() {
        TARGETS.iter().collect()
    } else {
        let mut ts: Vec<&'static Target> = vec![];
        for t in &args.targets {
            let t = target(t).with_context(|| format!("unknown target {t}"))?;
            if !ts.iter().any(|x| x.triple == t.triple) {
                ts.push(t);
            }
        }
        ts
    };

    // Decide each target's route, then make sure the tools for those routes exist.
    let mut plan = vec![];
    for &t in &targets {
        // Auto is the Debian route for every target: it builds std for size (no
        // backtrace, optimised for size), which makes the aarch64 agent 0.6 MB smaller
        // than rustup's prebuilt std, and one cargo run then serves all three targets.
        let route = match (args.route, t.triple) {
            (Route::Debian | Route::Auto, _) => Route::Debian,
            (Route::Rustup, "aarch64-unknown-linux-musl") => {
                if rustup_std(t.triple, true)? {
                    Route::Rustup
                } else {
                    bail!(
                        "--route rustup: rustup has no {} std here and `rustup target add` could not fetch it; use --route debian",
                        t.triple
                    );
                }
            }
            (Route::Rustup, _) => bail!(
                "--route rustup works for aarch64-unknown-linux-musl only: rustup ships no {} std that this machine can fetch; use --route debian",
                t.triple
            ),
        };
        plan.push((t, route));
    }
    let tools = Tools::ensure(&plan)?;
    // One cargo per package: built together, cargo would unify the features of their
    // shared dependencies and the agent would carry the hub's (a different, larger
    // firmware, and a rebuild every time the set changes).
    let mut packages = vec!["outpost-edge"];
    if args.hub {
        packages.push("outpost-hub");
    }
    // The version the agent reports: stamped, or the crate's (never an outer shell's).
    let stamp = |c: &mut Command| {
        match &args.stamp {
            Some(v) => c.env("OUTPOST_VERSION", v),
            None => c.env_remove("OUTPOST_VERSION"),
        };
    };

    let mut built = vec![];
    let rustup: Vec<_> = plan.iter().filter(|p| p.1 == Route::Rustup).collect();
    for &&(t, _) in &rustup {
        let t1 = Instant::now();
        for pkg in &packages {
            let mut c = cargo();
            c.args(["build", "--profile", &args.profile])
                .args(["-p", pkg])
                .args(["--target", t.triple])
                // ring's C and assembly: Debian's cross gcc, which this route installs.
                .env(cc_var("CC", t.triple), "aarch64-linux-gnu-gcc")
                .env(cc_var("AR", t.triple), "aarch64-linux-gnu-ar");
            stamp(&mut c);
            run(&mut c)
                .with_context(|| format!("building {pkg} for {} (rustup route)", t.triple))?;
        }
        let path = target_dir()
            .join(t.triple)
            .join(&args.profile)
            .join("outpost-edge");
        built.push(built_one(t, Route::Rustup, path, t1.elapsed())?);
    }
    let debian: Vec<&'static Target> = plan
        .iter()
        .filter(|p| p.1 == Route::Debian)
        .map(|p| p.0)
        .collect();
    if !debian.is_empty() {
        // One cargo for all of them: the host side (proc macros, build scripts) is
        // built once. Its own target dir, because another rustc's artifacts would
        // only evict the host build's.
        let dir = target_dir().join("cross-debian");
        let zig = tools
            .zig
            .as_ref()
            .expect("zig checked for the debian route");
        let t1 = Instant::now();
        for pkg in &packages {
            let mut cmd = Command::new(DEBIAN_CARGO);
            cmd.current_dir(root())
                .args(["--config", ".cargo/cross-debian.toml", "build"])
                .args(["--profile", &args.profile])
                .args(["-p", pkg])
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_DIR", &dir)
                .env("ZIG", zig)
                // Whatever rustup or an outer cargo set must not pick the compiler.
                .env_remove("RUSTC")
                .env_remove("RUSTC_WRAPPER")
                .env_remove("RUSTDOC");
            for t in &debian {
                cmd.args(["--target", t.triple]);
                // zig for C and archives, set here because the environment wins over
                // every config file: a CC from `.cargo/config.toml` or an outer shell
                // would call a compiler this route never installs (issue 15).
                let wrapper = root().join(".cargo/zig").join(zig_wrapper(t.triple));
                cmd.env(cc_var("CC", t.triple), &wrapper)
                    .env(cc_var("AR", t.triple), root().join(".cargo/zig/ar"))
                    .env(cc_var("CFLAGS", t.triple), "-fno-sanitize=undefined");
            }
            stamp(&mut cmd);
            run(&mut cmd).with_context(|| {
                format!(
                    "building {pkg} for {} (debian route: rustc-web + build-std + zig)",
                    debian
                        .iter()
                        .map(|t| t.triple)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        }
        let took = t1.elapsed();
        for t in debian {
            let path = dir.join(t.triple).join(&args.profile).join("outpost-edge");
            built.push(built_one(t, Route::Debian, path, took)?);
        }
    }

    // Prove each one, then the budget; copy for the tests only what passes.
    let firmware = args.profile == FIRMWARE_PROFILE;
    let mut over = vec![];
    let mut report = String::new();
    for b in &built {
        let elf = Elf::read(&b.path)?;
        elf.check(b.target)
            .with_context(|| format!("{} is not the firmware we meant", b.path.display()))?;
        let smoke = smoke_test(b, &b.path, "outpost-edge")?;
        if let Some(v) = &args.stamp {
            ensure!(
                smoke == format!("outpost-edge {v}"),
                "{} says {smoke:?}, not the stamped version {v}",
                b.path.display()
            );
        }
        let fits = b.bytes <= BUDGET_BYTES;
        eprintln!(
            "\n{} ({}), {} route",
            b.target.triple,
            b.target.units,
            b.route.name()
        );
        eprintln!("  {}", b.path.display());
        eprintln!(
            "  {} bytes = {:.2} MiB{}",
            thousands(b.bytes),
            mib(b.bytes),
            if !firmware {
                format!(" (no budget for profile {})", args.profile)
            } else if fits {
                format!(" (budget {:.2} MiB: ok)", mib(BUDGET_BYTES))
            } else {
                format!(" (OVER the {:.2} MiB budget)", mib(BUDGET_BYTES))
            }
        );
        eprintln!("  {}", elf.describe());
        eprintln!(
            "  {} -cpu {} {} --version: {smoke}",
            b.target.qemu,
            b.target.qemu_cpu,
            b.path.display()
        );
        if let Some(f) = tools.file.as_ref()
            && let Ok(o) = Command::new(f).arg("-b").arg(&b.path).output()
        {
            eprintln!("  file: {}", String::from_utf8_lossy(&o.stdout).trim());
        }
        if firmware && !fits {
            over.push(b);
        }
        let _ = writeln!(
            report,
            "  {:<32} {:>10} B {:>6.2} MiB  {:>7.1?} ({})",
            b.target.triple,
            thousands(b.bytes),
            mib(b.bytes),
            b.build_time,
            b.route.name()
        );
    }
    eprintln!(
        "\ncross: built in {:.0?} (build time per route; one cargo builds all debian targets)\n{report}",
        t0.elapsed()
    );
    if !over.is_empty() {
        bail!(
            "over the {} byte ({:.2} MiB) size budget: {}; `cargo bloat` shows what grew (docs/cross.md)",
            thousands(BUDGET_BYTES),
            mib(BUDGET_BYTES),
            over.iter()
                .map(|b| format!("{} is {} bytes", b.target.triple, thousands(b.bytes)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if firmware {
        let dest = args.out.clone().unwrap_or_else(binaries_dir);
        for b in &built {
            let to = dest.join(b.target.triple).join("outpost-edge");
            copy_atomic(&b.path, &to)?;
            if args.hub {
                let hub = b.path.with_file_name("outpost-hub");
                let elf = Elf::read(&hub)?;
                elf.check(b.target)
                    .with_context(|| format!("{} is not the binary we meant", hub.display()))?;
                let smoke = smoke_test(b, &hub, "outpost-hub")?;
                let bytes = std::fs::metadata(&hub)?.len();
                eprintln!(
                    "{} hub: {} bytes = {:.2} MiB; {}; {smoke}",
                    b.target.triple,
                    thousands(bytes),
                    mib(bytes),
                    elf.describe()
                );
                copy_atomic(&hub, &to.with_file_name("outpost-hub"))?;
            }
        }
        eprintln!(
            "cross: copied to {}/<triple>/{}",
            dest.display(),
            if args.hub {
                "{outpost-edge,outpost-hub}"
            } else {
                "outpost-edge"
            }
        );
    }
    Ok(built)
}

/// Install what the default build (every target, debian route) needs, without
/// building: CI does every install before it starts anything in the background.
pub fn ensure_tools() -> Result<()> {
    let plan: Vec<(&'static Target, Route)> = TARGETS.iter().map(|t| (t, Route::Debian)).collect();
    Tools::ensure(&plan).map(|_| ())
}

/// `CC_aarch64_unknown_linux_musl` and the like: what cc-rs reads for one target.
fn cc_var(tool: &str, triple: &str) -> String {
    format!("{tool}_{}", triple.replace('-', "_"))
}

/// The `.cargo/zig/` wrapper that runs `zig cc` for one target.
fn zig_wrapper(triple: &str) -> &'static str {
    match triple.split('-').next() {
        Some("aarch64") => "cc-aarch64",
        Some("armv7") => "cc-armv7",
        _ => "cc-armv6",
    }
}

fn built_one(t: &'static Target, route: Route, path: PathBuf, took: Duration) -> Result<Built> {
    let bytes = std::fs::metadata(&path)
        .with_context(|| format!("the build did not produce {}", path.display()))?
        .len();
    Ok(Built {
        target: t,
        route,
        path,
        bytes,
        build_time: took,
    })
}

/// Run the binary under qemu-user on the unit's CPU model: it must at least start.
fn smoke_test(b: &Built, path: &Path, name: &str) -> Result<String> {
    let qemu = on_path(b.target.qemu).with_context(|| format!("{} is missing", b.target.qemu))?;
    let o = Command::new(qemu)
        .args(["-cpu", b.target.qemu_cpu])
        .arg(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", b.target.qemu))?;
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    ensure!(
        o.status.success() && out.starts_with(&format!("{name} ")),
        "{} -cpu {} {} --version failed ({}): {out}{}",
        b.target.qemu,
        b.target.qemu_cpu,
        path.display(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(out)
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let dir = to.parent().expect("a file in a dir");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot rename to {}", to.display()))?;
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---- tools ---------------------------------------------------------------------------

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Where Debian's rust-web-src puts std's sources (build-std reads them there).
const DEBIAN_STD_SRC: &str = "/usr/lib/rustlib/src/rust/library/Cargo.lock";

/// The tools the chosen routes need, found (and installed if allowed).
#[derive(Debug, Default)]
struct Tools {
    zig: Option<PathBuf>,
    file: Option<PathBuf>,
}

impl Tools {
    fn ensure(plan: &[(&'static Target, Route)]) -> Result<Tools> {
        let mut apt: Vec<&str> = vec![];
        let mut pip: Vec<&str> = vec![];
        let need_bin = |name: &str, pkg: &'static str, apt: &mut Vec<&'static str>| {
            if on_path(name).is_none() && !apt.contains(&pkg) {
                apt.push(pkg);
            }
        };
        need_bin("file", "file", &mut apt);
        for (t, _) in plan {
            need_bin(t.qemu, "qemu-user-static", &mut apt);
        }
        if plan.iter().any(|p| p.1 == Route::Rustup) {
            need_bin("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", &mut apt);
            need_bin(
                "aarch64-linux-gnu-ar",
                "binutils-aarch64-linux-gnu",
                &mut apt,
            );
        }
        let debian = plan.iter().any(|p| p.1 == Route::Debian);
        if debian {
            for (path, pkg) in [
                (DEBIAN_RUSTC, "rustc-web"),
                (DEBIAN_CARGO, "cargo-web"),
                (DEBIAN_STD_SRC, "rust-web-src"),
            ] {
                if !Path::new(path).exists() {
                    apt.push(pkg);
                }
            }
            if find_zig().is_none() {
                pip.push(ZIG_PIN);
            }
        }
        if !apt.is_empty() || !pip.is_empty() {
            install("the cross build", &apt, &pip)?;
        }

        let mut tools = Tools {
            file: on_path("file"),
            ..Tools::default()
        };
        let mut qemus: Vec<&str> = plan.iter().map(|p| p.0.qemu).collect();
        qemus.dedup();
        for q in qemus {
            let q = on_path(q).with_context(|| format!("{q} is missing after installing it"))?;
            eprintln!("cross: {}", first_line(&q, &["--version"]));
        }
        if plan.iter().any(|p| p.1 == Route::Rustup) {
            eprintln!(
                "cross: {}",
                first_line(Path::new("aarch64-linux-gnu-gcc"), &["--version"])
            );
        }
        if debian {
            let v = first_line(Path::new(DEBIAN_RUSTC), &["-V"]);
            let ver = parse_version(&v)
                .with_context(|| format!("cannot tell the version of {DEBIAN_RUSTC}: {v:?}"))?;
            ensure!(
                ver >= MIN_DEBIAN_RUSTC,
                "{DEBIAN_RUSTC} is {v}, older than the workspace's rust-version {}.{}: install Debian's rustc-web (bookworm-security), not rustc",
                MIN_DEBIAN_RUSTC.0,
                MIN_DEBIAN_RUSTC.1
            );
            eprintln!("cross: {DEBIAN_RUSTC}: {v}");
            eprintln!(
                "cross: {DEBIAN_CARGO}: {}",
                first_line(Path::new(DEBIAN_CARGO), &["-V"])
            );
            // build-std compiles these sources with that rustc: they must be one release.
            let dpkg = |pkg: &str| {
                Command::new("dpkg-query")
                    .args(["-W", "-f=${Version}", pkg])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            };
            if let (Some(a), Some(b)) = (dpkg("rustc-web"), dpkg("rust-web-src")) {
                ensure!(
                    a == b,
                    "rustc-web is {a} but rust-web-src is {b}: build-std needs the std sources of the same release (apt-get install rustc-web rust-web-src)"
                );
            }
            let zig = find_zig().context("zig is missing after installing it")?;
            let v = first_line(&zig, &["version"]);
            let pinned = ZIG_PIN.rsplit('=').next().unwrap_or_default();
            if v != pinned {
                eprintln!(
                    "cross: warning: zig is {v}; the debian route was verified with {pinned}"
                );
            }
            eprintln!("cross: zig {v} ({})", zig.display());
            tools.zig = Some(zig);
        }
        Ok(tools)
    }
}

/// The first line a tool prints, or why it printed nothing.
fn first_line(prog: &Path, args: &[&str]) -> String {
    match Command::new(prog).args(args).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Err(e) => format!("cannot run {}: {e}", prog.display()),
    }
}

/// "rustc 1.96.0 (ac68faa20 2026-05-25)" -> (1, 96)
fn parse_version(s: &str) -> Option<(u32, u32)> {
    let v = s.split_whitespace().nth(1)?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The zig binary inside PyPI's `ziglang` package, for the `python3` on PATH (the one
/// `.cargo/zig/cc` falls back to).
fn find_zig() -> Option<PathBuf> {
    let o = Command::new("python3")
        .args([
            "-c",
            "import os, ziglang; print(os.path.dirname(ziglang.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let zig = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("zig");
    (o.status.success() && zig.is_file()).then_some(zig)
}

/// Install apt and PyPI packages, but only as root or in CI; elsewhere say how.
pub(crate) fn install(what: &str, apt: &[&str], pip: &[&str]) -> Result<()> {
    let root = is_root();
    let ci = std::env::var_os("CI").is_some();
    let apt_get = || {
        if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        }
    };
    let mut cmds: Vec<Command> = vec![];
    if !apt.is_empty() {
        let mut update = apt_get();
        update.args(["update", "-q"]);
        let mut inst = apt_get();
        inst.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(apt)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmds.push(update);
        cmds.push(inst);
    }
    if !pip.is_empty() {
        let mut c = Command::new("python3");
        c.args(["-m", "pip", "install", "--quiet"]).args(pip);
        cmds.push(c);
    }
    let listing = cmds.iter().map(show).collect::<Vec<_>>().join("\n  ");
    if !root && !ci {
        bail!(
            "missing tools for {what} ({}); install them with:\n  {listing}\n(cargo xtask installs them itself when run as root or with CI set)",
            apt.iter()
                .chain(pip)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for mut c in cmds {
        run(&mut c)?;
    }
    Ok(())
}

/// Is rustup's std for `triple` installed? If not, try `rustup target add` once, under
/// a deadline (it can hang on some machines), and say so either way.
fn rustup_std(triple: &str, required: bool) -> Result<bool> {
    let present = || -> bool {
        let Ok(o) = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .current_dir(root())
            .args(["--print", "sysroot"])
            .output()
        else {
            return false;
        };
        let sysroot = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        sysroot
            .join("lib/rustlib")
            .join(triple)
            .join("lib/self-contained/crt1.o")
            .is_file()
    };
    if present() {
        return Ok(true);
    }
    if on_path("rustup").is_none() {
        return Ok(false);
    }
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root()).args(["target", "add", triple]);
    eprintln!("$ {} (at most {RUSTUP_ADD_TIMEOUT:?})", show(&cmd));
    let mut child = cmd.spawn().context("cannot run rustup")?;
    let end = Instant::now() + RUSTUP_ADD_TIMEOUT;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                eprintln!("cross: `rustup target add {triple}` failed with {st}");
            }
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "cross: `rustup target add {triple}` hung for {RUSTUP_ADD_TIMEOUT:?}: gave up"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ok = present();
    if !ok && required {
        eprintln!("cross: still no rustup std for {triple}");
    }
    Ok(ok)
}

// ---- ELF -----------------------------------------------------------------------------

const EM_ARM: u16 = 40;
const EM_AARCH64: u16 = 183;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_ARM_ATTRIBUTES: u32 = 0x7000_0003;

/// What the ELF headers say about a binary: enough to prove "static ARM executable".
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Elf {
    pub bits: u8,
    pub machine: u16,
    pub kind: u16,
    /// A PT_INTERP segment: the binary needs a dynamic loader.
    pub interp: Option<String>,
    /// DT_NEEDED entries: shared libraries it needs.
    pub needed: usize,
    pub symtab: bool,
    /// ARM EABI attributes: Tag_CPU_arch, Tag_FP_arch, Tag_ABI_VFP_args.
    pub cpu_arch: Option<u64>,
    pub fp_arch: Option<u64>,
    pub vfp_args: Option<u64>,
}

impl Elf {
    pub fn read(path: &Path) -> Result<Elf> {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Elf::parse(&data).with_context(|| format!("{} is not a valid ELF file", path.display()))
    }

    pub fn parse(d: &[u8]) -> Result<Elf> {
        ensure!(d.len() >= 52 && d[..4] == *b"\x7fELF", "no ELF magic");
        ensure!(d[5] == 1, "not little-endian");
        let bits = match d[4] {
            1 => 32,
            2 => 64,
            c => bail!("unknown ELF class {c}"),
        };
        let r = Reader {
            d,
            wide: bits == 64,
        };
        let mut e = Elf {
            bits,
            kind: r.u16(16)?,
            machine: r.u16(18)?,
            ..Elf::default()
        };
        let (phoff, shoff, at) = if r.wide {
            (r.u64(32)?, r.u64(40)?, 54)
        } else {
            (r.u32(28)? as u64, r.u32(32)? as u64, 42)
        };
        let (phentsize, phnum) = (r.u16(at)? as u64, r.u16(at + 2)? as u64);
        let (shentsize, shnum) = (r.u16(at + 4)? as u64, r.u16(at + 6)? as u64);

        for i in 0..phnum {
            let p = (phoff + i * phentsize) as usize;
            let kind = r.u32(p)?;
            let (off, size) = if r.wide {
                (r.u64(p + 8)?, r.u64(p + 32)?)
            } else {
                (r.u32(p + 4)? as u64, r.u32(p + 16)? as u64)
            };
            let bytes = d
                .get(off as usize..(off + size) as usize)
                .context("segment past the end of the file")?;
            match kind {
                PT_INTERP => {
                    e.interp = Some(String::from_utf8_lossy(bytes).trim_end_matches('\0').into())
                }
                PT_DYNAMIC => {
                    let step = if r.wide { 16 } else { 8 };
                    let dynr = Reader {
                        d: bytes,
                        wide: r.wide,
                    };
                    for at in (0..bytes.len().saturating_sub(step - 1)).step_by(step) {
                        let tag = if r.wide {
                            dynr.u64(at)?
                        } else {
                            dynr.u32(at)? as u64
                        };
                        match tag {
                            0 => break,
                            DT_NEEDED => e.needed += 1,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        for i in 0..shnum {
            let s = (shoff + i * shentsize) as usize;
            let kind = r.u32(s + 4)?;
            let (off, size) = if r.wide {
                (r.u64(s + 24)?, r.u64(s + 32)?)
            } else {
                (r.u32(s + 16)? as u64, r.u32(s + 20)? as u64)
            };
            match kind {
                SHT_SYMTAB => e.symtab = true,
                SHT_ARM_ATTRIBUTES => {
                    let bytes = d
                        .get(off as usize..(off + size) as usize)
                        .context("section past the end of the file")?;
                    e.arm_attributes(bytes);
                }
                _ => {}
            }
        }
        Ok(e)
    }

    /// The file-scope "aeabi" attributes (ARM IHI 0045, "Build Attributes").
    fn arm_attributes(&mut self, d: &[u8]) {
        if d.first() != Some(&b'A') {
            return;
        }
        let mut at = 1;
        while at + 4 <= d.len() {
            let len = u32::from_le_bytes(d[at..at + 4].try_into().expect("4 bytes")) as usize;
            let Some(section) = d.get(at + 4..at + len.max(4)) else {
                return;
            };
            at += len.max(4);
            let Some(nul) = section.iter().position(|&b| b == 0) else {
                return;
            };
            if &section[..nul] != b"aeabi" {
                continue;
            }
            let mut s = nul + 1;
            while s < section.len() {
                let (tag, n) = uleb(&section[s..]);
                let Some(size) = section
                    .get(s + n..s + n + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                else {
                    return;
                };
                let end = (s + size).min(section.len());
                if tag == 1 {
                    self.file_attributes(&section[s + n + 4..end]);
                }
                if size == 0 {
                    return;
                }
                s += size;
            }
        }
    }

    fn file_attributes(&mut self, mut d: &[u8]) {
        let ntbs = |d: &[u8]| d.iter().position(|&b| b == 0).map_or(d.len(), |p| p + 1);
        while !d.is_empty() {
            let (tag, n) = uleb(d);
            d = &d[n..];
            let used = match tag {
                // Strings: CPU raw name, CPU name, also_compatible_with, conformance.
                4 | 5 | 65 | 67 => ntbs(d),
                // Tag_compatibility: a number, then a string.
                32 => {
                    let (_, n) = uleb(d);
                    n + ntbs(&d[n.min(d.len())..])
                }
                // From 32 on, odd tags are strings and even ones numbers.
                t if t > 32 && t % 2 == 1 => ntbs(d),
                _ => {
                    let (v, n) = uleb(d);
                    match tag {
                        6 => self.cpu_arch = Some(v),
                        10 => self.fp_arch = Some(v),
                        28 => self.vfp_args = Some(v),
                        _ => {}
                    }
                    n
                }
            };
            d = &d[used.min(d.len())..];
        }
    }

    /// Fail unless this is a static, stripped executable for `t`'s units.
    pub fn check(&self, t: &Target) -> Result<()> {
        ensure!(
            self.bits == t.elf_bits && self.machine == t.elf_machine,
            "it is a {}-bit ELF for machine {}, not {}-bit {} ({})",
            self.bits,
            self.machine,
            t.elf_bits,
            machine_name(t.elf_machine),
            t.elf_machine
        );
        ensure!(
            self.kind == ET_EXEC || self.kind == ET_DYN,
            "ELF type {} is not an executable",
            self.kind
        );
        if let Some(i) = &self.interp {
            bail!("it is dynamically linked: it asks for the loader {i}");
        }
        ensure!(
            self.needed == 0,
            "it needs {} shared libraries",
            self.needed
        );
        ensure!(!self.symtab, "it is not stripped (it has a .symtab)");
        if let Some(ok) = t.arm_cpu_arch {
            let arch = self
                .cpu_arch
                .context("it has no ARM Tag_CPU_arch attribute")?;
            ensure!(
                ok.contains(&arch),
                "it needs an {} CPU, which {} do not have",
                cpu_arch_name(arch),
                t.units
            );
            ensure!(
                self.vfp_args == Some(1),
                "it does not pass floats in VFP registers (not hard-float)"
            );
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "ELF{} {} {}; static: {}, {}; {}",
            self.bits,
            machine_name(self.machine),
            match self.kind {
                ET_EXEC => "executable",
                ET_DYN => "position-independent executable",
                _ => "file",
            },
            match &self.interp {
                None => "no PT_INTERP".to_string(),
                Some(i) => format!("PT_INTERP {i}"),
            },
            match self.needed {
                0 => "no DT_NEEDED".to_string(),
                n => format!("{n} DT_NEEDED"),
            },
            if self.symtab {
                "not stripped"
            } else {
                "stripped (no .symtab)"
            }
        );
        if let Some(a) = self.cpu_arch {
            let _ = write!(s, "; Tag_CPU_arch {}", cpu_arch_name(a));
        }
        if let Some(f) = self.fp_arch {
            let fp = match f {
                0 => "none",
                1 => "VFPv1",
                2 => "VFPv2",
                3 => "VFPv3",
                4 => "VFPv3-D16",
                5 => "VFPv4",
                6 => "VFPv4-D16",
                7 => "ARMv8 FP",
                8 => "ARMv8 FP-D16",
                _ => "other",
            };
            let _ = write!(s, ", Tag_FP_arch {fp}");
        }
        if self.vfp_args == Some(1) {
            s.push_str(", hard-float (VFP registers)");
        }
        s
    }
}

fn machine_name(m: u16) -> &'static str {
    match m {
        EM_ARM => "ARM",
        EM_AARCH64 => "AArch64",
        62 => "x86-64",
        _ => "other",
    }
}

fn cpu_arch_name(a: u64) -> &'static str {
    [
        "pre-v4", "v4", "v4T", "v5T", "v5TE", "v5TEJ", "v6", "v6KZ", "v6T2", "v6K", "v7", "v6-M",
        "v6S-M", "v7E-M", "v8",
    ]
    .get(a as usize)
    .copied()
    .unwrap_or("later")
}

fn uleb(d: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, b) in d.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, d.len().min(10))
}

struct Reader<'a> {
    d: &'a [u8],
    wide: bool,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        self.d
            .get(at..at + N)
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("truncated at byte {at}"))
    }
    fn u16(&self, at: usize) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(at)?))
    }
    fn u32(&self, at: usize) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(at)?))
    }
    fn u64(&self, at: usize) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(at)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host_binary_as_dynamic_or_static_x86() {
        // The test binary itself: a real ELF of the host's kind.
        let e = Elf::read(&std::env::current_exe().unwrap()).unwrap();
        assert_eq!(e.bits, 64);
        assert!(e.kind == ET_EXEC || e.kind == ET_DYN);
        assert!(Elf::parse(b"not an elf").is_err());
    }

    #[test]
    fn arm_attributes_are_parsed() {
        // Tag_conformance "2.09", Tag_CPU_name "6KZ"... as `readelf -A` lists them.
        let mut attrs = vec![67u8];
        attrs.extend_from_slice(b"2.09\0");
        attrs.extend_from_slice(&[5]);
        attrs.extend_from_slice(b"arm1176jzf-s\0");
        attrs.extend_from_slice(&[6, 6, 8, 1, 9, 1, 10, 2, 28, 1, 34, 0]);
        let mut file = vec![1u8];
        file.extend_from_slice(&((attrs.len() + 5) as u32).to_le_bytes());
        file.extend_from_slice(&attrs);
        let mut sub = b"aeabi\0".to_vec();
        sub.extend_from_slice(&file);
        let mut sect = vec![b'A'];
        sect.extend_from_slice(&((sub.len() + 4) as u32).to_le_bytes());
        sect.extend_from_slice(&sub);
        let mut e = Elf::default();
        e.arm_attributes(&sect);
        assert_eq!(
            (e.cpu_arch, e.fp_arch, e.vfp_args),
            (Some(6), Some(2), Some(1))
        );
        let armv6 = target("arm-unknown-linux-musleabihf").unwrap();
        assert!(armv6.arm_cpu_arch.unwrap().contains(&6));
        assert!(
            !armv6.arm_cpu_arch.unwrap().contains(&10),
            "v7 is no Pi Zero"
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(2_169_560), "2,169,560");
        assert_eq!(thousands(999), "999");
        assert_eq!(BUDGET_BYTES, 2_621_440);
        assert_eq!(
            parse_version("rustc 1.96.0 (ac68faa20 2026-05-25)"),
            Some((1, 96))
        );
    }
}
