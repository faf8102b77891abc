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
