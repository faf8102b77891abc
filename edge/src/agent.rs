//! The agent's event loop: connect, take commands, run them, deliver outcomes.
//!
//! ```text
//! NATS cmd ──▶ handle (verify, check, persist) ──ACK──▶ hub     (Running when it starts at once)
//!                  │ bounded queue (Config::queue; full ⇒ ACK Busy, hub re-sends)
//!                  ▼
//!              dispatcher ──deadline (hub clock) passed? ──▶ Expired, never started
//!                  │ up to Config::concurrency at once, in acceptance order
//!                  ▼ Started report (queued ones)
//!              method ──outcome──▶ state log (outbox)
//!                                    │
//!              outbox sender ──request──▶ hub ──Receipt──▶ entry done
//! hello (request) ──▶ hub ──HelloReply: its protocol versions and clock
//! ```
//! The agent speaks to the hub in the newest protocol version both know: it learns the
//! hub's from the reply to its hello (a version 1 hub never replies), and answers each
//! command in the version the command came in (ADR 0010).

use crate::clock::{FlooredTime, HubClock, Source};
use crate::config::Config;
use crate::intake::{self, Accepted, Context, Decision};
use crate::inventory;
use crate::methods::groups::Groups;
use crate::methods::{self, Ctx, Limits};
use crate::state::{StateDir, Ticket};
use crate::trust::Trust;
use async_nats::{Client, ConnectOptions, Event, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::limits::{MAX_LOG_MESSAGE, truncate};
use outpost_wire::subject::Subjects;
use outpost_wire::{
    Ack, AckKind, Hello, HelloReply, Level, Log, MAX_PAYLOAD, Method, MsgId, Outcome, PROTOCOL,
    PROTOCOL_MIN, Receipt, Started, Status, decode, decode_versioned, encode, encode_for, now_ms,
};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// How long the agent waits for the hub's receipt of one outcome.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it waits for the hub's answer to a hello before it takes the hub for a
/// version 1 hub (which never answers): long enough for a satellite link.
pub const HELLO_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbox retry backoff bounds: quick after a blip, at most one try per 30 s on a dead
/// link. Each entry has its own: one that keeps failing never holds back the rest.
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
    trust: Mutex<Trust>,
    clock: HubClock,
    /// Wakes the dispatcher when the hub's clock becomes known.
    clock_kick: Notify,
    /// The protocol version to write for the hub (1 until a hello reply says more).
    hub_proto: AtomicU8,
    /// Accepted, not started, in acceptance order; at most `cfg.queue` taken from the
    /// hub, plus what a restart recovered.
    queue: Mutex<VecDeque<Ticket>>,
    queue_kick: Notify,
    /// One permit per command running at once.
    slots: Arc<Semaphore>,
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

/// TLS pinned to the fleet CA, certificates checked against a clock that is never
/// earlier than the agent's build (a Pi without an RTC boots in 1970).
fn tls_config(cfg: &Config) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&cfg.ca_file)
        .map_err(|e| anyhow::anyhow!("cannot read ca_file {}: {e}", cfg.ca_file.display()))?;
    for c in certs {
        let c = c.map_err(|e| anyhow::anyhow!("ca_file {}: {e}", cfg.ca_file.display()))?;
        roots
            .add(c)
            .map_err(|e| anyhow::anyhow!("ca_file {}: {e}", cfg.ca_file.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "ca_file {} holds no certificate",
        cfg.ca_file.display()
    );
    Ok(rustls::ClientConfig::builder_with_details(
        Arc::new(rustls::crypto::ring::default_provider()),
        Arc::new(FlooredTime),
    )
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Connect options shared by every outpost-edge connection: TLS pinned to the fleet
/// CA, the unit's own nkey and reply inbox (the broker lets it read no other), reconnect
/// forever, every connection event logged.
fn connect_options(cfg: &Config, kick: Arc<Notify>) -> anyhow::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new();
    if let Some(path) = &cfg.nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read nkey_file {}: {e}", path.display()))?;
        opts = opts.nkey(seed.trim().to_string());
    }
    if cfg.tls_first {
        opts = opts.tls_first();
    }
    Ok(opts
        .name(format!("outpost-edge {}", cfg.node))
        .custom_inbox_prefix(outpost_wire::subject::unit_inbox(&cfg.node))
        .tls_client_config(tls_config(cfg)?)
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
                        kick.notify_one();
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
    let connected = Arc::new(Notify::new());
    info!(node = %cfg.node, url = %cfg.nats_url, state_dir = %cfg.state_dir.display(), "starting outpost-edge");
    let client = connect_options(&cfg, connected.clone())?
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
    let trust = Trust::load(&cfg.state_dir, &cfg.hub_keys)?;
    let hub_floor = state.hub_floor();
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
    for t in &recovery.queued {
        info!(command = %t.command.id, "resuming command accepted before the restart");
    }

    let agent = Arc::new(Agent {
        subjects,
        client,
        state: Mutex::new(state),
        trust: Mutex::new(trust),
        clock: {
            let c = HubClock::new();
            c.set_floor(hub_floor);
            c
        },
        clock_kick: Notify::new(),
        hub_proto: AtomicU8::new(PROTOCOL_MIN),
        // Every recovered command is kept, however many: they were all accepted.
        queue: Mutex::new(recovery.queued.into_iter().collect()),
        queue_kick: Notify::new(),
        slots: Arc::new(Semaphore::new(cfg.concurrency as usize)),
        outbox_kick: Notify::new(),
        hello_kick: Notify::new(),
        started_at: now_ms(),
        groups: Groups::default(),
        cfg,
    });
    // A (re)connection: hello at once (the hub delivers on it), outbox at once.
    {
        let a = agent.clone();
        tokio::spawn(async move {
            loop {
                connected.notified().await;
                a.hello_kick.notify_one();
                a.outbox_kick.notify_one();
            }
        });
    }
    tokio::spawn(dispatch(agent.clone()));
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
                let (ack, v) = handle(&agent, &msg.payload).await;
                if let Some(reply) = msg.reply
                    && let Err(e) = agent.client.publish(reply, Bytes::from(encode_for(&ack, v))).await
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
    if tokio::time::timeout(SHUTDOWN_GRACE, agent.slots.acquire_many(all))
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
/// dir and has a place (a free slot to start at once, or room in the queue). Returns
/// the ACK and the protocol version to write it in.
async fn handle(agent: &Arc<Agent>, payload: &[u8]) -> (Ack, u8) {
    let node = &agent.cfg.node;
    let decision = {
        let keys = agent.trust.lock().expect("trust lock").keys().to_vec();
        let mut state = agent.state.lock().expect("state lock");
        if state.full() {
            // Ids are forgotten as hub time passes, not only when a command finishes:
            // a unit whose memory filled must not stay Busy for good.
            state.prune(agent.clock.now());
        }
        let had_time = agent.clock.source() == Source::Hub;
        let d = intake::decide(
            payload,
            &Context {
                node,
                keys: &keys,
                policy: &agent.cfg.policy,
                clock: &agent.clock,
                full: state.full(),
            },
            |id| state.lookup(id),
        );
        if !had_time && agent.clock.source() == Source::Hub {
            agent.clock_kick.notify_waiters();
        }
        d
    };
    let acc = match decision {
        Decision::Accept(a) => a,
        Decision::Answer(ack, v) => {
            match &ack.kind {
                AckKind::Duplicate(_) => debug!(command = %ack.command, "duplicate delivery"),
                AckKind::Busy => debug!(command = %ack.command, "duplicate memory full: busy"),
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
            return (ack, v);
        }
    };
    let (id, v) = (acc.command.id, acc.version);
    if let Method::HubKeys(keys) = &acc.command.method {
        return (hub_keys_now(agent, &acc, keys).await, v);
    }
    let busy = (
        Ack {
            command: id,
            kind: AckKind::Busy,
        },
        v,
    );
    // Start at once when nothing waits before it and a slot is free: the ACK then says
    // `Running`, and the start costs no sync and no report of its own.
    let permit = {
        let q = agent.queue.lock().expect("queue lock");
        if q.is_empty() {
            agent.slots.clone().try_acquire_owned().ok()
        } else if q.len() >= agent.cfg.queue as usize {
            debug!(command = %id, "queue full: busy");
            return busy;
        } else {
            None
        }
    };
    let start = permit.is_some();
    let accepted = agent
        .state
        .lock()
        .expect("state lock")
        .accept(&acc.command, start);
    let ticket = match accepted {
        Ok(t) => t,
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
            return busy;
        }
    };
    info!(command = %id, method = acc.command.method.name(), domain = %acc.command.domain, start, "accepted command");
    match permit {
        Some(p) => {
            tokio::spawn(execute(agent.clone(), ticket, p));
            let kind = if v >= 2 {
                AckKind::Running
            } else {
                AckKind::Accepted
            };
            (Ack { command: id, kind }, v)
        }
        None => {
            agent.queue.lock().expect("queue lock").push_back(ticket);
            agent.queue_kick.notify_one();
            (
                Ack {
                    command: id,
                    kind: AckKind::Accepted,
                },
                v,
            )
        }
    }
}

/// Start queued commands in acceptance order, at most `concurrency` at once, and
/// never one whose deadline (hub clock) has passed.
async fn dispatch(agent: Arc<Agent>) {
    loop {
        if agent.queue.lock().expect("queue lock").is_empty() {
            agent.queue_kick.notified().await;
            continue;
        }
        let Ok(permit) = agent.slots.clone().acquire_owned().await else {
            return;
        };
        // Deadlines mean the hub's clock: a command recovered after a restart waits
        // until the hub has said what time it is.
        let Some(hub_now) = agent.clock.now() else {
            drop(permit);
            let waiting = agent.clock_kick.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            if agent.clock.now().is_none() {
                debug!("queued commands wait for the hub's clock");
                waiting.await;
            }
            continue;
        };
        let Some(ticket) = agent.queue.lock().expect("queue lock").pop_front() else {
            continue;
        };
        let cmd = &ticket.command;
        if hub_now > cmd.deadline {
            let why = format!(
                "its deadline passed {} ms before it could start (hub clock)",
                hub_now - cmd.deadline
            );
            warn!(command = %cmd.id, reason = %why, "command expired in the queue: not started");
            let outcome = Outcome {
                command: cmd.id,
                status: Status::Expired(why),
                exit_code: None,
                stdout: vec![],
                stderr: vec![],
                truncated: false,
                started_at: 0,
                duration_ms: 0,
            };
            retry_state(&agent, cmd.id, |s| s.finish(&ticket, &outcome)).await;
            agent.outbox_kick.notify_one();
            drop(permit);
            continue;
        }
        // Mark it running before it runs: from here a crash reports it interrupted
        // instead of running it a second time.
        retry_state(&agent, cmd.id, |s| s.start(&ticket)).await;
        if agent.hub_proto.load(Ordering::Relaxed) >= 2 {
            let started = Started {
                command: cmd.id,
                at: now_ms(),
            };
            let subject = agent.subjects.started(&agent.cfg.node);
            if let Err(e) = agent
                .client
                .publish(subject, Bytes::from(encode(&started)))
                .await
            {
                debug!(command = %cmd.id, error = %e, "cannot report the start");
            }
        }
        tokio::spawn(execute(agent.clone(), ticket, permit));
    }
}

/// Run one started command to its outcome and put that in the outbox.
async fn execute(agent: Arc<Agent>, ticket: Ticket, permit: OwnedSemaphorePermit) {
    let cmd = &ticket.command;
    let outcome = match &cmd.method {
        // Handled at intake (it needs the key that signed it); never queued.
        Method::HubKeys(_) => Outcome {
            command: cmd.id,
            status: Status::Failed(
                "hub.keys runs when it is accepted, never from the queue".into(),
            ),
            exit_code: None,
            stdout: vec![],
            stderr: vec![],
            truncated: false,
            started_at: now_ms(),
            duration_ms: 0,
        },
        method => {
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
            methods::run(cmd.id, method, &ctx).await
        }
    };
    let outcome = Outcome {
        status: outcome.status.bounded(),
        ..outcome
    };
    info!(command = %cmd.id, status = outcome.status.word(), exit = ?outcome.exit_code,
          ms = outcome.duration_ms, "command finished");
    retry_state(&agent, cmd.id, |s| s.finish(&ticket, &outcome)).await;
    agent
        .state
        .lock()
        .expect("state lock")
        .prune(agent.clock.now());
    agent.outbox_kick.notify_one();
    drop(permit);
}

/// `hub.keys`, run as it is accepted (it needs the key that signed it, which must stay
/// trusted, and takes no time): replace the trusted hub keys, durably, then report.
async fn hub_keys_now(agent: &Arc<Agent>, acc: &Accepted, keys: &outpost_wire::HubKeys) -> Ack {
    let id = acc.command.id;
    let busy = Ack {
        command: id,
        kind: AckKind::Busy,
    };
    let accepted = agent
        .state
        .lock()
        .expect("state lock")
        .accept(&acc.command, true);
    let Ok(ticket) = accepted else {
        return busy;
    };
    let mut outcome = methods::hub_keys::run(
        &mut agent.trust.lock().expect("trust lock"),
        keys,
        &acc.signer,
    );
    if outcome.status == Status::Succeeded {
        agent.hello_kick.notify_one();
    }
    outcome.command = id;
    outcome.started_at = now_ms();
    retry_state(agent, id, |s| s.finish(&ticket, &outcome)).await;
    agent.outbox_kick.notify_one();
    Ack {
        command: id,
        kind: if acc.version >= 2 {
            AckKind::Running
        } else {
            AckKind::Accepted
        },
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

/// One outbox entry's retry state.
struct Backoff {
    next: Instant,
    wait: Duration,
}

/// An outcome as the hub at version `v` takes it, cut to fit one message if it must.
fn outcome_for_hub(stored: &[u8], v: u8) -> Option<Vec<u8>> {
    let mut o: Outcome = decode(stored).ok()?;
    let mut bytes = encode_for(&o, v);
    while bytes.len() > MAX_PAYLOAD as usize {
        let over = bytes.len() - MAX_PAYLOAD as usize + 1024;
        let (a, b) = (o.stdout.len(), o.stderr.len());
        let cut_out = over * a / (a + b).max(1) + 1;
        o.stdout.truncate(a.saturating_sub(cut_out));
        o.stderr
            .truncate(b.saturating_sub(over.saturating_sub(cut_out) + 1));
        o.truncated = true;
        bytes = encode_for(&o, v);
    }
    Some(bytes)
}

/// Send outbox entries, oldest first, until the hub has receipted each. An entry that
/// fails waits its own backoff; a hub that is not there stops the round.
async fn deliver_outbox(agent: Arc<Agent>) {
    let subject = agent.subjects.result(&agent.cfg.node);
    let mut backoff: HashMap<MsgId, Backoff> = HashMap::new();
    let mut round_wait = OUTBOX_BACKOFF_MIN;
    loop {
        let entries = agent.state.lock().expect("state lock").outbox();
        backoff.retain(|id, _| entries.contains(id));
        let now = Instant::now();
        let mut hub_away = false;
        for id in entries {
            if backoff.get(&id).is_some_and(|b| b.next > now) {
                continue;
            }
            let stored = match agent.state.lock().expect("state lock").outcome_bytes(&id) {
                Ok(Some(b)) => b,
                // Receipted meanwhile (a re-sent outcome answered twice).
                Ok(None) => continue,
                Err(e) => {
                    error!(command = %id, error = %e, "cannot read an outbox entry");
                    fail(&mut backoff, id);
                    continue;
                }
            };
            let v = agent.hub_proto.load(Ordering::Relaxed);
            let Some(bytes) = outcome_for_hub(&stored, v) else {
                error!(command = %id, "an outbox entry does not decode: it stays for a human");
                fail(&mut backoff, id);
                continue;
            };
            let req = async_nats::Request::new()
                .payload(Bytes::from(bytes))
                .timeout(Some(RECEIPT_TIMEOUT));
            match agent.client.send_request(subject.clone(), req).await {
                Ok(reply) => match decode::<Receipt>(&reply.payload) {
                    Ok(r) if r.command == id => {
                        debug!(command = %id, "outcome delivered");
                        backoff.remove(&id);
                        if let Err(e) = agent.state.lock().expect("state lock").delivered(&id) {
                            error!(error = %e, "cannot record a receipted outcome");
                        }
                    }
                    other => {
                        warn!(command = %id, reply = ?other, "unexpected receipt");
                        fail(&mut backoff, id);
                    }
                },
                Err(e) => {
                    debug!(command = %id, error = %e, "outcome not delivered yet");
                    match e.kind() {
                        // Nobody there: no use trying the next entries now.
                        RequestErrorKind::NoResponders => {
                            hub_away = true;
                            break;
                        }
                        // A slow hub, or one that will never answer this entry (a
                        // bug, an old hub): the entry waits its own backoff, so it
                        // cannot hold back the ones behind it in the next round.
                        RequestErrorKind::TimedOut => {
                            fail(&mut backoff, id);
                            hub_away = true;
                            break;
                        }
                        _ => fail(&mut backoff, id),
                    }
                }
            }
        }
        let next_entry = backoff.values().map(|b| b.next).min();
        let wait = if hub_away {
            let w = round_wait
                + Duration::from_millis(jitter_ms(round_wait.as_millis() as u64 / 4 + 1));
            round_wait = (round_wait * 2).min(OUTBOX_BACKOFF_MAX);
            w
        } else {
            round_wait = OUTBOX_BACKOFF_MIN;
            next_entry
                .map(|n| n.saturating_duration_since(Instant::now()))
                .unwrap_or(OUTBOX_BACKOFF_MAX)
                .min(OUTBOX_BACKOFF_MAX)
        };
        let _ = tokio::time::timeout(wait, agent.outbox_kick.notified()).await;
    }
}

fn fail(backoff: &mut HashMap<MsgId, Backoff>, id: MsgId) {
    let b = backoff.entry(id).or_insert(Backoff {
        next: Instant::now(),
        wait: OUTBOX_BACKOFF_MIN / 2,
    });
    b.wait = (b.wait * 2).min(OUTBOX_BACKOFF_MAX);
    b.next = Instant::now() + b.wait;
}

/// A unit that took its hub for version 1 asks again after this many hellos (about
/// ten minutes at the default interval).
pub const V1_RECHECK_EVERY: u32 = 40;

/// The methods this agent serves.
pub const SERVED: &[&str] = &["ping", "exec", "file.write", "file.read", "hub.keys"];

/// Hello at connect and every interval. Sent as a request in the newest version; a
/// hub that answers says which versions it speaks and its clock. No answer: a version
/// 1 hub (it drops the new hello), so from then on version 1 hellos, published.
async fn say_hello(agent: Arc<Agent>) {
    let subject = agent.subjects.hello(&agent.cfg.node);
    let (os, kernel) = (inventory::os(), inventory::kernel());
    let allowed: Vec<String> = SERVED
        .iter()
        .filter(|m| agent.cfg.policy.allows_method(m))
        .map(|m| m.to_string())
        .collect();
    // Whether the hub took the last new-version hello in silence (a version 1 hub).
    // Asked again now and then: the hub may have been upgraded.
    let mut v1_hub = false;
    let mut hellos = 0u32;
    loop {
        hellos = hellos.wrapping_add(1);
        if hellos.is_multiple_of(V1_RECHECK_EVERY) {
            v1_hub = false;
        }
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
            proto_min: PROTOCOL_MIN,
            proto_max: PROTOCOL,
            methods: SERVED.iter().map(|m| m.to_string()).collect(),
            allowed: allowed.clone(),
            sent_at: now_ms(),
            keys: agent.trust.lock().expect("trust lock").ids(),
        };
        if v1_hub {
            if let Err(e) = agent
                .client
                .publish(subject.clone(), Bytes::from(encode_for(&hello, 1)))
                .await
            {
                warn!(error = %e, "cannot publish hello");
            }
        } else {
            let req = async_nats::Request::new()
                .payload(Bytes::from(encode(&hello)))
                .timeout(Some(HELLO_REPLY_TIMEOUT));
            match agent.client.send_request(subject.clone(), req).await {
                Ok(msg) => match decode_versioned::<HelloReply>(&msg.payload) {
                    Ok((r, _)) => {
                        let v = r.proto_max.clamp(PROTOCOL_MIN, PROTOCOL);
                        if agent.hub_proto.swap(v, Ordering::Relaxed) != v {
                            info!(protocol = v, "hub answered the hello");
                        }
                        let had = agent.clock.source() == Source::Hub;
                        agent.clock.observe(r.hub_time);
                        if !had {
                            if let Some(off) = agent.clock.offset()
                                && off.abs() > 2000
                            {
                                warn!(
                                    offset_ms = off,
                                    "this unit's clock is off from the hub's: deadlines follow the hub's"
                                );
                            }
                            agent.clock_kick.notify_waiters();
                        }
                    }
                    Err(e) => warn!(error = %e, "undecodable answer to a hello"),
                },
                Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                    // The hub got it (it subscribes) and said nothing: version 1.
                    info!("no answer to the hello: the hub speaks protocol version 1");
                    v1_hub = true;
                    agent.hub_proto.store(1, Ordering::Relaxed);
                    agent.clock.use_unit_clock();
                    agent.clock_kick.notify_waiters();
                    continue;
                }
                Err(e) => debug!(error = %e, "hello not answered (no hub?)"),
            }
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
        message: truncate(&message, MAX_LOG_MESSAGE),
        command,
    };
    if let Err(e) = client
        // `Log` is laid out as in version 1: written so, every hub reads it (a log is
        // fire-and-forget, sent before the hub's version may be known).
        .publish(
            subjects.log(node),
            Bytes::from(outpost_wire::encode_for(&log, PROTOCOL_MIN)),
        )
        .await
    {
        debug!(error = %e, "cannot publish log to the hub");
    }
}
