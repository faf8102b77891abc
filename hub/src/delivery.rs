//! Delivery: one task per unit with work, sending its commands one at a time in the
//! order the hub accepted them (acceptance time, then id; ADR 0003), each signed for
//! the unit's protocol version with a key it trusts, until the unit answers or the
//! deadline passes; exponential backoff with jitter, at once when the unit says hello.
//!
//! A unit's task exists only while it has commands to deliver (an idle fleet of
//! 100,000 costs no task and no channel). Its queue lives in a map the task and the
//! senders share under one lock, so nothing is lost between "queue empty, exit" and
//! "new command, spawn".

use crate::keys::Keys;
use crate::ledger::{Applied, Ledger};
use crate::machine::Event;
use crate::registry::Registry;
use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use outpost_wire::api::CmdState;
use outpost_wire::subject::Subjects;
use outpost_wire::{Ack, AckKind, MsgId, decode, now_ms};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

/// How long the hub waits for a unit's ACK before it counts the attempt as failed.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-delivery backoff: doubling from 500 ms to 60 s, plus up to 25 % jitter, so an
/// offline unit costs one request a minute and a fleet's retries do not align.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Queue {
    /// (hub acceptance time, id): deliveries, and probes of accepted commands.
    items: BTreeSet<(u64, MsgId)>,
    /// The unit said hello: try now, backoff reset.
    kicked: bool,
    /// A task is serving this queue.
    running: bool,
    /// Wakes the task (new work, a kick).
    wake: Arc<Notify>,
}

/// Everything delivery needs from the rest of the hub.
pub struct Delivery {
    pub ledger: Arc<Ledger>,
    pub registry: Arc<Registry>,
    pub client: Client,
    pub subjects: Subjects,
    pub keys: Arc<Keys>,
    pub ack_timeout: Duration,
    queues: Mutex<HashMap<String, Queue>>,
    tasks: Mutex<Tasks>,
}

/// The delivery tasks. A `JoinSet` keeps a finished task (its future's memory
/// included) until it is joined, and a unit's task ends whenever its queue empties:
/// unreaped, the set grew by one task per command delivered (8 KiB each: a hub that
/// ran a million commands held 8 GiB). Finished tasks are reaped at every spawn.
#[derive(Default)]
struct Tasks(tokio::task::JoinSet<()>);

impl Tasks {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        while let Some(done) = self.0.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "a delivery task panicked");
            }
        }
        self.0.spawn(task);
    }

    fn abort_all(&mut self) {
        self.0.abort_all();
    }

    /// Tasks held: running, or finished since the last spawn.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.0.len()
    }
}

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    Duration::from_millis(nanos % (d.as_millis() as u64 / 4 + 1))
}

/// What became of one delivery attempt.
enum Attempt {
    /// Nothing more to do for this command here (answered, final, gone).
    Done,
    /// Try again after a backoff.
    Retry,
}

