//! The hub's command-signing keys and which one signs for which unit.
//!
//! Rotation without reconfiguring a fleet (ADR 0005): besides the key units are
//! enrolled with, the hub may hold the next key. Each unit lists, in its hellos, the
//! ids of the hub keys it trusts; the hub signs with the next key for a unit that
//! trusts it and with the enrolment key otherwise (a version 1 agent, or one never
//! seen, trusts only what its config pins). A unit learns a new key from a signed
//! `hub.keys` command, so the hub can bring in a key, move every unit to it (offline
//! units when they return), retire the old one, and keep commands flowing throughout.

use outpost_wire::sign::{KEY_ID_LEN, SigningKey};
use std::path::Path;

/// Why the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("signing key {path}: {source}")]
    Bad {
        path: String,
        source: outpost_wire::sign::KeyError,
    },
}

/// The hub's signing keys: the one units are enrolled with (the key their config
/// pins), and during a rotation the next one.
#[derive(Debug)]
pub struct Keys {
    primary: SigningKey,
    next: Option<SigningKey>,
}

fn load_one(p: &Path) -> Result<SigningKey, KeysError> {
    let path = p.display().to_string();
    let der = std::fs::read(p).map_err(|source| KeysError::Read {
        path: path.clone(),
        source,
    })?;
    SigningKey::from_pkcs8(&der).map_err(|source| KeysError::Bad { path, source })
}

impl Keys {
    pub fn new(primary: SigningKey, next: Option<SigningKey>) -> Keys {
        Keys { primary, next }
    }

    /// Read the PKCS#8 key files.
    pub fn load(primary: &Path, next: Option<&Path>) -> Result<Keys, KeysError> {
        Ok(Keys {
            primary: load_one(primary)?,
            next: next.map(load_one).transpose()?,
        })
    }

    /// The key to sign with for a unit that trusts `trusted` (key ids; empty: it has
    /// not said, so it trusts what it was enrolled with).
    pub fn for_peer(&self, trusted: &[[u8; KEY_ID_LEN]]) -> &SigningKey {
        match &self.next {
            Some(n) if trusted.contains(&n.public().id()) => n,
            _ => &self.primary,
        }
    }

    /// Whether `public` is one of this hub's keys (the enrolment key or the next):
    /// the only keys a `hub.keys` command may tell units to trust.
    pub fn is_ours(&self, public: &[u8; 32]) -> bool {
        std::iter::once(&self.primary)
            .chain(self.next.as_ref())
            .any(|k| &k.public().0 == public)
    }

    pub fn primary(&self) -> &SigningKey {
        &self.primary
    }

    pub fn next(&self) -> Option<&SigningKey> {
        self.next.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    #[test]
    fn signs_with_the_next_key_once_the_unit_trusts_it() {
        let keys = Keys::new(key(), Some(key()));
        let (old, new) = (keys.primary().public(), keys.next().unwrap().public());
        assert_eq!(
            keys.for_peer(&[]).public(),
            old,
            "unknown: the enrolment key"
        );
        assert_eq!(keys.for_peer(&[old.id()]).public(), old);
        assert_eq!(keys.for_peer(&[old.id(), new.id()]).public(), new);
        assert_eq!(keys.for_peer(&[new.id()]).public(), new);
    }
}
