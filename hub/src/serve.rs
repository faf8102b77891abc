//! `outpost-hub serve`: the daemon. Persists every command before sending it, delivers
//! it to its unit until the unit ACKs or the deadline passes, stores every outcome,
//! and keeps the registry of units. All state lives in [`crate::store`].
//!
//! ```text
//! api.send ──▶ persist (Queued) ──▶ node task ──request──▶ unit ──Ack──▶ Accepted / Rejected
//!                                      │ no ACK: backoff + jitter, at once on hello
//!                                      └ deadline passed: Expired
//! hub.result.<node> ──▶ store outcome (dedup by id) ──Receipt──▶ unit
//! hub.hello.<node>  ──▶ node registry, kick that node's task
//! ```

use crate::store::{Cas, Store, StoreError, last_key};
use async_nats::{Client, Message, Request, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::api::{
    ApiReply, CmdState, CommandRecord, LastOutcome, MAX_TARGETS, NodeRecord, NodeView,
    SendManyReply, SendManyRequest, SendRequest, ShowRequest, StoredCommand,
};
use outpost_wire::sign::SigningKey;
use outpost_wire::subject::Subjects;
use outpost_wire::{
    Ack, AckKind, Command, Hello, Level, Log, Method, MsgId, Outcome, Receipt, decode, encode,
    names, now_ms,
};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// How long the hub waits for a unit's ACK before it counts the attempt as failed.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-delivery backoff: doubling from 500 ms to 60 s, plus up to 25 % jitter, so an
/// offline unit costs one request a minute and a fleet's retries do not align.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Messages waiting for one node's delivery task; `send` waits when it is full.
pub const NODE_QUEUE: usize = 1024;
/// Unit reports (outcomes, hellos) handled at once; further ones wait in the
/// subscription (bounded by async-nats' subscription capacity).
pub const REPORT_CONCURRENCY: usize = 256;
/// A unit is offline after missing this many hellos.
pub const MISSED_HELLOS: u64 = 3;
/// Longest deadline the API accepts (30 days): the hub keeps trying that long.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// How long an `Accepted` may wait in memory before it is written (ADR 0006): most
/// outcomes of short commands arrive within it, and their one final write carries the
/// acceptance too. A hub that dies in this window re-sends the command after its
/// restart and the unit answers `Duplicate`, as for any lost `Accepted` write. One
/// second, not less: under a burst (one command to 10,000 units) outcomes queue behind
/// each other, and at 100 ms 86 % of them missed the window (ADR 0008).
pub const ACCEPTED_WRITE_DELAY: Duration = Duration::from_secs(1);
/// Last-outcome revisions the hub remembers (about 100 bytes each); beyond it the
/// cache starts over and the next outcome of a key reads the store once.
pub const LAST_CACHE: usize = 100_000;

/// `send_many`: store writes in flight at once for one call.
pub const SEND_MANY_IN_FLIGHT: usize = 64;

/// What every command of one `send` or `send_many` shares.
struct Template {
    domain: String,
    method: Method,
    timeout_ms: u32,
    ttl_ms: u64,
}

impl Template {
    fn checked(
        domain: String,
        method: Method,
        timeout_ms: u32,
        ttl_ms: u64,
    ) -> Result<Template, String> {
        let t = Template {
            domain,
            method,
            timeout_ms,
            ttl_ms,
        };
        names::check_domain(&t.domain).map_err(|e| e.to_string())?;
        if t.ttl_ms == 0 || t.ttl_ms > MAX_TTL_MS {
            return Err(format!(
                "deadline must be between 1 ms and {} days",
                MAX_TTL_MS / 86_400_000
            ));
        }
        if let Method::Exec(e) = &t.method
            && e.argv.is_empty()
        {
            return Err("exec needs a program: give it after --".into());
        }
        Ok(t)
    }
}

/// What the daemon needs.
pub struct ServeConfig {
    pub name: String,
    pub prefix: String,
    pub signing_key: SigningKey,
    pub ack_timeout: Duration,
}

enum NodeMsg {
    /// A command to deliver, keyed by (hub acceptance time, id).
    Enqueue(u64, MsgId),
    /// The unit said hello: deliver now.
    Kick,
}

/// A command that is not final yet, as this hub knows it.
#[derive(Clone)]
struct Cached {
    cmd: StoredCommand,
    /// The KV revision of the last version of `cmd` written or read.
    rev: u64,
    /// `cmd` holds a transition the store does not have yet: an `Accepted` waiting
    /// for its deferred write (ADR 0006).
    unsaved: bool,
}

/// When [`Hub::update`] writes a transition.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Persist {
    /// Before it returns.
    Now,
    /// Later, by [`Hub::flush`], unless a `Now` update of the same command writes it
    /// first; the cached record (what `show` says) changes at once, the command's
    /// event follows the write (ADR 0008). Only for
    /// commands in the cache: one that is not is final, and an ACK cannot change it.
    Deferred,
}

