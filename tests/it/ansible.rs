//! `deploy/ansible` proven by running it (issue 7): `ansible-playbook site.yml` for real
//! against two Raspberry-Pi-like arm64 Debian VMs (systemd, SSH, python3; `cargo
//! xtask pi-image`) that this test boots under qemu-system-aarch64:
//!
//! - `hub1` is the hub host (nats-server + hub) and a unit; `pi1` is a unit that
//!   reaches the broker through a QEMU forward (10.0.2.100:4222 → the hub VM's
//!   forwarded port on the host's loopback). Both use `restrict=on`: the guests reach
//!   nothing but SSH and that forward, and nothing leaves QEMU and loopback.
//! - run 1 deploys from nothing (PKI, enrolment, broker, hub, agents); the agents come
//!   online at the hub with the right arch, labels and allow-list, and run commands;
//! - run 2 changes nothing; `--check` on the converged fleet changes nothing;
//! - run 3 rolls out a newer agent build (`--tags edge`) one unit per batch, each
//!   batch waiting for the unit's hello with the new version before the next starts
//!   (the deploy runs use batches of two: both units at once).
//! - `ansible-lint` (production profile) is clean.
//!
//! Needs `cargo xtask ansible-prep` (CI runs it). Without its output the tests fail
//! when `CI` is set and skip with a message otherwise.

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::pi_vm::{self, PiVm};
use outpost_tests::{Proc, bin, free_port, which};
use outpost_wire::api::NodeView;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TRIPLE: &str = "aarch64-unknown-linux-musl";
/// One playbook run under TCG emulation: every module runs in an emulated Python.
const PLAYBOOK_LIMIT: Duration = Duration::from_secs(20 * 60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::current_exe()
        .expect("test exe")
        .ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf()
}

/// What `cargo xtask ansible-prep` leaves, or why it is not there.
struct Prep {
    venv_bin: PathBuf,
    image: PathBuf,
    /// `<triple>/{outpost-edge,outpost-hub,nats-server}`
    arm: PathBuf,
    upgrade_edge: PathBuf,
    upgrade_version: String,
    /// `cargo xtask package`'s directory, and the Debian versions of the arm64 agent
    /// package of this build and of the upgrade build: pi1 installs from them.
    debs: PathBuf,
    first_deb: String,
    upgrade_deb: String,
}

impl Prep {
    fn find() -> std::result::Result<Prep, String> {
        let t = target_dir();
        let upgrade_version = std::fs::read_to_string(t.join("arm-upgrade/version"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if upgrade_version.is_empty() {
            return Err("arm-upgrade/version is missing: run `cargo xtask ansible-prep`".into());
        }
        let debs = t.join("debian");
        let deb = |version: &str| {
            pi_vm::deb_for(&debs, "outpost-edge", version, "arm64")
                .and_then(|f| pi_vm::deb_version(&f))
                .ok_or_else(|| {
                    format!(
                        "no outpost-edge {version} arm64 package in {}/packages.tsv: run `cargo xtask package` (and `--version {version} --arch arm64 --edge-only`)",
                        debs.display()
                    )
                })
        };
        let (first_deb, upgrade_deb) = (deb(env!("CARGO_PKG_VERSION"))?, deb(&upgrade_version)?);
        let p = Prep {
            venv_bin: t.join("ansible-venv/bin"),
            image: t.join("qemu/pi-arm64"),
            arm: std::env::var_os("OUTPOST_ARM_BINARIES_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| t.join("arm")),
            upgrade_edge: t.join("arm-upgrade").join(TRIPLE).join("outpost-edge"),
            upgrade_version,
            debs,
            first_deb,
            upgrade_deb,
        };
        let needed = [
            p.venv_bin.join("ansible-playbook"),
            p.venv_bin.join("ansible-lint"),
            p.mitogen_strategies().join("mitogen_linear.py"),
            p.image.join("rootfs.ext4"),
            p.image.join("vmlinuz"),
            p.image.join("initrd.img"),
            p.image.join("id_ed25519"),
            p.arm.join(TRIPLE).join("outpost-edge"),
            p.arm.join(TRIPLE).join("outpost-hub"),
            p.arm.join(TRIPLE).join("nats-server"),
            p.upgrade_edge.clone(),
        ];
        for f in needed {
            if !f.is_file() {
                return Err(format!(
                    "{} is missing: run `cargo xtask ansible-prep` (CI does it before the tests)",
                    f.display()
                ));
            }
        }
        for tool in pi_vm::HOST_TOOLS {
            if which(tool).is_none() {
                return Err(format!(
                    "{tool} is not on PATH: `cargo xtask ansible-prep` installs it"
                ));
            }
        }
        Ok(p)
    }
}

fn prep() -> Option<Prep> {
    outpost_tests::ready_or_skip("ansible", Prep::find())
}

impl Prep {
    /// Mitogen's strategy plugins in the venv (`lib/python3.X/site-packages/...`).
    fn mitogen_strategies(&self) -> PathBuf {
        let lib = self.venv_bin.with_file_name("lib");
        let python = std::fs::read_dir(&lib)
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
                })
            })
            .unwrap_or_else(|| lib.join("python3"));
        python.join("site-packages/ansible_mitogen/plugins/strategy")
    }

    /// PATH with the venv first: ansible-playbook and ansible-lint find their own
    /// helpers (ansible-galaxy, ansible-config) there.
    fn path(&self) -> std::ffi::OsString {
        let mut path = std::ffi::OsString::from(self.venv_bin.as_os_str());
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        path
    }
}

