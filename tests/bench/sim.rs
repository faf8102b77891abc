//! Simulated units: many per NATS connection, each running the agent's real intake
//! (`edge::intake::decide`), its real state dir (`edge::state::StateDir`: dedupe,
//! its append-only log with the outbox — on tmpfs) and its real outbox protocol
//! (outcome request until receipt). Only the executor is fake: it answers at once
//! with 100 bytes of output.

use anyhow::Result;
use async_nats::{Client, ConnectOptions};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_edge::intake::{Decision, decide};
use outpost_edge::policy::Policy;
use outpost_edge::state::StateDir;
use outpost_tests::Fleet;
use outpost_wire::sign::PublicKey;
use outpost_wire::subject::Subjects;
use outpost_wire::{Ack, AckKind, Hello, Outcome, Receipt, Status, decode, encode, now_ms};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Unit {
    name: String,
    state: Mutex<StateDir>,
}

pub struct Sim {
    pub names: Vec<String>,
    clients: Vec<Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dir: PathBuf,
}

impl Drop for Sim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A connection with the hub's identity (the simulator is not testing permissions).
pub async fn connect(f: &Fleet) -> Result<Client> {
    let seed = std::fs::read_to_string(f.pki().join("hub.nk"))?;
    Ok(ConnectOptions::with_nkey(seed.trim().to_string())
        .add_root_certificates(f.ca())
        .require_tls(true)
        .subscription_capacity(65_536)
        .connect(f.url())
        .await?)
}

/// Start `n` units named `<prefix>-<i>`, `per_conn` to a connection; each says hello once.
pub async fn start(f: &Fleet, prefix: &str, n: usize, per_conn: usize) -> Result<Sim> {
    let dir = Path::new("/dev/shm").join(format!("outpost-sim-{}-{prefix}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let key: PublicKey = std::fs::read_to_string(f.pki().join("hub-signing.pub"))?.parse()?;
    let policy = Arc::new(Policy::allow_all());
    let subjects = Subjects::default();
    let mut sim = Sim {
        names: vec![],
        clients: vec![],
        tasks: vec![],
        dir: dir.clone(),
    };
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in names.chunks(per_conn) {
        let client = connect(f).await?;
        for name in chunk {
            let (state, _) = StateDir::open(&dir.join(name))?;
            let unit = Arc::new(Unit {
                name: name.clone(),
                state: Mutex::new(state),
            });
            let sub = client.subscribe(subjects.command(name)).await?;
            sim.tasks.push(tokio::spawn(serve(
                unit,
                sub,
                client.clone(),
                key,
                policy.clone(),
            )));
            let hello = Hello {
                agent_version: "sim".into(),
                arch: "sim".into(),
                os: String::new(),
                kernel: String::new(),
                uptime_s: 0,
                agent_started_at: now_ms(),
                labels: vec![],
                outbox_depth: 0,
                pending: 0,
                // Idle units stay online for the whole run without further hellos.
                interval_s: 3600,
            };
            client
                .publish(subjects.hello(name), Bytes::from(encode(&hello)))
                .await?;
        }
        client.flush().await?;
        sim.clients.push(client);
    }
    sim.names = names;
    Ok(sim)
}

async fn serve(
    unit: Arc<Unit>,
    mut sub: async_nats::Subscriber,
    client: Client,
    key: PublicKey,
    policy: Arc<Policy>,
) {
    let subjects = Subjects::default();
    while let Some(msg) = sub.next().await {
        let decision = {
            let st = unit.state.lock().expect("state");
            decide(
                &msg.payload,
                &unit.name,
                &key,
                &policy,
                |id| st.lookup(id),
                now_ms(),
            )
        };
        let (ack, ticket) = match decision {
            Decision::Answer(ack) => (ack, None),
            Decision::Accept(cmd) => match unit.state.lock().expect("state").accept(&cmd) {
                Ok(t) => (
                    Ack {
                        command: cmd.id,
                        kind: AckKind::Accepted,
                    },
                    Some(t),
                ),
                Err(_) => (
                    Ack {
                        command: cmd.id,
                        kind: AckKind::Busy,
                    },
                    None,
                ),
            },
        };
        if let Some(reply) = msg.reply {
            let _ = client.publish(reply, Bytes::from(encode(&ack))).await;
        }
        let Some(t) = ticket else { continue };
        let (client, unit, subject) = (client.clone(), unit.clone(), subjects.result(&unit.name));
        tokio::spawn(async move {
            let started = now_ms();
            let outcome = Outcome {
                command: t.command.id,
                status: Status::Succeeded,
                exit_code: Some(0),
                stdout: vec![b'x'; 100],
                stderr: vec![],
                truncated: false,
                started_at: started,
                duration_ms: 0,
            };
            {
                let mut st = unit.state.lock().expect("state");
                if st.start(&t).is_err() || st.finish(&t, &outcome).is_err() {
                    return;
                }
            }
            let bytes = Bytes::from(encode(&outcome));
            let mut wait = Duration::from_millis(100);
            loop {
                let req = async_nats::Request::new()
                    .payload(bytes.clone())
                    .timeout(Some(Duration::from_secs(10)));
                if let Ok(r) = client.send_request(subject.clone(), req).await
                    && decode::<Receipt>(&r.payload).is_ok_and(|r| r.command == t.command.id)
                {
                    let _ = unit.state.lock().expect("state").delivered(&t.command.id);
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }
}
