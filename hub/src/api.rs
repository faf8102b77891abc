//! The operator API, `<prefix>.api.<call>`: send, send_many, show, nodes, node. Every
//! reply is an `ApiReply` with a typed error, published only to a reply subject in
//! the operators' inbox namespace (ADR 0005: an operator credential cannot make the
//! hub write into the store's subjects or a unit's).

use crate::ledger::Created;
use crate::selector::Selector;
use crate::serve::Hub;
use async_nats::Message;
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::api::{
    ApiError, ApiReply, CmdState, CommandRecord, ErrorCode, MAX_TARGETS, NodeRequest, NodesRequest,
    SendManyReply, SendManyRequest, SendRequest, ShowRequest, StoredCommand,
};
use outpost_wire::limits::MAX_COMMAND;
use outpost_wire::subject::{OPERATOR_INBOX, is_in_inbox};
use outpost_wire::{Command, Method, MsgId, Wire, decode, encode, names, now_ms};
use serde::Serialize;
use std::collections::HashSet;
use tracing::{debug, warn};

/// Longest deadline the API accepts (30 days): the hub keeps trying that long.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// `send_many`: store writes in flight at once for one call.
pub const SEND_MANY_IN_FLIGHT: usize = 64;

type ApiResult<T> = Result<T, ApiError>;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("the hub's store failed: {e}; try again"),
    )
}

/// What every command of one `send` or `send_many` shares, checked once.
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
    ) -> ApiResult<Template> {
        names::check_domain(&domain).map_err(|e| bad(e.to_string()))?;
        if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
            return Err(bad(format!(
                "deadline must be between 1 ms and {} days",
                MAX_TTL_MS / 86_400_000
            )));
        }
        if let Method::Exec(e) = &method
            && e.argv.is_empty()
        {
            return Err(bad("exec needs a program: give it after --"));
        }
        Ok(Template {
            domain,
            method,
            timeout_ms,
            ttl_ms,
        })
    }
}

fn decode_req<T: Wire>(call: &str, payload: &[u8]) -> ApiResult<T> {
    decode(payload).map_err(|e| bad(format!("bad {call} request: {e}")))
}

fn reply<T: Serialize>(r: ApiResult<T>) -> Vec<u8>
where
    ApiReply<T>: Wire,
{
    encode(&match r {
        Ok(v) => ApiReply::Ok(v),
        Err(e) => ApiReply::Err(e),
    })
}

/// Answer one API call.
pub async fn on_api(hub: &Hub, msg: Message) {
    let Some(to) = msg.reply.clone() else {
        return debug!(subject = %msg.subject, "api call without a reply subject: ignored");
    };
    if !is_in_inbox(&to, OPERATOR_INBOX) {
        return warn!(reply = ?to.as_str(), "api call asks for a reply outside the operator inbox: not answered");
    }
    let call = msg
        .subject
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let p = &msg.payload;
    let bytes = match call.as_str() {
        "send" => reply(send(hub, p).await),
        "send_many" => reply(send_many(hub, p).await),
        "show" => reply(show(hub, p).await),
        "nodes" => reply(nodes(hub, p)),
        "node" => reply(node(hub, p)),
        other => reply::<()>(Err(ApiError::new(
            ErrorCode::UnknownCall,
            format!(
                "unknown API call {other:?}: this hub answers send, send_many, show, nodes, node"
            ),
        ))),
    };
    if let Err(e) = hub.client.publish(to, Bytes::from(bytes)).await {
        warn!(call, error = %e, "cannot answer an api call");
    }
}

async fn send(hub: &Hub, payload: &[u8]) -> ApiResult<CommandRecord> {
    let req: SendRequest = decode_req("send", payload)?;
    let t = Template::checked(req.domain, req.method, req.timeout_ms, req.ttl_ms)?;
    let stored = prepare(hub, &t, &req.to, req.id, now_ms())?;
    queue(hub, stored).await
}

/// The same command to many units: each is checked and created as by `send`, the
/// store writes in flight together; one result per target, in order.
async fn send_many(hub: &Hub, payload: &[u8]) -> ApiResult<SendManyReply> {
    let req: SendManyRequest = decode_req("send_many", payload)?;
    if req.targets.len() > MAX_TARGETS as usize {
        return Err(bad(format!(
            "{} targets in one call; at most {MAX_TARGETS} (split the list)",
            req.targets.len()
        )));
    }
    let t = Template::checked(req.domain, req.method, req.timeout_ms, req.ttl_ms)?;
    let now = now_ms();
    let mut seen = HashSet::new();
    let prepared: Vec<ApiResult<StoredCommand>> = req
        .targets
        .iter()
        .map(|target| {
            if !seen.insert(target.to.as_str()) {
                return Err(bad(format!("{} is named twice", target.to)));
            }
            prepare(hub, &t, &target.to, target.id, now)
        })
        .collect();
    Ok(futures_util::stream::iter(prepared)
        .map(|p| async move {
            match p {
                Ok(stored) => queue(hub, stored).await,
                Err(e) => Err(e),
            }
        })
        .buffered(SEND_MANY_IN_FLIGHT)
        .collect()
        .await)
}

