//! The end-to-end loop against a real nats-server with TLS: hub and agents run as
//! processes; the operator side is the real CLI or the real API.

use bytes::Bytes;
use futures_util::StreamExt;
use outpost_tests::{AgentOpts, append_argv, scenario};
use outpost_wire::api::CmdState;
use outpost_wire::sign::SigningKey;
use outpost_wire::{
    Ack, AckKind, Command, Exec, FileRead, FileWrite, Log, Method, MsgId, RejectCode, decode,
    now_ms,
};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_the_cli() {
    scenario!(f, {
        f.start_agent(
            "pi-1",
            &AgentOpts {
                labels: vec!["site=lab".into()],
                ..Default::default()
            },
        )
        .await?;
        let o = f.cli(&[
            "send",
            "--to",
            "pi-1",
            "--",
            "sh",
            "-c",
            "echo hello from $0",
            "pi",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(stdout(&o), "hello from pi\n");
        assert!(
            stderr(&o).contains("exec succeeded on pi-1"),
            "{}",
            stderr(&o)
        );

        // --json gives the whole record, output as text.
        let o = f.cli(&[
            "send", "--json", "--to", "pi-1", "--domain", "nginx", "--", "echo", "x",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["domain"], "nginx");
        assert_eq!(v["outcome"]["stdout"], "x\n");

        // show, by id.
        let id = v["id"].as_str().unwrap();
        let o = f.cli(&["show", id]);
        assert!(stdout(&o).contains("state     succeeded"), "{}", stdout(&o));

        // The nodes table knows the unit.
        let o = f.cli(&["nodes"]);
        let table = stdout(&o);
        let row = table
            .lines()
            .find(|l| l.starts_with("pi-1"))
            .expect("pi-1 row");
        assert!(
            row.contains("online")
                && row.contains(std::env::consts::ARCH)
                && row.contains("site=lab"),
            "{table}"
        );
        let o = f.cli(&["nodes", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        assert_eq!(v[0]["agent_version"], env!("CARGO_PKG_VERSION"));
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_timed_out_commands() {
    scenario!(f, {
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        let o = f.cli(&[
            "send",
            "--to",
            "pi-1",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]);
        assert_eq!(
            o.status.code(),
            Some(3),
            "the unit's exit code passes through"
        );
        assert_eq!(stdout(&o), "out\n");
        assert!(
            stderr(&o).contains("err\n") && stderr(&o).contains("exit code 3"),
            "{}",
            stderr(&o)
        );

        let o = f.cli(&[
            "send",
            "--to",
            "pi-1",
            "--timeout",
            "300ms",
            "--",
            "sleep",
            "30",
        ]);
        assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
        assert!(stderr(&o).contains("timed-out"), "{}", stderr(&o));

        // A program that is nowhere is refused before anything runs (issue 13).
        let o = f.cli(&["send", "--to", "pi-1", "--", "/nonexistent/program"]);
        assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
        assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    scenario!(f, {
        let o = f.cli(&["send", "--to", "pi-1", "--method", "reboot"]);
        assert_eq!(o.status.code(), Some(255));
        assert!(
            stderr(&o).contains("unknown method \"reboot\""),
            "{}",
            stderr(&o)
        );
        let o = f.cli(&["send", "--to", "pi-1"]);
        assert!(
            stderr(&o).contains("exec needs a program"),
            "{}",
            stderr(&o)
        );
        let o = f.cli(&["send", "--to", "a.b", "--", "true"]);
        assert!(stderr(&o).contains("invalid node name"), "{}", stderr(&o));
        let o = f.cli(&["show", "nothex"]);
        assert_eq!(o.status.code(), Some(2), "clap usage error");
        let o = f.cli(&["show", &MsgId::new(1).to_string()]);
        assert!(stderr(&o).contains("no command"), "{}", stderr(&o));
        // A dead broker is a clear error, not a hang.
        let o = std::process::Command::new(outpost_tests::bin("outpost-hub"))
            .args(["nodes", "--nats-url", "tls://127.0.0.1:1"])
            .arg("--ca-file")
            .arg(f.ca())
            .output()?;
        assert_eq!(o.status.code(), Some(255));
        assert!(stderr(&o).contains("cannot reach NATS"), "{}", stderr(&o));
        let o = std::process::Command::new(outpost_tests::bin("outpost-hub"))
            .args(["nodes", "--nats-url", "nats://127.0.0.1:4222"])
            .arg("--ca-file")
            .arg(f.ca())
            .output()?;
        assert!(stderr(&o).contains("not TLS"), "{}", stderr(&o));
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_then_read() {
    scenario!(f, {
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        let path = f.work_dir("pi-1").join("motd").display().to_string();
        let id = f
            .send(
                "pi-1",
                Method::FileWrite(FileWrite {
                    path: path.clone(),
                    mode: 0o640,
                    data: b"welcome\n".to_vec(),
                }),
                T,
                0,
            )
            .await?;
        assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);
        let id = f
            .send(
                "pi-1",
                Method::FileRead(FileRead { path, max_bytes: 0 }),
                T,
                0,
            )
            .await?;
        let r = f.wait_final(id, T).await?;
        assert_eq!(r.outcome.unwrap().stdout, b"welcome\n");
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_unit_gets_its_command_when_it_starts() {
    scenario!(f, {
        let effect = f.work_dir("pi-late").join("ran");
        let argv = append_argv(&effect, "once");
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        f.enroll("pi-late")?;
        let id = f.exec("pi-late", &argv).await?;
        // The hub keeps trying; the operator sees why it has not landed.
        let sent = outpost_tests::eventually("a failed attempt", T, || {
            let c = f.show(id);
            async move { c.await.ok().filter(|r| r.attempts >= 2) }
        })
        .await?;
        assert_eq!(sent.state, CmdState::Sent);
        assert!(sent.note.contains("no responders"), "{}", sent.note);
        let pending = f.nodes().await?;
        assert_eq!(
            pending
                .iter()
                .find(|n| n.name == "pi-late")
                .map(|n| n.pending),
            Some(1)
        );

        f.start_agent("pi-late", &AgentOpts::default()).await?;
        let r = f.wait_final(id, T).await?;
        assert_eq!(r.state, CmdState::Succeeded);
        assert_eq!(
            std::fs::read_to_string(&effect)?,
            "once\n",
            "ran exactly once"
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_unit_goes_offline_and_back() {
    scenario!(f, {
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        // Freeze the agent: no hellos, but its connection stays open.
        f.agents["pi-1"].signal(libc::SIGSTOP);
        let off = f.wait_online("pi-1", false, T).await?;
        assert!(!off.online);
        f.agents["pi-1"].signal(libc::SIGCONT);
        f.wait_online("pi-1", true, T).await?;
        // And after a real restart.
        f.kill_agent("pi-1");
        f.wait_online("pi-1", false, T).await?;
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_forged_commands_are_rejected_and_the_agent_keeps_serving() {
    scenario!(f, {
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        let c = f.hub_client().await?;
        let mut logs = c.subscribe(f.subjects.log("pi-1")).await?;
        let subject = f.subjects.command("pi-1");

        for garbage in [&b""[..], b"\x01", b"\xff\xfe garbage", &[0u8; 200][..]] {
            let reply = c
                .request(subject.clone(), Bytes::copy_from_slice(garbage))
                .await?;
            let ack: Ack = decode(&reply.payload)?;
            assert!(
                matches!(&ack.kind, AckKind::Rejected(r) if r.code == RejectCode::BadSignature || r.code == RejectCode::Malformed),
                "{ack:?}"
            );
            let log: Log = decode(&tokio::time::timeout(T, logs.next()).await?.unwrap().payload)?;
            assert!(log.message.contains("rejected"), "{log:?}");
        }

        // Signed by a key the unit does not pin: rejected, never run.
        let effect = f.work_dir("pi-1").join("forged");
        let forger = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()?)?;
        let cmd = Command {
            id: MsgId::new(now_ms()),
            from: "mallory".into(),
            to: "pi-1".into(),
            issued_at: now_ms(),
            deadline: now_ms() + 60_000,
            domain: String::new(),
            timeout_ms: 0,
            method: Method::Exec(Exec {
                argv: append_argv(&effect, "x"),
                env: vec![],
                cwd: None,
            }),
            sent_at: now_ms(),
        };
        let reply = c
            .request(subject.clone(), Bytes::from(forger.sign(&cmd)))
            .await?;
        let ack: Ack = decode(&reply.payload)?;
        assert_eq!(ack.command, cmd.id);
        assert!(
            matches!(&ack.kind, AckKind::Rejected(r) if r.code == RejectCode::BadSignature),
            "{ack:?}"
        );

        // Still serving.
        let id = f.exec("pi-1", &["true"]).await?;
        assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);
        assert!(!effect.exists(), "the forged command never ran");
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_and_bad_arguments_are_rejected() {
    scenario!(f, {
        let narrow = AgentOpts {
            config: "[allow]\nmethods = [\"ping\", \"file.read\"]\nread = [\"/\"]\n".into(),
            ..Default::default()
        };
        f.start_agent("pi-1", &narrow).await?;
        // The hub knows what the unit allows and refuses up front, naming it.
        let o = f.cli(&["send", "--to", "pi-1", "--", "true"]);
        assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("do not include exec (it allows ping, file.read)"),
            "{}",
            stderr(&o)
        );
        // The unit enforces its own list: a command queued while the hub believed
        // exec allowed (the unit's config narrowed while it was offline) is refused.
        f.kill_agent("pi-1");
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        outpost_tests::eventually("the hub to see exec allowed", T, || async {
            let n = f.nodes().await.ok()?;
            n.iter()
                .any(|n| n.name == "pi-1" && n.allowed.iter().any(|m| m == "exec"))
                .then_some(())
        })
        .await?;
        f.kill_agent("pi-1");
        let id = f.exec("pi-1", &["true"]).await?;
        f.start_agent("pi-1", &narrow).await?;
        let r = f.wait_final(id, T).await?;
        assert_eq!(r.state, CmdState::Rejected);
        assert!(r.note.contains("NotAllowed"), "{}", r.note);
        let id = f
            .send(
                "pi-1",
                Method::FileRead(FileRead {
                    path: "relative/path".into(),
                    max_bytes: 0,
                }),
                T,
                0,
            )
            .await?;
        let r = f.wait_final(id, T).await?;
        assert_eq!(r.state, CmdState::Rejected);
        assert!(r.note.contains("BadArgs"), "{}", r.note);
        let o = f.cli(&["send", "--to", "pi-1", "--method", "ping"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_command_never_runs() {
    scenario!(f, {
        let effect = f.work_dir("pi-1").join("late");
        let argv = append_argv(&effect, "late");
        let m = Method::Exec(Exec {
            argv,
            env: vec![],
            cwd: None,
        });
        f.enroll("pi-1")?;
        let id = f.send("pi-1", m, Duration::from_secs(2), 0).await?;
        let r = f.wait_final(id, T).await?;
        assert_eq!(r.state, CmdState::Expired);
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        let probe = f.exec("pi-1", &["true"]).await?;
        f.wait_final(probe, T).await?;
        assert!(!effect.exists());
        assert_eq!(f.show(id).await?.state, CmdState::Expired);
        // A unit that was never enrolled is an error at once, not a silent expiry.
        let o = f.cli(&["send", "--to", "nobody", "--deadline", "1s", "--", "true"]);
        assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("no unit \"nobody\" is enrolled"),
            "{}",
            stderr(&o)
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_config_errors_are_clear() {
    let edge = outpost_tests::bin("outpost-edge");
    let o = std::process::Command::new(&edge)
        .args([
            "run",
            "--node",
            "pi-1",
            "--nats-url",
            "tls://x:1",
            "--ca-file",
            "/nonexistent/ca.pem",
        ])
        .args(["--hub-key", &"ab".repeat(32)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("ca_file /nonexistent/ca.pem does not exist"),
        "{}",
        stderr(&o)
    );
    let o = std::process::Command::new(&edge)
        .args(["run", "--config", "/nonexistent/edge.toml"])
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("cannot read config file /nonexistent/edge.toml"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_queues_the_command_once() {
    scenario!(f, {
        let effect = f.work_dir("pi-1").join("once");
        let req = outpost_wire::api::SendRequest {
            id: MsgId::new(now_ms()),
            to: "pi-1".into(),
            domain: String::new(),
            method: Method::Exec(Exec {
                argv: append_argv(&effect, "x"),
                env: vec![],
                cwd: None,
            }),
            timeout_ms: 0,
            ttl_ms: 60_000,
        };
        let c = f.client().await?;
        f.enroll("pi-1")?;
        // The operator's reply was lost, so it asks again with the same id.
        let first = outpost_hub::cli::send(&c, &f.subjects, req.clone(), false, false).await?;
        let again = outpost_hub::cli::send(&c, &f.subjects, req.clone(), false, false).await?;
        assert_eq!((first.id, first.issued_at), (again.id, again.issued_at));
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        assert_eq!(f.wait_final(req.id, T).await?.state, CmdState::Succeeded);
        let third = outpost_hub::cli::send(&c, &f.subjects, req.clone(), false, false).await?;
        assert_eq!(
            third.state,
            CmdState::Succeeded,
            "a late retry returns the final record"
        );
        assert_eq!(std::fs::read_to_string(&effect)?, "x\n");

        // An id made two hours ago (an operator clock that is behind): the hub looks it
        // up in history before creating it, and a retry after the finish still finds
        // the final record.
        let mut old = req.clone();
        old.id = {
            // Built by hand: `MsgId::new` never goes back in time within a process.
            let mut b = MsgId::new(now_ms()).0;
            b[..6].copy_from_slice(&(now_ms() - 2 * 3_600_000).to_be_bytes()[2..]);
            MsgId(b)
        };
        old.method = Method::Exec(Exec {
            argv: append_argv(&effect, "y"),
            env: vec![],
            cwd: None,
        });
        outpost_hub::cli::send(&c, &f.subjects, old.clone(), false, false).await?;
        assert_eq!(f.wait_final(old.id, T).await?.state, CmdState::Succeeded);
        let late = outpost_hub::cli::send(&c, &f.subjects, old, false, false).await?;
        assert_eq!(late.state, CmdState::Succeeded);
        assert_eq!(std::fs::read_to_string(&effect)?, "x\ny\n");
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_many_units_in_one_call() {
    scenario!(f, {
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        f.start_agent("pi-2", &AgentOpts::default()).await?;

        // Every unit's output, each line under its unit's name; exit 0 when all succeed.
        let o = f.cli(&[
            "send",
            "--to",
            "pi-1,pi-2",
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(
            out.contains("pi-1: hi\n") && out.contains("pi-2: hi\n"),
            "{out}"
        );
        assert!(stderr(&o).contains("pi-2: oops"), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("2 units: 2 succeeded"),
            "{}",
            stderr(&o)
        );

        // An enrolled unit that never comes: its command expires; the exit code is
        // the one `send` to it alone gives, and the others still ran.
        f.enroll("ghost")?;
        let o = f.cli(&[
            "send",
            "--to",
            "pi-1",
            "--to",
            "ghost,pi-2",
            "--deadline",
            "2s",
            "--",
            "true",
        ]);
        assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("1 expired") && err.contains("2 succeeded"),
            "{err}"
        );
        assert!(err.contains("exec expired on ghost"), "{err}");

        // The first failure in the order given sets the exit code.
        let o = f.cli(&["send", "--to", "pi-2,pi-1", "--", "sh", "-c", "exit 3"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(stderr(&o).contains("2 failed"), "{}", stderr(&o));

        // A bad target is reported and the good ones are still sent: 255.
        let o = f.cli(&["send", "--json", "--to", "pi-1,a.b", "--", "true"]);
        assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        assert_eq!(v[0]["node"], "pi-1");
        assert_eq!(v[0]["state"], "succeeded");
        assert_eq!(v[1]["node"], "a.b");
        assert!(
            v[1]["error"]
                .as_str()
                .is_some_and(|e| e.contains("invalid node name")),
            "{v}"
        );

        // Naming a unit twice is refused before anything is sent.
        let o = f.cli(&["send", "--to", "pi-1,pi-1", "--", "true"]);
        assert_eq!(o.status.code(), Some(255));
        assert!(stderr(&o).contains("names pi-1 twice"), "{}", stderr(&o));

        // --no-wait: one `unit<TAB>id` line each; every id is a real command.
        let o = f.cli(&["send", "--no-wait", "--to", "pi-1,pi-2", "--", "true"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for (line, unit) in lines.iter().zip(["pi-1", "pi-2"]) {
            let (node, id) = line.split_once('\t').expect("unit<TAB>id");
            assert_eq!(node, unit);
            let id: MsgId = id.parse()?;
            let rec = outpost_tests::eventually("the command to finish", T, || async {
                f.show(id).await.ok().filter(|r| r.state.is_final())
            })
            .await?;
            assert_eq!(rec.state, CmdState::Succeeded);
            assert_eq!(rec.node, unit);
        }
        Ok(())
    });
}
