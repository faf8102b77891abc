//! Command signing: ed25519 (ring) over the whole encoded command.
//!
//! A signed command is `encode_for(Command, v)` (the version byte included) followed
//! by the 64-byte signature of those bytes. The hub signs each delivery in the unit's
//! protocol version with a key the unit trusts; the unit verifies the bytes exactly as
//! received against each key it trusts before it decodes them, so there is no
//! canonical-encoding question and nothing unsigned is ever trusted.

use crate::{Command, DecodeError, decode_versioned, encode_for};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use std::fmt;

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Signing-key errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an ed25519 PKCS#8 private key")]
    BadPrivateKey,
    #[error("not an ed25519 public key: expected 64 hex digits")]
    BadPublicKey,
    #[error("the system random generator failed")]
    Random,
}

/// Why a signed command was not accepted as authentic.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("payload too short to hold a signature")]
    Short,
    #[error("signature does not verify against any hub key this unit trusts")]
    BadSignature,
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The hub's private command-signing key. `Debug` never shows the key.
pub struct SigningKey(Ed25519KeyPair);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public())
    }
}

impl SigningKey {
    /// A new random key as a PKCS#8 document (what the hub stores, mode 0600).
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| KeyError::Random)
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(SigningKey)
            .map_err(|_| KeyError::BadPrivateKey)
    }

    /// The public half, which units pin.
    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }

    /// Encode a command for a unit that speaks up to version `v`, and sign it: the
    /// bytes to publish.
    pub fn sign_for(&self, cmd: &Command, v: u8) -> Vec<u8> {
        let mut bytes = encode_for(cmd, v);
        let sig = self.0.sign(&bytes);
        bytes.extend_from_slice(sig.as_ref());
        bytes
    }

    /// Sign in this build's newest version.
    pub fn sign(&self, cmd: &Command) -> Vec<u8> {
        self.sign_for(cmd, crate::PROTOCOL)
    }
}

/// The hub's public command key, as units pin it (64 hex digits in their config).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return Err(KeyError::BadPublicKey);
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b =
                u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| KeyError::BadPublicKey)?;
        }
        Ok(PublicKey(k))
    }
}

/// Length of a key's id: its first bytes, as hellos list the keys a unit trusts.
pub const KEY_ID_LEN: usize = 8;

impl PublicKey {
    /// Check the signature, then decode. Fails closed: any doubt is an error.
    pub fn verify(&self, signed: &[u8]) -> Result<Command, VerifyError> {
        verify_any(std::slice::from_ref(self), signed).map(|v| v.command)
    }

    /// The key's short id (its first 8 bytes), as hellos report trusted keys.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&self.0[..KEY_ID_LEN]);
        id
    }
}

/// A command whose signature verified.
#[derive(Debug)]
pub struct Verified {
    pub command: Command,
    /// The protocol version it was written in: the unit answers in the same one.
    pub version: u8,
    /// Which of the trusted keys signed it.
    pub key: usize,
}

/// Check the signature against each trusted key in turn, then decode. Fails closed.
pub fn verify_any(keys: &[PublicKey], signed: &[u8]) -> Result<Verified, VerifyError> {
    let split = signed
        .len()
        .checked_sub(SIGNATURE_LEN)
        .filter(|&n| n > 0)
        .ok_or(VerifyError::Short)?;
    let (body, sig) = signed.split_at(split);
    let key = keys
        .iter()
        .position(|k| {
            UnparsedPublicKey::new(&ED25519, &k.0)
                .verify(body, sig)
                .is_ok()
        })
        .ok_or(VerifyError::BadSignature)?;
    let (command, version) = decode_versioned(body)?;
    Ok(Verified {
        command,
        version,
        key,
    })
}

/// Decode a signed command without checking its signature: only to learn which
/// command id (and version) to name in a rejection. Never act on the result.
pub fn peek_unverified(signed: &[u8]) -> Option<(Command, u8)> {
    let split = signed.len().checked_sub(SIGNATURE_LEN)?;
    decode_versioned(&signed[..split]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Method, MsgId};

    fn cmd() -> Command {
        Command {
            id: MsgId([7; 16]),
            from: "central".into(),
            to: "pi-17".into(),
            issued_at: 1,
            deadline: 2,
            domain: String::new(),
            timeout_ms: 0,
            method: Method::Ping,
            sent_at: 3,
        }
    }

    #[test]
    fn sign_verify_and_tamper() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let signed = key.sign(&cmd());
        assert_eq!(key.public().verify(&signed).unwrap(), cmd());
        for i in 0..signed.len() {
            let mut bad = signed.clone();
            bad[i] ^= 0x01;
            assert!(
                key.public().verify(&bad).is_err(),
                "flip at byte {i} accepted"
            );
        }
        let other = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        assert!(matches!(
            other.public().verify(&signed),
            Err(VerifyError::BadSignature)
        ));
        assert!(matches!(
            key.public().verify(&[1; 10]),
            Err(VerifyError::Short)
        ));
        assert_eq!(peek_unverified(&signed).unwrap().0.id, MsgId([7; 16]));
    }

    #[test]
    fn versions_and_key_sets() {
        let old = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let new = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let keys = [old.public(), new.public()];
        let v1 = new.sign_for(&cmd(), 1);
        assert_eq!(v1[0], 1);
        let got = verify_any(&keys, &v1).unwrap();
        assert_eq!((got.version, got.key), (1, 1));
        // Version 1 has no sent_at: it reads back as 0.
        assert_eq!(got.command.sent_at, 0);
        let v2 = old.sign(&cmd());
        let got = verify_any(&keys, &v2).unwrap();
        assert_eq!((got.version, got.key, got.command), (2, 0, cmd()));
        assert!(matches!(
            verify_any(&keys[1..], &v2),
            Err(VerifyError::BadSignature)
        ));
        assert_ne!(old.public().id(), new.public().id());
    }

    #[test]
    fn public_key_text_round_trip() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let text = key.public().to_string();
        assert_eq!(text.parse::<PublicKey>().unwrap(), key.public());
        assert!("abc".parse::<PublicKey>().is_err());
        assert!(!format!("{key:?}").contains("private"));
    }
}
