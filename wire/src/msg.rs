//! The messages between hub and unit: `Command` (signed), `Ack`, `Started`, `Outcome`,
//! `Receipt`, `Hello` and its `HelloReply`, and `Log`, as protocol version 2 lays them
//! out. Version 1's layouts are frozen in [`crate::v1`].
//!
//! *API Boundary*: postcard is not self-describing, so these definitions are the
//! schema. Append fields at the end of a message and variants at the end of an enum,
//! never reorder, and bump [`crate::PROTOCOL`] when you do; write the new version's
//! layout into `docs/wire-spec.md` and a vector into `wire/tests/vectors.rs`.

use crate::{MsgId, since_v1, unchanged};
use serde::{Deserialize, Serialize};

/// What the hub asks a unit to do. Sent signed (see [`crate::sign`]) on
/// `<prefix>.node.<node>.cmd`; the NATS reply is the unit's [`Ack`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id; ACKs, outcomes and the hub's records all name the command by it.
    pub id: MsgId,
    /// The hub that issued it.
    pub from: String,
    /// The unit it is for; a unit rejects commands addressed to another.
    pub to: String,
    /// When the hub accepted it from the operator (ms since the epoch, hub clock).
    pub issued_at: u64,
    /// After this instant (ms since the epoch, **hub clock**) the unit must not start it.
    pub deadline: u64,
    /// What the command is for (`nginx`, `apache`, ...); may be empty.
    pub domain: String,
    /// How long the method may run on the unit, in ms; 0 means the unit's default.
    pub timeout_ms: u32,
    /// What to do.
    pub method: Method,
    /// Version 2: the hub's clock when it sent this delivery (ms since the epoch). Signed
    /// with the rest, it is the unit's source of hub time: deadlines mean the hub's
    /// clock, whatever the unit's own says (ADR 0011). 0 in a version 1 command.
    pub sent_at: u64,
}

/// The built-in methods. A unit lists the ones it serves in its hello; the hub never
/// sends one a unit does not list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// Answer with an empty success: proves the whole path works.
    Ping,
    /// Run a program directly (no shell).
    Exec(Exec),
    /// Write a file atomically (temporary file, fsync, rename).
    FileWrite(FileWrite),
    /// Read a file (up to `max_bytes`; longer files are reported truncated).
    FileRead(FileRead),
    /// Version 2: replace the set of hub command keys the unit trusts (key rotation).
    HubKeys(HubKeys),
}

/// The methods of protocol version 1, which every unit serves (a version 1 unit's
/// hello does not list them).
pub const V1_METHODS: &[&str] = &["ping", "exec", "file.write", "file.read"];

impl Method {
    /// The method's name as operators type it and the hub keys state by it.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Ping => "ping",
            Method::Exec(_) => "exec",
            Method::FileWrite(_) => "file.write",
            Method::FileRead(_) => "file.read",
            Method::HubKeys(_) => "hub.keys",
        }
    }
}

/// Arguments of `hub.keys`: the complete set of hub command keys (ed25519 public
/// keys) the unit trusts from now on. The unit refuses a set that leaves out the key
/// that signed this command, so a typo cannot lock the hub out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubKeys {
    pub keys: Vec<[u8; 32]>,
}

/// Most keys a unit trusts at once (the current and the next, and room to spare).
pub const MAX_HUB_KEYS: usize = 4;

/// Arguments of `exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Program and arguments; `argv[0]` without a `/` is looked up in the unit's fixed
    /// PATH, and must be allowed by the unit's `[allow] exec` patterns.
    pub argv: Vec<String>,
    /// Environment variables for the program; the unit allows only names in its
    /// `[allow] env` list and never the ones that change what a program runs.
    pub env: Vec<(String, String)>,
    /// Working directory; must be under the unit's `[allow] cwd` prefixes.
    pub cwd: Option<String>,
}

/// Arguments of `file.write`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWrite {
    /// Absolute path of the file to write.
    pub path: String,
    /// Permission bits of the new file (e.g. 0o644); setuid, setgid and sticky refused.
    pub mode: u32,
    /// The complete new contents.
    pub data: Vec<u8>,
}

/// Arguments of `file.read`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRead {
    /// Absolute path of the file to read.
    pub path: String,
    /// Read at most this many bytes; 0 means the unit's output cap.
    pub max_bytes: u32,
}

/// A unit's answer to a delivered command (the NATS reply to it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The command this answers.
    pub command: MsgId,
    pub kind: AckKind,
}

/// What the unit did with a delivered command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckKind {
    /// Decoded, verified, allowed, and durably queued: it will run exactly once.
    Accepted,
    /// Seen before; it is not run again. Carries what the unit recorded.
    Duplicate(Recorded),
    /// Refused; it will never run.
    Rejected(Rejection),
    /// Not recorded (queue full, duplicate memory full, state dir failing): deliver
    /// again later.
    Busy,
    /// Version 2: accepted and started at once (the `Started` report, coalesced).
    Running,
}

/// A unit's recorded state of a command it accepted earlier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recorded {
    /// Accepted, waiting for or in execution.
    Pending,
    /// Finished with this status; its outcome is in (or through) the unit's outbox.
    Finished(Status),
}

/// Why a unit refused a command: a code the hub can act on and a human detail
/// (at most [`crate::limits::MAX_REASON`] bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectCode,
    pub detail: String,
}

