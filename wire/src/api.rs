//! The operator API (CLI → hub over `<prefix>.api.*`) and the records the hub keeps
//! in JetStream key-value buckets. Both cross the network, so both live here.
//!
//! The API speaks version 2 only (an older CLI gets a clear version error from its own
//! decoder); the stored records are read in every version, so a hub upgraded in place
//! reads what the previous one wrote.

use crate::codec::{Wire, put, take};
use crate::{Command, Hello, Method, MsgId, Outcome, Status, since_v1, unchanged};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

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
pub type SendManyReply = Vec<Result<CommandRecord, ApiError>>;

/// Most targets one `send_many` call may name: about 100 KiB of request and of reply.
pub const MAX_TARGETS: u32 = 1000;

/// `<prefix>.api.show`: one command's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowRequest {
    pub id: MsgId,
}

/// `<prefix>.api.nodes`: one page of the units that match, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesRequest {
    /// Start after this name (the `next` of the previous page); empty for the first.
    pub after: String,
    /// Units per page; 0 means the hub's default. The hub also ends a page before its
    /// reply would pass [`MAX_PAGE_BYTES`].
    pub limit: u32,
    /// Only units online (`Some(true)`) or offline (`Some(false)`).
    pub online: Option<bool>,
    /// Only names matching this glob (`*`, `?`); empty for all.
    pub name: String,
    /// Only units whose enrolment labels match this selector
    /// (`site=oslo,role!=camera,tier in (a,b)`); empty for all.
    pub selector: String,
}

/// Reply to `nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesPage {
    pub nodes: Vec<NodeView>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
    /// Units that match the filter in all (every page). With a filter (name, selector
    /// or online) it is counted for the first page only (empty `after`) and 0 on the
    /// pages after it: counting is a pass over the whole fleet.
    pub matched: u32,
}

/// Units per `nodes` page unless the caller asks otherwise, and at most.
pub const DEFAULT_PAGE: u32 = 500;
pub const MAX_PAGE: u32 = 5000;
/// A page ends before its encoded reply passes this (half the payload limit).
pub const MAX_PAGE_BYTES: u32 = 512 * 1024;

/// `<prefix>.api.node`: one unit by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRequest {
    pub name: String,
}

/// Every API reply: the value, or a typed error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiReply<T> {
    Ok(T),
    Err(ApiError),
}

/// Why the hub did not do what was asked: a code a program can act on and a message
/// for a human (lowercase, naming the input, with a hint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// The kinds of API error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request is malformed or a field is invalid (a name, a deadline, a selector).
    BadRequest,
    /// No enrolled unit has that name.
    UnknownUnit,
    /// No command has that id (or it is older than the hub's retention).
    UnknownCommand,
    /// The unit does not serve that method (its agent is too old, or lacks it).
    Unsupported,
    /// The unit's own allow-list refuses that method (from its last hello).
    NotAllowed,
    /// The command or reply would be over a size limit.
    TooLarge,
    /// The unit is revoked.
    Revoked,
    /// The hub's store failed; retry later.
    Unavailable,
    /// The API call does not exist in this hub.
    UnknownCall,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// Where a command stands (ADR 0011 has the transition table). The last six are final.
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
    /// Its deadline passed before it started; it never ran. Final only when the hub
    /// knows the unit never accepted it, or the unit said so (ADR 0011).
    Expired,
    /// Version 2: stopped by the hub (the unit was revoked); it never ran, or its
    /// outcome will not be waited for.
    Cancelled,
}

impl CmdState {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CmdState::Queued | CmdState::Sent | CmdState::Accepted | CmdState::Running
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
            CmdState::Cancelled => "cancelled",
        }
    }

    /// The final state an outcome status puts a command in.
    pub fn of(status: &Status) -> CmdState {
        match status {
            Status::Succeeded => CmdState::Succeeded,
            Status::Failed(_) => CmdState::Failed,
            Status::TimedOut => CmdState::TimedOut,
            Status::Rejected(_) => CmdState::Rejected,
            Status::Expired(_) => CmdState::Expired,
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
    /// Hub clock.
    pub deadline: u64,
    pub state: CmdState,
    /// Deliveries so far.
    pub attempts: u32,
    pub last_attempt_at: u64,
    pub accepted_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// The last thing worth telling the operator (delivery error, rejection reason),
    /// at most [`crate::limits::MAX_NOTE`] bytes.
    pub note: String,
    pub outcome: Option<Outcome>,
    /// Version 2: when it started, in hub time (when the hub received the `Running`
    /// ACK or the `Started` report).
    pub started_at: Option<u64>,
    /// Version 2: a delivery may have reached the unit without its answer reaching
    /// the hub (an ACK lost or late). While it is set, a passed deadline does not make
    /// the command `Expired`: only the unit can say whether it accepted it (ADR 0011).
    pub unconfirmed: bool,
}

/// What the hub persists per command: the record and the command itself, which the
/// hub signs for each delivery in the unit's protocol version with a key the unit
/// trusts. A version 2 delivery carries its `sent_at`, so its bytes differ each time;
/// the id is what makes it the same command to the unit (a re-delivery is a
/// duplicate, never a new run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCommand {
    pub record: CommandRecord,
    pub command: Command,
}

