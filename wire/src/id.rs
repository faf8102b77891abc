//! 128-bit message ids: 48-bit milliseconds, a 16-bit per-process sequence, 64
//! random bits (the layout of UUIDv7 with a counter).
//!
//! Ids made by one process are strictly increasing, even within one millisecond or
//! when the clock steps back, so a sequence of commands from one operator sorts in the
//! order it was made; ids from different processes are unique by their random bits.

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

/// A unique message id; commands are known everywhere by theirs.
/// On the wire (postcard) it is 16 raw bytes; in JSON it is 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub [u8; 16]);

impl MsgId {
    /// A new id stamped with `now_ms` (or later, to stay above this process's last id).
    pub fn new(now_ms: u64) -> Self {
        static LAST: Mutex<(u64, u16)> = Mutex::new((0, 0));
        let (ms, seq) = {
            let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
            *last = if now_ms > last.0 {
                (now_ms, 0)
            } else if last.1 == u16::MAX {
                (last.0 + 1, 0)
            } else {
                (last.0, last.1 + 1)
            };
            *last
        };
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        b[6..8].copy_from_slice(&seq.to_be_bytes());
        // SystemRandom only fails when the OS has no entropy source at all; the
        // sequence still keeps this process's ids unique then.
        let _ = SystemRandom::new().fill(&mut b[8..]);
        MsgId(b)
    }

    /// The millisecond timestamp the id was made at.
    pub fn millis(&self) -> u64 {
        let mut t = [0u8; 8];
        t[2..].copy_from_slice(&self.0[..6]);
        u64::from_be_bytes(t)
    }
}

impl Serialize for MsgId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for MsgId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(d).map(MsgId)
        }
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MsgId({self})")
    }
}

/// The text was not 32 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("invalid command id {0:?}: expected 32 hex digits")]
pub struct ParseIdError(pub String);

impl FromStr for MsgId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError(s.to_string());
        if s.len() != 32 || !s.is_ascii() {
            return Err(err());
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(MsgId(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered_unique_and_monotonic() {
        let a = MsgId::new(1_700_000_000_000);
        let b = MsgId::new(1_700_000_000_001);
        let c = MsgId::new(1_700_000_000_001);
        let d = MsgId::new(1_600_000_000_000); // clock stepped back
        assert!(a < b && b < c && c < d);
        assert_eq!(a.millis(), 1_700_000_000_000);
        let many: Vec<MsgId> = (0..70_000).map(|_| MsgId::new(5)).collect();
        assert!(many.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let a = MsgId::new(5);
        assert_eq!(a.to_string().parse::<MsgId>().unwrap(), a);
        assert!("xyz".parse::<MsgId>().is_err());
        assert!("zz".repeat(16).parse::<MsgId>().is_err());
    }
}
