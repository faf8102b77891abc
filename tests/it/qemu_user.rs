//! The ARM agents that `cargo xtask cross` builds, run under qemu-user as real units
//! against the real hub and a real nats-server with TLS: the firmware itself, not a
//! host build, must do the whole round trip.
//!
//! The binaries come from `$OUTPOST_ARM_BINARIES_DIR/<triple>/outpost-edge`, by
//! default `<target dir>/arm/<triple>/outpost-edge`. Without them (or without qemu)
//! these tests fail when `CI` is set, and skip with a message otherwise.

use anyhow::{Context, Result, ensure};
use outpost_tests::{AgentOpts, Fleet};
use outpost_wire::api::CmdState;
use outpost_wire::{FileRead, FileWrite, Method};
use std::path::PathBuf;
use std::time::Duration;

/// qemu-user runs the agent several times slower than native; TLS handshakes too.
const T: Duration = Duration::from_secs(60);

/// One ARM unit kind, as qemu-user stands in for it.
struct Unit {
    triple: &'static str,
    qemu: &'static str,
    /// The CPU model of the real unit, so instructions it lacks trap here too.
    cpu: &'static str,
    /// `outpost_edge::arch()` of the build: what the hub's nodes table must show.
    arch: &'static str,
    node: &'static str,
}

const AARCH64: Unit = Unit {
    triple: "aarch64-unknown-linux-musl",
    qemu: "qemu-aarch64-static",
    cpu: "cortex-a53",
    arch: "aarch64",
    node: "pi3-64",
};
const ARMV7: Unit = Unit {
    triple: "armv7-unknown-linux-musleabihf",
    qemu: "qemu-arm-static",
    cpu: "cortex-a7",
    arch: "armv7",
    node: "pi2-32",
};
const ARMV6: Unit = Unit {
    triple: "arm-unknown-linux-musleabihf",
    qemu: "qemu-arm-static",
    cpu: "arm1176",
    arch: "armv6",
    node: "pi-zero",
};

/// Where `cargo xtask cross` leaves the firmware.
fn binaries_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTPOST_ARM_BINARIES_DIR") {
        return PathBuf::from(d);
    }
    // <target dir>/<profile>/deps/<this test>
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .nth(3)
        .expect("a target dir above the test binary")
        .join("arm")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The command line that runs `u`'s agent under qemu-user, or `None` to skip (only
/// outside CI; in CI a missing binary or qemu is a failure).
fn wrapper(u: &Unit) -> Option<Vec<String>> {
    let bin = binaries_dir().join(u.triple).join("outpost-edge");
    let qemu = which(u.qemu);
    let missing = match (&qemu, bin.is_file()) {
        (Some(_), true) => None,
        (None, _) => Some(format!(
            "{} is not on PATH: `apt-get install qemu-user-static`, or run `cargo xtask cross`, which installs it",
            u.qemu
        )),
        (_, false) => Some(format!(
            "{} is missing: build the ARM agents first with `cargo xtask cross` (CI runs it before the tests), or set OUTPOST_ARM_BINARIES_DIR to where they are",
            bin.display()
        )),
    };
    if let Some(why) = missing {
        if std::env::var_os("CI").is_some() {
            panic!("{} agent under qemu-user: {why}", u.triple);
        }
        eprintln!("qemu_user: SKIPPED {} (CI is not set): {why}", u.triple);
        return None;
    }
    warn_if_stale(&bin);
    let qemu = qemu.expect("checked above");
    Some(vec![
        qemu.display().to_string(),
        "-cpu".into(),
        u.cpu.into(),
        bin.display().to_string(),
    ])
}