/// The hub's record of one unit, from its hellos.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub first_seen: u64,
    pub last_seen: u64,
    /// When the unit last came (back) online after being offline or unknown.
    pub online_since: u64,
    /// The last hello, its strings and lists bounded (`crate::limits`).
    pub hello: Hello,
    /// Version 2: the unit's clock minus the hub's when the hello arrived (ms); 0 when
    /// unknown (a version 1 unit sends no clock).
    pub clock_offset_ms: i64,
    /// Version 2: the protocol version of that hello.
    pub hello_proto: u8,
}

/// A unit as `outpost-hub nodes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub online: bool,
    /// Online since, or offline since (last hello plus the grace period); 0: never seen.
    pub since: u64,
    pub last_seen: u64,
    pub arch: String,
    pub os: String,
    pub kernel: String,
    pub agent_version: String,
    /// When the unit's agent process started (its clock, ms since the epoch): a newer
    /// value than before a restart means the restarted agent has said hello.
    pub agent_started_at: u64,
    /// The labels given at enrolment: what selectors match.
    pub labels: Vec<(String, String)>,
    /// Commands for it that are not final yet.
    pub pending: u32,
    /// Enrolled (in the hub's enrolment list); a unit that is not was revoked or
    /// never enrolled and only has history here.
    pub enrolled: bool,
    /// The protocol versions its agent speaks (0, 0 before its first hello).
    pub proto_min: u8,
    pub proto_max: u8,
    /// The methods its agent serves and the ones its allow-list lets run.
    pub methods: Vec<String>,
    pub allowed: Vec<String>,
    /// The unit's clock minus the hub's (ms), when the unit reports its clock.
    pub clock_offset_ms: Option<i64>,
}

/// The last outcome per (node, method, domain): the state the hub knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOutcome {
    pub command: MsgId,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub finished_at: u64,
}

since_v1!(
    CommandRecord => crate::v1::CommandRecord,
    NodeRecord => crate::v1::NodeRecord,
    LastOutcome => crate::v1::LastOutcome,
);
unchanged!(SendRequest, since = 2);
unchanged!(SendManyRequest, since = 2);
unchanged!(ShowRequest, since = 2);
unchanged!(NodesRequest, since = 2);
unchanged!(NodesPage, since = 2);
unchanged!(NodeRequest, since = 2);
unchanged!(NodeView, since = 2);

impl Wire for StoredCommand {
    fn write_body(&self, v: u8, out: Vec<u8>) -> Vec<u8> {
        if v == 1 {
            // Only tests write version 1 records (to prove an upgraded hub reads them);
            // the signature of a version 1 record is not kept, the unit checks anew.
            let signed = crate::encode_for(&self.command, 1);
            let old = crate::v1::StoredCommand {
                record: (&self.record).into(),
                signed,
            };
            put(&old, out)
        } else {
            put(self, out)
        }
    }

    /// A version 1 record carried the signature, which is not kept: it cannot be
    /// written back byte for byte.
    fn canonical(v: u8) -> bool {
        v != 1
    }

    fn read_body(v: u8, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        if v != 1 {
            return take(body);
        }
        let (old, rest) = take::<crate::v1::StoredCommand>(body)?;
        // The signed bytes are a version 1 command and its 64-byte signature.
        let unsigned = old
            .signed
            .len()
            .checked_sub(crate::sign::SIGNATURE_LEN)
            .map(|n| &old.signed[..n])
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        let command: Command =
            crate::decode(unsigned).map_err(|_| postcard::Error::DeserializeBadEncoding)?;
        Ok((
            StoredCommand {
                record: old.record.into(),
                command,
            },
            rest,
        ))
    }
}

impl<T: Serialize + DeserializeOwned> Wire for ApiReply<T> {
    const SINCE: u8 = 2;
    fn write_body(&self, _v: u8, out: Vec<u8>) -> Vec<u8> {
        put(self, out)
    }
    fn read_body(_v: u8, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        take(body)
    }
}
