//! `hub.keys`: replace the hub keys the unit trusts (a key rotation). Run by the agent
//! as it is accepted, not from the queue: it must be judged against the key that
//! signed it, which the new set must keep (so a rotation can never lock the hub out).
//! Allowed when listed in `[allow] methods` (the example config lists it).

use crate::trust::Trust;
use outpost_wire::sign::PublicKey;
use outpost_wire::{HubKeys, MAX_HUB_KEYS, Outcome};

pub fn check_args(k: &HubKeys) -> Result<(), String> {
    if k.keys.is_empty() || k.keys.len() > MAX_HUB_KEYS {
        return Err(format!(
            "hub.keys needs 1 to {MAX_HUB_KEYS} keys, got {}",
            k.keys.len()
        ));
    }
    Ok(())
}

/// Replace the trusted set durably; the outcome says what happened.
pub fn run(trust: &mut Trust, keys: &HubKeys, signer: &PublicKey) -> Outcome {
    match trust.set(keys, signer) {
        Ok(()) => {
            tracing::info!(keys = keys.keys.len(), "hub keys replaced");
            super::ok(Vec::new(), false)
        }
        Err(e) => {
            tracing::warn!(error = %e, "hub.keys refused");
            super::failed(e.to_string())
        }
    }
}