/// One `ansible-playbook` run: its output and the PLAY RECAP per host.
struct Run {
    output: String,
    took: Duration,
}

impl Run {
    /// `changed=` per host from the PLAY RECAP.
    fn changed(&self, host: &str) -> Option<u32> {
        self.recap(host, "changed")
    }

    fn recap(&self, host: &str, field: &str) -> Option<u32> {
        let recap = &self.output[self.output.rfind("PLAY RECAP")?..];
        let line = recap
            .lines()
            .find(|l| l.split_whitespace().next() == Some(host))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .and_then(|n| n.parse().ok())
    }

    fn tail(&self) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }
}

struct Deploy {
    p: Prep,
    dir: tempfile::TempDir,
    inventory: PathBuf,
    nats_port: u16,
    runs: u32,
}

impl Deploy {
    /// A vanilla `ansible-playbook` run, as operators run it.
    fn playbook(&mut self, extra: &[&str]) -> Result<Run> {
        self.playbook_with(extra, false)
    }

    /// The same run with Mitogen's `mitogen_linear` strategy: the same play, roles,
    /// modules, `serial` batches and check mode, through one Python per host per run
    /// instead of one per task (a task costs seconds of emulated Python start-up).
    fn playbook_mitogen(&mut self, extra: &[&str]) -> Result<Run> {
        self.playbook_with(extra, true)
    }

