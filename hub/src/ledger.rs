//! The ledger: the one way a command record changes. It holds every open command in
//! memory (a cache of the `open` bucket), runs each event through the state machine
//! ([`crate::machine`]), writes the result (compare-and-set, or deferred, ADR 0006),
//! publishes every version written as the command's event (ADR 0008), and keeps the
//! last outcome per (node, method, domain).
//!
//! ```text
//! event ──▶ lock(id) ──▶ machine::step ──▶ final?  ── history.create, open.purge ──▶ event, last
//!                                     └─▶ deferred? ── cache only; one task writes it ≤ 1 s later
//!                                     └─▶ else     ── open.update(rev) ──▶ event
//! ```

use crate::machine::{self, Event, Ignored, Persist};
use crate::store::{Cas, Store, StoreError, last_key};
use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::api::{CmdState, CommandRecord, LastOutcome, StoredCommand};
use outpost_wire::subject::Subjects;
use outpost_wire::{MsgId, encode};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// How long a deferred transition (an `Accepted`, a `Running`) may wait in memory
/// before it is written (ADR 0006): most outcomes of short commands arrive within
/// it, and their one final write carries the acceptance too. A hub that dies in this
/// window re-sends the command after its restart and the unit answers `Duplicate`.
pub const DEFERRED_WRITE_DELAY: Duration = Duration::from_secs(1);
/// Last-outcome revisions the hub remembers (about 100 bytes each); beyond it the
/// cache starts over and the next outcome of a key reads the store once.
pub const LAST_CACHE: usize = 100_000;
/// Compare-and-set retries before an update is reported failed.
const CAS_TRIES: usize = 16;
/// Shards of the per-command update locks.
const UPDATE_SHARDS: usize = 256;
/// Store reads in flight while checking recovered commands.
const RECOVERY_IN_FLIGHT: usize = 64;

/// One open command as this hub knows it.
#[derive(Clone)]
struct Entry {
    cmd: StoredCommand,
    /// Revision of the last version written to (or read from) `open`.
    rev: u64,
    /// `cmd` holds a transition the store does not have yet (deferred).
    unsaved: bool,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<MsgId, Entry>,
    /// Open commands per unit, in acceptance order: pending counts, probes.
    by_node: HashMap<String, BTreeSet<(u64, MsgId)>>,
}

impl Open {
    fn insert(&mut self, e: Entry) {
        let r = &e.cmd.record;
        self.by_node
            .entry(r.node.clone())
            .or_default()
            .insert((r.issued_at, r.id));
        self.by_id.insert(r.id, e);
    }

    fn remove(&mut self, id: &MsgId) {
        if let Some(e) = self.by_id.remove(id) {
            let r = &e.cmd.record;
            if let Some(set) = self.by_node.get_mut(&r.node) {
                set.remove(&(r.issued_at, r.id));
                if set.is_empty() {
                    self.by_node.remove(&r.node);
                }
            }
        }
    }
}

/// What `create` did.
pub enum Created {
    /// Stored now.
    New(CommandRecord),
    /// The id existed (a retried request): its record as it stands.
    Exists(CommandRecord),
}

/// What `apply` did.
#[derive(Debug)]
pub enum Applied {
    /// The record changed (and is written, or will be shortly if deferred).
    Changed(Box<CommandRecord>),
    /// It did not; why.
    Ignored(Ignored, CmdState),
    /// No such command (never, or older than the history retention).
    Unknown,
    /// The command is for another unit (this one reported on it): ignored.
    NotYours(String),
}

pub struct Ledger {
    store: Store,
    client: Client,
    subjects: Subjects,
    open: Mutex<Open>,
    locks: Vec<tokio::sync::Mutex<()>>,
    deferred: Mutex<VecDeque<(Instant, MsgId)>>,
    deferred_kick: tokio::sync::Notify,
    last: Mutex<HashMap<String, (MsgId, u64)>>,
}

/// What the ledger found at start.
pub struct Recovered {
    /// Open commands, in acceptance order: (node, issued_at, id).
    pub open: Vec<(String, u64, MsgId)>,
    pub damaged: usize,
    /// Open records whose final version was already in history (a hub that died
    /// between the two writes): purged now.
    pub settled: usize,
}

