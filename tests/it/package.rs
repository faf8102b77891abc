//! The agent's Debian package proven on a Pi-like arm64 VM (issue 15), as an operator
//! would use it: `apt install ./outpost-edge_<v>_arm64.deb` (the agent stays down: no
//! config yet), the enrolment bundle into /etc/outpost, start, online at the hub, a
//! command; a reinstall of the same package (idempotent, the running agent restarts);
//! a command queued while the agent is stopped, then `apt install` of a newer version
//! (the agent restarts with it, the hub sees the new version, the queued command runs);
//! `apt remove` (config and state stay) and `apt purge` (they go).
//!
//! The broker and hub run on this host (the support crate's [`Fleet`]); the VM reaches
//! the broker through a QEMU `guestfwd` at 10.0.2.100:4222, as in tests/it/ansible.rs,
//! and nothing else (`restrict=on`: apt installs from the local file, offline).
//!
//! Needs `cargo xtask package` (both versions of the arm64 agent package, see
//! `Args::for_ci`) and `cargo xtask pi-image`; CI makes both before the tests. Without
//! them the test fails when `CI` is set and skips with a message otherwise.

use anyhow::{Context, Result, ensure};
use outpost_tests::pi_vm::{self, PiVm};
use outpost_tests::{Fleet, which};
use outpost_wire::api::{CmdState, NodeView};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NODE: &str = "pi-deb";
/// What the agent says hello with in this test: often, so online/offline show fast.
const HELLO_INTERVAL_S: u32 = 2;
/// apt and the agent's start under TCG emulation are slow; a real Pi is much faster.
const ONLINE_LIMIT: Duration = Duration::from_secs(180);

fn target_dir() -> PathBuf {
    std::env::current_exe()
        .expect("test exe")
        .ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf()
}

/// What `cargo xtask package` and `pi-image` leave, or why it is not there.
struct Prep {
    image: PathBuf,
    /// (agent version, .deb) of the package installed first, and of the upgrade.
    first: (String, PathBuf),
    upgrade: (String, PathBuf),
}