/// Check one command for `to` and build its record: the unit is enrolled and can do
/// the method, the command fits.
fn prepare(hub: &Hub, t: &Template, to: &str, id: MsgId, now: u64) -> ApiResult<StoredCommand> {
    names::check_node(to).map_err(|e| bad(e.to_string()))?;
    hub.registry.check(to, &t.method)?;
    // An operator credential must not make units trust a key of its choosing: only
    // this hub's own keys (ADR 0005, key rotation).
    if let Method::HubKeys(k) = &t.method
        && let Some(other) = k.keys.iter().find(|k| !hub.delivery.keys.is_ours(k))
    {
        return Err(ApiError::new(
            ErrorCode::NotAllowed,
            format!(
                "hub.keys may name only this hub's signing keys (--signing-key, --next-signing-key); {} is neither",
                outpost_wire::sign::PublicKey(*other)
            ),
        ));
    }
    let command = Command {
        id,
        from: hub.name.clone(),
        to: to.to_string(),
        issued_at: now,
        deadline: now + t.ttl_ms,
        domain: t.domain.clone(),
        timeout_ms: t.timeout_ms,
        method: t.method.clone(),
        sent_at: 0,
    };
    // The largest form it is ever sent in: newest version, sent_at at its widest.
    let size = encode(&Command {
        sent_at: u64::MAX,
        ..command.clone()
    })
    .len()
        + outpost_wire::sign::SIGNATURE_LEN;
    if size > MAX_COMMAND as usize {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "the command is {size} bytes, over the {MAX_COMMAND}-byte limit (a file.write carries at most about {} KiB)",
                MAX_COMMAND / 1024 - 1
            ),
        ));
    }
    let record = CommandRecord {
        id,
        node: to.to_string(),
        method: t.method.name().into(),
        domain: t.domain.clone(),
        issued_at: now,
        deadline: command.deadline,
        state: CmdState::Queued,
        attempts: 0,
        last_attempt_at: 0,
        accepted_at: None,
        finished_at: None,
        note: String::new(),
        outcome: None,
        started_at: None,
        unconfirmed: false,
    };
    Ok(StoredCommand { record, command })
}

/// Persist a prepared command and hand it to its unit's delivery. Idempotent.
async fn queue(hub: &Hub, stored: StoredCommand) -> ApiResult<CommandRecord> {
    match hub.ledger.create(stored).await.map_err(unavailable)? {
        Created::New(r) => {
            hub.delivery.enqueue(&r.node, r.issued_at, r.id);
            // The finish is logged at info; a log line is a write(2) per command.
            debug!(node = %r.node, command = %r.id, method = %r.method, domain = %r.domain, "command queued");
            Ok(r)
        }
        Created::Exists(r) => Ok(r),
    }
}

async fn show(hub: &Hub, payload: &[u8]) -> ApiResult<CommandRecord> {
    let req: ShowRequest = decode_req("show", payload)?;
    hub.ledger
        .record(&req.id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownCommand,
                format!(
                    "no command {} (never sent, or finished longer ago than the hub's retention)",
                    req.id
                ),
            )
        })
}

fn nodes(hub: &Hub, payload: &[u8]) -> ApiResult<outpost_wire::api::NodesPage> {
    let req: NodesRequest = decode_req("nodes", payload)?;
    let selector = Selector::parse(&req.selector).map_err(|e| bad(e.to_string()))?;
    let pending = hub.ledger.pending_all();
    Ok(hub.registry.page(
        &req,
        &selector,
        |n| pending.get(n).copied().unwrap_or(0),
        now_ms(),
    ))
}

fn node(hub: &Hub, payload: &[u8]) -> ApiResult<outpost_wire::api::NodeView> {
    let req: NodeRequest = decode_req("node", payload)?;
    hub.registry
        .node(&req.name, hub.ledger.pending(&req.name), now_ms())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownUnit,
                format!("no unit {:?} is known to the hub", req.name),
            )
        })
}
