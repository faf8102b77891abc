//! Protocol version 1, frozen: the layouts every release before ADR 0010 spoke, and
//! the conversions to and from the current types. A version 2 build writes these for
//! a version 1 peer and reads them from one; `wire/tests/vectors.rs` pins their bytes.
//!
//! Never change a type here: version 1 units are in the field. Converting down maps
//! what version 1 cannot say onto the nearest thing it can (documented per type).

use crate::api::{CmdState as CurState, CommandRecord as CurRecord};
use crate::{Method, MsgId, Rejection};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: MsgId,
    pub from: String,
    pub to: String,
    pub issued_at: u64,
    pub deadline: u64,
    pub domain: String,
    pub timeout_ms: u32,
    /// The same four variants as today's [`Method`]; the hub never sends a version 1
    /// unit a method added later (a version 1 unit would reject it as malformed).
    pub method: Method,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub command: MsgId,
    pub kind: AckKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckKind {
    Accepted,
    Duplicate(Recorded),
    Rejected(Rejection),
    Busy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recorded {
    Pending,
    Finished(Status),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Succeeded,
    Failed(String),
    TimedOut,
    Rejected(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub command: MsgId,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub started_at: u64,
    pub duration_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_version: String,
    pub arch: String,
    pub os: String,
    pub kernel: String,
    pub uptime_s: u64,
    pub agent_started_at: u64,
    pub labels: Vec<(String, String)>,
    pub outbox_depth: u32,
    pub pending: u32,
    pub interval_s: u32,
}

// ---- the hub's stored records, version 1 (KV values of earlier hubs) ----------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdState {
    Queued,
    Sent,
    Accepted,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Rejected,
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: MsgId,
    pub node: String,
    pub method: String,
    pub domain: String,
    pub issued_at: u64,
    pub deadline: u64,
    pub state: CmdState,
    pub attempts: u32,
    pub last_attempt_at: u64,
    pub accepted_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub note: String,
    pub outcome: Option<Outcome>,
}

/// A version 1 hub stored the signed bytes; a version 2 hub stores the command and
/// signs each delivery for the unit's version and keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCommand {
    pub record: CommandRecord,
    pub signed: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub online_since: u64,
    pub hello: Hello,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOutcome {
    pub command: MsgId,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub finished_at: u64,
}

// ---- conversions ---------------------------------------------------------------------

impl From<&crate::Command> for Command {
    /// Drops `sent_at`: a version 1 unit judges deadlines by its own clock.
    fn from(c: &crate::Command) -> Self {
        Command {
            id: c.id,
            from: c.from.clone(),
            to: c.to.clone(),
            issued_at: c.issued_at,
            deadline: c.deadline,
            domain: c.domain.clone(),
            timeout_ms: c.timeout_ms,
            method: c.method.clone(),
        }
    }
}

impl From<Command> for crate::Command {
    fn from(c: Command) -> Self {
        crate::Command {
            id: c.id,
            from: c.from,
            to: c.to,
            issued_at: c.issued_at,
            deadline: c.deadline,
            domain: c.domain,
            timeout_ms: c.timeout_ms,
            method: c.method,
            sent_at: 0,
        }
    }
}

impl From<&crate::Status> for Status {
    /// `Expired` becomes `Failed` with the reason spelled out.
    fn from(s: &crate::Status) -> Self {
        match s {
            crate::Status::Succeeded => Status::Succeeded,
            crate::Status::Failed(r) => Status::Failed(r.clone()),
            crate::Status::TimedOut => Status::TimedOut,
            crate::Status::Rejected(r) => Status::Rejected(r.clone()),
            crate::Status::Expired(r) => Status::Failed(format!("expired before it started: {r}")),
        }
    }
}

impl From<Status> for crate::Status {
    fn from(s: Status) -> Self {
        match s {
            Status::Succeeded => crate::Status::Succeeded,
            Status::Failed(r) => crate::Status::Failed(r),
            Status::TimedOut => crate::Status::TimedOut,
            Status::Rejected(r) => crate::Status::Rejected(r),
        }
    }
}

impl From<&crate::Recorded> for Recorded {
    fn from(r: &crate::Recorded) -> Self {
        match r {
            crate::Recorded::Pending => Recorded::Pending,
            crate::Recorded::Finished(s) => Recorded::Finished(s.into()),
        }
    }
}

impl From<Recorded> for crate::Recorded {
    fn from(r: Recorded) -> Self {
        match r {
            Recorded::Pending => crate::Recorded::Pending,
            Recorded::Finished(s) => crate::Recorded::Finished(s.into()),
        }
    }
}

impl From<&crate::Ack> for Ack {
    /// `Running` becomes `Accepted` (a version 1 hub has no running state to show).
    fn from(a: &crate::Ack) -> Self {
        Ack {
            command: a.command,
            kind: match &a.kind {
                crate::AckKind::Accepted | crate::AckKind::Running => AckKind::Accepted,
                crate::AckKind::Duplicate(r) => AckKind::Duplicate(r.into()),
                crate::AckKind::Rejected(r) => AckKind::Rejected(r.clone()),
                crate::AckKind::Busy => AckKind::Busy,
            },
        }
    }
}

impl From<Ack> for crate::Ack {
    fn from(a: Ack) -> Self {
        crate::Ack {
            command: a.command,
            kind: match a.kind {
                AckKind::Accepted => crate::AckKind::Accepted,
                AckKind::Duplicate(r) => crate::AckKind::Duplicate(r.into()),
                AckKind::Rejected(r) => crate::AckKind::Rejected(r),
                AckKind::Busy => crate::AckKind::Busy,
            },
        }
    }
}

impl From<&crate::Outcome> for Outcome {
    fn from(o: &crate::Outcome) -> Self {
        Outcome {
            command: o.command,
            status: (&o.status).into(),
            exit_code: o.exit_code,
            stdout: o.stdout.clone(),
            stderr: o.stderr.clone(),
            truncated: o.truncated,
            started_at: o.started_at,
            duration_ms: o.duration_ms,
        }
    }
}

impl From<Outcome> for crate::Outcome {
    fn from(o: Outcome) -> Self {
        crate::Outcome {
            command: o.command,
            status: o.status.into(),
            exit_code: o.exit_code,
            stdout: o.stdout,
            stderr: o.stderr,
            truncated: o.truncated,
            started_at: o.started_at,
            duration_ms: o.duration_ms,
        }
    }
}

impl From<&crate::Hello> for Hello {
    /// Drops what version 2 added (versions, methods, clock, keys).
    fn from(h: &crate::Hello) -> Self {
        Hello {
            agent_version: h.agent_version.clone(),
            arch: h.arch.clone(),
            os: h.os.clone(),
            kernel: h.kernel.clone(),
            uptime_s: h.uptime_s,
            agent_started_at: h.agent_started_at,
            labels: h.labels.clone(),
            outbox_depth: h.outbox_depth,
            pending: h.pending,
            interval_s: h.interval_s,
        }
    }
}

impl From<Hello> for crate::Hello {
    /// A version 1 unit speaks version 1 only and serves the version 1 methods; what
    /// its policy allows and its clock are unknown.
    fn from(h: Hello) -> Self {
        crate::Hello {
            agent_version: h.agent_version,
            arch: h.arch,
            os: h.os,
            kernel: h.kernel,
            uptime_s: h.uptime_s,
            agent_started_at: h.agent_started_at,
            labels: h.labels,
            outbox_depth: h.outbox_depth,
            pending: h.pending,
            interval_s: h.interval_s,
            proto_min: 1,
            proto_max: 1,
            methods: crate::V1_METHODS.iter().map(|m| m.to_string()).collect(),
            allowed: vec![],
            sent_at: 0,
            keys: vec![],
        }
    }
}

impl From<CmdState> for CurState {
    fn from(s: CmdState) -> Self {
        match s {
            CmdState::Queued => CurState::Queued,
            CmdState::Sent => CurState::Sent,
            CmdState::Accepted => CurState::Accepted,
            CmdState::Running => CurState::Running,
            CmdState::Succeeded => CurState::Succeeded,
            CmdState::Failed => CurState::Failed,
            CmdState::TimedOut => CurState::TimedOut,
            CmdState::Rejected => CurState::Rejected,
            CmdState::Expired => CurState::Expired,
        }
    }
}

impl From<CurState> for CmdState {
    /// `Cancelled` becomes `Failed` (the note says why).
    fn from(s: CurState) -> Self {
        match s {
            CurState::Queued => CmdState::Queued,
            CurState::Sent => CmdState::Sent,
            CurState::Accepted => CmdState::Accepted,
            CurState::Running => CmdState::Running,
            CurState::Succeeded => CmdState::Succeeded,
            CurState::Failed | CurState::Cancelled => CmdState::Failed,
            CurState::TimedOut => CmdState::TimedOut,
            CurState::Rejected => CmdState::Rejected,
            CurState::Expired => CmdState::Expired,
        }
    }
}

impl From<CommandRecord> for CurRecord {
    fn from(r: CommandRecord) -> Self {
        CurRecord {
            id: r.id,
            node: r.node,
            method: r.method,
            domain: r.domain,
            issued_at: r.issued_at,
            deadline: r.deadline,
            state: r.state.into(),
            attempts: r.attempts,
            last_attempt_at: r.last_attempt_at,
            accepted_at: r.accepted_at,
            finished_at: r.finished_at,
            note: r.note,
            outcome: r.outcome.map(Into::into),
            started_at: None,
            // A version 1 hub expired commands whatever it knew; keep what it decided.
            unconfirmed: false,
        }
    }
}

impl From<&CurRecord> for CommandRecord {
    fn from(r: &CurRecord) -> Self {
        CommandRecord {
            id: r.id,
            node: r.node.clone(),
            method: r.method.clone(),
            domain: r.domain.clone(),
            issued_at: r.issued_at,
            deadline: r.deadline,
            state: r.state.into(),
            attempts: r.attempts,
            last_attempt_at: r.last_attempt_at,
            accepted_at: r.accepted_at,
            finished_at: r.finished_at,
            note: r.note.clone(),
            outcome: r.outcome.as_ref().map(Into::into),
        }
    }
}

impl From<NodeRecord> for crate::api::NodeRecord {
    fn from(n: NodeRecord) -> Self {
        crate::api::NodeRecord {
            name: n.name,
            first_seen: n.first_seen,
            last_seen: n.last_seen,
            online_since: n.online_since,
            hello: n.hello.into(),
            clock_offset_ms: 0,
            hello_proto: 1,
        }
    }
}

impl From<&crate::api::NodeRecord> for NodeRecord {
    fn from(n: &crate::api::NodeRecord) -> Self {
        NodeRecord {
            name: n.name.clone(),
            first_seen: n.first_seen,
            last_seen: n.last_seen,
            online_since: n.online_since,
            hello: (&n.hello).into(),
        }
    }
}

impl From<LastOutcome> for crate::api::LastOutcome {
    fn from(l: LastOutcome) -> Self {
        crate::api::LastOutcome {
            command: l.command,
            status: l.status.into(),
            exit_code: l.exit_code,
            finished_at: l.finished_at,
        }
    }
}

impl From<&crate::api::LastOutcome> for LastOutcome {
    fn from(l: &crate::api::LastOutcome) -> Self {
        LastOutcome {
            command: l.command,
            status: (&l.status).into(),
            exit_code: l.exit_code,
            finished_at: l.finished_at,
        }
    }
}