impl Prep {
    fn find() -> std::result::Result<Prep, String> {
        let t = target_dir();
        let image = t.join("qemu/pi-arm64");
        for f in pi_vm::IMAGE_FILES {
            if !image.join(f).is_file() {
                return Err(format!(
                    "{} is missing: run `cargo xtask pi-image`",
                    image.join(f).display()
                ));
            }
        }
        let up = std::fs::read_to_string(t.join("arm-upgrade/version"))
            .map_err(|_| "arm-upgrade/version is missing: run `cargo xtask ansible-prep`")?;
        let debs = t.join("debian");
        let find = |version: &str| -> std::result::Result<(String, PathBuf), String> {
            pi_vm::deb_for(&debs, "outpost-edge", version, "arm64")
                .map(|p| (version.to_string(), p))
                .ok_or_else(|| {
                    format!(
                        "no outpost-edge {version} arm64 package in {}/packages.tsv: run `cargo xtask package` (and `--version {version} --arch arm64 --edge-only`)",
                        debs.display()
                    )
                })
        };
        let p = Prep {
            image,
            first: find(env!("CARGO_PKG_VERSION"))?,
            upgrade: find(up.trim())?,
        };
        for tool in pi_vm::HOST_TOOLS {
            if which(tool).is_none() {
                return Err(format!(
                    "{tool} is not on PATH: `cargo xtask qemu-image` and `pi-image` install it"
                ));
            }
        }
        Ok(p)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deb_installs_enrols_upgrades_and_purges_on_a_pi() {
    let Some(p) = outpost_tests::ready_or_skip("package", Prep::find()) else {
        return;
    };
    let fleet = Fleet::start_with_hosts(&[pi_vm::HOST_BROKER_ADDR])
        .await
        .expect("fleet starts");
    if let Err(e) = lifecycle(&fleet, &p).await {
        panic!("{e:#}\n\n{}", fleet.logs());
    }
}

/// One step's time, for the log: where the test's minutes go.
fn step(t0: Instant, what: &str) {
    eprintln!("package: {:>6.1?} {what}", t0.elapsed());
}

async fn lifecycle(f: &Fleet, p: &Prep) -> Result<()> {
    let t0 = Instant::now();
    let dir = f.dir.path().join("vm");
    std::fs::create_dir_all(&dir)?;
    let mut vm = PiVm::boot(
        NODE,
        &p.image,
        &dir,
        &format!(
            ",guestfwd=tcp:{}:4222-cmd:socat STDIO TCP:127.0.0.1:{}",
            pi_vm::HOST_BROKER_ADDR,
            f.port
        ),
    )?;
    let took = vm.wait_ssh(Duration::from_secs(300))?;
    step(t0, &format!("VM answers SSH ({took:.0?} after launch)"));

    // The bundle, as the hub's operator makes it, for the address the unit dials.
    let bundle = dir.join("bundle");
    let o = f.cli(&[
        "enroll",
        "--pki",
        &f.pki().display().to_string(),
        NODE,
        "--out",
        &bundle.display().to_string(),
        "--nats-url",
        &format!("tls://{}:4222", pi_vm::HOST_BROKER_ADDR),
        "--label",
        "site=lab",
    ]);
    ensure!(
        o.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let toml = std::fs::read_to_string(bundle.join("edge.toml"))?;
    // The bundle allows ping only; this unit may also run `uname`.
    let head = toml.split("\n[allow]").next().unwrap_or(&toml);
    std::fs::write(
        bundle.join("edge.toml"),
        format!(
            "{head}\nhello_interval_s = {HELLO_INTERVAL_S}\n\n[allow]\nmethods = [\"ping\", \"exec\"]\nexec = [\"uname ...\"]\n"
        ),
    )?;
    vm.copy_in(
        &[
            &p.first.1,
            &p.upgrade.1,
            &bundle.join("edge.toml"),
            &bundle.join("ca.pem"),
            &bundle.join("node.nk"),
        ],
        "/tmp/",
    )?;
    let deb = |d: &Path| {
        format!(
            "/tmp/{}",
            d.file_name().unwrap_or_default().to_string_lossy()
        )
    };
    let apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q";

    // 1. Installed, enabled, not started: it has no config yet.
    let out = vm.sh(&format!("{apt} {}", deb(&p.first.1)))?;
    step(t0, "apt install (first version)");
    ensure!(
        out.contains("installed, not started"),
        "the postinst should say the agent waits for its bundle:\n{out}"
    );
    vm.sh("systemctl is-enabled outpost-edge")?;
    let active = vm.ssh("systemctl is-active outpost-edge")?;
    ensure!(
        !active.status.success(),
        "the agent started without a config: {}",
        String::from_utf8_lossy(&active.stdout)
    );
    let layout = String::from_utf8_lossy(
        &vm.ssh(
            "sudo stat -c '%U:%G %a %n' /usr/bin/outpost-edge /etc/outpost \
             /etc/outpost/edge.toml.example /var/lib/outpost; getent passwd outpost",
        )?
        .stdout,
    )
    .into_owned();
    for want in [
        "root:root 755 /usr/bin/outpost-edge",
        "root:outpost 750 /etc/outpost",
        "root:root 644 /etc/outpost/edge.toml.example",
        "outpost:outpost 700 /var/lib/outpost",
        "outpost:x:",
    ] {
        ensure!(
            layout.contains(want),
            "after install, no {want:?} in:\n{layout}"
        );
    }

    // 2. The bundle in place, started: online at the hub, a command runs.
    vm.sh(
        "cd /tmp && sudo install -m 0640 -o root -g outpost edge.toml ca.pem node.nk /etc/outpost/ && \
         sudo systemctl start outpost-edge",
    )?;
    let v1 = wait_version(f, &p.first.0, 0).await?;
    step(t0, "online at the hub");
    ensure!(v1.arch == "aarch64", "arch {}", v1.arch);
    ensure!(v1.os.contains("Debian"), "os {}", v1.os);
    let (code, out) = exec(f, &["uname", "-m"]).await?;
    ensure!(
        code == Some(0) && out.trim() == "aarch64",
        "uname -m: {code:?} {out:?}"
    );
    step(t0, "a command ran");

    // 3. The same package again: nothing breaks, the running agent is restarted.
    vm.sh(&format!("{apt} --reinstall {}", deb(&p.first.1)))?;
    let again = wait_version(f, &p.first.0, v1.agent_started_at).await?;
    vm.sh("systemctl is-active outpost-edge")?;
    step(t0, "reinstalled: agent restarted");

    // 4. A command queued while the agent is down, then the upgrade: the agent comes
    // back with the new version and runs the command it missed.
    vm.sh("sudo systemctl stop outpost-edge")?;
    f.wait_online(NODE, false, Duration::from_secs(60)).await?;
    let queued = f.exec(NODE, &["uname", "-n"]).await?;
    let rec = f.show(queued).await?;
    ensure!(
        !rec.state.is_final(),
        "queued command already final: {rec:?}"
    );
    vm.sh(&format!("{apt} {}", deb(&p.upgrade.1)))?;
    step(t0, "apt install (upgrade)");
    let v2 = wait_version(f, &p.upgrade.0, again.agent_started_at).await?;
    vm.sh("systemctl is-active outpost-edge")?;
    let rec = f.wait_final(queued, Duration::from_secs(120)).await?;
    let out = rec
        .outcome
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    ensure!(
        rec.state == CmdState::Succeeded && out.trim() == "raspberrypi",
        "the command queued across the upgrade: {:?} {out:?}",
        rec.state
    );
    let installed = vm.sh("dpkg-query -W -f '${Version}' outpost-edge")?;
    step(
        t0,
        &format!(
            "upgraded to {installed} (agent {}); the queued command ran",
            v2.agent_version
        ),
    );

    // 5. Remove keeps the config and the state; purge takes them.
    vm.sh("sudo DEBIAN_FRONTEND=noninteractive apt-get remove -y -q outpost-edge")?;
    let left = vm.sh(
        "test ! -e /usr/bin/outpost-edge && ! systemctl is-active -q outpost-edge && \
         sudo ls /etc/outpost /var/lib/outpost",
    )?;
    ensure!(
        left.contains("edge.toml") && left.contains("node.nk"),
        "remove must keep the config: {left}"
    );
    step(t0, "removed: config and state kept");
    vm.sh("sudo DEBIAN_FRONTEND=noninteractive apt-get purge -y -q outpost-edge")?;
    let gone = vm.sh(
        "for p in /etc/outpost /var/lib/outpost /usr/lib/systemd/system/outpost-edge.service \
         /usr/lib/sysusers.d/outpost-edge.conf; do sudo test -e $p && echo \"left: $p\"; done; \
         dpkg-query -W -f '${db:Status-Abbrev}' outpost-edge 2>/dev/null; echo",
    )?;
    ensure!(
        !gone.contains("left:")
            && !gone.trim_start().starts_with("ii")
            && !gone.trim_start().starts_with("rc"),
        "purge left: {gone}"
    );
    step(t0, "purged: nothing left but the `outpost` user");
    eprintln!("package: the whole life cycle in {:.0?}", t0.elapsed());
    Ok(())
}

/// Wait until the unit is online with `version`, from an agent that started after
/// `started_after` (its clock, ms).
async fn wait_version(f: &Fleet, version: &str, started_after: u64) -> Result<NodeView> {
    let end = Instant::now() + ONLINE_LIMIT;
    loop {
        let n = f.nodes().await?.into_iter().find(|n| n.name == NODE);
        if let Some(n) = &n
            && n.online
            && n.agent_version == version
            && n.agent_started_at > started_after
        {
            return Ok(n.clone());
        }
        ensure!(
            Instant::now() < end,
            "{NODE} not online with agent {version} started after {started_after} within {ONLINE_LIMIT:?}; last seen: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An exec through the hub; its exit code and stdout.
async fn exec(f: &Fleet, argv: &[&str]) -> Result<(Option<i32>, String)> {
    let id = f.exec(NODE, argv).await?;
    let rec = f.wait_final(id, Duration::from_secs(120)).await?;
    let o = rec.outcome.context("final without an outcome")?;
    Ok((o.exit_code, String::from_utf8_lossy(&o.stdout).into_owned()))
}