/// The daemon's shared state. The maps are caches of what is in the store; the
/// std mutexes are never held across an await.
pub struct Hub {
    name: String,
    subjects: Subjects,
    client: Client,
    store: Store,
    key: SigningKey,
    ack_timeout: Duration,
    /// Every command that is not final yet, with its KV revision.
    cache: Mutex<HashMap<MsgId, Cached>>,
    /// Newest command id and KV revision per last-outcome key, as stored.
    last: Mutex<HashMap<String, (MsgId, u64)>>,
    nodes: Mutex<HashMap<String, NodeRecord>>,
    queues: Mutex<HashMap<String, mpsc::Sender<NodeMsg>>>,
    /// Updates of one command are serialised in this process (an ACK and its outcome
    /// often arrive together); compare-and-set still guards against other writers.
    update_locks: Vec<tokio::sync::Mutex<()>>,
    /// Deferred `Accepted` writes, due in this order (one delay for all): one task
    /// writes them, instead of a sleeping task per ACK.
    deferred: Mutex<VecDeque<(Instant, MsgId)>>,
    deferred_kick: tokio::sync::Notify,
}

/// Shards of `Hub::update_locks`.
const UPDATE_SHARDS: usize = 256;

fn grace_ms(n: &NodeRecord) -> u64 {
    MISSED_HELLOS * n.hello.interval_s as u64 * 1000 + 2000
}

fn is_online(n: &NodeRecord, now: u64) -> bool {
    now <= n.last_seen + grace_ms(n)
}

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    Duration::from_millis(nanos % (d.as_millis() as u64 / 4 + 1))
}

/// Run the daemon until `shutdown` resolves.
pub async fn serve(
    cfg: ServeConfig,
    client: Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let store = loop {
        match Store::open(&js, &cfg.prefix).await {
            Ok(s) => break s,
            Err(e) => {
                error!(error = %e, "cannot open the JetStream buckets (is JetStream enabled?); retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let subjects = Subjects::new(&cfg.prefix);
    let hub = Arc::new(Hub {
        name: cfg.name,
        subjects: subjects.clone(),
        client: client.clone(),
        store,
        key: cfg.signing_key,
        ack_timeout: cfg.ack_timeout,
        cache: Mutex::new(HashMap::new()),
        last: Mutex::new(HashMap::new()),
        nodes: Mutex::new(HashMap::new()),
        queues: Mutex::new(HashMap::new()),
        update_locks: (0..UPDATE_SHARDS)
            .map(|_| tokio::sync::Mutex::new(()))
            .collect(),
        deferred: Mutex::new(VecDeque::new()),
        deferred_kick: tokio::sync::Notify::new(),
    });
    // Subscribe before recovering so no report falls between the two.
    let results = client.subscribe(subjects.all_results()).await?;
    let hellos = client.subscribe(subjects.all_hellos()).await?;
    let logs = client.subscribe(subjects.all_logs()).await?;
    let api = client.subscribe(subjects.api("*")).await?;
    hub.recover().await?;
    info!(hub = %hub.name, prefix = %cfg.prefix, "hub serving");

    let slots = Arc::new(Semaphore::new(REPORT_CONCURRENCY));
    let tasks = [
        tokio::spawn(report_loop(
            hub.clone(),
            results,
            slots.clone(),
            Kind::Result,
        )),
        tokio::spawn(report_loop(hub.clone(), hellos, slots.clone(), Kind::Hello)),
        tokio::spawn(report_loop(hub.clone(), logs, slots.clone(), Kind::Log)),
        tokio::spawn(report_loop(hub.clone(), api, slots, Kind::Api)),
        tokio::spawn(watch_presence(hub.clone())),
        tokio::spawn(write_deferred(hub.clone())),
    ];
    shutdown.await;
    info!("hub shutting down");
    for t in tasks {
        t.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), hub.flush_all()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Result,
    Hello,
    Log,
    Api,
}

async fn report_loop(
    hub: Arc<Hub>,
    mut sub: async_nats::Subscriber,
    slots: Arc<Semaphore>,
    kind: Kind,
) {
    while let Some(msg) = sub.next().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            match kind {
                Kind::Result => hub.on_outcome(msg).await,
                Kind::Hello => hub.on_hello(msg).await,
                Kind::Log => hub.on_log(msg),
                Kind::Api => hub.on_api(msg).await,
            }
            drop(permit);
        });
    }
}

/// Write each deferred `Accepted` when it is due, unless its outcome's write
/// carried it first (then `flush` finds nothing unsaved and writes nothing).
async fn write_deferred(hub: Arc<Hub>) {
    loop {
        let next = hub.deferred.lock().expect("deferred lock").front().copied();
        match next {
            None => hub.deferred_kick.notified().await,
            // Entries added meanwhile are due later than this one.
            Some((due, _)) if due > Instant::now() => tokio::time::sleep_until(due).await,
            Some(_) => {
                let now = Instant::now();
                let due: Vec<MsgId> = {
                    let mut q = hub.deferred.lock().expect("deferred lock");
                    let n = q.iter().take_while(|(at, _)| *at <= now).count();
                    q.drain(..n).map(|(_, id)| id).collect()
                };
                futures_util::stream::iter(due)
                    .for_each_concurrent(64, |id| {
                        let hub = hub.clone();
                        async move { hub.flush(&id).await }
                    })
                    .await;
            }
        }
    }
}

/// Log units going offline (and the hub's view of them) as it happens.
async fn watch_presence(hub: Arc<Hub>) {
    let mut offline: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = now_ms();
        let nodes = hub.nodes.lock().expect("nodes lock").clone();
        for (name, n) in nodes {
            let online = is_online(&n, now);
            if !online && offline.insert(name.clone()) {
                warn!(node = %name, last_seen_ms_ago = now - n.last_seen, "unit offline");
            } else if online {
                offline.remove(&name);
            }
        }
    }
}

