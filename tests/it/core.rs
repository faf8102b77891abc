//! Issue 14's defects, each as the operator would meet it: a crash with a full queue,
//! a deadline that passes while a command waits, a unit whose clock is wrong.

use outpost_tests::{AgentOpts, Fleet, append_argv, bin, eventually, scenario, which};
use outpost_wire::api::CmdState;
use outpost_wire::sign::SigningKey;
use outpost_wire::{Ack, AckKind, Command, Exec, Method, MsgId, RejectCode, decode, now_ms};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn exec(argv: Vec<String>) -> Method {
    Method::Exec(Exec {
        argv,
        env: vec![],
        cwd: None,
    })
}

fn opts(extra: &str) -> AgentOpts {
    AgentOpts {
        config: format!("{extra}\n{}", outpost_tests::ALLOW_ALL),
        ..Default::default()
    }
}

/// Defect 1: with `concurrency = 1, queue = 2`, a long command and three pings are
/// four commands waiting at a crash, one more than the queue; recovery keeps all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_keeps_every_waiting_command() {
    scenario!(f, {
        let o = opts("concurrency = 1\nqueue = 2");
        f.start_agent("pi-1", &o).await?;
        let marker = f.work_dir("pi-1").join("long-started");
        let long = f
            .send(
                "pi-1",
                exec(vec![
                    "sh".into(),
                    "-c".into(),
                    format!("touch {}; sleep 30", marker.display()),
                ]),
                Duration::from_secs(300),
                0,
            )
            .await?;
        eventually("the long command to start", T, || async {
            marker.exists().then_some(())
        })
        .await?;
        let effects = f.work_dir("pi-1").join("effects");
        let mut queued = vec![];
        for i in 0..2 {
            let argv = append_argv(&effects, &format!("q{i}"));
            queued.push(
                f.send("pi-1", exec(argv), Duration::from_secs(300), 0)
                    .await?,
            );
        }
        // Both accepted into the queue (of 2) before the crash.
        for id in &queued {
            eventually("the queued command to be accepted", T, || async {
                f.show(*id)
                    .await
                    .ok()
                    .filter(|r| r.state == CmdState::Accepted)
            })
            .await?;
        }
        // A third one arrives while the queue is full: Busy, the hub keeps it.
        let third = f
            .send(
                "pi-1",
                exec(append_argv(&effects, "q2")),
                Duration::from_secs(300),
                0,
            )
            .await?;
        f.kill_agent("pi-1");
        f.start_agent("pi-1", &o).await?;
        let r = f.wait_final(long, T).await?;
        assert_eq!(r.state, CmdState::Failed, "{r:?}");
        assert!(
            r.note.contains("interrupted") || format!("{:?}", r.outcome).contains("interrupted"),
            "{r:?}"
        );
        for id in queued.iter().chain([&third]) {
            assert_eq!(f.wait_final(*id, T).await?.state, CmdState::Succeeded);
        }
        let text = std::fs::read_to_string(&effects)?;
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(lines, ["q0", "q1", "q2"], "each ran exactly once");
        Ok(())
    });
}

/// Defect 3: the deadline is checked when a command starts, not only when the unit
/// accepts it. Queued behind a long command past its deadline, it never runs and
/// ends `Expired`, distinct from a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passed_in_the_queue_means_it_never_starts() {
    scenario!(f, {
        f.start_agent("pi-1", &opts("concurrency = 1")).await?;
        let long = f
            .send(
                "pi-1",
                exec(vec!["sleep".into(), "5".into()]),
                Duration::from_secs(60),
                0,
            )
            .await?;
        eventually("the long command to run", T, || async {
            f.show(long)
                .await
                .ok()
                .filter(|r| r.state == CmdState::Running)
        })
        .await?;
        let effect = f.work_dir("pi-1").join("late");
        let late = f
            .send(
                "pi-1",
                exec(append_argv(&effect, "late")),
                Duration::from_secs(2),
                0,
            )
            .await?;
        let r = f.wait_final(late, T).await?;
        assert_eq!(r.state, CmdState::Expired, "{r:?}");
        assert!(r.accepted_at.is_some(), "the unit had accepted it: {r:?}");
        assert_eq!(f.wait_final(long, T).await?.state, CmdState::Succeeded);
        assert!(!effect.exists(), "an expired command ran");
        Ok(())
    });
}

