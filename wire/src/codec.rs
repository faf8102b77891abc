//! Payload codec: one version byte, then the postcard encoding of the message.
//!
//! Decoding untrusted bytes never panics and never allocates more than a small
//! multiple of the input: postcard reads lengths as varints and serde caps the
//! capacity it reserves up front, so a lying length prefix just runs out of input.

use crate::{MAX_PAYLOAD, PROTOCOL_VERSION};
use serde::{Serialize, de::DeserializeOwned};

/// Why bytes did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {got} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version { got: u8 },
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("{0} unexpected trailing bytes after the message")]
    Trailing(usize),
    #[error("non-canonical encoding (an over-long integer)")]
    NonCanonical,
}

/// Encode a message with the version byte in front.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let out = vec![PROTOCOL_VERSION];
    // Serialising into a Vec only fails for types postcard cannot represent
    // (maps with unknown length and the like), which no wire type is.
    postcard::to_extend(msg, out).expect("wire types always serialise")
}

/// Decode a message, checking the version byte, the size limit, that every byte was
/// used, and that the bytes are the one canonical encoding of the value (postcard
/// itself accepts over-long varints), so each message has exactly one byte form.
pub fn decode<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MAX_PAYLOAD as usize {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version { got: version });
    }
    let (msg, tail) =
        postcard::take_from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !tail.is_empty() {
        return Err(DecodeError::Trailing(tail.len()));
    }
    if encode(&msg) != bytes {
        return Err(DecodeError::NonCanonical);
    }
    Ok(msg)
}
