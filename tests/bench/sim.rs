//! Simulated units: many per NATS connection, each running the agent's real intake
//! (`edge::intake::decide`), its real state dir (`edge::state::StateDir`: dedupe,
//! its append-only log with the outbox — on tmpfs) and its real outbox protocol
//! (outcome request on its own reply inbox until receipt). Only the executor is fake:
//! it answers at once with 100 bytes of output.
//!
//! They connect with a bench identity the fleet adds (the simulator is not testing
//! broker permissions), and are enrolled in a list the hub is pointed at (`--units`),
//! not in the broker's auth.conf: a hundred thousand users there would measure the
//! broker's config reload, not outpost.

use anyhow::{Context as _, Result};
use async_nats::{Client, ConnectOptions};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_edge::clock::HubClock;
use outpost_edge::intake::{Context, Decision, decide};
use outpost_edge::policy::Policy;
use outpost_edge::state::StateDir;
use outpost_tests::Fleet;
use outpost_wire::sign::PublicKey;
use outpost_wire::subject::{Subjects, unit_inbox};
use outpost_wire::{
    Ack, AckKind, Hello, Outcome, PROTOCOL, Receipt, Status, V1_METHODS, decode, encode, now_ms,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Unit {
    name: String,
    state: Mutex<StateDir>,
    clock: HubClock,
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

/// The bench identity's seed file of the fleet [`prepare`] was last called on.
static IDENTITY: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Give the fleet the bench's identity (publish and subscribe anything) and point the
/// hub at an enrolment list the bench writes. Call once, before [`connect`].
pub async fn prepare(f: &mut Fleet) -> Result<()> {
    let seed = f.add_identity("bench", &[">"], &[">"]).await?;
    *IDENTITY.lock().expect("identity") = Some(seed);
    enroll(f, &[]).await
}

/// Enrol `names` (on top of what the bench enrolled before) in the hub's list, with
/// realistic labels, and wait until the hub has read it.
pub async fn enroll(f: &mut Fleet, names: &[String]) -> Result<()> {
    use outpost_hub::enroll::{Unit as Enrolled, Units};
    let path = f.dir.path().join("bench-units.json");
    let mut units = match Units::load_file(&path) {
        Ok(u) => u,
        Err(_) => Units::load(&f.pki())?,
    };
    for (i, n) in names.iter().enumerate() {
        units.units.insert(
            n.clone(),
            Enrolled {
                nkey: String::new(),
                labels: vec![
                    format!("site=site-{}", i % 50),
                    format!("role={}", ["camera", "gateway", "sensor"][i % 3]),
                ],
                enrolled_at: now_ms(),
            },
        );
    }
    std::fs::write(&path, serde_json::to_vec(&units)?)?;
    if f.units_file() != Some(path.as_path()) {
        f.set_units_file(Some(path)).await?;
    }
    Ok(())
}

/// A connection with the bench identity.
pub async fn connect(f: &Fleet) -> Result<Client> {
    let path = IDENTITY
        .lock()
        .expect("identity")
        .clone()
        .context("sim::prepare first")?;
    let seed = std::fs::read_to_string(path)?;
    Ok(ConnectOptions::with_nkey(seed.trim().to_string())
        .add_root_certificates(f.ca())
        .require_tls(true)
        .tls_first()
        .subscription_capacity(65_536)
        .connect(f.url())
        .await?)
}

/// A hello as a Raspberry Pi's agent sends it.
pub fn hello(interval_s: u32) -> Hello {
    Hello {
        agent_version: "0.2.0".into(),
        arch: "aarch64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.6.51+rpt-rpi-v8".into(),
        uptime_s: 86_400,
        agent_started_at: now_ms(),
        labels: vec![("site".into(), "harbour".into())],
        outbox_depth: 0,
        pending: 0,
        interval_s,
        proto_min: 1,
        proto_max: PROTOCOL,
        methods: V1_METHODS.iter().map(|m| m.to_string()).collect(),
        allowed: V1_METHODS.iter().map(|m| m.to_string()).collect(),
        sent_at: now_ms(),
        keys: vec![],
    }
}

/// Start `n` units named `<prefix>-<i>`, `per_conn` to a connection, enrolled first;
/// each says hello once.
pub async fn start(f: &mut Fleet, prefix: &str, n: usize, per_conn: usize) -> Result<Sim> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    enroll(f, &names).await?;
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
    for chunk in names.chunks(per_conn) {
        let client = connect(f).await?;
        for name in chunk {
            let (state, _) = StateDir::open(&dir.join(name))?;
            let unit = Arc::new(Unit {
                name: name.clone(),
                state: Mutex::new(state),
                clock: HubClock::new(),
            });
            let cmds = client.subscribe(subjects.command(name)).await?;
            let inbox = client.subscribe(format!("{}.>", unit_inbox(name))).await?;
            sim.tasks.push(tokio::spawn(serve(
                unit,
                cmds,
                inbox,
                client.clone(),
                key,
                policy.clone(),
            )));
            // Idle units stay online for the whole run without further hellos.
            client
                .publish(subjects.hello(name), Bytes::from(encode(&hello(3600))))
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
    mut cmds: async_nats::Subscriber,
    mut inbox: async_nats::Subscriber,
    client: Client,
    key: PublicKey,
    policy: Arc<Policy>,
) {
    let subjects = Subjects::default();
    let keys = [key];
    // Outcomes waiting for their receipt: (id, bytes, next try, wait).
    let mut waiting: Vec<(outpost_wire::MsgId, Bytes, tokio::time::Instant, Duration)> = vec![];
    let reply_to = |id: &outpost_wire::MsgId| format!("{}.r{id}", unit_inbox(&unit.name));
    loop {
        let next = waiting.iter().map(|w| w.2).min();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = cmds.next() => {
                let Some(msg) = msg else { return };
                let decision = {
                    let st = unit.state.lock().expect("state");
                    decide(
                        &msg.payload,
                        &Context {
                            node: &unit.name,
                            keys: &keys,
                            policy: &policy,
                            clock: &unit.clock,
                            full: st.full(),
                        },
                        |id| st.lookup(id),
                    )
                };
                let (ack, v, ticket) = match decision {
                    Decision::Answer(ack, v) => (ack, v, None),
                    Decision::Accept(acc) => {
                        let id = acc.command.id;
                        match unit.state.lock().expect("state").accept(&acc.command, true) {
                            Ok(t) => (Ack { command: id, kind: AckKind::Running }, acc.version, Some(t)),
                            Err(_) => (Ack { command: id, kind: AckKind::Busy }, acc.version, None),
                        }
                    }
                };
                if let Some(reply) = msg.reply {
                    let _ = client
                        .publish(reply, Bytes::from(outpost_wire::encode_for(&ack, v)))
                        .await;
                }
                let Some(t) = ticket else { continue };
                let outcome = Outcome {
                    command: t.command.id,
                    status: Status::Succeeded,
                    exit_code: Some(0),
                    stdout: vec![b'x'; 100],
                    stderr: vec![],
                    truncated: false,
                    started_at: now_ms(),
                    duration_ms: 0,
                };
                if unit.state.lock().expect("state").finish(&t, &outcome).is_err() {
                    continue;
                }
                let bytes = Bytes::from(encode(&outcome));
                let id = t.command.id;
                let _ = client
                    .publish_with_reply(subjects.result(&unit.name), reply_to(&id), bytes.clone())
                    .await;
                waiting.push((id, bytes, tokio::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5)));
            }
            msg = inbox.next() => {
                let Some(msg) = msg else { return };
                if let Ok(r) = decode::<Receipt>(&msg.payload) {
                    waiting.retain(|w| w.0 != r.command);
                    let _ = unit.state.lock().expect("state").delivered(&r.command);
                }
            }
            _ = sleep => {
                let now = tokio::time::Instant::now();
                for w in waiting.iter_mut().filter(|w| w.2 <= now) {
                    let _ = client
                        .publish_with_reply(subjects.result(&unit.name), reply_to(&w.0), w.1.clone())
                        .await;
                    w.3 = (w.3 * 2).min(Duration::from_secs(30));
                    w.2 = now + w.3;
                }
            }
        }
    }
}

/// Idle units: those of `range` named `<prefix>-<i>`, enrolled with realistic labels, `per_conn`
/// to a connection, each saying one hello as a Raspberry Pi's agent does (os, kernel,
/// methods) and then nothing. For what the hub keeps per unit and for its views:
/// they run no intake, so they cannot take commands.
pub struct Idle {
    _clients: Vec<Client>,
}

pub async fn idle(
    f: &mut Fleet,
    prefix: &str,
    range: std::ops::Range<usize>,
    per_conn: usize,
) -> Result<Idle> {
    let names: Vec<String> = range.map(|i| format!("{prefix}-{i:06}")).collect();
    enroll(f, &names).await?;
    let subjects = Subjects::default();
    let mut clients = vec![];
    for chunk in names.chunks(per_conn) {
        let client = connect(f).await?;
        for name in chunk {
            let mut h = hello(3600);
            h.labels = vec![("site".into(), "harbour".into())];
            client
                .publish(subjects.hello(name), Bytes::from(encode(&h)))
                .await?;
        }
        client.flush().await?;
        clients.push(client);
    }
    Ok(Idle { _clients: clients })
}
