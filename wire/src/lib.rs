//! outpost's wire protocol: the only crate that defines types crossing the network.
//!
//! *Architecture Invariant*: no I/O, no tokio, no logging, no `usize` in any wire
//! type (32-bit units talk to a 64-bit hub). Every type deriving `Serialize` here is a
//! network boundary; enum variants are only ever appended. See `docs/wire-spec.md`
//! and its evolution rules (ADR 0010): a payload's first byte is the protocol version
//! it was written in; each side speaks a range of versions and writes for its peer.

pub mod api;
pub mod codec;
pub mod id;
pub mod limits;
pub mod msg;
pub mod names;
pub mod sign;
pub mod subject;
pub mod v1;

pub use codec::{DecodeError, Wire, decode, decode_versioned, encode, encode_for};
pub use id::MsgId;
pub use msg::*;

/// The oldest protocol version this build reads and writes: version 1 units and hubs
/// (every release before ADR 0010) keep working with this one.
pub const PROTOCOL_MIN: u8 = 1;
/// The newest protocol version this build speaks, and what it writes when it does
/// not know better. Bumped when a message gains a field or a variant.
pub const PROTOCOL: u8 = 2;

/// Largest payload outpost sends or accepts (NATS' own default `max_payload` is 1 MiB).
pub const MAX_PAYLOAD: u32 = 1024 * 1024;

/// Milliseconds since the Unix epoch, the one time unit on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
