//! The operator API (CLI → hub over `<prefix>.api.*`) and the records the hub keeps
//! in JetStream key-value buckets. Both cross the network, so both live here.

use crate::{Hello, Method, MsgId, Outcome, Status};
use serde::{Deserialize, Serialize};

/// `<prefix>.api.send`: queue a command. The id is chosen by the caller, so a
/// retried request after a lost reply does not queue the command twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub id: MsgId,
    pub to: String,
    pub domain: String,
    pub method: Method,
    /// Execution timeout on the unit in ms (0: the unit's default).
    pub timeout_ms: u32,
    /// How long the hub keeps trying to deliver, in ms from now.
    pub ttl_ms: u64,
}

/// `<prefix>.api.send_many`: the same command to many units in one call (at most
/// [`MAX_TARGETS`]; callers split longer lists). Each target carries its own command
/// id, chosen by the caller as for `send`, so a retried call queues nothing twice.
/// Reply: one entry per target, in order: its record, or why it was not queued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendManyRequest {
    pub targets: Vec<Target>,
    pub domain: String,
    pub method: Method,
    /// Execution timeout on the unit in ms (0: the unit's default).
    pub timeout_ms: u32,
    /// How long the hub keeps trying to deliver, in ms from now.
    pub ttl_ms: u64,
}

/// One unit of a [`SendManyRequest`] and the id its command gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub to: String,
    pub id: MsgId,
}

/// The reply to `send_many`.
pub type SendManyReply = Vec<Result<CommandRecord, String>>;

/// Most targets one `send_many` call may name: about 100 KiB of request and of reply.
pub const MAX_TARGETS: u32 = 1000;

/// `<prefix>.api.show`: one command's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowRequest {
    pub id: MsgId,
}

/// `<prefix>.api.nodes`: every known unit (the request body is empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesRequest {}

/// Every API reply: the value, or an error message for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiReply<T> {
    Ok(T),
    Err(String),
}

/// Where a command stands (DESIGN §4). The last five are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CmdState {
    /// Persisted, not yet delivered.
    Queued,
    /// Delivered at least once, not yet acknowledged.
    Sent,
    /// The unit acknowledged it: it will run exactly once.
    Accepted,
    /// The unit reported it running.
    Running,
    Succeeded,
    Failed,
    TimedOut,
    /// The unit refused it; it never ran.
    Rejected,
    /// The deadline passed before any unit accepted it; it never runs.
    Expired,
}

impl CmdState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CmdState::Succeeded
                | CmdState::Failed
                | CmdState::TimedOut
                | CmdState::Rejected
                | CmdState::Expired
        )
    }

    pub fn word(self) -> &'static str {
        match self {
            CmdState::Queued => "queued",
            CmdState::Sent => "sent",
            CmdState::Accepted => "accepted",
            CmdState::Running => "running",
            CmdState::Succeeded => "succeeded",
            CmdState::Failed => "failed",
            CmdState::TimedOut => "timed-out",
            CmdState::Rejected => "rejected",
            CmdState::Expired => "expired",
        }
    }

    /// The final state an outcome status puts a command in.
    pub fn of(status: &Status) -> CmdState {
        match status {
            Status::Succeeded => CmdState::Succeeded,
            Status::Failed(_) => CmdState::Failed,
            Status::TimedOut => CmdState::TimedOut,
            Status::Rejected(_) => CmdState::Rejected,
        }
    }
}

/// The hub's record of one command, as stored and as shown to operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: MsgId,
    pub node: String,
    pub method: String,
    pub domain: String,
    pub issued_at: u64,
    pub deadline: u64,
    pub state: CmdState,
    /// Deliveries so far.
    pub attempts: u32,
    pub last_attempt_at: u64,
    pub accepted_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// The last thing worth telling the operator (delivery error, rejection reason).
    pub note: String,
    pub outcome: Option<Outcome>,
}

/// What the hub persists per command: the record and the exact signed bytes it
/// re-sends, so a restarted hub delivers the same command, not a new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCommand {
    pub record: CommandRecord,
    pub signed: Vec<u8>,
}

/// The hub's record of one unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub first_seen: u64,
    pub last_seen: u64,
    /// When the unit last came (back) online after being offline or unknown.
    pub online_since: u64,
    pub hello: Hello,
}

/// A unit as `outpost-hub nodes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub online: bool,
    /// Online since, or offline since (last hello plus the grace period).
    pub since: u64,
    pub last_seen: u64,
    pub arch: String,
    pub os: String,
    pub kernel: String,
    pub agent_version: String,
    /// When the unit's agent process started (its clock, ms since the epoch): a newer
    /// value than before a restart means the restarted agent has said hello.
    pub agent_started_at: u64,
    pub labels: Vec<(String, String)>,
    /// Commands for it that are not final yet.
    pub pending: u32,
}

/// The last outcome per (node, method, domain): the state the hub knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOutcome {
    pub command: MsgId,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub finished_at: u64,
}