impl Ledger {
    pub fn new(store: Store, client: Client, subjects: Subjects) -> Ledger {
        Ledger {
            store,
            client,
            subjects,
            open: Mutex::new(Open::default()),
            locks: (0..UPDATE_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            deferred: Mutex::new(VecDeque::new()),
            deferred_kick: tokio::sync::Notify::new(),
            last: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self, id: &MsgId) -> &tokio::sync::Mutex<()> {
        // The id's last byte is random: an even spread over the shards.
        &self.locks[id.0[15] as usize % UPDATE_SHARDS]
    }

    /// Load every open command. Reads `open` only: memory and time are independent
    /// of how much history is kept.
    pub async fn recover(&self) -> Result<Recovered, StoreError> {
        let found = self.store.open_commands().await?;
        // Finish what a hub that died between the final write and the purge left.
        let store = &self.store;
        let checked: Vec<_> = futures_util::stream::iter(found.commands)
            .map(|(c, rev)| async move {
                let done = store.get_final(&c.record.id).await;
                (c, rev, done)
            })
            .buffer_unordered(RECOVERY_IN_FLIGHT)
            .collect()
            .await;
        let mut settled = 0;
        let mut open = Vec::new();
        for (c, rev, done) in checked {
            match done {
                Ok(Some(done)) => {
                    settled += 1;
                    // The dead hub may not have written its last outcome either (it
                    // comes after the purge): write it now; the newest still wins.
                    let r = &done.record;
                    if let Some(last) = last_of(r) {
                        self.record_last(last_key(&r.node, &r.method, &r.domain), last)
                            .await;
                    }
                    if let Err(e) = self.store.purge_open(&c.record.id).await {
                        warn!(command = %c.record.id, error = %e, "cannot purge a finished command from open");
                    }
                }
                Ok(None) => {
                    open.push((c.record.node.clone(), c.record.issued_at, c.record.id));
                    self.open.lock().expect("open lock").insert(Entry {
                        cmd: c,
                        rev,
                        unsaved: false,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        open.sort_by_key(|(_, at, id)| (*at, *id));
        Ok(Recovered {
            open,
            damaged: found.damaged,
            settled,
        })
    }

    /// Persist a new command. Idempotent: a retried request with the same id gets the
    /// first one's record, open or final. A new id costs one write: `open` refuses a
    /// key that holds the command or, for an hour after it finished, its purge marker
    /// (then history has it). Only an id outside that hour (a retry much later, or a
    /// client clock far off) is looked up in history first.
    pub async fn create(&self, c: StoredCommand) -> Result<Created, StoreError> {
        let id = c.record.id;
        if !marker_covers(&id, outpost_wire::now_ms())
            && let Some(done) = self.store.get_final(&id).await?
        {
            return Ok(Created::Exists(done.record));
        }
        match self.store.create_open(&c).await? {
            Some(rev) => {
                let record = c.record.clone();
                self.open.lock().expect("open lock").insert(Entry {
                    cmd: c,
                    rev,
                    unsaved: false,
                });
                // No event for `Queued`: the reply to `send` carries it (ADR 0008).
                Ok(Created::New(record))
            }
            None => match self.record(&id).await? {
                Some(r) => Ok(Created::Exists(r)),
                None => Err(StoreError::Kv(format!(
                    "command id {id} belongs to a command that finished and is no longer in history: send with a new id"
                ))),
            },
        }
    }

    /// An open command as cached (what delivery signs and sends).
    pub fn cached(&self, id: &MsgId) -> Option<StoredCommand> {
        self.open
            .lock()
            .expect("open lock")
            .by_id
            .get(id)
            .map(|e| e.cmd.clone())
    }

    /// The encoded size of an open command (what its final record must make room
    /// for), without copying it.
    pub fn command_bytes(&self, id: &MsgId) -> Option<usize> {
        self.open
            .lock()
            .expect("open lock")
            .by_id
            .get(id)
            .map(|e| outpost_wire::encode(&e.cmd.command).len())
    }

    /// A command's record: open (as this hub knows it), else from history.
    pub async fn record(&self, id: &MsgId) -> Result<Option<CommandRecord>, StoreError> {
        if let Some(c) = self.cached(id) {
            return Ok(Some(c.record));
        }
        if let Some((c, _)) = self.store.get_open(id).await? {
            return Ok(Some(c.record));
        }
        Ok(self.store.get_final(id).await?.map(|c| c.record))
    }

    /// Open commands of one unit, in acceptance order.
    pub fn open_of(&self, node: &str) -> Vec<(u64, MsgId)> {
        self.open
            .lock()
            .expect("open lock")
            .by_node
            .get(node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many commands are open per unit.
    pub fn pending(&self, node: &str) -> u32 {
        self.open
            .lock()
            .expect("open lock")
            .by_node
            .get(node)
            .map_or(0, |s| s.len() as u32)
    }

    /// Units with open commands and how many.
    pub fn pending_all(&self) -> HashMap<String, u32> {
        self.open
            .lock()
            .expect("open lock")
            .by_node
            .iter()
            .map(|(n, s)| (n.clone(), s.len() as u32))
            .collect()
    }

    /// Run one event through the state machine and make the result durable.
    pub async fn apply(&self, id: &MsgId, ev: Event) -> Result<Applied, StoreError> {
        self.apply_from(None, id, ev).await
    }

    /// Like [`Ledger::apply`], for a report from unit `from`: a unit reports only on
    /// its own commands.
    pub async fn apply_from(
        &self,
        from: Option<&str>,
        id: &MsgId,
        ev: Event,
    ) -> Result<Applied, StoreError> {
        let _serial = self.lock(id).lock().await;
        for _ in 0..CAS_TRIES {
            let cached = self.open.lock().expect("open lock").by_id.get(id).cloned();
            let mut entry = match cached {
                Some(e) => e,
                None => match self.store.get_open(id).await? {
                    Some((cmd, rev)) => {
                        let e = Entry {
                            cmd,
                            rev,
                            unsaved: false,
                        };
                        self.open.lock().expect("open lock").insert(e.clone());
                        e
                    }
                    None => {
                        return Ok(match self.store.get_final(id).await? {
                            Some(c) if from.is_some_and(|f| f != c.record.node) => {
                                Applied::NotYours(c.record.node)
                            }
                            Some(c) => Applied::Ignored(Ignored::Final, c.record.state),
                            None => Applied::Unknown,
                        });
                    }
                },
            };
            if let Some(from) = from
                && entry.cmd.record.node != from
            {
                return Ok(Applied::NotYours(entry.cmd.record.node.clone()));
            }
            let step = match machine::step(&entry.cmd.record, &ev) {
                Ok(s) => s,
                Err(why) => return Ok(Applied::Ignored(why, entry.cmd.record.state)),
            };
            entry.cmd.record = step.record;
            let record = entry.cmd.record.clone();
            if record.state.is_final() {
                return self.finish(entry).await;
            }
            if step.persist == Persist::Deferred {
                entry.unsaved = true;
                self.open.lock().expect("open lock").insert(entry);
                self.deferred
                    .lock()
                    .expect("deferred lock")
                    .push_back((Instant::now() + DEFERRED_WRITE_DELAY, *id));
                self.deferred_kick.notify_one();
                return Ok(Applied::Changed(Box::new(record)));
            }
            match self.store.update_open(&entry.cmd, entry.rev).await? {
                Cas::Done(rev) => {
                    entry.rev = rev;
                    entry.unsaved = false;
                    self.open.lock().expect("open lock").insert(entry);
                    self.publish(&record).await;
                    return Ok(Applied::Changed(Box::new(record)));
                }
                Cas::Conflict => {
                    // Another writer's version wins; a deferred transition of ours is
                    // dropped with the cached copy (ADR 0006). Read it again.
                    self.open.lock().expect("open lock").remove(id);
                }
            }
        }
        Err(StoreError::Kv(format!(
            "command {id}: too many conflicting updates"
        )))
    }

    /// Make a final record durable: history first (only one writer wins the create),
    /// the last outcome, then out of `open`.
    async fn finish(&self, entry: Entry) -> Result<Applied, StoreError> {
        let id = entry.cmd.record.id;
        let record = entry.cmd.record.clone();
        if !self.store.create_final(&entry.cmd).await? {
            // Finished elsewhere first (another hub, or before a restart): that stands.
            self.open.lock().expect("open lock").remove(&id);
            let state = self
                .store
                .get_final(&id)
                .await?
                .map_or(record.state, |c| c.record.state);
            if let Err(e) = self.store.purge_open(&id).await {
                warn!(command = %id, error = %e, "cannot purge a finished command from open");
            }
            return Ok(Applied::Ignored(Ignored::Final, state));
        }
        // The final record is durable: the operator may hear of it now (ADR 0008);
        // the rest is bookkeeping that a restart redoes.
        self.open.lock().expect("open lock").remove(&id);
        self.publish(&record).await;
        // The last outcome before the purge: a hub that dies in between finds the
        // command still open at its next start, and in history, and writes it then.
        if let Some(last) = last_of(&record) {
            self.record_last(last_key(&record.node, &record.method, &record.domain), last)
                .await;
        }
        if let Err(e) = self.store.purge_open(&id).await {
            // The next start finds it in history and purges it then.
            warn!(command = %id, error = %e, "cannot purge a finished command from open");
        }
        Ok(Applied::Changed(Box::new(record)))
    }

    async fn publish(&self, r: &CommandRecord) {
        let _ = self
            .client
            .publish(self.subjects.event(&r.id), Bytes::from(encode(r)))
            .await;
    }

    /// Write the deferred transition of one command, if it still has one.
    async fn flush(&self, id: &MsgId) {
        let _serial = self.lock(id).lock().await;
        let Some(mut entry) = self
            .open
            .lock()
            .expect("open lock")
            .by_id
            .get(id)
            .filter(|e| e.unsaved)
            .cloned()
        else {
            return;
        };
        match self.store.update_open(&entry.cmd, entry.rev).await {
            Ok(Cas::Done(rev)) => {
                entry.rev = rev;
                entry.unsaved = false;
                let record = entry.cmd.record.clone();
                self.open.lock().expect("open lock").insert(entry);
                self.publish(&record).await;
            }
            Ok(Cas::Conflict) => {
                self.open.lock().expect("open lock").remove(id);
            }
            Err(e) => error!(command = %id, error = %e, "cannot record an acceptance"),
        }
    }

    /// Write deferred transitions as they fall due, until the ledger is dropped.
    pub async fn write_deferred(&self) {
        loop {
            let next = self
                .deferred
                .lock()
                .expect("deferred lock")
                .front()
                .copied();
            match next {
                None => self.deferred_kick.notified().await,
                Some((due, _)) if due > Instant::now() => tokio::time::sleep_until(due).await,
                Some(_) => {
                    let now = Instant::now();
                    let due: Vec<MsgId> = {
                        let mut q = self.deferred.lock().expect("deferred lock");
                        let n = q.iter().take_while(|(at, _)| *at <= now).count();
                        q.drain(..n).map(|(_, id)| id).collect()
                    };
                    futures_util::stream::iter(due)
                        .for_each_concurrent(64, |id| async move { self.flush(&id).await })
                        .await;
                }
            }
        }
    }

    /// Write every deferred transition now (at shutdown).
    pub async fn flush_all(&self) {
        let ids: Vec<MsgId> = self
            .open
            .lock()
            .expect("open lock")
            .by_id
            .iter()
            .filter(|(_, e)| e.unsaved)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.flush(&id).await;
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

    /// Log what an applied event did, at the level it deserves.
    pub fn log(node: &str, id: &MsgId, what: &str, r: &Result<Applied, StoreError>) {
        match r {
            Ok(Applied::Changed(rec)) if rec.state.is_final() => {
                let status = rec.outcome.as_ref().map(|o| o.status.word()).unwrap_or("");
                let exit = rec.outcome.as_ref().and_then(|o| o.exit_code);
                info!(node, command = %id, state = rec.state.word(), status, exit = ?exit,
                      method = %rec.method, domain = %rec.domain, "command finished");
            }
            Ok(Applied::Changed(rec)) => {
                debug!(node, command = %id, state = rec.state.word(), what, "command changed")
            }
            Ok(Applied::Ignored(why, state)) => {
                debug!(node, command = %id, ?why, state = state.word(), what, "event ignored")
            }
            Ok(Applied::Unknown) => {
                warn!(node, command = %id, what, "report for an unknown command: ignored")
            }
            Ok(Applied::NotYours(owner)) => {
                warn!(node, command = %id, owner = %owner, what, "report on another unit's command: ignored")
            }
            Err(e) => error!(node, command = %id, what, error = %e, "cannot record"),
        }
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

/// Whether a command with this id, had it finished, would still have its purge
/// marker in `open`: ids are made at send time, so one issued within the marker's
/// TTL (half of it, for clock differences between the operator and the hub), and not
/// from the future by more than that margin.
fn marker_covers(id: &MsgId, now: u64) -> bool {
    let margin = crate::store::OPEN_MARKER_TTL.as_millis() as u64 / 2;
    let at = id.millis();
    at + margin >= now && at <= now + margin
}

/// Whether the ledger's record says a delivery task should still send it.
pub fn wants_delivery(r: &CommandRecord) -> bool {
    machine::wants_delivery(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id stamped `ms` (`MsgId::new` never goes back in time within a process).
    fn id_at(ms: u64) -> MsgId {
        let mut b = [7u8; 16];
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        MsgId(b)
    }

    #[test]
    fn only_ids_of_the_last_half_hour_skip_the_history_lookup() {
        let now = 1_800_000_000_000;
        let minute = 60_000;
        assert!(marker_covers(&id_at(now), now));
        assert!(marker_covers(&id_at(now - 29 * minute), now));
        assert!(marker_covers(&id_at(now + 29 * minute), now));
        assert!(!marker_covers(&id_at(now - 31 * minute), now));
        assert!(!marker_covers(&id_at(now + 31 * minute), now));
        assert!(!marker_covers(&id_at(0), now));
    }
}