impl Delivery {
    pub fn new(
        ledger: Arc<Ledger>,
        registry: Arc<Registry>,
        client: Client,
        subjects: Subjects,
        keys: Arc<Keys>,
        ack_timeout: Duration,
    ) -> Delivery {
        Delivery {
            ledger,
            registry,
            client,
            subjects,
            keys,
            ack_timeout,
            queues: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Tasks::default()),
        }
    }

    /// Queue a command (or a probe of an accepted one) for its unit.
    pub fn enqueue(self: &Arc<Self>, node: &str, issued_at: u64, id: MsgId) {
        let mut queues = self.queues.lock().expect("queues lock");
        let q = queues.entry(node.to_string()).or_default();
        q.items.insert((issued_at, id));
        self.wake_or_spawn(node, q);
    }

    /// The unit said hello: deliver what it has now.
    pub fn kick(self: &Arc<Self>, node: &str) {
        let mut queues = self.queues.lock().expect("queues lock");
        if let Some(q) = queues.get_mut(node) {
            q.kicked = true;
            self.wake_or_spawn(node, q);
        }
    }

    fn wake_or_spawn(self: &Arc<Self>, node: &str, q: &mut Queue) {
        if q.running {
            q.wake.notify_one();
        } else {
            q.running = true;
            let (me, node, wake) = (self.clone(), node.to_string(), q.wake.clone());
            self.tasks
                .lock()
                .expect("tasks lock")
                .spawn(Box::pin(async move { me.serve(node, wake).await }));
        }
    }

    /// Units with a delivery task.
    pub fn active(&self) -> usize {
        self.queues.lock().expect("queues lock").len()
    }

    /// Stop every delivery task (at shutdown).
    pub fn abort_all(&self) {
        self.tasks.lock().expect("tasks lock").abort_all();
    }

    /// One unit's delivery task: until its queue is empty.
    async fn serve(self: Arc<Self>, node: String, wake: Arc<Notify>) {
        let mut backoff = BACKOFF_MIN;
        let mut next_try = Instant::now();
        // The earliest deadline in the queue; 0 asks for a scan (something was added).
        let mut earliest = 0u64;
        let mut known = 0usize;
        loop {
            let (front, kicked, len) = {
                let mut queues = self.queues.lock().expect("queues lock");
                let Some(q) = queues.get_mut(&node) else {
                    return;
                };
                let Some(&front) = q.items.first() else {
                    // Nothing left: exit under the lock, so a sender spawns a new task.
                    queues.remove(&node);
                    return;
                };
                (front, std::mem::take(&mut q.kicked), q.items.len())
            };
            if kicked {
                next_try = Instant::now();
                backoff = BACKOFF_MIN;
            }
            if len != known {
                known = len;
                earliest = 0;
            }
            // Deadlines: scanned when one may have passed or the queue grew, not per
            // command (a long queue to one unit costs O(n) per scan).
            let now = now_ms();
            if now >= earliest {
                earliest = self.sweep(&node, now).await;
                continue;
            }
            if Instant::now() < next_try {
                let until = Duration::from_millis(earliest.saturating_sub(now_ms()) + 1);
                let wake_at = next_try.min(Instant::now() + until);
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(wake_at) => {}
                }
                continue;
            }
            match self.attempt(&node, front.1).await {
                Attempt::Done => {
                    self.drop_item(&node, front);
                    backoff = BACKOFF_MIN;
                }
                Attempt::Retry => {
                    next_try = Instant::now() + backoff + jitter(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn drop_item(&self, node: &str, item: (u64, MsgId)) {
        if let Some(q) = self.queues.lock().expect("queues lock").get_mut(node) {
            q.items.remove(&item);
        }
    }

    /// Drop what no longer waits; tell the ledger of passed deadlines. Returns the
    /// earliest deadline still ahead (u64::MAX: none).
    async fn sweep(&self, node: &str, now: u64) -> u64 {
        let items: Vec<(u64, MsgId)> = self
            .queues
            .lock()
            .expect("queues lock")
            .get(node)
            .map(|q| q.items.iter().copied().collect())
            .unwrap_or_default();
        let mut earliest = u64::MAX;
        for item in items {
            let Some(c) = self.ledger.cached(&item.1) else {
                self.drop_item(node, item);
                continue;
            };
            let r = &c.record;
            let probe = matches!(r.state, CmdState::Accepted | CmdState::Running);
            if probe {
                continue;
            }
            if !crate::ledger::wants_delivery(r) {
                self.drop_item(node, item);
                continue;
            }
            if now > r.deadline {
                let applied = self
                    .ledger
                    .apply(&item.1, Event::DeadlinePassed { at: now })
                    .await;
                if let Ok(Applied::Changed(rec)) = &applied
                    && rec.state == CmdState::Expired
                {
                    tracing::warn!(node, command = %item.1, note = %rec.note, "command expired undelivered");
                }
                // Still open only while the unit may have it: keep asking it.
                match self.ledger.cached(&item.1) {
                    Some(c) if crate::ledger::wants_delivery(&c.record) => {}
                    _ => self.drop_item(node, item),
                }
            } else {
                earliest = earliest.min(r.deadline);
            }
        }
        earliest
    }

    /// One delivery attempt (or probe) of one command.
    async fn attempt(&self, node: &str, id: MsgId) -> Attempt {
        let Some(c) = self.ledger.cached(&id) else {
            return Attempt::Done;
        };
        let probe = matches!(c.record.state, CmdState::Accepted | CmdState::Running);
        if !probe && !crate::ledger::wants_delivery(&c.record) {
            return Attempt::Done;
        }
        let peer = self.registry.peer(node);
        let mut cmd = c.command;
        cmd.sent_at = now_ms();
        let signed = self.keys.for_peer(&peer.keys).sign_for(&cmd, peer.proto);
        let req = async_nats::Request::new()
            .payload(Bytes::from(signed))
            .timeout(Some(self.ack_timeout));
        let (why, reached) = match self
            .client
            .send_request(self.subjects.command(node), req)
            .await
        {
            Ok(msg) => match decode::<Ack>(&msg.payload) {
                Ok(ack) if ack.command == id => {
                    let busy = ack.kind == AckKind::Busy;
                    let ev = Event::Ack {
                        at: now_ms(),
                        kind: ack.kind,
                        probe,
                    };
                    let r = self.ledger.apply(&id, ev).await;
                    Ledger::log(node, &id, "ack", &r);
                    return if busy && !probe {
                        Attempt::Retry
                    } else {
                        Attempt::Done
                    };
                }
                Ok(ack) => (format!("ack names another command ({})", ack.command), true),
                Err(e) => (format!("undecodable ack: {e}"), true),
            },
            Err(e) => match e.kind() {
                // The broker says nobody subscribes: the command reached no one.
                RequestErrorKind::NoResponders => {
                    ("unit not connected (no responders)".into(), false)
                }
                RequestErrorKind::TimedOut => (
                    format!("no ack within {} ms", self.ack_timeout.as_millis()),
                    true,
                ),
                _ => (e.to_string(), true),
            },
        };
        if probe {
            // A probe nobody answered teaches nothing; the next idle hello asks again.
            return Attempt::Done;
        }
        debug!(node, command = %id, problem = %why, "delivery attempt failed");
        let r = self
            .ledger
            .apply(
                &id,
                Event::NoAnswer {
                    at: now_ms(),
                    why,
                    reached,
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(command = %id, error = %e, "cannot record a delivery attempt");
        }
        Attempt::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit's task ends when its queue empties and a new one is spawned for its next
    /// command: the set must not keep the finished ones (it kept one per command).
    #[tokio::test]
    async fn finished_tasks_are_not_kept() {
        let mut tasks = Tasks::default();
        for _ in 0..1_000 {
            tasks.spawn(async {});
            // Let the task run to its end, as a delivery does between two commands.
            tokio::task::yield_now().await;
        }
        assert!(
            tasks.held() <= 2,
            "{} tasks held after 1,000 that ended",
            tasks.held()
        );
    }

    /// Reaping does not stop a task that is still running.
    #[tokio::test]
    async fn running_tasks_are_kept() {
        let mut tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _ = rx.await;
        });
        for _ in 0..10 {
            tasks.spawn(async {});
            tokio::task::yield_now().await;
        }
        assert!(tasks.held() >= 1);
        tx.send(()).expect("the first task still waits");
    }
}
