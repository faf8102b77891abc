//! `cargo xtask demo`: a real fleet on this machine — nats-server with TLS and
//! JetStream, the hub, three units and the aarch64 firmware agent under qemu-user —
//! a tour of commands, then the fleet table. `--keep` leaves it running with an
//! environment file to `source`.
//!
//! The tour prints what the operator CLI prints, as it prints it: the CLI's output is
//! not parsed beyond counting `online` in `nodes`, so a new column or format changes
//! the demo's output, not whether it works.

use crate::{Procs, cargo, cross, ensure_nats_server, root, run, target_dir, wait_port};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 14222;
const UNITS: [(&str, &str); 3] = [
    ("pi-north", "site=harbour,role=camera"),
    ("pi-south", "site=harbour,role=gateway"),
    ("ship-7", "site=atlantic,role=gateway"),
];

/// The firmware target the demo's ARM unit runs (Pi 3/4/5, 64-bit OS).
const ARM_TRIPLE: &str = "aarch64-unknown-linux-musl";

/// How long units may take to say hello: the emulated one starts slower.
const ONLINE_LIMIT: Duration = Duration::from_secs(60);

pub fn tour(keep: bool, with_arm: bool) -> Result<()> {
    let t0 = Instant::now();
    let nats = ensure_nats_server()?;
    run_build()?;
    let arm = if with_arm {
        Some(arm_firmware()?)
    } else {
        None
    };
    let bin = target_dir().join("debug");
    let hub = bin.join("outpost-hub");
    let dir = root().join(".demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = dir.join("pki");
    run(Command::new(&hub)
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .args(["--listen", &format!("127.0.0.1:{PORT}")]))?;
    let ca = pki.join("ca.pem");
    let url = format!("tls://localhost:{PORT}");
    let key = std::fs::read_to_string(pki.join("hub-signing.pub"))?
        .trim()
        .to_string();
    // Each unit gets its own identity and broker permissions (its bundle), and an
    // allow-list: a few harmless programs, and files under the demo directory.
    // One more unit: the real aarch64 firmware agent, emulated (a Pi's CPU model).
    let mut units: Vec<(&str, &str, Option<Vec<String>>)> =
        UNITS.iter().map(|(n, l)| (*n, *l, None)).collect();
    if let Some((qemu, arm)) = &arm {
        units.push((
            "pi-arm64",
            "site=lab,role=firmware",
            Some(vec![
                qemu.display().to_string(),
                "-cpu".into(),
                "cortex-a53".into(),
                arm.display().to_string(),
            ]),
        ));
    }
    // `outpost-hub enroll` of one unit, its bundle under the PKI dir.
    let enroll_cmd = |node: &str| {
        let mut c = Command::new(&hub);
        c.args(["enroll", "--pki"])
            .arg(&pki)
            .arg(node)
            .arg("--install-dir")
            .arg(pki.join("bundles").join(node))
            .stdout(std::process::Stdio::null());
        c
    };
    for &(node, labels, _) in &units {
        let mut enroll = enroll_cmd(node);
        for l in labels.split(',') {
            enroll.args(["--label", l]);
        }
        run(&mut enroll)?;
        // The agent refuses every command its own config dir, state dir and keys: the
        // units read and write only `work/`.
        let allow = format!(
            "[allow]\nmethods = [\"ping\", \"exec\", \"file.read\", \"file.write\"]\n\
             exec = [\"uname ...\", \"uptime\", \"df ...\", \"sh -c *\"]\n\
             read = [\"{d}\"]\nwrite = [\"{d}\"]\n",
            d = dir.join("work").display()
        );
        std::fs::create_dir_all(dir.join("config"))?;
        std::fs::create_dir_all(dir.join("work"))?;
        std::fs::write(dir.join("config").join(format!("{node}.toml")), allow)?;
    }

    let mut procs = Procs::default();
    procs.spawn(
        "nats-server",
        Command::new(nats)
            .arg("-c")
            .arg(pki.join("nats-server.conf")),
        &dir.join("nats.log"),
    )?;
    wait_port(PORT, Duration::from_secs(20))
        .context("nats-server did not start; see .demo/nats.log")?;
    procs.spawn(
        "hub",
        Command::new(&hub)
            .args(["serve", "--name", "demo-hub", "--nats-url", &url])
            .arg("--ca-file")
            .arg(&ca)
            .arg("--signing-key")
            .arg(pki.join("hub-signing.pk8"))
            .arg("--nkey-file")
            .arg(pki.join("hub.nk")),
        &dir.join("hub.log"),
    )?;
    for (node, labels, wrapper) in &units {
        let (node, labels) = (*node, *labels);
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]);
                c
            }
            None => Command::new(bin.join("outpost-edge")),
        };
        cmd.args(["run", "--node", node, "--nats-url", &url, "--hub-key", &key])
            .arg("--config")
            .arg(dir.join("config").join(format!("{node}.toml")))
            .arg("--ca-file")
            .arg(&ca)
            .arg("--nkey-file")
            .arg(pki.join("bundles").join(node).join("node.nk"))
            .arg("--state-dir")
            .arg(dir.join("units").join(node));
        for l in labels.split(',') {
            cmd.args(["--label", l]);
        }
        procs.spawn(node, &mut cmd, &dir.join(format!("{node}.log")))?;
    }

    let op = |args: &[&str]| -> Command {
        let mut c = Command::new(&hub);
        c.args(args)
            .env("OUTPOST_NATS_URL", &url)
            .env("OUTPOST_CA_FILE", &ca)
            .env("OUTPOST_NKEY_FILE", pki.join("operator.nk"));
        c
    };
    // Wait until every unit is online.
    let end = Instant::now() + ONLINE_LIMIT;
    loop {
        let out = op(&["nodes"]).output()?;
        let table = String::from_utf8_lossy(&out.stdout);
        if table.matches(" online ").count() >= units.len() {
            break;
        }
        if Instant::now() > end {
            anyhow::bail!("units did not come online; see the logs in .demo/");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    println!("\n== a command with output");
    run(&mut op(&["send", "--to", "pi-north", "--", "uname", "-sm"]))?;
    if units.iter().any(|u| u.0 == "pi-arm64") {
        // Only the agent is emulated: a program it starts is the host's, so a ping
        // shows the firmware's own round trip.
        println!("\n== a ping through the ARM firmware (aarch64 agent under qemu-user)");
        run(&mut op(&["send", "--to", "pi-arm64", "--method", "ping"]))?;
    }
    println!("\n== a command that fails: its exit code comes back");
    let st = op(&[
        "send",
        "--to",
        "pi-south",
        "--domain",
        "nginx",
        "--",
        "sh",
        "-c",
        "echo config test failed >&2; exit 3",
    ])
    .status()?;
    println!("(outpost-hub send exited with {})", st.code().unwrap_or(-1));
    println!("\n== a file written atomically, then read back");
    let motd = dir.join("motd.txt");
    std::fs::write(&motd, "welcome aboard\n")?;
    let target = dir.join("work/ship-7-motd").display().to_string();
    let mut write = op(&["send", "--to", "ship-7", "--method", "file.write"]);
    write.arg("--data-file").arg(&motd).args(["--", &target]);
    run(&mut write)?;
    run(&mut op(&[
        "send",
        "--to",
        "ship-7",
        "--method",
        "file.read",
        "--",
        &target,
    ]))?;
    println!("\n== a command outside the unit's allow-list: rejected, never run");
    let st = op(&[
        "send",
        "--to",
        "pi-north",
        "--",
        "rm",
        "-rf",
        "/tmp/outpost-demo",
    ])
    .status()?;
    println!("(outpost-hub send exited with {})", st.code().unwrap_or(-1));
    println!("\n== a command for a unit that is offline: queued, delivered when it connects");
    // Enrolled, never connected (its agent is not started): the hub queues for it. A
    // name nobody enrolled would be refused at once, with the nearest names.
    run(&mut enroll_cmd("buoy-1"))?;
    run(&mut op(&[
        "send",
        "--to",
        "buoy-1",
        "--no-wait",
        "--deadline",
        "10m",
        "--",
        "true",
    ]))?;

    println!("\n== the fleet as the hub knows it");
    run(&mut op(&["nodes"]))?;
    println!(
        "\ndemo fleet up in {:.1?}; logs and state in {}",
        t0.elapsed(),
        dir.display()
    );
    if keep {
        let env = write_env(&dir, &url, &ca, &pki.join("operator.nk"), &bin)?;
        let arm_unit = if arm.is_some() {
            "pi-arm64"
        } else {
            "pi-north"
        };
        println!("\nThe fleet keeps running; in another shell:\n");
        println!("  source {}", env.display());
        println!("  outpost-hub nodes");
        println!("  outpost-hub send --to pi-north,pi-south,ship-7 -- uptime");
        println!("  outpost-hub send --to {arm_unit} --method ping");
        println!("\nCtrl-C here stops the fleet.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(procs);
    Ok(())
}

/// qemu-user and the aarch64 firmware agent, built once when missing (the debian
/// route of `cargo xtask cross`: Debian's rustc rebuilds std for size).
fn arm_firmware() -> Result<(PathBuf, PathBuf)> {
    let arm = cross::binaries_dir().join(ARM_TRIPLE).join("outpost-edge");
    if !arm.is_file() {
        println!(
            "\n== building the aarch64 firmware agent for the demo's ARM unit: once, a few minutes\n   \
             (installs Debian's rustc-web and zig when missing; cargo shows its progress below;\n   \
             `cargo xtask demo --no-arm` skips this unit)\n"
        );
        let t = Instant::now();
        cross::cross(cross::Args {
            targets: vec![ARM_TRIPLE.into()],
            ..Default::default()
        })
        .context("building the aarch64 agent (`cargo xtask demo --no-arm` leaves it out)")?;
        println!("== aarch64 firmware built in {:.0?}\n", t.elapsed());
    }
    // cross installs qemu-user-static for its own smoke test, so it is here now.
    let qemu = crate::on_path("qemu-aarch64-static").context(
        "qemu-aarch64-static is missing: apt-get install qemu-user-static (or `cargo xtask demo --no-arm`)",
    )?;
    Ok((qemu, arm))
}

/// `.demo/env`: what the operator CLI needs, to `source` in another shell.
fn write_env(dir: &Path, url: &str, ca: &Path, nkey: &Path, bin: &Path) -> Result<PathBuf> {
    let env = dir.join("env");
    let text = format!(
        "# The demo fleet of `cargo xtask demo --keep`: `source` this file, then use outpost-hub.\n\
         export OUTPOST_NATS_URL='{url}'\n\
         export OUTPOST_CA_FILE='{}'\n\
         export OUTPOST_NKEY_FILE='{}'\n\
         export PATH='{}':\"$PATH\"\n",
        ca.display(),
        nkey.display(),
        bin.display()
    );
    std::fs::write(&env, text)?;
    Ok(env)
}

fn run_build() -> Result<()> {
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "outpost-hub",
        "-p",
        "outpost-edge",
    ]))
}