/// The kinds of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The bytes did not decode as a command of a protocol version the unit speaks.
    Malformed,
    /// The signature is missing or does not verify against the hub keys the unit trusts.
    BadSignature,
    /// The command is addressed to another unit.
    WrongNode,
    /// The deadline (hub clock) passed before the unit could accept it.
    Expired,
    /// The unit's local policy does not allow it.
    NotAllowed,
    /// The arguments are invalid (empty argv, relative path, ...).
    BadArgs,
}

/// Version 2, unit → hub on `<prefix>.hub.started.<node>` (a plain publish): a
/// command that waited in the unit's queue has started. Cheap and lossy on purpose:
/// the outcome carries `started_at` too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub command: MsgId,
    /// When it started (unit clock, ms since the epoch).
    pub at: u64,
}

/// The final result of a command on a unit. Sent as a NATS request on
/// `<prefix>.hub.result.<node>`; the hub's reply is a [`Receipt`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The command this is the outcome of.
    pub command: MsgId,
    pub status: Status,
    /// The process exit code, where a process ran and exited.
    pub exit_code: Option<i32>,
    /// Standard output (or the file contents for `file.read`), capped.
    pub stdout: Vec<u8>,
    /// Standard error, capped.
    pub stderr: Vec<u8>,
    /// True when output was cut at the unit's cap (or by the hub to fit its store):
    /// never silently cut.
    pub truncated: bool,
    /// When the method started (ms since the epoch, unit clock).
    pub started_at: u64,
    /// How long it ran, in ms.
    pub duration_ms: u32,
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Succeeded,
    /// Ran and failed; the reason is never empty.
    Failed(String),
    /// Killed after its timeout.
    TimedOut,
    /// Refused by the unit; never ran.
    Rejected(Rejection),
    /// Version 2: accepted, but its deadline (hub clock) passed before it could start
    /// (it waited behind others, or the unit was off); it never ran. A version 1 hub
    /// hears `Failed("expired before it started: …")`.
    Expired(String),
}

/// The hub's reply to an [`Outcome`]: it is stored, the unit may drop it from its outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub command: MsgId,
}

/// A unit's heartbeat and inventory, on `<prefix>.hub.hello.<node>` at connect and
/// every `interval_s`. Since version 2 it is a request: a hub that speaks version 2
/// answers with a [`HelloReply`]; silence means a version 1 hub (ADR 0010).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// outpost-edge version.
    pub agent_version: String,
    /// The agent's build: `aarch64`, `armv7`, `armv6`, else Rust's `target_arch`.
    pub arch: String,
    /// Operating system and distribution, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Seconds since the unit booted.
    pub uptime_s: u64,
    /// When this agent process started (ms since the epoch, unit clock): a change
    /// means a restart.
    pub agent_started_at: u64,
    /// Labels from the agent's config. Informational: the hub targets by the labels
    /// given at enrolment, never by what a unit says about itself.
    pub labels: Vec<(String, String)>,
    /// Outcomes waiting in the outbox for a receipt.
    pub outbox_depth: u32,
    /// Commands accepted but not finished.
    pub pending: u32,
    /// Seconds until the next hello; the hub marks the unit offline after three misses.
    pub interval_s: u32,
    /// Version 2: the protocol versions this agent speaks.
    pub proto_min: u8,
    pub proto_max: u8,
    /// Version 2: the methods this agent serves.
    pub methods: Vec<String>,
    /// Version 2: the methods its `[allow]` table lets run.
    pub allowed: Vec<String>,
    /// Version 2: the unit's clock when it sent this hello (ms since the epoch): the hub
    /// shows how far it is off.
    pub sent_at: u64,
    /// Version 2: the first 8 bytes of each hub command key this unit trusts, the key
    /// from its config first: the hub signs with one of them (key rotation, ADR 0005).
    pub keys: Vec<[u8; 8]>,
}

/// Version 2, the hub's reply to a [`Hello`] request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The protocol versions the hub speaks: the unit writes for `min(its, the hub's)`.
    pub proto_min: u8,
    pub proto_max: u8,
    /// The hub's clock when it answered (ms since the epoch): the unit's time source
    /// until a command brings a newer one.
    pub hub_time: u64,
}

/// A warning or error the unit wants the operator to see, on `<prefix>.hub.log.<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    pub level: Level,
    pub at: u64,
    pub message: String,
    /// The command it concerns, if any.
    pub command: Option<MsgId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Error,
    Warn,
    Info,
}

impl Status {
    /// A short lowercase word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed(_) => "failed",
            Status::TimedOut => "timed-out",
            Status::Rejected(_) => "rejected",
            Status::Expired(_) => "expired",
        }
    }

    /// The same status with its free text cut to [`crate::limits::MAX_REASON`] bytes.
    pub fn bounded(self) -> Status {
        use crate::limits::{MAX_REASON, truncate};
        match self {
            Status::Failed(r) => Status::Failed(truncate(&r, MAX_REASON)),
            Status::Expired(r) => Status::Expired(truncate(&r, MAX_REASON)),
            Status::Rejected(r) => Status::Rejected(r.bounded()),
            s => s,
        }
    }
}

impl Rejection {
    /// The same rejection with its detail cut to [`crate::limits::MAX_REASON`] bytes.
    pub fn bounded(self) -> Rejection {
        Rejection {
            detail: crate::limits::truncate(&self.detail, crate::limits::MAX_REASON),
            ..self
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.detail)
    }
}

since_v1!(
    Command => crate::v1::Command,
    Ack => crate::v1::Ack,
    Outcome => crate::v1::Outcome,
    Hello => crate::v1::Hello,
    Status => crate::v1::Status,
);
unchanged!(Receipt, Log, Rejection);
unchanged!(Started, since = 2);
unchanged!(HelloReply, since = 2);
