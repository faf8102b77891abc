//! The agent's event loop: connect, take commands, run them, deliver outcomes.
//!
//! ```text
//! NATS cmd ──▶ handle (verify, check, persist) ──ACK──▶ hub
//!                  │ bounded queue (Config::queue; full ⇒ ACK Busy, hub re-sends)
//!                  ▼
//!              dispatcher ──▶ up to Config::concurrency methods at once
//!                                  │ outcome written to the outbox first
//!                                  ▼
//!              outbox sender ──request──▶ hub ──Receipt──▶ entry removed
//! ```

use crate::config::Config;
use crate::intake::{self, Decision};
use crate::inventory;
use crate::methods::groups::Groups;
use crate::methods::{self, Ctx, Limits};
use crate::state::{StateDir, Ticket};
use async_nats::{Client, ConnectOptions, Event};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::subject::Subjects;
use outpost_wire::{Ack, AckKind, Hello, Level, Log, MsgId, Receipt, decode, encode, now_ms};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{debug, error, info, warn};

/// How long the agent waits for the hub's receipt of one outcome.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Outbox retry backoff bounds: quick after a blip, at most one try per 30 s on a dead link.
pub const OUTBOX_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const OUTBOX_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Messages buffered per subscription before the client drops them (the hub
/// re-delivers anything unacknowledged, so a drop delays, never loses).
pub const SUBSCRIPTION_CAPACITY: usize = 1024;
/// Running commands get this long to finish after SIGTERM; the rest are reported
/// "interrupted" after the next start.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause before retrying a failed state-dir write (full disk, read-only remount).
pub const STATE_RETRY: Duration = Duration::from_secs(5);

struct Agent {
    cfg: Config,
    subjects: Subjects,
    client: Client,
    state: Mutex<StateDir>,
    outbox_kick: Notify,
    hello_kick: Notify,
    started_at: u64,
    /// The process groups of running `exec` commands, killed at shutdown.
    groups: Groups,
}

/// Reconnect delay: exponential from 100 ms to 30 s, with up to 1 s of jitter so a
/// fleet does not reconnect in lockstep after a broker restart.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = 100u64.saturating_mul(1 << attempts.min(9));
    Duration::from_millis(exp.min(30_000) + jitter_ms(1000))
}

fn jitter_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % max.max(1)
}

/// Connect options shared by every outpost-edge connection: TLS pinned to the fleet
/// CA, the unit's own nkey and reply inbox (the broker lets it read no other), reconnect
/// forever, every connection event logged.
fn connect_options(cfg: &Config, kick: Arc<(Notify, Notify)>) -> anyhow::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new();
    if let Some(path) = &cfg.nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read nkey_file {}: {e}", path.display()))?;
        opts = opts.nkey(seed.trim().to_string());
    }
    Ok(opts
        .name(format!("outpost-edge {}", cfg.node))
        .custom_inbox_prefix(outpost_wire::subject::unit_inbox(&cfg.node))
        .add_root_certificates(cfg.ca_file.clone())
        .require_tls(true)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let kick = kick.clone();
            async move {
                match &event {
                    Event::Connected => {
                        info!(event = %event, "nats connection");
                        kick.0.notify_one();
                        kick.1.notify_one();
                    }
                    Event::Disconnected | Event::Closed | Event::LameDuckMode => {
                        warn!(event = %event, "nats connection")
                    }
                    _ => warn!(event = %event, "nats event"),
                }
            }
        }))
}

