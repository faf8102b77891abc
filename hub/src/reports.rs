//! Unit reports (`<prefix>.hub.<kind>.<node>`): outcomes, start reports, hellos and
//! logs. The broker's permissions make the `<node>` token authentic (a unit may only
//! publish under its own name); the reply subject is not checked by the broker, so the
//! hub answers only replies inside that unit's own inbox (ADR 0005): a unit cannot
//! make the hub write a receipt into the store's subjects or another unit's.
//!
//! Receipts: an outcome is receipted once it is stored, and also when the hub will
//! never store it (an unknown command, or another unit's): a receipt means "the hub
//! has taken this report", so the unit's outbox does not keep a report nobody will
//! take. Only a failing store withholds it (the unit sends again).

use crate::ledger::Ledger;
use crate::machine::Event;
use crate::serve::Hub;
use async_nats::Message;
use bytes::Bytes;
use outpost_wire::api::CmdState;
use outpost_wire::limits::{MAX_COMMAND, MAX_LOG_MESSAGE, truncate};
use outpost_wire::subject::{is_in_inbox, kind, unit_inbox};
use outpost_wire::{
    HelloReply, Level, Log, MAX_PAYLOAD, Outcome, PROTOCOL, PROTOCOL_MIN, Receipt, Started,
    decode_versioned, encode_for, now_ms,
};
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// How long a command must have been accepted before an idle unit's hello makes the
/// hub probe it (an outcome may be on its way).
pub const PROBE_AFTER: Duration = Duration::from_secs(30);
/// Room kept under the store's value limit for the record's own fields.
const RECORD_SLACK: usize = 8 * 1024;

/// Route one report by its kind.
pub async fn on_report(hub: &Hub, msg: Message) {
    let Some((kind, node)) = hub.subjects.report_of(&msg.subject) else {
        return;
    };
    let node = node.to_string();
    // A reply subject is honoured only inside the sender's own inbox.
    let reply = match &msg.reply {
        Some(r) if is_in_inbox(r, &unit_inbox(&node)) => Some(r.clone()),
        Some(r) => {
            warn!(node, reply = ?r.as_str(), kind, "report asks for a reply outside the unit's inbox: not answered");
            None
        }
        None => None,
    };
    match kind {
        kind::RESULT => on_outcome(hub, &node, &msg.payload, reply).await,
        kind::HELLO => on_hello(hub, &node, &msg.payload, reply).await,
        kind::STARTED => on_started(hub, &node, &msg.payload).await,
        kind::LOG => on_log(&node, &msg.payload),
        other => debug!(node, kind = ?other, "report of a kind this hub does not know: ignored"),
    }
}

/// Cut an outcome's outputs so that its record fits one store value; say so.
pub fn fit(o: &mut Outcome, command_bytes: usize) {
    let room = (MAX_PAYLOAD as usize).saturating_sub(command_bytes + RECORD_SLACK);
    let total = o.stdout.len() + o.stderr.len();
    if total <= room {
        return;
    }
    // Keep the start of each stream, in proportion.
    let keep_out = room * o.stdout.len() / total.max(1);
    o.stdout.truncate(keep_out);
    o.stderr.truncate(room - keep_out);
    o.truncated = true;
}

async fn on_outcome(hub: &Hub, node: &str, payload: &[u8], reply: Option<async_nats::Subject>) {
    let (mut o, v) = match decode_versioned::<Outcome>(payload) {
        Ok(x) => x,
        Err(e) => {
            warn!(node, error = %e, bytes = payload.len(), "undecodable outcome dropped");
            return;
        }
    };
    let id = o.command;
    o.status = o.status.bounded();
    let command_bytes = hub
        .ledger
        .command_bytes(&id)
        .unwrap_or(MAX_COMMAND as usize);
    fit(&mut o, command_bytes);
    let r = hub
        .ledger
        .apply_from(
            Some(node),
            &id,
            Event::Outcome {
                at: now_ms(),
                outcome: o,
            },
        )
        .await;
    Ledger::log(node, &id, "outcome", &r);
    if r.is_err() {
        // Not stored: no receipt, the unit keeps the outcome and sends it again.
        return;
    }
    if let Some(to) = reply {
        let receipt = encode_for(&Receipt { command: id }, v);
        if let Err(e) = hub.client.publish(to, Bytes::from(receipt)).await {
            warn!(node, command = %id, error = %e, "cannot send a receipt");
        }
    }
}

