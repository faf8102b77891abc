//! outpost's wire protocol: the only crate that defines types crossing the network.
//!
//! *Architecture Invariant*: no I/O, no tokio, no logging, no `usize` in any wire
//! type (32-bit units talk to a 64-bit hub). Every type deriving `Serialize` here is a
//! network boundary; enum variants are only ever appended. See `docs/wire-spec.md`.

pub mod api;
pub mod codec;
pub mod id;
pub mod msg;
pub mod names;
pub mod sign;
pub mod subject;

pub use codec::{DecodeError, decode, encode};
pub use id::MsgId;
pub use msg::*;

/// The first byte of every payload. Bumped only for an incompatible change.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest payload outpost sends or accepts (NATS' own default `max_payload` is 1 MiB).
pub const MAX_PAYLOAD: u32 = 1024 * 1024;

/// Milliseconds since the Unix epoch, the one time unit on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