impl Hub {
    /// Load what the store holds: units, and every command not final yet.
    async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        let nodes = self.store.all_nodes().await?;
        let n_nodes = nodes.len();
        self.nodes
            .lock()
            .expect("nodes lock")
            .extend(nodes.into_iter().map(|n| (n.name.clone(), n)));
        let mut to_deliver = Vec::new();
        let mut open = 0;
        // The newest finished command per last-outcome key: the last-outcome write
        // follows the receipt, so a hub that died in between left it undone.
        let mut newest: HashMap<String, LastOutcome> = HashMap::new();
        for (cmd, rev) in self.store.all_commands().await? {
            if cmd.record.state.is_final() {
                if let Some(last) = last_of(&cmd.record) {
                    let key = last_key(&cmd.record.node, &cmd.record.method, &cmd.record.domain);
                    match newest.get(&key) {
                        Some(l) if l.command > last.command => {}
                        _ => {
                            newest.insert(key, last);
                        }
                    }
                }
                continue;
            }
            open += 1;
            if matches!(cmd.record.state, CmdState::Queued | CmdState::Sent) {
                to_deliver.push((cmd.record.node.clone(), cmd.record.issued_at, cmd.record.id));
            }
            self.cache.lock().expect("cache lock").insert(
                cmd.record.id,
                Cached {
                    cmd,
                    rev,
                    unsaved: false,
                },
            );
        }
        for (key, last) in newest {
            self.record_last(key, last).await;
        }
        to_deliver.sort_by_key(|(_, at, id)| (*at, *id));
        let n_deliver = to_deliver.len();
        for (node, at, id) in to_deliver {
            self.enqueue(&node, at, id).await;
        }
        info!(
            units = n_nodes,
            open_commands = open,
            to_deliver = n_deliver,
            "recovered state"
        );
        Ok(())
    }

    fn queue(self: &Arc<Self>, node: &str) -> mpsc::Sender<NodeMsg> {
        let mut queues = self.queues.lock().expect("queues lock");
        queues
            .entry(node.to_string())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(NODE_QUEUE);
                tokio::spawn(node_loop(self.clone(), node.to_string(), rx));
                tx
            })
            .clone()
    }

    async fn enqueue(self: &Arc<Self>, node: &str, issued_at: u64, id: MsgId) {
        let _ = self.queue(node).send(NodeMsg::Enqueue(issued_at, id)).await;
    }

    fn kick(&self, node: &str) {
        if let Some(q) = self.queues.lock().expect("queues lock").get(node) {
            let _ = q.try_send(NodeMsg::Kick);
        }
    }

    /// Apply `f` to a command's record and write it by compare-and-set, now or
    /// deferred (see [`Persist`]); `f` returns false to leave the record as it is (a
    /// `Now` update then still writes a deferred transition). Returns the new record
    /// when `f` changed something. Every version written is published as the
    /// command's event: operators see what the store holds (ADR 0008).
    async fn update(
        &self,
        id: &MsgId,
        persist: Persist,
        f: impl Fn(&mut StoredCommand) -> bool,
    ) -> Result<Option<CommandRecord>, StoreError> {
        // The id's last byte is random: an even spread over the shards.
        let _serial = self.update_locks[id.0[15] as usize % UPDATE_SHARDS]
            .lock()
            .await;
        for _ in 0..32 {
            let cached = self.cache.lock().expect("cache lock").get(id).cloned();
            let mut e = match cached {
                Some(e) => e,
                None if persist == Persist::Deferred => return Ok(None),
                None => match self.store.get_command(id).await? {
                    Some((cmd, rev)) => {
                        let e = Cached {
                            cmd,
                            rev,
                            unsaved: false,
                        };
                        if !e.cmd.record.state.is_final() {
                            self.cache
                                .lock()
                                .expect("cache lock")
                                .insert(*id, e.clone());
                        }
                        e
                    }
                    None => return Ok(None),
                },
            };
            let changed = f(&mut e.cmd);
            let flush = e.unsaved && persist == Persist::Now;
            if !changed && !flush {
                return Ok(None);
            }
            if persist == Persist::Deferred {
                debug_assert!(
                    !e.cmd.record.state.is_final(),
                    "final states are written now"
                );
                e.unsaved = true;
                let record = e.cmd.record.clone();
                self.cache.lock().expect("cache lock").insert(*id, e);
                // No event yet: events follow the store (ADR 0008), so a command
                // that finishes before the deferred write costs no `Accepted` event.
                return Ok(Some(record));
            }
            match self.store.update_command(&e.cmd, e.rev).await? {
                Cas::Done(new_rev) => {
                    let record = e.cmd.record.clone();
                    {
                        let mut cache = self.cache.lock().expect("cache lock");
                        if record.state.is_final() {
                            cache.remove(id);
                        } else {
                            e.rev = new_rev;
                            e.unsaved = false;
                            cache.insert(*id, e);
                        }
                    }
                    // Every version written is published, a deferred one included.
                    self.publish_event(&record).await;
                    return Ok(changed.then_some(record));
                }
                Cas::Conflict => {
                    // Another writer's version wins; a deferred transition of ours
                    // is dropped with the cached copy (ADR 0006).
                    self.cache.lock().expect("cache lock").remove(id);
                }
            }
        }
        Err(StoreError::Kv(format!(
            "command {id}: too many conflicting updates"
        )))
    }

    /// Write a deferred transition of one command, if it still has one.
    async fn flush(&self, id: &MsgId) {
        let unsaved = self
            .cache
            .lock()
            .expect("cache lock")
            .get(id)
            .is_some_and(|e| e.unsaved);
        if !unsaved {
            return;
        }
        if let Err(e) = self.update(id, Persist::Now, |_| false).await {
            error!(command = %id, error = %e, "cannot record an ack");
        }
    }

    /// Write every deferred transition (at shutdown).
    async fn flush_all(&self) {
        let ids: Vec<MsgId> = self
            .cache
            .lock()
            .expect("cache lock")
            .iter()
            .filter(|(_, e)| e.unsaved)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.flush(&id).await;
        }
    }

    async fn publish_event(&self, r: &CommandRecord) {
        let _ = self
            .client
            .publish(self.subjects.event(&r.id), Bytes::from(encode(r)))
            .await;
    }

    /// One delivery attempt of the command at the front of a node's queue.
    async fn deliver(self: &Arc<Self>, node: &str, id: MsgId) -> Delivery {
        let Some(c) = self
            .cache
            .lock()
            .expect("cache lock")
            .get(&id)
            .map(|e| e.cmd.clone())
        else {
            return Delivery::Done;
        };
        if !matches!(c.record.state, CmdState::Queued | CmdState::Sent) {
            return Delivery::Done;
        }
        if now_ms() > c.record.deadline {
            self.expire(&id).await;
            return Delivery::Done;
        }
        let req = Request::new()
            .payload(Bytes::from(c.signed))
            .timeout(Some(self.ack_timeout));
        let problem = match self
            .client
            .send_request(self.subjects.command(node), req)
            .await
        {
            Ok(msg) => match decode::<Ack>(&msg.payload) {
                Ok(ack) if ack.command == id => return self.on_ack(node, ack).await,
                Ok(ack) => format!("ack names another command ({})", ack.command),
                Err(e) => format!("undecodable ack: {e}"),
            },
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => "unit not connected (no responders)".into(),
                RequestErrorKind::TimedOut => {
                    format!("no ack within {} ms", self.ack_timeout.as_millis())
                }
                _ => e.to_string(),
            },
        };
        debug!(node, command = %id, problem = %problem, "delivery attempt failed");
        self.failed_attempt(&id, problem).await
    }

    /// Record a delivery attempt that did not land (the command stays `Sent`, the
    /// operator sees why) and ask for a retry.
    async fn failed_attempt(&self, id: &MsgId, problem: String) -> Delivery {
        let now = now_ms();
        let r = self
            .update(id, Persist::Now, |c| {
                if !matches!(c.record.state, CmdState::Queued | CmdState::Sent) {
                    return false;
                }
                c.record.state = CmdState::Sent;
                c.record.attempts += 1;
                c.record.last_attempt_at = now;
                c.record.note = problem.clone();
                true
            })
            .await;
        if let Err(e) = r {
            error!(command = %id, error = %e, "cannot record a delivery attempt");
        }
        Delivery::Retry
    }

    async fn on_ack(self: &Arc<Self>, node: &str, ack: Ack) -> Delivery {
        let id = ack.command;
        let now = now_ms();
        let (state, note) = match &ack.kind {
            AckKind::Accepted | AckKind::Duplicate(_) => (CmdState::Accepted, String::new()),
            AckKind::Rejected(r) => (CmdState::Rejected, r.to_string()),
            AckKind::Busy => {
                return self
                    .failed_attempt(&id, "unit busy: its queue is full".into())
                    .await;
            }
        };
        // Acceptance is written deferred: an outcome that follows soon carries it in
        // its own write, and nothing waits for it (the next command to this unit is
        // sent on the ACK, not on the write; ADR 0006). A refusal is final: now.
        let persist = if state == CmdState::Accepted {
            Persist::Deferred
        } else {
            Persist::Now
        };
        let r = self
            .update(&id, persist, |c| {
                if !matches!(c.record.state, CmdState::Queued | CmdState::Sent) {
                    return false;
                }
                c.record.state = state;
                c.record.attempts += 1;
                c.record.last_attempt_at = now;
                c.record.note = note.clone();
                if state == CmdState::Accepted {
                    c.record.accepted_at = Some(now);
                } else {
                    c.record.finished_at = Some(now);
                }
                true
            })
            .await;
        match r {
            Ok(_) if state == CmdState::Rejected => {
                warn!(node, command = %id, reason = %note, "unit rejected command")
            }
            Ok(Some(_)) => {
                debug!(node, command = %id, "command accepted");
                self.deferred
                    .lock()
                    .expect("deferred lock")
                    .push_back((Instant::now() + ACCEPTED_WRITE_DELAY, id));
                self.deferred_kick.notify_one();
            }
            // Its outcome is stored already.
            Ok(None) => debug!(node, command = %id, "command accepted and finished"),
            // The unit has it either way; a later re-delivery is answered Duplicate.
            Err(e) => error!(command = %id, error = %e, "cannot record an ack"),
        }
        Delivery::Done
    }

    async fn expire(&self, id: &MsgId) {
        let now = now_ms();
        let r = self
            .update(id, Persist::Now, |c| {
                if !matches!(c.record.state, CmdState::Queued | CmdState::Sent) {
                    return false;
                }
                c.record.state = CmdState::Expired;
                c.record.finished_at = Some(now);
                c.record.note = format!(
                    "deadline passed after {} delivery attempts; {}",
                    c.record.attempts,
                    if c.record.note.is_empty() {
                        "no answer"
                    } else {
                        &c.record.note
                    }
                );
                true
            })
            .await;
        match r {
            Ok(Some(rec)) => warn!(node = %rec.node, command = %id, "command expired undelivered"),
            Ok(None) => {}
            Err(e) => error!(command = %id, error = %e, "cannot record expiry"),
        }
    }

    /// The deadline of a queued command, if it is still waiting for delivery.
    fn deadline_of(&self, id: &MsgId) -> Option<u64> {
        let cache = self.cache.lock().expect("cache lock");
        let r = &cache.get(id)?.cmd.record;
        matches!(r.state, CmdState::Queued | CmdState::Sent).then_some(r.deadline)
    }

    async fn on_outcome(&self, msg: Message) {
        let Some(node) = self.subjects.node_of(&msg.subject).map(str::to_string) else {
            return;
        };
        let o = match decode::<Outcome>(&msg.payload) {
            Ok(o) => o,
            Err(e) => {
                warn!(node, error = %e, "undecodable outcome dropped");
                return;
            }
        };
        let id = o.command;
        let now = now_ms();
        let r = self
            .update(&id, Persist::Now, |c| {
                if c.record.node != node || c.record.outcome.is_some() {
                    return false;
                }
                c.record.state = CmdState::of(&o.status);
                c.record.outcome = Some(o.clone());
                c.record.finished_at = Some(now);
                c.record.accepted_at.get_or_insert(now);
                // An outcome is the truth: it overrides an Expired that raced with a
                // late acceptance, and clears delivery notes.
                c.record.note.clear();
                true
            })
            .await;
        let finished = match r {
            Ok(Some(rec)) => Some(rec),
            Ok(None) => match self.store.get_command(&id).await {
                Ok(Some((c, _))) if c.record.node != node => {
                    warn!(node, command = %id, addressed_to = %c.record.node,
                          "outcome from a unit the command was not for: ignored");
                    None
                }
                Ok(Some(_)) => {
                    debug!(node, command = %id, "duplicate outcome");
                    None
                }
                Ok(None) => {
                    warn!(node, command = %id, "outcome for an unknown command: ignored");
                    None
                }
                Err(e) => {
                    error!(command = %id, error = %e, "cannot check an outcome; no receipt");
                    return;
                }
            },
            Err(e) => {
                // No receipt: the unit keeps the outcome and sends it again.
                error!(command = %id, error = %e, "cannot store an outcome; no receipt");
                return;
            }
        };
        // The outcome is stored (or was before): the unit may forget it.
        if let Some(reply) = msg.reply {
            let _ = self
                .client
                .publish(reply, Bytes::from(encode(&Receipt { command: id })))
                .await;
        }
        // Bookkeeping the receipt need not wait for: the command record holds the
        // outcome, and a restarted hub redoes this from the records (`recover`).
        if let Some(rec) = &finished {
            info!(node, command = %id, method = %rec.method, domain = %rec.domain,
                  status = o.status.word(), exit = ?o.exit_code, "command finished");
        }
        if let Some(rec) = finished
            && let Some(last) = last_of(&rec)
        {
            let key = last_key(&rec.node, &rec.method, &rec.domain);
            self.record_last(key, last).await;
        }
    }

    /// Keep the last outcome per (node, method, domain): the newest command wins,
    /// whatever order outcomes arrive in. Compare-and-set on the key's revision, which
    /// the hub remembers, so the usual case is one write and no read.
    async fn record_last(&self, key: String, last: LastOutcome) {
        for _ in 0..8 {
            let known = self.last.lock().expect("last lock").get(&key).copied();
            let stored = match known {
                Some((newest, _)) if newest >= last.command => return,
                Some((_, rev)) => self.store.update_last(&key, &last, rev).await,
                // Not known here: most likely a new key, so try to create it.
                None => match self.store.create_last(&key, &last).await {
                    Ok(None) => match self.store.get_last(&key).await {
                        Ok(Some((prev, rev))) => {
                            self.remember_last(&key, prev.command, rev);
                            continue;
                        }
                        Ok(None) => continue,
                        Err(e) => Err(e),
                    },
                    Ok(Some(rev)) => Ok(Cas::Done(rev)),
                    Err(e) => Err(e),
                },
            };
            match stored {
                Ok(Cas::Done(rev)) => return self.remember_last(&key, last.command, rev),
                Ok(Cas::Conflict) => {
                    self.last.lock().expect("last lock").remove(&key);
                }
                Err(e) => {
                    self.last.lock().expect("last lock").remove(&key);
                    return warn!(key, error = %e, "cannot store last outcome");
                }
            }
        }
        warn!(
            key,
            "cannot store last outcome: too many conflicting writes"
        );
    }

    fn remember_last(&self, key: &str, command: MsgId, rev: u64) {
        let mut last = self.last.lock().expect("last lock");
        if last.len() >= LAST_CACHE && !last.contains_key(key) {
            last.clear();
        }
        last.insert(key.to_string(), (command, rev));
    }

    async fn on_hello(&self, msg: Message) {
        let Some(node) = self.subjects.node_of(&msg.subject).map(str::to_string) else {
            return;
        };
        let hello = match decode::<Hello>(&msg.payload) {
            Ok(h) => h,
            Err(e) => {
                warn!(node, error = %e, "undecodable hello dropped");
                return;
            }
        };
        let now = now_ms();
        let (rec, came_online, restarted) = {
            let mut nodes = self.nodes.lock().expect("nodes lock");
            let prev = nodes.get(&node).cloned();
            let was_online = prev.as_ref().is_some_and(|p| is_online(p, now));
            let restarted = prev
                .as_ref()
                .is_some_and(|p| p.hello.agent_started_at != hello.agent_started_at);
            let rec = NodeRecord {
                name: node.clone(),
                first_seen: prev.as_ref().map_or(now, |p| p.first_seen),
                last_seen: now,
                online_since: match &prev {
                    Some(p) if was_online => p.online_since,
                    _ => now,
                },
                hello,
            };
            nodes.insert(node.clone(), rec.clone());
            (rec, !was_online, restarted)
        };
        if came_online {
            info!(node, arch = %rec.hello.arch, version = %rec.hello.agent_version, "unit online");
        } else if restarted {
            info!(node, "unit agent restarted");
        }
        if let Err(e) = self.store.put_node(&rec).await {
            warn!(node, error = %e, "cannot store unit record");
        }
        self.kick(&node);
    }

    fn on_log(&self, msg: Message) {
        let Some(node) = self.subjects.node_of(&msg.subject) else {
            return;
        };
        match decode::<Log>(&msg.payload) {
            Ok(l) => {
                let cmd = l.command.map(|c| c.to_string()).unwrap_or_default();
                match l.level {
                    Level::Error => error!(node, command = %cmd, message = %l.message, "unit log"),
                    Level::Warn => warn!(node, command = %cmd, message = %l.message, "unit log"),
                    Level::Info => info!(node, command = %cmd, message = %l.message, "unit log"),
                }
            }
            Err(e) => warn!(node, error = %e, "undecodable unit log dropped"),
        }
    }

    async fn on_api(self: &Arc<Self>, msg: Message) {
        let call = msg
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string();
        let reply = match call.as_str() {
            "send" => respond(self.api_send(&msg.payload).await),
            "send_many" => respond(self.api_send_many(&msg.payload).await),
            "show" => respond(self.api_show(&msg.payload).await),
            "nodes" => respond(Ok::<_, String>(self.api_nodes())),
            other => respond::<()>(Err(format!("unknown API call {other:?}"))),
        };
        if let Some(to) = msg.reply {
            let _ = self.client.publish(to, Bytes::from(reply)).await;
        }
    }

    async fn api_send(self: &Arc<Self>, payload: &[u8]) -> Result<CommandRecord, String> {
        let req: SendRequest = decode(payload).map_err(|e| format!("bad send request: {e}"))?;
        let t = Template::checked(req.domain, req.method, req.timeout_ms, req.ttl_ms)?;
        let stored = self.prepare(&t, &req.to, req.id, now_ms())?;
        self.queue_new(stored).await
    }

    /// The same command to many units: each is prepared (checked, signed) and
    /// created as by `send`, the store writes in flight together; one result per
    /// target, in order.
    async fn api_send_many(self: &Arc<Self>, payload: &[u8]) -> Result<SendManyReply, String> {
        let req: SendManyRequest =
            decode(payload).map_err(|e| format!("bad send_many request: {e}"))?;
        if req.targets.len() > MAX_TARGETS as usize {
            return Err(format!(
                "{} targets in one call; at most {MAX_TARGETS} (split the list)",
                req.targets.len()
            ));
        }
        let t = Template::checked(req.domain, req.method, req.timeout_ms, req.ttl_ms)?;
        let now = now_ms();
        let mut seen = HashSet::new();
        let prepared: Vec<Result<StoredCommand, String>> = req
            .targets
            .iter()
            .map(|target| {
                if !seen.insert(target.to.as_str()) {
                    return Err(format!("{} is named twice", target.to));
                }
                self.prepare(&t, &target.to, target.id, now)
            })
            .collect();
        Ok(futures_util::stream::iter(prepared)
            .map(|p| async move {
                match p {
                    Ok(stored) => self.queue_new(stored).await,
                    Err(e) => Err(e),
                }
            })
            .buffered(SEND_MANY_IN_FLIGHT)
            .collect()
            .await)
    }

    /// Check, build and sign one command for `to`.
    fn prepare(
        &self,
        t: &Template,
        to: &str,
        id: MsgId,
        now: u64,
    ) -> Result<StoredCommand, String> {
        names::check_node(to).map_err(|e| e.to_string())?;
        let cmd = Command {
            id,
            from: self.name.clone(),
            to: to.to_string(),
            issued_at: now,
            deadline: now + t.ttl_ms,
            domain: t.domain.clone(),
            timeout_ms: t.timeout_ms,
            method: t.method.clone(),
        };
        let signed = self.key.sign(&cmd);
        if signed.len() > outpost_wire::MAX_PAYLOAD as usize {
            return Err(format!(
                "command is {} bytes, over the {} byte limit",
                signed.len(),
                outpost_wire::MAX_PAYLOAD
            ));
        }
        let record = CommandRecord {
            id: cmd.id,
            node: cmd.to.clone(),
            method: cmd.method.name().into(),
            domain: cmd.domain.clone(),
            issued_at: now,
            deadline: cmd.deadline,
            state: CmdState::Queued,
            attempts: 0,
            last_attempt_at: 0,
            accepted_at: None,
            finished_at: None,
            note: String::new(),
            outcome: None,
        };
        Ok(StoredCommand { record, signed })
    }

    /// Persist a prepared command and hand it to its unit's delivery task.
    /// Idempotent: a retried request with the same id returns the first one (the
    /// store's `create` refuses an existing id).
    async fn queue_new(self: &Arc<Self>, stored: StoredCommand) -> Result<CommandRecord, String> {
        let record = stored.record.clone();
        match self
            .store
            .create_command(&stored)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(rev) => {
                self.cache.lock().expect("cache lock").insert(
                    record.id,
                    Cached {
                        cmd: stored,
                        rev,
                        unsaved: false,
                    },
                );
                // No event for `Queued`: the reply to this call carries it, and
                // whoever waits subscribes before calling (ADR 0008).
                self.enqueue(&record.node, record.issued_at, record.id)
                    .await;
                // The finish is logged at info; a log line is a write(2) per command.
                debug!(node = %record.node, command = %record.id, method = %record.method, domain = %record.domain, "command queued");
                Ok(record)
            }
            None => match self
                .store
                .get_command(&record.id)
                .await
                .map_err(|e| e.to_string())?
            {
                Some((c, _)) => Ok(c.record),
                None => Err(format!(
                    "command {} vanished while being created",
                    record.id
                )),
            },
        }
    }

    async fn api_show(&self, payload: &[u8]) -> Result<CommandRecord, String> {
        let req: ShowRequest = decode(payload).map_err(|e| format!("bad show request: {e}"))?;
        if let Some(e) = self.cache.lock().expect("cache lock").get(&req.id) {
            return Ok(e.cmd.record.clone());
        }
        match self.store.get_command(&req.id).await {
            Ok(Some((c, _))) => Ok(c.record),
            Ok(None) => Err(format!("no command {}", req.id)),
            Err(e) => Err(e.to_string()),
        }
    }

    fn api_nodes(&self) -> Vec<NodeView> {
        let now = now_ms();
        let mut pending: HashMap<String, u32> = HashMap::new();
        for e in self.cache.lock().expect("cache lock").values() {
            *pending.entry(e.cmd.record.node.clone()).or_default() += 1;
        }
        let nodes = self.nodes.lock().expect("nodes lock");
        let mut out: Vec<NodeView> = nodes
            .values()
            .map(|n| {
                let online = is_online(n, now);
                NodeView {
                    name: n.name.clone(),
                    online,
                    since: if online {
                        n.online_since
                    } else {
                        n.last_seen + grace_ms(n)
                    },
                    last_seen: n.last_seen,
                    arch: n.hello.arch.clone(),
                    os: n.hello.os.clone(),
                    kernel: n.hello.kernel.clone(),
                    agent_version: n.hello.agent_version.clone(),
                    agent_started_at: n.hello.agent_started_at,
                    labels: n.hello.labels.clone(),
                    pending: pending.get(&n.name).copied().unwrap_or(0),
                }
            })
            .collect();
        // Units that have commands waiting but never said hello.
        for (name, count) in pending {
            if !nodes.contains_key(&name) {
                out.push(NodeView {
                    name,
                    online: false,
                    since: 0,
                    last_seen: 0,
                    arch: String::new(),
                    os: String::new(),
                    kernel: String::new(),
                    agent_version: String::new(),
                    agent_started_at: 0,
                    labels: vec![],
                    pending: count,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// What the last-outcome bucket keeps of a finished command.
fn last_of(r: &CommandRecord) -> Option<LastOutcome> {
    let o = r.outcome.as_ref()?;
    Some(LastOutcome {
        command: r.id,
        status: o.status.clone(),
        exit_code: o.exit_code,
        finished_at: r.finished_at.unwrap_or(0),
    })
}

fn respond<T: Serialize>(r: Result<T, String>) -> Vec<u8> {
    encode(&match r {
        Ok(v) => ApiReply::Ok(v),
        Err(e) => ApiReply::Err(e),
    })
}

enum Delivery {
    /// Nothing more to do for this command here (accepted, rejected, expired, gone).
    Done,
    /// Try again after a backoff.
    Retry,
}

/// One task per unit: delivers its commands one at a time, in the order the hub
/// accepted them (acceptance time, then id), so commands to one unit are accepted —
/// and started — in that order (ADR 0003).
async fn node_loop(hub: Arc<Hub>, node: String, mut rx: mpsc::Receiver<NodeMsg>) {
    let mut queue: BTreeSet<(u64, MsgId)> = BTreeSet::new();
    let mut backoff = BACKOFF_MIN;
    let mut next_try = Instant::now();
    // The earliest deadline in the queue; 0 asks for a scan (something was added).
    // The queue is scanned only when a deadline may have passed or it grew, not on
    // every command: a long queue to one unit costs O(n) per scan.
    let mut earliest = 0;
    let apply = |m: NodeMsg,
                 q: &mut BTreeSet<(u64, MsgId)>,
                 next: &mut Instant,
                 b: &mut Duration,
                 e: &mut u64| match m {
        NodeMsg::Enqueue(at, id) => {
            q.insert((at, id));
            *e = 0;
        }
        NodeMsg::Kick => {
            *next = Instant::now();
            *b = BACKOFF_MIN;
        }
    };
    loop {
        while let Ok(m) = rx.try_recv() {
            apply(m, &mut queue, &mut next_try, &mut backoff, &mut earliest);
        }
        // Drop what is no longer waiting; expire what is past its deadline. (The
        // front is checked again by `deliver`.)
        let now = now_ms();
        if now >= earliest {
            earliest = u64::MAX;
            let mut expired = Vec::new();
            queue.retain(|&(_, id)| match hub.deadline_of(&id) {
                None => false,
                Some(d) if now > d => {
                    expired.push(id);
                    false
                }
                Some(d) => {
                    earliest = earliest.min(d);
                    true
                }
            });
            for id in expired {
                hub.expire(&id).await;
            }
        }
        let Some(&front @ (_, front_id)) = queue.first() else {
            match rx.recv().await {
                Some(m) => apply(m, &mut queue, &mut next_try, &mut backoff, &mut earliest),
                None => return,
            }
            continue;
        };
        if Instant::now() < next_try {
            let until_deadline = Duration::from_millis(earliest.saturating_sub(now_ms()) + 1);
            let wake = next_try.min(Instant::now() + until_deadline);
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => apply(m, &mut queue, &mut next_try, &mut backoff, &mut earliest),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
            continue;
        }
        match hub.deliver(&node, front_id).await {
            Delivery::Done => {
                queue.remove(&front);
                backoff = BACKOFF_MIN;
            }
            Delivery::Retry => {
                next_try = Instant::now() + backoff + jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
