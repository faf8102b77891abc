//! A whole ARM64 Linux unit under qemu-system-aarch64 (issue 5, docs/qemu.md): Debian's
//! kernel, busybox init supervising the aarch64 agent, a persistent ext4 disk, QEMU
//! user networking with `restrict=on` (the guest reaches only the broker's forward).
//!
//! One VM per test binary run, the scenarios in order: boot and come online with arch
//! and kernel; a command and its output; a link cut with commands queued, each
//! landing exactly once; a hard reset mid-command, reported "interrupted". The same
//! link-cut scenario also runs against a local agent process through the same
//! [`Device`] interface.
//!
//! The image comes from `cargo xtask qemu-image` (CI builds it before the tests).
//! Without it, the VM test fails when `CI` is set and skips with a message otherwise.

use anyhow::{Context, Result, ensure};
use outpost_tests::device::{Device, ProcessDevice, QemuVm, VM_BROKER_ADDR, VmImage};
use outpost_tests::{Fleet, append_argv};
use outpost_wire::api::CmdState;
use outpost_wire::msg::Status;
use outpost_wire::{Exec, Method, MsgId};
use std::time::{Duration, Instant};

/// TCG emulation: the agent runs several times slower than native; TLS too.
const T: Duration = Duration::from_secs(90);