/// Run the agent until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let subjects = Subjects::new(&cfg.prefix);
    let kicks = Arc::new((Notify::new(), Notify::new()));
    info!(node = %cfg.node, url = %cfg.nats_url, state_dir = %cfg.state_dir.display(), "starting outpost-edge");
    let client = connect_options(&cfg, kicks.clone())?
        .connect(cfg.nats_url.as_str())
        .await?;

    // The state dir must open before any command is taken; if it cannot (unwritable,
    // full), say so locally and to the hub, and keep trying rather than crash-loop.
    let (state, recovery) = loop {
        match StateDir::open(&cfg.state_dir) {
            Ok(s) => break s,
            Err(e) => {
                error!(error = %e, "cannot open the state dir; retrying");
                publish_log(
                    &client,
                    &subjects,
                    &cfg.node,
                    Level::Error,
                    e.to_string(),
                    None,
                )
                .await;
                tokio::time::sleep(STATE_RETRY).await;
            }
        }
    };
    for id in &recovery.interrupted {
        warn!(command = %id, "command was running when the agent stopped: reported interrupted");
    }
    if recovery.imported > 0 {
        info!(
            entries = recovery.imported,
            "took over the state dir of an earlier agent version"
        );
    }
    if recovery.corrupt_lines > 0 {
        let msg = format!(
            "{} damaged line(s) in the state log were skipped and copied to log.corrupt",
            recovery.corrupt_lines
        );
        error!("{msg}");
        publish_log(&client, &subjects, &cfg.node, Level::Error, msg, None).await;
    }

    let agent = Arc::new(Agent {
        subjects,
        client,
        state: Mutex::new(state),
        outbox_kick: Notify::new(),
        hello_kick: Notify::new(),
        started_at: now_ms(),
        groups: Groups::default(),
        cfg,
    });
    // Forward connection events into the agent's own notifiers.
    {
        let (a, k) = (agent.clone(), kicks.clone());
        tokio::spawn(async move {
            loop {
                k.0.notified().await;
                a.hello_kick.notify_one();
                a.outbox_kick.notify_one();
            }
        });
    }

    let (tx, rx) = mpsc::channel::<Ticket>(agent.cfg.queue as usize);
    let slots = Arc::new(Semaphore::new(agent.cfg.concurrency as usize));
    for t in recovery.queued {
        info!(command = %t.command.id, "resuming command accepted before the restart");
        tx.try_send(t).ok();
    }
    tokio::spawn(dispatch(agent.clone(), rx, slots.clone()));
    tokio::spawn(deliver_outbox(agent.clone()));
    // Subscribe before the first hello: the hub delivers as soon as it hears one.
    let mut commands = agent
        .client
        .subscribe(agent.subjects.command(&agent.cfg.node))
        .await?;
    tokio::spawn(say_hello(agent.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            msg = commands.next() => {
                let Some(msg) = msg else { break };
                let ack = handle(&agent, &tx, &msg.payload).await;
                if let Some(reply) = msg.reply
                    && let Err(e) = agent.client.publish(reply, Bytes::from(encode(&ack))).await
                {
                    warn!(error = %e, command = %ack.command, "cannot send ack");
                }
            }
            _ = &mut shutdown => break,
        }
    }
    info!("shutting down: no new commands; waiting for running ones");
    drop(commands);
    let all = agent.cfg.concurrency;
    if tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!("commands still running at shutdown: they will be reported interrupted");
    }
    // Nothing a command started outlives the agent: not the commands still running
    // after the grace, nor what they started in their process groups.
    let killed = agent.groups.kill_all();
    if killed > 0 {
        warn!(
            groups = killed,
            "killed the process groups of commands still running"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), agent.client.flush()).await;
    Ok(())
}

/// Decide about one delivered command; accept only after it is durably in the state
/// dir and has a queue slot.
async fn handle(agent: &Agent, tx: &mpsc::Sender<Ticket>, payload: &[u8]) -> Ack {
    let node = &agent.cfg.node;
    let decision = {
        let state = agent.state.lock().expect("state lock");
        intake::decide(
            payload,
            node,
            &agent.cfg.hub_key,
            &agent.cfg.policy,
            |id| state.lookup(id),
            now_ms(),
        )
    };
    let cmd = match decision {
        Decision::Accept(cmd) => cmd,
        Decision::Answer(ack) => {
            match &ack.kind {
                AckKind::Duplicate(_) => debug!(command = %ack.command, "duplicate delivery"),
                AckKind::Rejected(r) => {
                    warn!(command = %ack.command, code = ?r.code, reason = %r.detail, bytes = payload.len(), "rejected command");
                    let msg = format!("rejected a command: {r}");
                    publish_log(
                        &agent.client,
                        &agent.subjects,
                        node,
                        Level::Warn,
                        msg,
                        Some(ack.command),
                    )
                    .await;
                }
                _ => {}
            }
            return ack;
        }
    };
    let id = cmd.id;
    let Ok(slot) = tx.try_reserve() else {
        debug!(command = %id, "queue full: busy");
        return Ack {
            command: id,
            kind: AckKind::Busy,
        };
    };
    let accepted = agent.state.lock().expect("state lock").accept(&cmd);
    match accepted {
        Ok(ticket) => {
            info!(command = %id, method = cmd.method.name(), domain = %cmd.domain, "accepted command");
            slot.send(ticket);
            Ack {
                command: id,
                kind: AckKind::Accepted,
            }
        }
        Err(e) => {
            error!(command = %id, error = %e, "cannot record the command: answering busy");
            publish_log(
                &agent.client,
                &agent.subjects,
                node,
                Level::Error,
                e.to_string(),
                Some(id),
            )
            .await;
            Ack {
                command: id,
                kind: AckKind::Busy,
            }
        }
    }
}

/// Start accepted commands in acceptance order, at most `concurrency` at once.
async fn dispatch(agent: Arc<Agent>, mut rx: mpsc::Receiver<Ticket>, slots: Arc<Semaphore>) {
    while let Some(ticket) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Mark it running before it runs: from here a crash reports it interrupted
        // instead of running it a second time.
        retry_state(&agent, ticket.command.id, |s| s.start(&ticket)).await;
        let agent = agent.clone();
        tokio::spawn(async move {
            let cmd = &ticket.command;
            let timeout = match cmd.timeout_ms {
                0 => agent.cfg.default_timeout_ms,
                t => t,
            };
            let ctx = Ctx {
                limits: Limits {
                    output_cap: agent.cfg.output_cap,
                    timeout: Duration::from_millis(timeout as u64),
                },
                policy: &agent.cfg.policy,
                groups: &agent.groups,
                domain: &cmd.domain,
            };
            let outcome = methods::run(cmd.id, &cmd.method, &ctx).await;
            info!(command = %cmd.id, status = outcome.status.word(), exit = ?outcome.exit_code,
                  ms = outcome.duration_ms, "command finished");
            retry_state(&agent, cmd.id, |s| s.finish(&ticket, &outcome)).await;
            agent.outbox_kick.notify_one();
            drop(permit);
        });
    }
}