/// Defect 4: a unit with a wrong clock (no RTC, stale or jumped) comes online and
/// obeys; deadlines mean the hub's time; `nodes` shows the offset. The agent runs
/// under libfaketime (its monotonic clock left real).
async fn wrong_clock(f: &mut Fleet, fake: &str, offset_ms: Option<i64>) -> anyhow::Result<()> {
    let faketime = which("faketime").ok_or_else(|| {
        anyhow::anyhow!("faketime is not installed (`cargo xtask deps` installs it)")
    })?;
    let o = AgentOpts {
        wrapper: Some(vec![
            "env".into(),
            "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
            faketime.display().to_string(),
            "-f".into(),
            fake.into(),
            bin("outpost-edge").display().to_string(),
        ]),
        ..Default::default()
    };
    let view = f.start_agent("pi-1", &o).await?;
    let shown = view
        .clock_offset_ms
        .expect("a version 2 unit reports its clock");
    match offset_ms {
        Some(want) => assert!(
            (shown - want).abs() < 120_000,
            "offset shown {shown} ms, the unit is {want} ms off"
        ),
        None => assert!(shown < -50 * 365 * 86_400_000, "offset shown {shown} ms"),
    }
    // A short deadline in hub time: the unit judges it by the hub's clock.
    let effect = f.work_dir("pi-1").join("ran");
    let id = f
        .send(
            "pi-1",
            exec(append_argv(&effect, "x")),
            Duration::from_secs(20),
            0,
        )
        .await?;
    assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);
    assert_eq!(std::fs::read_to_string(&effect)?, "x\n");
    // A command whose deadline passed in hub time is refused, whatever the unit's
    // own clock says (2 days behind, or 1970, it would still look in time). Signed
    // and delivered as the hub would, with a hub time after the deadline.
    let key = SigningKey::from_pkcs8(&std::fs::read(f.pki().join("hub-signing.pk8"))?)?;
    let now = now_ms();
    let late = key.sign(&Command {
        id: MsgId::new(now),
        from: "central".into(),
        to: "pi-1".into(),
        issued_at: now - 60_000,
        deadline: now - 30_000,
        domain: String::new(),
        timeout_ms: 0,
        method: exec(append_argv(&effect, "late")),
        sent_at: now,
    });
    let hub = f.hub_client().await?;
    let r = hub.request(f.subjects.command("pi-1"), late.into()).await?;
    let ack: Ack = decode(&r.payload)?;
    assert!(
        matches!(&ack.kind, AckKind::Rejected(r) if r.code == RejectCode::Expired),
        "{ack:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&effect)?,
        "x\n",
        "the late command ran"
    );
    // The nodes table names the skew.
    let o = f.cli(&["nodes"]);
    let table = String::from_utf8_lossy(&o.stdout);
    let row = table.lines().find(|l| l.starts_with("pi-1")).unwrap_or("");
    assert!(
        !row.contains(" ok "),
        "the CLOCK column hides a skew: {table}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_two_days_ahead_obeys() {
    scenario!(f, wrong_clock(&mut f, "+2d", Some(2 * 86_400_000)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_two_days_behind_obeys() {
    scenario!(f, wrong_clock(&mut f, "-2d", Some(-2 * 86_400_000)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_boots_in_1970_comes_online_and_obeys() {
    scenario!(f, wrong_clock(&mut f, "@1970-01-02 00:00:00", None).await);
}

/// An outbox of `n` finished commands, `output` bytes of stdout each, written by the
/// agent's own state code into `dir` before the agent starts (as a unit leaves it
/// after a long time offline).
fn outbox(dir: &std::path::Path, n: u64, output: usize) -> anyhow::Result<Vec<MsgId>> {
    use outpost_edge::state::StateDir;
    use outpost_wire::{Outcome, Status};
    let (mut s, _) = StateDir::open(dir)?;
    let mut ids = vec![];
    for i in 0..n {
        let c = Command {
            id: MsgId::new(now_ms() + i),
            from: "central".into(),
            to: "pi-1".into(),
            issued_at: now_ms(),
            deadline: now_ms() + 3_600_000,
            domain: String::new(),
            timeout_ms: 0,
            method: Method::Ping,
            sent_at: 0,
        };
        let t = s.accept(&c, true)?;
        s.finish(
            &t,
            &Outcome {
                command: c.id,
                status: Status::Succeeded,
                exit_code: Some(0),
                stdout: vec![b'o'; output],
                stderr: vec![],
                truncated: false,
                started_at: now_ms(),
                duration_ms: 1,
            },
        )?;
        ids.push(c.id);
    }
    Ok(ids)
}

fn delivered(log: &str) -> usize {
    log.matches("outcome delivered").count()
}

/// Defect 5: a 100 MB state log (weeks offline with chatty commands) opens in a unit
/// with 64 MiB of memory, as `systemd-run -p MemoryMax=64M` would give it (a memory
/// cgroup; see tests/support/src/memlimit.rs), and its outbox drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_state_log_opens_with_64_mib_of_memory() {
    use outpost_tests::memlimit::MemoryLimit;
    let Some(limit) = outpost_tests::ready_or_skip(
        "a_100_mb_state_log_opens_with_64_mib_of_memory",
        MemoryLimit::new("log", 64 << 20).map_err(|e| format!("{e:#}")),
    ) else {
        return;
    };
    scenario!(f, {
        // 200 outcomes of 256 KiB: about 100 MB of log (outcomes are kept as hex).
        let dir = f.state_dir("pi-1");
        let ids = outbox(&dir, 200, 256 * 1024)?;
        let size = std::fs::metadata(dir.join("log"))?.len();
        assert!(size > 100_000_000, "the log is {size} bytes");

        let o = AgentOpts {
            wrapper: Some(limit.wrapper(&bin("outpost-edge"))),
            ..Default::default()
        };
        f.start_agent("pi-1", &o).await?;
        eventually(
            "every outcome in the outbox to be receipted",
            Duration::from_secs(180),
            || async { (delivered(&f.agents["pi-1"].log_text()) >= ids.len()).then_some(()) },
        )
        .await?;
        let agent = f.agents.get_mut("pi-1").expect("agent");
        let pid = agent.pid().expect("pid");
        let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
            .unwrap_or_default();
        assert!(agent.try_wait()?.is_none(), "the agent exited");
        assert_eq!(limit.oom_kills(), 0, "the agent was OOM-killed");
        eprintln!(
            "100 MB log ({size} bytes) under 64 MiB: agent peak RSS {hwm}, cgroup peak {:?} bytes (page cache included)",
            limit.peak_bytes()
        );
        Ok(())
    });
}

/// Defect 2's other half: an outbox entry the hub never answers (lost by a broken or
/// old hub) does not hold back the entries behind it. A stand-in for the hub answers
/// every outcome but the oldest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_hub_never_answers_does_not_block_the_outbox() {
    use futures_util::StreamExt;
    use outpost_wire::{Outcome, Receipt, encode};
    scenario!(f, {
        let ids = outbox(&f.state_dir("pi-1"), 3, 10)?;
        f.kill_hub();
        let hub = f.hub_client().await?;
        let mut results = hub.subscribe(f.subjects.result("pi-1")).await?;
        hub.flush().await?;
        f.spawn_agent("pi-1", &AgentOpts::default())?;

        let mut asked = std::collections::HashMap::<MsgId, u32>::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while !asked.contains_key(&ids[1]) || !asked.contains_key(&ids[2]) {
            let msg = tokio::time::timeout_at(end, results.next())
                .await
                .map_err(|_| anyhow::anyhow!("only these outcomes came: {asked:?} (want {ids:?})"))?
                .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
            let o: Outcome = decode(&msg.payload)?;
            *asked.entry(o.command).or_default() += 1;
            if o.command != ids[0]
                && let Some(reply) = msg.reply
            {
                hub.publish(reply, encode(&Receipt { command: o.command }).into())
                    .await?;
            }
        }
        assert!(
            asked.contains_key(&ids[0]),
            "the oldest was tried: {asked:?}"
        );
        // The unanswered one is retried later, on its own backoff.
        let again = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(msg) = results.next().await {
                if decode::<Outcome>(&msg.payload).is_ok_and(|o| o.command == ids[0]) {
                    return;
                }
            }
        })
        .await;
        assert!(again.is_ok(), "the unanswered outcome was not tried again");
        Ok(())
    });
}