async fn on_started(hub: &Hub, node: &str, payload: &[u8]) {
    let s = match decode_versioned::<Started>(payload) {
        Ok((s, _)) => s,
        Err(e) => return warn!(node, error = %e, "undecodable start report dropped"),
    };
    let r = hub
        .ledger
        .apply_from(
            Some(node),
            &s.command,
            Event::Started {
                at: now_ms(),
                unit_at: s.at,
            },
        )
        .await;
    Ledger::log(node, &s.command, "started", &r);
}

async fn on_hello(hub: &Hub, node: &str, payload: &[u8], reply: Option<async_nats::Subject>) {
    let (hello, v) = match decode_versioned::<outpost_wire::Hello>(payload) {
        Ok(x) => x,
        Err(e) => return warn!(node, error = %e, "undecodable hello dropped"),
    };
    let now = now_ms();
    // Answer first: the unit's clock and protocol choice wait on it, the rest does not.
    if v >= 2
        && let Some(to) = reply
    {
        let r = HelloReply {
            proto_min: PROTOCOL_MIN,
            proto_max: PROTOCOL,
            hub_time: now,
        };
        if let Err(e) = hub.client.publish(to, Bytes::from(encode_for(&r, v))).await {
            warn!(node, error = %e, "cannot answer a hello");
        }
    }
    if !hub.registry.is_enrolled(node) && hub.registry.units_file().is_some() {
        // The broker let it in, so it is in auth.conf: the list may be newer than ours.
        let _ = hub.registry.reload();
    }
    let effect = hub.registry.hello(node, hello, v, now);
    if effect.came_online {
        info!(node, proto = v, "unit online");
    } else if effect.restarted {
        info!(node, "unit agent restarted");
    }
    hub.delivery.kick(node);
    if effect.idle {
        probe_stale(hub, node, now);
    }
    if let Some(rec) = effect.persist
        && let Err(e) = hub.store.put_node(&rec).await
    {
        warn!(node, error = %e, "cannot store unit record");
    }
}

/// The unit has nothing pending and nothing to report, yet the hub holds commands of
/// it as accepted or running: their outcomes were receipted but not kept (the store
/// lost a write). Re-send them; the unit answers what it recorded.
fn probe_stale(hub: &Hub, node: &str, now: u64) {
    for (at, id) in hub.ledger.open_of(node) {
        let Some(c) = hub.ledger.cached(&id) else {
            continue;
        };
        let r = &c.record;
        let accepted_long_ago = r
            .accepted_at
            .is_some_and(|a| now.saturating_sub(a) > PROBE_AFTER.as_millis() as u64);
        if matches!(r.state, CmdState::Accepted | CmdState::Running) && accepted_long_ago {
            debug!(node, command = %id, "probing a command the unit no longer holds");
            hub.delivery.enqueue(node, at, id);
        }
    }
}

fn on_log(node: &str, payload: &[u8]) {
    match decode_versioned::<Log>(payload) {
        Ok((l, _)) => {
            let cmd = l.command.map(|c| c.to_string()).unwrap_or_default();
            // `?`: a unit's text is escaped (no forged log lines), and bounded.
            let message = truncate(&l.message, MAX_LOG_MESSAGE);
            match l.level {
                Level::Error => error!(node, command = %cmd, message = ?message, "unit log"),
                Level::Warn => warn!(node, command = %cmd, message = ?message, "unit log"),
                Level::Info => info!(node, command = %cmd, message = ?message, "unit log"),
            }
        }
        Err(e) => warn!(node, error = %e, "undecodable unit log dropped"),
    }
}
