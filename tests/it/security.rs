//! Issue 6: nobody gets in where they don't belong. A real nats-server with the broker
//! permissions `outpost-hub enroll` generates; units' own identities; signed commands.

use anyhow::{Context, Result};
use async_nats::{Client, ConnectOptions, Event, ServerError};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_tests::{AgentOpts, Fleet, append_argv, eventually, scenario};
use outpost_wire::api::CmdState;
use outpost_wire::sign::SigningKey;
use outpost_wire::{
    Ack, AckKind, Command, Exec, Hello, Method, MsgId, RejectCode, decode, encode, now_ms,
};
use std::time::Duration;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(30);

/// Connect as an enrolled unit (its nkey and inbox), collecting the server's errors.
async fn connect_as(f: &Fleet, node: &str) -> Result<(Client, mpsc::Receiver<String>)> {
    let seed = std::fs::read_to_string(f.bundle(node).join("node.nk"))?;
    let (tx, rx) = mpsc::channel(64);
    let c = ConnectOptions::with_nkey(seed.trim().to_string())
        .add_root_certificates(f.ca())
        .require_tls(true)
        .custom_inbox_prefix(outpost_wire::subject::unit_inbox(node))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(ServerError::Other(m)) = e {
                    let _ = tx.send(m).await;
                }
            }
        })
        .connect(f.url())
        .await?;
    Ok((c, rx))
}

async fn expect_violation(rx: &mut mpsc::Receiver<String>, what: &str) -> Result<String> {
    let m = tokio::time::timeout(T, rx.recv())
        .await
        .with_context(|| format!("no permissions violation for {what}"))?
        .context("event channel closed")?;
    assert!(
        m.to_lowercase().contains("permissions violation"),
        "{what}: {m}"
    );
    assert!(m.contains(what), "{what}: {m}");
    Ok(m)
}

fn hub_key(f: &Fleet) -> Result<SigningKey> {
    Ok(SigningKey::from_pkcs8(&std::fs::read(
        f.pki().join("hub-signing.pk8"),
    )?)?)
}