    fn playbook_with(&mut self, extra: &[&str], mitogen: bool) -> Result<Run> {
        self.runs += 1;
        let log = self.dir.path().join(format!("playbook-{}.log", self.runs));
        let mut cmd = Command::new(self.p.venv_bin.join("ansible-playbook"));
        cmd.current_dir(root().join("deploy/ansible"))
            .arg("-i")
            .arg(&self.inventory)
            .arg("site.yml")
            .args(extra)
            .env("PATH", self.p.path())
            .env("ANSIBLE_HOME", self.dir.path().join("ansible-home"))
            // The same output with a timestamp per line: where the time goes.
            .env(
                "ANSIBLE_LOG_PATH",
                self.dir
                    .path()
                    .join(format!("playbook-{}.timed.log", self.runs)),
            )
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0");
        if mitogen {
            // Mitogen decides host key checking from Ansible's setting, not from the
            // inventory's `-o StrictHostKeyChecking=no` (fresh VMs, new keys each run).
            cmd.env("ANSIBLE_STRATEGY_PLUGINS", self.p.mitogen_strategies())
                .env("ANSIBLE_STRATEGY", "mitogen_linear")
                .env("ANSIBLE_HOST_KEY_CHECKING", "False");
        }
        let t0 = Instant::now();
        let mut proc = Proc::spawn("ansible-playbook", cmd, log.clone())?;
        let status = loop {
            if let Some(st) = proc.try_wait()? {
                break st;
            }
            if t0.elapsed() > PLAYBOOK_LIMIT {
                proc.kill();
                bail!(
                    "ansible-playbook {extra:?} ran over {PLAYBOOK_LIMIT:?}:\n{}",
                    proc.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let run = Run {
            output: std::fs::read_to_string(&log)?,
            took: t0.elapsed(),
        };
        eprintln!(
            "ansible: run {} {extra:?}{}: {status} in {:.0?}",
            self.runs,
            if mitogen { " (mitogen)" } else { "" },
            run.took
        );
        ensure!(
            status.success(),
            "ansible-playbook {extra:?} failed ({status}); log {}:\n{}",
            log.display(),
            run.tail()
        );
        for host in ["localhost", "hub1", "pi1"] {
            ensure!(
                run.recap(host, "failed") == Some(0) && run.recap(host, "unreachable") == Some(0),
                "{host} failed or was unreachable:\n{}",
                run.tail()
            );
        }
        Ok(run)
    }

    /// The operator CLI on the test machine, through the hub VM's forwarded port.
    fn cli(&self, args: &[&str]) -> Result<Output> {
        let pki = self.dir.path().join("outpost-pki");
        Command::new(bin("outpost-hub"))
            .args(args)
            .env(
                "OUTPOST_NATS_URL",
                format!("tls://127.0.0.1:{}", self.nats_port),
            )
            .env("OUTPOST_CA_FILE", pki.join("ca.pem"))
            .env("OUTPOST_NKEY_FILE", pki.join("operator.nk"))
            .output()
            .context("running outpost-hub")
    }

    fn nodes(&self) -> Result<Vec<NodeView>> {
        let o = self.cli(&["nodes", "--json"])?;
        ensure!(
            o.status.success(),
            "outpost-hub nodes: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    fn wait_online(&self, node: &str, version: &str) -> Result<NodeView> {
        let o = self.cli(&[
            "wait-online",
            node,
            "--agent-version",
            version,
            "--timeout",
            "3m",
        ])?;
        ensure!(
            o.status.success(),
            "{node}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        self.nodes()?
            .into_iter()
            .find(|n| n.name == node)
            .context("online but not listed")
    }

    /// `send` an exec and return (exit status, stdout).
    fn exec(&self, node: &str, argv: &[&str]) -> Result<(i32, String)> {
        let mut args = vec!["send", "--to", node, "--timeout", "1m", "--"];
        args.extend(argv);
        let o = self.cli(&args)?;
        Ok((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ))
    }
}

/// hub1 gets the agent as a binary (`bins`), pi1 from its Debian package of version
/// `deb` (the edge role's two ways).
fn write_inventory(d: &Deploy, vms: &[&PiVm; 2], bins: &Path, deb: &str) -> Result<()> {
    let key = d.p.image.join("id_ed25519");
    let text = format!(
        r#"# written by tests/it/ansible.rs
all:
  vars:
    outpost_hub_cli: {hub_cli}
    outpost_binaries_dir: {bins}
    outpost_hub_address: 10.0.2.100
    outpost_edge_serial: 2
  children:
    qemu:
      vars:
        ansible_host: 127.0.0.1
        ansible_user: pi
        ansible_ssh_private_key_file: {key}
        ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
        ansible_python_interpreter: /usr/bin/python3
      hosts:
        hub1: {{ansible_port: {hub_port}}}
        pi1: {{ansible_port: {pi_port}}}
    outpost_hub:
      hosts:
        hub1:
    outpost_units:
      vars:
        edge_allow:
          methods: [ping, exec]
          exec: ["uname ..."]
      hosts:
        hub1:
          outpost_nats_url: tls://127.0.0.1:4222
          outpost_labels: {{site: shore, role: hub}}
        pi1:
          outpost_labels: {{site: ship}}
          edge_install: deb
          edge_packages_dir: {debs}
          edge_deb_version: "{deb}"
"#,
        hub_cli = bin("outpost-hub").display(),
        bins = bins.display(),
        key = key.display(),
        hub_port = vms[0].ssh_port,
        pi_port = vms[1].ssh_port,
        debs = d.p.debs.display(),
    );
    std::fs::write(&d.inventory, text)?;
    Ok(())
}

/// `<dir>/<triple>/{outpost-edge,outpost-hub,nats-server}`, with the agent from `edge`.
fn binaries(dir: &Path, p: &Prep, edge: &Path) -> Result<PathBuf> {
    let d = dir.join(TRIPLE);
    std::fs::create_dir_all(&d)?;
    std::fs::copy(edge, d.join("outpost-edge"))?;
    for f in ["outpost-hub", "nats-server"] {
        std::fs::copy(p.arm.join(TRIPLE).join(f), d.join(f))?;
    }
    Ok(dir.to_path_buf())
}

#[test]
fn site_yml_deploys_converges_and_upgrades_a_fleet() {
    let Some(p) = prep() else { return };
    if let Err(e) = deploy(p) {
        panic!("{e:#}");
    }
}

fn deploy(p: Prep) -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("outpost-ansible-")
        .tempdir()?;
    let keep = std::env::var_os("OUTPOST_KEEP_TEST_DIRS").is_some();
    let nats_port = free_port();
    let mut hub = PiVm::boot(
        "hub1",
        &p.image,
        dir.path(),
        &format!(",hostfwd=tcp:127.0.0.1:{nats_port}-:4222"),
    )?;
    let mut pi = PiVm::boot(
        "pi1",
        &p.image,
        dir.path(),
        &format!(
            ",guestfwd=tcp:{}:4222-cmd:socat STDIO TCP:127.0.0.1:{nats_port}",
            pi_vm::HOST_BROKER_ADDR
        ),
    )?;
    for vm in [&mut hub, &mut pi] {
        let took = vm.wait_ssh(Duration::from_secs(300))?;
        eprintln!("ansible: {} answers SSH {took:.0?} after launch", vm.name);
    }
    let v1 = binaries(
        &dir.path().join("bin-v1"),
        &p,
        &p.arm.join(TRIPLE).join("outpost-edge"),
    )?;
    let v2 = binaries(&dir.path().join("bin-v2"), &p, &p.upgrade_edge)?;
    let mut d = Deploy {
        inventory: dir.path().join("inventory.yml"),
        p,
        dir,
        nats_port,
        runs: 0,
    };
    let (first_deb, upgrade_deb) = (d.p.first_deb.clone(), d.p.upgrade_deb.clone());
    write_inventory(&d, &[&hub, &pi], &v1, &first_deb)?;

    // 1. From nothing to a fleet.
    let run = d.playbook(&[])?;
    for host in ["hub1", "pi1"] {
        ensure!(
            run.changed(host).unwrap_or(0) > 0,
            "the first run changed nothing on {host}"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    for (node, site) in [("hub1", "shore"), ("pi1", "ship")] {
        let n = d.wait_online(node, version)?;
        ensure!(n.arch == "aarch64", "{node} arch {}", n.arch);
        ensure!(
            n.labels.contains(&("site".into(), site.into())),
            "{node} labels {:?}",
            n.labels
        );
        ensure!(n.os.contains("Debian"), "{node} os {}", n.os);
    }
    let (code, out) = d.exec("pi1", &["uname", "-m"])?;
    ensure!(
        code == 0 && out.trim() == "aarch64",
        "pi1 uname -m: {code} {out:?}"
    );
    let (code, out) = d.exec("hub1", &["uname", "-n"])?;
    ensure!(
        code == 0 && out.trim() == "raspberrypi",
        "hub1 uname -n: {code} {out:?}"
    );
    // pi1's agent came from its package, hub1's as a binary.
    let installed = |vm: &PiVm| {
        vm.ssh("dpkg-query -W -f '${Version}' outpost-edge")
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let on_pi = installed(&pi)?;
    ensure!(
        on_pi == first_deb,
        "pi1's outpost-edge package: {on_pi:?}, not {first_deb}"
    );
    // The package's unit (in /usr/lib, or /lib as merged-/usr systems may say), not
    // a copy in /etc that would hide it.
    let unit = pi.sh("systemctl show -p FragmentPath outpost-edge")?;
    ensure!(
        unit.trim()
            .ends_with("lib/systemd/system/outpost-edge.service"),
        "pi1 does not run the package's unit: {unit:?}"
    );
    let on_hub = installed(&hub)?;
    ensure!(
        on_hub.is_empty(),
        "hub1 has an outpost-edge package: {on_hub:?}"
    );
    // The allow-list from the inventory is what the unit enforces.
    let (code, _) = d.exec("pi1", &["id"])?;
    ensure!(
        code == 125,
        "`id` is outside pi1's allow-list, yet: exit {code}"
    );

    // 2. Converged: nothing to change, and --check agrees. These runs and the upgrade
    // go through Mitogen (see `playbook_mitogen`): the first run above proved the
    // vanilla path.
    for extra in [&[][..], &["--check"][..]] {
        let run = d.playbook_mitogen(extra)?;
        for host in ["localhost", "hub1", "pi1"] {
            ensure!(
                run.changed(host) == Some(0),
                "{extra:?}: {host} changed={:?} on a converged fleet:\n{}",
                run.changed(host),
                run.tail()
            );
        }
    }

    // 3. A new agent build, one unit per batch.
    let before: Vec<NodeView> = d.nodes()?;
    write_inventory(&d, &[&hub, &pi], &v2, &upgrade_deb)?;
    let run = d.playbook_mitogen(&["--tags", "edge", "-e", "outpost_edge_serial=1"])?;
    let new = d.p.upgrade_version.clone();
    for host in ["hub1", "pi1"] {
        ensure!(
            run.changed(host).unwrap_or(0) > 0,
            "the upgrade changed nothing on {host}"
        );
    }
    // Batch order: the first unit's hello with the new version is awaited before the
    // second unit's agent is replaced.
    let events = task_events(&run.output);
    let pos = |task: &str, host: &str| {
        events
            .iter()
            .position(|(t, h)| t.contains(task) && h == host)
            .with_context(|| format!("no {task:?} for {host} in:\n{}", run.tail()))
    };
    let (first, second) = ("hub1", "pi1");
    ensure!(
        pos("Install the agent", first)? < pos("Wait until the unit says hello", first)?
            && pos("Wait until the unit says hello", first)? < pos("Install the agent", second)?
            && pos("Install the agent", second)? < pos("Wait until the unit says hello", second)?,
        "the upgrade did not go one batch at a time: {events:?}"
    );
    for node in ["hub1", "pi1"] {
        let n = d.wait_online(node, &new)?;
        let old = before
            .iter()
            .find(|b| b.name == node)
            .context("listed before")?;
        ensure!(
            n.agent_started_at > old.agent_started_at,
            "{node}: agent not restarted ({} then {})",
            old.agent_started_at,
            n.agent_started_at
        );
    }
    let (code, out) = d.exec("pi1", &["uname", "-m"])?;
    ensure!(
        code == 0 && out.trim() == "aarch64",
        "after the upgrade: {code} {out:?}"
    );
    let on_pi = installed(&pi)?;
    ensure!(
        on_pi == upgrade_deb,
        "pi1's package after the upgrade: {on_pi:?}, not {upgrade_deb}"
    );
    eprintln!(
        "ansible: deployed, converged, checked and upgraded in {:.0?} ({} playbook runs)",
        t0.elapsed(),
        d.runs
    );
    if keep {
        eprintln!("ansible: keeping {}", d.dir.keep().display());
    }
    Ok(())
}

/// (task name, host) for every `changed:`/`ok:` line, in output order.
fn task_events(output: &str) -> Vec<(String, String)> {
    let mut task = String::new();
    let mut out = vec![];
    for line in output.lines() {
        if let Some(t) = line.strip_prefix("TASK [") {
            task = t.split(']').next().unwrap_or_default().to_string();
        } else if let Some(rest) = line
            .strip_prefix("changed: [")
            .or_else(|| line.strip_prefix("ok: ["))
        {
            let host = rest.split([']', ' ']).next().unwrap_or_default();
            out.push((task.clone(), host.to_string()));
        }
    }
    out
}

#[test]
fn ansible_lint_is_clean() {
    let Some(p) = prep() else { return };
    let home = tempfile::tempdir().unwrap();
    let o = Command::new(p.venv_bin.join("ansible-lint"))
        .current_dir(root().join("deploy/ansible"))
        .env("PATH", p.path())
        .env("ANSIBLE_HOME", home.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("run ansible-lint");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "ansible-lint failed:\n{text}");
    assert!(
        text.contains("0 failure(s), 0 warning(s)"),
        "ansible-lint:\n{text}"
    );
}

/// Issue 13, finding 9: `pi.1` and `pi-1` both become node `pi-1`; the pki role
/// refuses the inventory before it makes or enrols anything.
#[test]
fn two_hosts_with_one_node_name_are_refused() {
    let Some(p) = prep() else { return };
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("hosts.ini");
    std::fs::write(
        &inventory,
        "[outpost_units]\npi.1 ansible_connection=local\npi-1 ansible_connection=local\n",
    )
    .unwrap();
    let play = dir.path().join("pki.yml");
    std::fs::write(
        &play,
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  roles: [pki]\n",
    )
    .unwrap();
    let pki = dir.path().join("pki");
    let o = Command::new(p.venv_bin.join("ansible-playbook"))
        .arg("-i")
        .arg(&inventory)
        .arg(&play)
        .arg("-e")
        .arg(format!(
            "outpost_pki_dir={} outpost_hub_cli=/nonexistent outpost_nats_port=4222",
            pki.display()
        ))
        .env("PATH", p.path())
        .env("ANSIBLE_HOME", dir.path().join("home"))
        .env("ANSIBLE_ROLES_PATH", root().join("deploy/ansible/roles"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run ansible-playbook");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "the play passed:\n{text}");
    assert!(
        text.contains("two hosts map to the same node name (node names: pi-1, pi-1)"),
        "{text}"
    );
    assert!(!pki.exists(), "the PKI was made before the check");
}
