//! The hub command keys this unit trusts. The config names the key(s) the unit was
//! enrolled with; a signed `hub.keys` command replaces the set, and the new set is
//! kept in the state dir (`hub-keys`, one key in hex per line, written atomically) and
//! wins over the config from then on. See ADR 0005, key rotation.

use outpost_wire::sign::{KEY_ID_LEN, PublicKey};
use outpost_wire::{HubKeys, MAX_HUB_KEYS};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file in the state dir.
pub const FILE: &str = "hub-keys";

/// Why a key set was refused or could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("hub.keys needs 1 to {MAX_HUB_KEYS} keys, got {0}")]
    Count(usize),
    #[error("hub.keys leaves out the key that signed it: the hub would be locked out")]
    LocksOut,
    #[error("cannot keep the hub keys in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {why} (delete it to go back to the config's hub_key)")]
    Damaged { path: PathBuf, why: String },
}

/// The trusted keys, in order (the config's first, unless a `hub.keys` said otherwise).
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Vec<PublicKey>,
    path: PathBuf,
}

impl Trust {
    /// The set kept in `state_dir`, else the config's.
    pub fn load(state_dir: &Path, config: &[PublicKey]) -> Result<Trust, TrustError> {
        let path = state_dir.join(FILE);
        let keys = match fs::read_to_string(&path) {
            Ok(text) => {
                let keys: Result<Vec<PublicKey>, _> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::parse)
                    .collect();
                let keys = keys.map_err(|e| TrustError::Damaged {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
                if keys.is_empty() || keys.len() > MAX_HUB_KEYS {
                    return Err(TrustError::Damaged {
                        path,
                        why: format!("{} keys", keys.len()),
                    });
                }
                keys
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => config.to_vec(),
            Err(source) => return Err(TrustError::Io { path, source }),
        };
        Ok(Trust { keys, path })
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Short ids, as hellos list them.
    pub fn ids(&self) -> Vec<[u8; KEY_ID_LEN]> {
        self.keys.iter().map(PublicKey::id).collect()
    }

    /// Replace the set (a `hub.keys` command signed by `signer`), durably.
    pub fn set(&mut self, new: &HubKeys, signer: &PublicKey) -> Result<(), TrustError> {
        if new.keys.is_empty() || new.keys.len() > MAX_HUB_KEYS {
            return Err(TrustError::Count(new.keys.len()));
        }
        let keys: Vec<PublicKey> = new.keys.iter().map(|k| PublicKey(*k)).collect();
        if !keys.contains(signer) {
            return Err(TrustError::LocksOut);
        }
        let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
        let io = |source| TrustError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        self.keys = keys;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_set_is_kept_and_must_include_its_signer() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut t = Trust::load(dir.path(), &[a]).unwrap();
        assert_eq!(t.keys(), &[a]);
        assert!(matches!(
            t.set(
                &HubKeys {
                    keys: vec![[2; 32]]
                },
                &a
            ),
            Err(TrustError::LocksOut)
        ));
        assert!(matches!(
            t.set(&HubKeys { keys: vec![] }, &a),
            Err(TrustError::Count(0))
        ));
        t.set(
            &HubKeys {
                keys: vec![[1; 32], [2; 32]],
            },
            &a,
        )
        .unwrap();
        // Kept across a restart, over what the config says.
        let t = Trust::load(dir.path(), &[a]).unwrap();
        assert_eq!(t.keys(), &[a, b]);
        std::fs::write(dir.path().join(FILE), "zz\n").unwrap();
        assert!(matches!(
            Trust::load(dir.path(), &[a]),
            Err(TrustError::Damaged { .. })
        ));
    }
}
