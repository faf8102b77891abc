//! Command signing: ed25519 (ring) over the whole encoded command.
//!
//! A signed command is `encode(Command)` followed by the 64-byte signature of those
//! bytes. The unit verifies the bytes exactly as received before it decodes them, so
//! there is no canonical-encoding question and nothing unsigned is ever trusted.

use crate::{Command, DecodeError, decode, encode};
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
    #[error("signature does not verify against the hub key")]
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

    /// Encode and sign a command: the bytes to publish.
    pub fn sign(&self, cmd: &Command) -> Vec<u8> {
        let mut bytes = encode(cmd);
        let sig = self.0.sign(&bytes);
        bytes.extend_from_slice(sig.as_ref());
        bytes
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

impl PublicKey {
    /// Check the signature, then decode. Fails closed: any doubt is an error.
    pub fn verify(&self, signed: &[u8]) -> Result<Command, VerifyError> {
        let split = signed
            .len()
            .checked_sub(SIGNATURE_LEN)
            .filter(|&n| n > 0)
            .ok_or(VerifyError::Short)?;
        let (body, sig) = signed.split_at(split);
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(body, sig)
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(decode(body)?)
    }
}

/// Decode a signed command without checking its signature: only to learn which
/// command id to name in a rejection. Never act on the result.
pub fn peek_unverified(signed: &[u8]) -> Option<Command> {
    let split = signed.len().checked_sub(SIGNATURE_LEN)?;
    decode(&signed[..split]).ok()
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
        assert_eq!(peek_unverified(&signed).unwrap().id, MsgId([7; 16]));
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
