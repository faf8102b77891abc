//! Payload codec: one version byte, then the postcard encoding of the message as that
//! protocol version lays it out.
//!
//! The evolution rule (docs/wire-spec.md, ADR 0010): version N+1 of a message is
//! version N with fields appended at its end and enum variants appended; a writer
//! writes for the version its peer speaks, so a peer never sees a variant it does not
//! know. A reader takes every version from [`PROTOCOL_MIN`] to [`PROTOCOL`] exactly,
//! and a newer one by reading the fields it knows and ignoring what follows them.
//!
//! Decoding untrusted bytes never panics and never allocates more than a small
//! multiple of the input: postcard reads lengths as varints and serde caps the
//! capacity it reserves up front, so a lying length prefix just runs out of input.

use crate::{MAX_PAYLOAD, PROTOCOL, PROTOCOL_MIN};
use serde::{Serialize, de::DeserializeOwned};

/// Why bytes did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error(
        "protocol version {got} is not supported (this build speaks {PROTOCOL_MIN} to {PROTOCOL})"
    )]
    Version { got: u8 },
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("{0} unexpected trailing bytes after the message")]
    Trailing(usize),
    #[error("non-canonical encoding (an over-long integer)")]
    NonCanonical,
}

/// A message that crosses the network or sits in the hub's store, in every protocol
/// version it exists in.
pub trait Wire: Sized {
    /// The first protocol version that has this message.
    const SINCE: u8 = PROTOCOL_MIN;

    /// Append the postcard body of `self` as version `v` lays it out
    /// (`SINCE ≤ v ≤ PROTOCOL`).
    fn write_body(&self, v: u8, out: Vec<u8>) -> Vec<u8>;

    /// Read a body of version `v` (`SINCE ≤ v ≤ PROTOCOL`); return the bytes after it.
    fn read_body(v: u8, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error>;

    /// Whether a body of version `v` must be the one canonical encoding of its value.
    /// True for every message; false only where reading an old stored record drops
    /// what the current type no longer keeps.
    fn canonical(_v: u8) -> bool {
        true
    }
}

/// Append `value`'s postcard encoding. Serialising into a Vec only fails for types
/// postcard cannot represent (maps of unknown length and the like), which no wire
/// type is.
pub(crate) fn put<T: Serialize + ?Sized>(value: &T, out: Vec<u8>) -> Vec<u8> {
    postcard::to_extend(value, out).expect("wire types always serialise")
}

pub(crate) fn take<T: DeserializeOwned>(body: &[u8]) -> Result<(T, &[u8]), postcard::Error> {
    postcard::take_from_bytes(body)
}

/// Encode a message in this build's newest version.
pub fn encode<T: Wire>(msg: &T) -> Vec<u8> {
    encode_for(msg, PROTOCOL)
}

/// Encode a message for a peer that speaks up to version `peer` (clamped to what this
/// build speaks, and to the message's first version).
pub fn encode_for<T: Wire>(msg: &T, peer: u8) -> Vec<u8> {
    let v = peer.clamp(T::SINCE.max(PROTOCOL_MIN), PROTOCOL);
    msg.write_body(v, vec![v])
}

/// Decode a message of any version this build reads.
pub fn decode<T: Wire>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_versioned(bytes).map(|(m, _)| m)
}

/// Decode a message and say which version it was written in. Checks the size limit,
/// the version, that every byte was used (up to the fields a newer version appended),
/// and that the bytes are the one canonical encoding of the value (postcard itself
/// accepts over-long varints), so each message has exactly one byte form.
pub fn decode_versioned<T: Wire>(bytes: &[u8]) -> Result<(T, u8), DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MAX_PAYLOAD as usize {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if version < T::SINCE.max(PROTOCOL_MIN) {
        return Err(DecodeError::Version { got: version });
    }
    // A newer version is this one with fields appended: read what this build knows.
    let as_v = version.min(PROTOCOL);
    let (msg, tail) =
        T::read_body(as_v, body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if version <= PROTOCOL && !tail.is_empty() {
        return Err(DecodeError::Trailing(tail.len()));
    }
    let used = &body[..body.len() - tail.len()];
    if T::canonical(as_v) && msg.write_body(as_v, Vec::with_capacity(used.len())) != used {
        return Err(DecodeError::NonCanonical);
    }
    Ok((msg, version))
}

/// `Wire` for types laid out the same in every version they exist in: plain postcard.
/// `unchanged!(T)` for a type of version 1; `unchanged!(T, since = 2)` for a newer one.
#[macro_export]
#[doc(hidden)]
macro_rules! unchanged {
    ($($t:ty),+ $(,)?) => { $( $crate::unchanged!(@one $t, $crate::PROTOCOL_MIN); )+ };
    ($t:ty, since = $v:expr) => { $crate::unchanged!(@one $t, $v); };
    (@one $t:ty, $since:expr) => {
        impl $crate::codec::Wire for $t {
            const SINCE: u8 = $since;
            fn write_body(&self, _v: u8, out: Vec<u8>) -> Vec<u8> {
                $crate::codec::put(self, out)
            }
            fn read_body(_v: u8, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
                $crate::codec::take(body)
            }
        }
    };
}

/// `Wire` for a type whose version 1 layout is frozen in [`crate::v1`]: version 1 is
/// written and read through that type and the conversions between the two, every
/// later version as the current type.
#[macro_export]
#[doc(hidden)]
macro_rules! since_v1 {
    ($($t:ty => $old:ty),+ $(,)?) => { $(
        impl $crate::codec::Wire for $t {
            fn write_body(&self, v: u8, out: Vec<u8>) -> Vec<u8> {
                if v == 1 {
                    $crate::codec::put(&<$old>::from(self), out)
                } else {
                    $crate::codec::put(self, out)
                }
            }
            fn read_body(v: u8, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
                if v == 1 {
                    $crate::codec::take::<$old>(body).map(|(m, rest)| (m.into(), rest))
                } else {
                    $crate::codec::take(body)
                }
            }
        }
    )+ };
}

// Plain values, for tests and tools.
unchanged!(u32, u64, String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_errors() {
        assert_eq!(decode::<u32>(&[]), Err(DecodeError::Empty));
        assert_eq!(decode::<u32>(&[0, 1]), Err(DecodeError::Version { got: 0 }));
        assert_eq!(decode::<u32>(&[1, 5]), Ok(5));
        assert_eq!(decode_versioned::<u32>(&[2, 5]), Ok((5, 2)));
        assert_eq!(decode::<u32>(&[1, 5, 0]), Err(DecodeError::Trailing(1)));
        // A newer version: the fields this build knows, then appended ones it skips.
        assert_eq!(decode_versioned::<u32>(&[200, 5, 9, 9]), Ok((5, 200)));
        assert_eq!(
            decode::<u32>(&[1, 0x80, 0x00]),
            Err(DecodeError::NonCanonical)
        );
        assert_eq!(encode_for(&5u32, 0), vec![PROTOCOL_MIN, 5]);
        assert_eq!(encode_for(&5u32, 250), vec![PROTOCOL, 5]);
    }
}