fn command(to: &str, deadline: u64, argv: Vec<String>) -> Command {
    Command {
        id: MsgId::new(now_ms()),
        from: "central".into(),
        to: to.into(),
        issued_at: now_ms(),
        deadline,
        domain: String::new(),
        timeout_ms: 0,
        method: Method::Exec(Exec {
            argv,
            env: vec![],
            cwd: None,
        }),
        sent_at: now_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_cannot_read_or_forge_another_units_traffic() {
    scenario!(f, {
        f.start_agent("unit-b", &AgentOpts::default()).await?;
        f.enroll("unit-a")?;
        let (a, mut errors) = connect_as(&f, "unit-a").await?;

        // A cannot receive B's commands.
        let b_cmds = f.subjects.command("unit-b");
        let mut snoop = a.subscribe(b_cmds.clone()).await?;
        expect_violation(&mut errors, &b_cmds).await?;
        let id = f.exec("unit-b", &["true"]).await?;
        assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);
        let got = tokio::time::timeout(Duration::from_millis(500), snoop.next()).await;
        assert!(
            !matches!(got, Ok(Some(_))),
            "unit-a read a command for unit-b"
        );

        // A cannot read replies meant for others (the hub's or operators' inboxes).
        let _inbox = a.subscribe("_INBOX.>").await?;
        expect_violation(&mut errors, "_INBOX.>").await?;

        // A cannot pose as B: its hello on B's subject is refused by the server.
        let hello = Hello {
            agent_version: "evil".into(),
            arch: "evil".into(),
            os: String::new(),
            kernel: String::new(),
            uptime_s: 0,
            agent_started_at: 0,
            labels: vec![],
            outbox_depth: 0,
            pending: 0,
            interval_s: 1,
            proto_min: 1,
            proto_max: 2,
            methods: vec![],
            allowed: vec![],
            sent_at: now_ms(),
            keys: vec![],
        };
        let b_hello = f.subjects.hello("unit-b");
        a.publish(b_hello.clone(), Bytes::from(encode(&hello)))
            .await?;
        a.flush().await?;
        expect_violation(&mut errors, &b_hello).await?;
        let b_result = f.subjects.result("unit-b");
        a.publish(b_result.clone(), Bytes::from_static(b"forged outcome"))
            .await?;
        a.flush().await?;
        expect_violation(&mut errors, &b_result).await?;
        let nodes = f.nodes().await?;
        assert!(nodes.iter().all(|n| n.agent_version != "evil"), "{nodes:?}");

        // A cannot command B, not even with bytes the hub once signed.
        let effect = f.work_dir("unit-b").join("from-a");
        let signed = hub_key(&f)?.sign(&command(
            "unit-b",
            now_ms() + 60_000,
            append_argv(&effect, "x"),
        ));
        a.publish(b_cmds.clone(), Bytes::from(signed)).await?;
        a.flush().await?;
        expect_violation(&mut errors, &b_cmds).await?;
        // Nor call the hub's API.
        let api = f.subjects.api("send");
        a.publish(api.clone(), Bytes::from_static(b"x")).await?;
        a.flush().await?;
        expect_violation(&mut errors, &api).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !effect.exists(),
            "a command published by unit-a ran on unit-b"
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_misaddressed_replayed_and_late_commands_never_run() {
    scenario!(f, {
        f.start_agent("unit-a", &AgentOpts::default()).await?;
        let c = f.hub_client().await?; // the hub's messaging identity: may deliver to units
        let subject = f.subjects.command("unit-a");
        let key = hub_key(&f)?;
        let effects = f.work_dir("unit-a").join("effects");
        let deliver = |bytes: Vec<u8>| {
            let (c, s) = (c.clone(), subject.clone());
            async move {
                let r = c.request(s, Bytes::from(bytes)).await?;
                anyhow::Ok(decode::<Ack>(&r.payload)?)
            }
        };
        let code = |ack: &Ack| match &ack.kind {
            AckKind::Rejected(r) => Some(r.code),
            _ => None,
        };
        let fresh =
            |token: &str| command("unit-a", now_ms() + 60_000, append_argv(&effects, token));

        let forged = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()?)?.sign(&fresh("forged"));
        assert_eq!(
            code(&deliver(forged).await?),
            Some(RejectCode::BadSignature)
        );

        let mut tampered = key.sign(&fresh("tampered"));
        // Flip a byte inside the argv: the signature no longer matches.
        let at = tampered.len() - 64 - 10;
        tampered[at] ^= 0x20;
        assert_eq!(
            code(&deliver(tampered).await?),
            Some(RejectCode::BadSignature)
        );

        let elsewhere = key.sign(&command(
            "unit-b",
            now_ms() + 60_000,
            append_argv(&effects, "elsewhere"),
        ));
        assert_eq!(
            code(&deliver(elsewhere).await?),
            Some(RejectCode::WrongNode)
        );

        let late = key.sign(&command(
            "unit-a",
            now_ms() - 1,
            append_argv(&effects, "late"),
        ));
        assert_eq!(code(&deliver(late).await?), Some(RejectCode::Expired));

        let good = key.sign(&fresh("good"));
        let kind = deliver(good.clone()).await?.kind;
        // An idle unit starts it at once and says so.
        assert!(
            matches!(kind, AckKind::Accepted | AckKind::Running),
            "{kind:?}"
        );
        eventually("the good command to run", T, || async {
            std::fs::read_to_string(&effects)
                .ok()
                .filter(|t| t.contains("good"))
                .map(|_| ())
        })
        .await?;
        for _ in 0..3 {
            let ack = deliver(good.clone()).await?;
            assert!(
                matches!(ack.kind, AckKind::Duplicate(_)),
                "replay answered {ack:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            std::fs::read_to_string(&effects)?,
            "good\n",
            "only the authentic command ran, once"
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_outside_the_allow_list_is_rejected() {
    scenario!(f, {
        let opts = AgentOpts {
            config: "[allow]\nmethods = [\"ping\", \"exec\"]\nexec = [\"echo *\", \"uname ...\"]\n"
                .into(),
            ..Default::default()
        };
        f.start_agent("unit-a", &opts).await?;
        let ok = f.exec("unit-a", &["echo", "hi"]).await?;
        assert_eq!(f.wait_final(ok, T).await?.state, CmdState::Succeeded);
        let ok = f.exec("unit-a", &["uname", "-s", "-m"]).await?;
        assert_eq!(f.wait_final(ok, T).await?.state, CmdState::Succeeded);
        let marker = f.work_dir("unit-a").join("never");
        for argv in [
            vec!["echo".to_string(), "a".into(), "b".into()],
            vec![
                "sh".into(),
                "-c".into(),
                format!("touch {}", marker.display()),
            ],
            vec!["touch".into(), marker.display().to_string()],
        ] {
            let id = f
                .send(
                    "unit-a",
                    Method::Exec(Exec {
                        argv: argv.clone(),
                        env: vec![],
                        cwd: None,
                    }),
                    T,
                    0,
                )
                .await?;
            let r = f.wait_final(id, T).await?;
            assert_eq!(r.state, CmdState::Rejected, "{argv:?}");
            assert!(
                r.note.contains("NotAllowed") && r.note.contains("[allow] exec"),
                "{}",
                r.note
            );
        }
        assert!(!marker.exists());
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_unit_is_cut_off() {
    scenario!(f, {
        f.start_agent("unit-c", &AgentOpts::default()).await?;
        let id = f.exec("unit-c", &["true"]).await?;
        assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);

        let o = f.cli(&["revoke", "--pki", &f.pki().display().to_string(), "unit-c"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("broker reloaded"));

        // Its live connection is closed and it cannot come back.
        f.wait_online("unit-c", false, T).await?;
        let err = connect_as(&f, "unit-c")
            .await
            .err()
            .context("a revoked nkey connected")?;
        assert!(
            format!("{err:#}").to_lowercase().contains("authorization"),
            "{err:#}"
        );
        // The hub refuses new commands to it, naming why.
        let o = f.cli(&["send", "--to", "unit-c", "--method", "ping"]);
        assert_eq!(o.status.code(), Some(255));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("unit-c is not enrolled any more (revoked)"),
            "{err}"
        );
        // What waited for a unit when it was revoked ends Cancelled, not Expired
        // days later.
        f.enroll("unit-d")?;
        let waiting = f
            .send("unit-d", Method::Ping, Duration::from_secs(600), 0)
            .await?;
        let o = f.cli(&["revoke", "--pki", &f.pki().display().to_string(), "unit-d"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = f.wait_final(waiting, T).await?;
        assert_eq!(r.state, CmdState::Cancelled);
        assert!(r.note.contains("revoked"), "{}", r.note);
        let log = f.agents["unit-c"].log_text();
        assert!(
            log.to_lowercase().contains("authorization"),
            "the agent logs why it cannot connect:\n{log}"
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_nobody_connects() {
    scenario!(f, {
        let e = ConnectOptions::new()
            .add_root_certificates(f.ca())
            .require_tls(true)
            .connect(f.url())
            .await
            .err()
            .context("an anonymous client connected")?;
        assert!(
            format!("{e}").to_lowercase().contains("authorization"),
            "{e}"
        );
        let o = f.cli(&["nodes", "--nkey-file", "/dev/null"]);
        assert!(!o.status.success());
        let o = std::process::Command::new(outpost_tests::bin("outpost-hub"))
            .args(["nodes", "--nats-url", &f.url()])
            .arg("--ca-file")
            .arg(f.ca())
            .output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--nkey-file"),
            "the error says what to pass: {err}"
        );
        Ok(())
    });
}

/// Issue 13: even with `[allow]` wide open (read and write `/`, exec anything), the
/// agent refuses its own identity and config to every method, and a command cannot
/// bring its own environment: what the unit runs stays what its config says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_identity_and_config_are_never_reachable() {
    scenario!(f, {
        f.start_agent("unit-a", &AgentOpts::default()).await?;
        let nkey = f.bundle("unit-a").join("node.nk");
        let config = f.dir.path().join("config").join("unit-a.toml");
        let mut refused = vec![];
        for path in [&nkey, &config] {
            let read = Method::FileRead(outpost_wire::FileRead {
                path: path.display().to_string(),
                max_bytes: 0,
            });
            refused.push((format!("read {}", path.display()), read));
        }
        refused.push((
            "write into the config dir".into(),
            Method::FileWrite(outpost_wire::FileWrite {
                path: config.display().to_string(),
                mode: 0o600,
                data: b"[allow]\nmethods = []\n".to_vec(),
            }),
        ));
        refused.push((
            "exec with LD_PRELOAD".into(),
            Method::Exec(Exec {
                argv: vec!["true".into()],
                env: vec![("LD_PRELOAD".into(), "/tmp/x.so".into())],
                cwd: None,
            }),
        ));
        for (what, m) in refused {
            let id = f.send("unit-a", m, T, 0).await?;
            let r = f.wait_final(id, T).await?;
            assert_eq!(r.state, CmdState::Rejected, "{what}: {r:?}");
            assert!(r.note.contains("NotAllowed"), "{what}: {}", r.note);
        }
        assert!(std::fs::read_to_string(&config)?.contains("file.write"));
        // The environment a child sees is the fixed one.
        let id = f.exec("unit-a", &["env"]).await?;
        let r = f.wait_final(id, T).await?;
        let out = String::from_utf8_lossy(&r.outcome.context("no outcome")?.stdout).into_owned();
        assert!(out.contains("PATH=/usr/local/sbin:"), "{out}");
        assert!(
            !out.contains("RUST_LOG"),
            "the agent's environment leaked: {out}"
        );
        Ok(())
    });
}

/// Finding 1 (confused deputy): nats-server checks a publisher's subject, not its
/// reply subject, so a unit or an operator can ask the hub to answer *anywhere*. The
/// hub answers only within the sender's own inbox, and the identity it answers with
/// cannot write the store anyway. Each forged reply is watched where it would land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reply_subjects_get_no_answer_from_the_hub() {
    scenario!(f, {
        f.enroll("unit-a")?;
        f.enroll("unit-b")?;
        let (a, _errors) = connect_as(&f, "unit-a").await?;
        let (b, _) = connect_as(&f, "unit-b").await?;
        let hub_side = f.hub_client().await?;
        let operator = f.client().await?;
        // Where forged answers would land: another unit's hello subject (unit-b runs no
        // agent, so anything there is the hub's), unit-b's inbox, the store.
        let mut on_b_hello = hub_side.subscribe(f.subjects.hello("unit-b")).await?;
        let mut on_b_inbox = b.subscribe("_INBOX_unit-b.>").await?;
        // Controls: the same messages with an honest reply subject are answered.
        let mut a_ok = a.subscribe("_INBOX_unit-a.ok").await?;
        let mut op_ok = operator.subscribe("_INBOX.ok").await?;
        hub_side.flush().await?;
        b.flush().await?;

        let hello = Bytes::from(encode(&Hello {
            agent_version: "0".into(),
            arch: "x".into(),
            os: String::new(),
            kernel: String::new(),
            uptime_s: 0,
            agent_started_at: now_ms(),
            labels: vec![],
            outbox_depth: 0,
            pending: 0,
            interval_s: 15,
            proto_min: 1,
            proto_max: 2,
            methods: vec!["ping".into()],
            allowed: vec!["ping".into()],
            sent_at: now_ms(),
            keys: vec![],
        }));
        let outcome = Bytes::from(encode(&outpost_wire::Outcome {
            command: MsgId::new(now_ms()),
            status: outpost_wire::Status::Succeeded,
            exit_code: Some(0),
            stdout: vec![],
            stderr: vec![],
            truncated: false,
            started_at: now_ms(),
            duration_ms: 0,
        }));
        let forged = [
            "$KV.outpost-nodes.zz",
            "$KV.outpost-open.zz",
            "$JS.API.STREAM.DELETE.KV_outpost-open",
            &f.subjects.hello("unit-b"),
            "_INBOX_unit-b.x",
            "_INBOX.x.y",
            "_HUB.central.store.x",
        ];
        for reply in forged {
            a.publish_with_reply(f.subjects.hello("unit-a"), reply.to_string(), hello.clone())
                .await?;
            a.publish_with_reply(
                f.subjects.result("unit-a"),
                reply.to_string(),
                outcome.clone(),
            )
            .await?;
        }
        a.flush().await?;
        let nodes_req = Bytes::from(encode(&outpost_wire::api::NodesRequest::default()));
        for reply in forged.iter().filter(|r| !r.starts_with("_INBOX.")) {
            operator
                .publish_with_reply(
                    f.subjects.api("nodes"),
                    reply.to_string(),
                    nodes_req.clone(),
                )
                .await?;
        }
        operator.flush().await?;
        // The honest ones last: once they are answered, the forged ones (sent before
        // on the same connections, handled in order per subject) have been handled.
        a.publish_with_reply(
            f.subjects.hello("unit-a"),
            "_INBOX_unit-a.ok",
            hello.clone(),
        )
        .await?;
        operator
            .publish_with_reply(f.subjects.api("nodes"), "_INBOX.ok", nodes_req)
            .await?;
        tokio::time::timeout(T, a_ok.next())
            .await
            .context("the hub did not answer unit-a's honest hello")?;
        tokio::time::timeout(T, op_ok.next())
            .await
            .context("the hub did not answer the operator's honest request")?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        let leaked = tokio::time::timeout(Duration::from_millis(200), on_b_hello.next()).await;
        assert!(
            !matches!(leaked, Ok(Some(_))),
            "the hub published on unit-b's hello subject: {leaked:?}"
        );
        let leaked = tokio::time::timeout(Duration::from_millis(200), on_b_inbox.next()).await;
        assert!(
            !matches!(leaked, Ok(Some(_))),
            "the hub answered into unit-b's inbox: {leaked:?}"
        );
        let nodes = f.nodes().await?;
        assert!(
            nodes
                .iter()
                .all(|n| n.name != "zz" && (n.name != "unit-b" || !n.online)),
            "{nodes:?}"
        );

        // The store holds nothing the attacker wrote, and the hub starts again.
        let seed = std::fs::read_to_string(f.pki().join("hub-store.nk"))?;
        let store = ConnectOptions::with_nkey(seed.trim().to_string())
            .add_root_certificates(f.ca())
            .require_tls(true)
            .tls_first()
            .custom_inbox_prefix("_HUB.test.store")
            .connect(f.url())
            .await?;
        let js = async_nats::jetstream::new(store);
        for bucket in ["outpost-nodes", "outpost-open"] {
            let kv = js.get_key_value(bucket).await?;
            assert!(kv.get("zz").await?.is_none(), "{bucket} has key zz");
        }
        f.stop_hub();
        f.start_hub().await?;
        Ok(())
    });
}

/// Finding 3: a unit named `hub` (or anything) cannot read the hub's or operators'
/// reply inboxes: unit inboxes are `_INBOX_<node>`, the hub's `_HUB.<hub>.<role>`,
/// operators' `_INBOX.`, and no node name can make one of them another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_named_hub_reads_no_hub_replies() {
    scenario!(f, {
        f.enroll("hub")?;
        let (h, mut errors) = connect_as(&f, "hub").await?;
        for subject in ["_HUB.>", "_HUB.central.msg.>", "_INBOX.>", "_INBOX_pi-1.>"] {
            let _s = h.subscribe(subject.to_string()).await?;
            h.flush().await?;
            expect_violation(&mut errors, subject).await?;
        }
        // Traffic the hub's inboxes carry (ACKs, JetStream replies) flows meanwhile.
        f.start_agent("pi-1", &AgentOpts::default()).await?;
        let id = f.exec("pi-1", &["true"]).await?;
        assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);
        // A name that would be an inbox prefix of its own is refused at enrolment.
        let o = f.cli(&[
            "enroll",
            "--pki",
            &f.pki().display().to_string(),
            "_INBOX.x",
        ]);
        assert!(!o.status.success());
        Ok(())
    });
}

/// Finding 7: the hub's signing key is rotated without touching a unit's config, by
/// signed `hub.keys` commands, with one unit offline through the first step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_key_rotates_across_the_fleet_with_a_unit_offline() {
    scenario!(f, {
        let o = AgentOpts {
            config: outpost_tests::ALLOW_ALL.replace("\"ping\",", "\"ping\", \"hub.keys\","),
            ..Default::default()
        };
        f.start_agent("unit-a", &o).await?;
        f.start_agent("unit-b", &o).await?;
        f.kill_agent("unit-b"); // offline through step 1
        let k1_pub = f.pki().join("hub-signing.pub");
        let k2 = f.pki().join("hub-signing-2.pk8");
        let k2_pub = f.pki().join("hub-signing-2.pub");
        let o2 = f.cli(&["pki", "signing-key", &k2.display().to_string()]);
        assert!(
            o2.status.success(),
            "{}",
            String::from_utf8_lossy(&o2.stderr)
        );

        // Step 1: the hub holds the next key; every unit is told to trust both.
        f.next_signing_key = Some(k2.clone());
        f.stop_hub();
        f.start_hub().await?;
        let both = [k1_pub.display().to_string(), k2_pub.display().to_string()];
        let send_keys = |keys: Vec<String>| {
            let mut args = vec![
                "send",
                "--no-wait",
                "--to",
                "unit-a,unit-b",
                "--method",
                "hub.keys",
                "--",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
            args.extend(keys);
            args
        };
        // An operator cannot make units trust a key that is not the hub's.
        let k3 = f.pki().join("someone-else.pk8");
        f.cli(&["pki", "signing-key", &k3.display().to_string()]);
        let k3_pub = f.pki().join("someone-else.pub").display().to_string();
        let o3 = f.cli(&[
            "send", "--to", "unit-a", "--method", "hub.keys", "--", &k3_pub,
        ]);
        assert_eq!(o3.status.code(), Some(255));
        let err = String::from_utf8_lossy(&o3.stderr);
        assert!(
            err.contains("may name only this hub's signing keys"),
            "{err}"
        );
        let a1 = send_keys(both.to_vec());
        let o1 = f.cli(&a1.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            o1.status.success(),
            "{}",
            String::from_utf8_lossy(&o1.stderr)
        );
        // unit-b comes back and gets it then.
        f.start_agent("unit-b", &o).await?;
        for node in ["unit-a", "unit-b"] {
            eventually(&format!("{node} to trust both keys"), T, || async {
                let log = f.agents[node].log_text();
                log.contains("hub keys replaced").then_some(())
            })
            .await?;
        }
        // Hellos (every second here) tell the hub; commands now come signed with K2.
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Step 2: retire K1 on every unit (signed with K2, which the set keeps).
        let a2 = send_keys(vec![k2_pub.display().to_string()]);
        let o2 = f.cli(&a2.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            o2.status.success(),
            "{}",
            String::from_utf8_lossy(&o2.stderr)
        );
        for node in ["unit-a", "unit-b"] {
            eventually(&format!("{node} to trust K2 only"), T, || async {
                let log = f.agents[node].log_text();
                (log.matches("hub keys replaced").count() >= 2).then_some(())
            })
            .await?;
        }

        // Step 3: the hub signs with K2 alone; both units obey, after a restart too.
        f.signing_key = Some(k2.clone());
        f.next_signing_key = None;
        f.stop_hub();
        f.start_hub().await?;
        f.kill_agent("unit-a");
        f.start_agent("unit-a", &o).await?;
        for node in ["unit-a", "unit-b"] {
            let id = f.exec(node, &["true"]).await?;
            assert_eq!(
                f.wait_final(id, T).await?.state,
                CmdState::Succeeded,
                "{node}"
            );
        }
        // The old key no longer commands anyone.
        let old = hub_key(&f)?;
        let c = f.hub_client().await?;
        let effect = f.work_dir("unit-a").join("old-key");
        let signed = old.sign(&command(
            "unit-a",
            now_ms() + 60_000,
            append_argv(&effect, "x"),
        ));
        let r = c
            .request(f.subjects.command("unit-a"), Bytes::from(signed))
            .await?;
        let ack = decode::<Ack>(&r.payload)?;
        assert!(
            matches!(&ack.kind, AckKind::Rejected(r) if r.code == RejectCode::BadSignature),
            "{ack:?}"
        );
        assert!(!effect.exists());
        Ok(())
    });
}