/// Say so when the firmware is older than the agent's sources: outside CI nothing
/// rebuilds it before the tests, and an old binary would test old code.
fn warn_if_stale(bin: &std::path::Path) {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut newest = None;
    let mut dirs = vec![root.join("edge/src"), root.join("wire/src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    if let (Some(built), Some(newest)) = (built, newest)
        && newest > built
    {
        eprintln!(
            "qemu_user: note: {} is older than edge/ or wire/ sources: `cargo xtask cross` rebuilds it",
            bin.display()
        );
    }
}

/// The ARM agent comes online, runs a command (ACK, then an outcome with its output
/// and exit code), writes and reads a file, and the hub lists it with its arch.
async fn round_trip(u: &Unit) {
    let Some(wrapper) = wrapper(u) else {
        return;
    };
    let mut f = Fleet::start().await.expect("fleet starts");
    let r = scenario(&mut f, u, wrapper).await;
    if let Err(e) = r {
        panic!(
            "{} under {} -cpu {}: {e:#}\n\n{}",
            u.triple,
            u.qemu,
            u.cpu,
            f.logs()
        );
    }
}

async fn scenario(f: &mut Fleet, u: &Unit, wrapper: Vec<String>) -> Result<()> {
    let opts = AgentOpts {
        wrapper: Some(wrapper),
        labels: vec![format!("cpu={}", u.cpu)],
        ..Default::default()
    };
    let view = f.start_agent(u.node, &opts).await?;
    ensure!(
        view.arch == u.arch,
        "the hub says {} runs on {:?}, not {:?}: is the agent native instead of {}?",
        u.node,
        view.arch,
        u.arch,
        u.triple
    );

    // Command -> ACK -> outcome with output, through the operator CLI.
    let o = f.cli(&[
        "send",
        "--json",
        "--to",
        u.node,
        "--",
        "sh",
        "-c",
        "echo hello from $0; echo to stderr >&2",
        u.triple,
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.success(), "send failed: {stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).context("send --json prints the record")?;
    ensure!(v["state"] == "succeeded", "{v:#}");
    ensure!(
        v["accepted_at"].as_u64().is_some(),
        "no ACK recorded: {v:#}"
    );
    ensure!(
        v["outcome"]["stdout"] == format!("hello from {}\n", u.triple),
        "{v:#}"
    );
    ensure!(v["outcome"]["stderr"] == "to stderr\n", "{v:#}");
    ensure!(v["outcome"]["exit_code"] == 0, "{v:#}");

    // A failing command's exit code comes back through the firmware too.
    let o = f.cli(&["send", "--to", u.node, "--", "sh", "-c", "exit 3"]);
    ensure!(
        o.status.code() == Some(3),
        "exit code 3 should pass through, got {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );

    // The file methods: an atomic write, then a read, by the ARM binary itself.
    let path = f.work_dir(u.node).join("motd").display().to_string();
    let data = format!("written by {}\n", u.triple).into_bytes();
    let id = f
        .send(
            u.node,
            Method::FileWrite(FileWrite {
                path: path.clone(),
                mode: 0o640,
                data: data.clone(),
            }),
            T,
            0,
        )
        .await?;
    let r = f.wait_final(id, T).await?;
    ensure!(r.state == CmdState::Succeeded, "file.write: {r:?}");
    let id = f
        .send(
            u.node,
            Method::FileRead(FileRead { path, max_bytes: 0 }),
            T,
            0,
        )
        .await?;
    let r = f.wait_final(id, T).await?;
    ensure!(
        r.state == CmdState::Succeeded && r.outcome.as_ref().map(|o| &o.stdout) == Some(&data),
        "file.read: {r:?}"
    );

    // The nodes table and `nodes --json` show the unit with its arch.
    let o = f.cli(&["nodes"]);
    let table = String::from_utf8_lossy(&o.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(u.node))
        .with_context(|| format!("no {} row in\n{table}", u.node))?;
    ensure!(
        row.contains("online") && row.split_whitespace().any(|w| w == u.arch),
        "{table}"
    );
    let o = f.cli(&["nodes", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let n = v
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == u.node))
        .with_context(|| format!("no {} in {v:#}", u.node))?;
    ensure!(n["arch"] == u.arch, "{n:#}");
    ensure!(n["agent_version"] == env!("CARGO_PKG_VERSION"), "{n:#}");
    ensure!(n["online"] == true, "{n:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu() {
    round_trip(&AARCH64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_under_qemu() {
    round_trip(&ARMV7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv6_agent_under_qemu() {
    round_trip(&ARMV6).await;
}