/// A state-dir write that must happen before the agent can go on: retried with a
/// pause, reported to the hub each time it fails.
async fn retry_state(
    agent: &Agent,
    id: MsgId,
    mut op: impl FnMut(&mut StateDir) -> Result<(), crate::state::StateError>,
) {
    loop {
        let r = op(&mut agent.state.lock().expect("state lock"));
        match r {
            Ok(()) => return,
            Err(e) => {
                error!(command = %id, error = %e, "state dir write failed; retrying");
                publish_log(
                    &agent.client,
                    &agent.subjects,
                    &agent.cfg.node,
                    Level::Error,
                    e.to_string(),
                    Some(id),
                )
                .await;
                tokio::time::sleep(STATE_RETRY).await;
            }
        }
    }
}

/// Send outbox entries, oldest first, until the hub has receipted each.
async fn deliver_outbox(agent: Arc<Agent>) {
    let subject = agent.subjects.result(&agent.cfg.node);
    let mut backoff = OUTBOX_BACKOFF_MIN;
    loop {
        let entries = agent.state.lock().expect("state lock").outbox();
        let mut failed = false;
        for id in entries {
            let bytes = match agent.state.lock().expect("state lock").outcome_bytes(&id) {
                Ok(Some(b)) => b,
                // Receipted meanwhile (a re-sent outcome answered twice).
                Ok(None) => continue,
                Err(e) => {
                    error!(command = %id, error = %e, "cannot read an outbox entry");
                    failed = true;
                    break;
                }
            };
            let req = async_nats::Request::new()
                .payload(Bytes::from(bytes))
                .timeout(Some(RECEIPT_TIMEOUT));
            match agent.client.send_request(subject.clone(), req).await {
                Ok(reply) => match decode::<Receipt>(&reply.payload) {
                    Ok(r) if r.command == id => {
                        debug!(command = %id, "outcome delivered");
                        if let Err(e) = agent.state.lock().expect("state lock").delivered(&id) {
                            error!(error = %e, "cannot record a receipted outcome");
                        }
                    }
                    other => {
                        warn!(command = %id, reply = ?other, "unexpected receipt");
                        failed = true;
                        break;
                    }
                },
                Err(e) => {
                    debug!(command = %id, error = %e, "outcome not delivered yet");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            let wait =
                backoff + Duration::from_millis(jitter_ms(backoff.as_millis() as u64 / 4 + 1));
            backoff = (backoff * 2).min(OUTBOX_BACKOFF_MAX);
            let _ = tokio::time::timeout(wait, agent.outbox_kick.notified()).await;
        } else {
            backoff = OUTBOX_BACKOFF_MIN;
            let _ = tokio::time::timeout(OUTBOX_BACKOFF_MAX, agent.outbox_kick.notified()).await;
        }
    }
}

/// Hello at connect and every interval.
async fn say_hello(agent: Arc<Agent>) {
    let subject = agent.subjects.hello(&agent.cfg.node);
    let (os, kernel) = (inventory::os(), inventory::kernel());
    loop {
        let (outbox_depth, pending) = {
            let s = agent.state.lock().expect("state lock");
            (s.outbox().len(), s.pending())
        };
        let hello = Hello {
            agent_version: crate::VERSION.into(),
            arch: crate::arch().into(),
            os: os.clone(),
            kernel: kernel.clone(),
            uptime_s: inventory::uptime_s(),
            agent_started_at: agent.started_at,
            labels: agent.cfg.labels.clone(),
            outbox_depth: outbox_depth as u32,
            pending: pending as u32,
            interval_s: agent.cfg.hello_interval.as_secs() as u32,
        };
        if let Err(e) = agent
            .client
            .publish(subject.clone(), Bytes::from(encode(&hello)))
            .await
        {
            warn!(error = %e, "cannot publish hello");
        }
        let _ = tokio::time::timeout(agent.cfg.hello_interval, agent.hello_kick.notified()).await;
    }
}

async fn publish_log(
    client: &Client,
    subjects: &Subjects,
    node: &str,
    level: Level,
    message: String,
    command: Option<MsgId>,
) {
    let log = Log {
        level,
        at: now_ms(),
        message,
        command,
    };
    if let Err(e) = client
        .publish(subjects.log(node), Bytes::from(encode(&log)))
        .await
    {
        debug!(error = %e, "cannot publish log to the hub");
    }
}
