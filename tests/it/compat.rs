//! A mixed fleet, the normal state during a rollout (ADR 0010): the agent and hub of
//! the last protocol version 1 release (commit `compat::PROTOCOL_1`, checked out of
//! this repository's history and built once, see tests/support/src/compat.rs) against
//! the current hub and agent, each way round, on a real nats-server with TLS.

use outpost_tests::compat::{self, PROTOCOL_1};
use outpost_tests::{AgentOpts, Fleet, check_on};
use outpost_wire::api::CmdState;
use outpost_wire::{FileRead, FileWrite, Method, V1_METHODS};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `exec` through the CLI: its output passes through.
fn says_hello(f: &Fleet, unit: &str, tag: &str) {
    let o = f.cli(&[
        "send",
        "--to",
        unit,
        "--",
        "sh",
        "-c",
        "echo hello from $0",
        tag,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), format!("hello from {tag}\n"));
}

fn released() -> compat::Release {
    compat::release(PROTOCOL_1).expect("the protocol version 1 release builds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_agent_obeys_the_current_hub() {
    let old = tokio::task::spawn_blocking(released).await.unwrap();
    let f = Fleet::start().await.expect("fleet starts");
    check_on(f, |mut f| async move {
        let r = async {
            let o = AgentOpts {
                wrapper: Some(vec![old.edge.display().to_string()]),
                cli_v1: true,
                tls_first: false,
                ..Default::default()
            };
            let view = f.start_agent("v1-unit", &o).await?;
            // What a version 1 hello means: protocol 1 only, the four methods.
            assert_eq!((view.proto_min, view.proto_max), (1, 1), "{view:?}");
            assert_eq!(view.methods, V1_METHODS.to_vec(), "{view:?}");

            // exec through the CLI: output and exit code pass through.
            says_hello(&f, "v1-unit", "v1");
            let o = f.cli(&["send", "--to", "v1-unit", "--", "sh", "-c", "exit 3"]);
            assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));

            // file.write, then file.read, through the API.
            let path = f.work_dir("v1-unit").join("written");
            let id = f
                .send(
                    "v1-unit",
                    Method::FileWrite(FileWrite {
                        path: path.display().to_string(),
                        mode: 0o644,
                        data: b"from the v2 hub\n".to_vec(),
                    }),
                    T,
                    0,
                )
                .await?;
            assert_eq!(f.wait_final(id, T).await?.state, CmdState::Succeeded);
            assert_eq!(std::fs::read_to_string(&path)?, "from the v2 hub\n");
            let id = f
                .send(
                    "v1-unit",
                    Method::FileRead(FileRead {
                        path: path.display().to_string(),
                        max_bytes: 0,
                    }),
                    T,
                    0,
                )
                .await?;
            let rec = f.wait_final(id, T).await?;
            assert_eq!(rec.state, CmdState::Succeeded, "{rec:?}");
            let out = rec
                .outcome
                .as_ref()
                .map(|o| o.stdout.clone())
                .unwrap_or_default();
            assert_eq!(text(&out), "from the v2 hub\n");

            // A method version 1 does not have is refused at once, not queued.
            let key = f.pki().join("hub-signing.pub");
            let o = f.cli(&[
                "send",
                "--to",
                "v1-unit",
                "--method",
                "hub.keys",
                "--",
                &key.display().to_string(),
            ]);
            assert_ne!(o.status.code(), Some(0));
            let err = text(&o.stderr);
            assert!(err.contains("does not serve hub.keys"), "{err}");

            // A restarted hub still writes version 1 for it (from the stored hello).
            f.stop_hub();
            f.start_hub().await?;
            let o = f.cli(&["send", "--to", "v1-unit", "--", "echo", "after the restart"]);
            assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
            assert_eq!(text(&o.stdout), "after the restart\n");
            anyhow::Ok(())
        }
        .await;
        (f, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_agent_obeys_a_version_1_hub() {
    let old = tokio::task::spawn_blocking(released).await.unwrap();
    // The whole control side is the release's: PKI, broker config, enrolment, hub,
    // CLI, as a fleet has them before its hub is upgraded (or after a rollback).
    let f = Fleet::start_released(&old.hub).await.expect("fleet starts");
    check_on(f, |mut f| async move {
        let r = async {
            // The release's broker config does not start TLS first.
            f.spawn_agent(
                "v2-unit",
                &AgentOpts {
                    tls_first: false,
                    ..Default::default()
                },
            )?;
            let o = f.cli(&["wait-online", "v2-unit", "--timeout", "60s"]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{}{}",
                text(&o.stdout),
                text(&o.stderr)
            );

            says_hello(&f, "v2-unit", "v2");
            let o = f.cli(&[
                "send",
                "--to",
                "v2-unit",
                "--",
                "sh",
                "-c",
                "echo err >&2; exit 3",
            ]);
            assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
            assert!(text(&o.stderr).contains("err"), "{}", text(&o.stderr));
            let o = f.cli(&["send", "--to", "v2-unit", "--method", "ping"]);
            assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));

            // The release's hub lists it with its inventory.
            let o = f.cli(&["nodes", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            let unit = v
                .as_array()
                .and_then(|a| a.iter().find(|n| n["name"] == "v2-unit"))
                .cloned()
                .unwrap_or_default();
            assert_eq!(unit["online"], true, "{v}");
            assert_eq!(unit["arch"], std::env::consts::ARCH, "{v}");

            // The agent found out by itself that this hub speaks version 1.
            let log = f.agents["v2-unit"].log_text();
            assert!(log.contains("the hub speaks protocol version 1"), "{log}");
            anyhow::Ok(())
        }
        .await;
        (f, r)
    })
    .await;
}