fn image() -> Option<VmImage> {
    outpost_tests::ready_or_skip("qemu_vm", VmImage::find())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm64_vm_unit() {
    let Some(image) = image() else {
        return;
    };
    let t0 = Instant::now();
    let mut f = Fleet::start_with_hosts(&[VM_BROKER_ADDR])
        .await
        .expect("fleet starts");
    eprintln!(
        "qemu_vm: fleet (binaries, broker, hub) ready in {:.1?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    let mut vm = QemuVm::new("vm-pi", image.clone());
    let r = vm_scenarios(&mut f, &mut vm, &image).await;
    if let Err(e) = r {
        let agent_log = vm
            .console("tail -n 80 /data/agent.log", Duration::from_secs(10))
            .await
            .map(|(t, _)| t)
            .unwrap_or_else(|e| format!("(cannot read it: {e:#})"));
        panic!(
            "ARM64 VM: {e:#}\n\n=== VM console\n{}\n=== /data/agent.log (tail)\n{agent_log}\n{}",
            tail(&vm.console_log(), 120),
            f.logs()
        );
    }
    eprintln!(
        "qemu_vm: VM scenarios (boot to last check) took {:.1?}",
        t0.elapsed()
    );
}

async fn vm_scenarios(f: &mut Fleet, vm: &mut QemuVm, image: &VmImage) -> Result<()> {
    let node = vm.node().to_string();

    // (a) Boot; online with arch aarch64 and the Debian kernel's release.
    let boot = Instant::now();
    vm.start(f).await?;
    let view = f.wait_online(&node, true, T).await?;
    let boot_to_online = boot.elapsed();
    ensure!(view.arch == "aarch64", "arch {:?}", view.arch);
    ensure!(
        view.kernel == image.kernel_release,
        "the hub lists kernel {:?}, the image has {:?}",
        view.kernel,
        image.kernel_release
    );
    let o = f.cli(&["nodes"]);
    let table = String::from_utf8_lossy(&o.stdout);
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with(&node) && l.contains("online") && l.contains("aarch64")),
        "nodes table:\n{table}"
    );
    eprintln!(
        "qemu_vm: boot-to-online {:.2?} (QEMU start to the hub listing the unit online)",
        boot_to_online
    );

    // (b) A command runs and its output comes back, through the operator CLI.
    let o = f.cli(&["send", "--json", "--to", &node, "--", "uname", "-m", "-r"]);
    ensure!(
        o.status.success(),
        "send: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("send --json")?;
    ensure!(v["state"] == "succeeded", "{v:#}");
    let want = format!("{} aarch64\n", image.kernel_release);
    ensure!(v["outcome"]["stdout"] == want, "{v:#}");

    // Round trip inside the VM: ping, issue to stored outcome, median of 10.
    let mut rtts = vec![];
    for _ in 0..10 {
        let t = Instant::now();
        let id = f.send(&node, Method::Ping, T, 0).await?;
        let r = f.wait_final(id, T).await?;
        ensure!(r.state == CmdState::Succeeded, "ping: {r:?}");
        rtts.push(t.elapsed());
    }
    rtts.sort();
    eprintln!(
        "qemu_vm: ping round trip (API send to stored outcome): median {:.0?}, min {:.0?}, max {:.0?}",
        rtts[rtts.len() / 2],
        rtts[0],
        rtts[rtts.len() - 1]
    );

    // The supervisor restarts a killed agent.
    let (_, code) = vm.console("killall -9 outpost-edge", T).await?;
    ensure!(code == 0, "killall failed: {code}");
    let id = f.exec(&node, &["true"]).await?;
    let r = f.wait_final(id, T).await?;
    ensure!(
        r.state == CmdState::Succeeded,
        "after the agent was killed: {r:?}"
    );

    // (c) Link cut with commands queued; each lands exactly once.
    queued_across_link_cut(f, vm).await?;

    // (d) Hard reset mid-command: reported interrupted after the reboot.
    let boots = vm.boots();
    let id = f.exec(&node, &["sleep", "600"]).await?;
    // An idle unit starts it at once and says so (`Running`, persisted before it
    // starts): wait until the process really runs.
    f.eventually_state(id, CmdState::Running, T).await?;
    let end = Instant::now() + T;
    while vm.console("pidof sleep", T).await?.1 != 0 {
        ensure!(Instant::now() < end, "sleep 600 never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reset = Instant::now();
    vm.reset()?;
    let r = f.wait_final(id, T).await?;
    let after = reset.elapsed();
    ensure!(r.state == CmdState::Failed, "after the reset: {r:?}");
    let reason = match r.outcome.as_ref().map(|o| &o.status) {
        Some(Status::Failed(why)) => why.clone(),
        other => anyhow::bail!("no failure reason: {other:?}"),
    };
    ensure!(reason.contains("interrupted"), "reason {reason:?}");
    ensure!(vm.boots() > boots, "the VM did not reboot");
    eprintln!(
        "qemu_vm: hard reset to the interrupted outcome stored: {after:.2?} (reason {reason:?})"
    );
    // And the unit works after it.
    let id = f.exec(&node, &["true"]).await?;
    let r = f.wait_final(id, T).await?;
    ensure!(r.state == CmdState::Succeeded, "after the reset: {r:?}");
    Ok(())
}

/// Cut the device's link, queue commands through the hub API, restore the link:
/// every command is final, succeeded, and its token is in the file exactly once.
async fn queued_across_link_cut<D: Device>(f: &Fleet, dev: &mut D) -> Result<()> {
    let node = dev.node().to_string();
    let file = dev.persistent_path("tokens.txt");
    dev.cut_link().await?;
    let cut = Instant::now();
    let mut ids: Vec<(MsgId, String)> = vec![];
    for i in 0..5 {
        let token = format!("token-{i}");
        let m = Method::Exec(Exec {
            argv: append_argv(std::path::Path::new(&file), &token),
            env: vec![],
            cwd: None,
        });
        ids.push((f.send(&node, m, T * 3, 0).await?, token));
    }
    // Let the hub try (and fail) to deliver while the link is down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (id, _) in &ids {
        let r = f.show(*id).await?;
        ensure!(
            !r.state.is_final(),
            "{id} is {:?} with the link cut",
            r.state
        );
    }
    dev.restore_link().await?;
    let restored = Instant::now();
    let all: Vec<MsgId> = ids.iter().map(|(id, _)| *id).collect();
    let recs = f.wait_all_final(&all, T * 2).await?;
    for r in &recs {
        ensure!(r.state == CmdState::Succeeded, "{r:?}");
    }
    let (text, code) = dev.console(&format!("cat {file}"), T).await?;
    ensure!(code == 0, "cat {file}: {text}");
    for (_, token) in &ids {
        let n = text.lines().filter(|l| l.trim() == token).count();
        ensure!(n == 1, "{token} landed {n} times:\n{text}");
    }
    eprintln!(
        "qemu_vm: {}: link down {:.1?}, all {} queued commands final {:.1?} after restore, each once",
        node,
        restored - cut,
        ids.len(),
        restored.elapsed()
    );
    Ok(())
}

/// The same scenario, through the same interface, against a local agent process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_process_link_cut() {
    let mut f = Fleet::start().await.expect("fleet starts");
    let mut dev = ProcessDevice::local("local-dev");
    let r = async {
        dev.start(&mut f).await?;
        f.wait_online("local-dev", true, T).await?;
        queued_across_link_cut(&f, &mut dev).await
    }
    .await;
    if let Err(e) = r {
        panic!("local process device: {e:#}\n\n{}", f.logs());
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

trait WaitState {
    async fn eventually_state(&self, id: MsgId, st: CmdState, limit: Duration) -> Result<()>;
}

impl WaitState for Fleet {
    async fn eventually_state(&self, id: MsgId, st: CmdState, limit: Duration) -> Result<()> {
        outpost_tests::eventually(&format!("{id} to be {st:?}"), limit, || async {
            self.show(id)
                .await
                .ok()
                .filter(|r| r.state == st)
                .map(|_| ())
        })
        .await
    }
}
