//! The messages between hub and unit: `Command` (signed), `Ack`, `Outcome`, `Receipt`,
//! `Hello` and `Log`.
//!
//! *API Boundary*: postcard is not self-describing, so these definitions are the
//! schema. Append enum variants and never reorder them; add fields only with a
//! protocol version bump. `docs/wire-spec.md` gives the bytes.

use crate::MsgId;
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
    /// When the hub accepted it from the operator (ms since the epoch).
    pub issued_at: u64,
    /// After this instant (ms since the epoch) the unit must not start it.
    pub deadline: u64,
    /// What the command is for (`nginx`, `apache`, ...); may be empty.
    pub domain: String,
    /// How long the method may run on the unit, in ms; 0 means the unit's default.
    pub timeout_ms: u32,
    /// What to do.
    pub method: Method,
}

/// The built-in methods. Extension methods (methods.d) will be appended as a variant.
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
}

impl Method {
    /// The method's name as operators type it and the hub keys state by it.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Ping => "ping",
            Method::Exec(_) => "exec",
            Method::FileWrite(_) => "file.write",
            Method::FileRead(_) => "file.read",
        }
    }
}

/// Arguments of `exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Extra environment variables, added to the agent's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's own when absent.
    pub cwd: Option<String>,
}

/// Arguments of `file.write`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWrite {
    /// Absolute path of the file to write.
    pub path: String,
    /// Permission bits of the new file (e.g. 0o644).
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
    /// The unit's queue is full; the hub should deliver again later.
    Busy,
}

/// A unit's recorded state of a command it accepted earlier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recorded {
    /// Accepted, waiting for or in execution.
    Pending,
    /// Finished with this status; its outcome is in (or through) the unit's outbox.
    Finished(Status),
}

/// Why a unit refused a command: a code the hub can act on and a human detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectCode,
    pub detail: String,
}

/// The kinds of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The bytes did not decode as a command of this protocol version.
    Malformed,
    /// The signature is missing or does not verify against the pinned hub key.
    BadSignature,
    /// The command is addressed to another unit.
    WrongNode,
    /// The deadline passed before the unit could accept it.
    Expired,
    /// The unit's local policy does not allow it.
    NotAllowed,
    /// The arguments are invalid (empty argv, relative path, ...).
    BadArgs,
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
    /// True when output was cut at the unit's cap: never silently cut.
    pub truncated: bool,
    /// When the method started (ms since the epoch).
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
}

/// The hub's reply to an [`Outcome`]: it is stored, the unit may drop it from its outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub command: MsgId,
}

/// A unit's heartbeat and inventory, published on `<prefix>.hub.hello.<node>` at
/// connect and every `interval_s`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// outpost-edge version.
    pub agent_version: String,
    /// CPU architecture as Rust names it (`aarch64`, `arm`, `x86_64`).
    pub arch: String,
    /// Operating system and distribution, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Seconds since the unit booted.
    pub uptime_s: u64,
    /// When this agent process started (ms since the epoch): a change means a restart.
    pub agent_started_at: u64,
    /// Operator-given labels from the agent's config.
    pub labels: Vec<(String, String)>,
    /// Outcomes waiting in the outbox for a receipt.
    pub outbox_depth: u32,
    /// Commands accepted but not finished.
    pub pending: u32,
    /// Seconds until the next hello; the hub marks the unit offline after three misses.
    pub interval_s: u32,
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
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.detail)
    }
}
