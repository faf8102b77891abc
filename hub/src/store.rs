//! The hub's state in JetStream key-value buckets: commands, nodes, and the last
//! outcome per (node, method, domain). There is no other database.
//!
//! Command records are updated by compare-and-set on the KV revision, so two writers
//! (two tasks now, two hub processes later) can never lose each other's transition.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::api::{LastOutcome, NodeRecord, StoredCommand};
use outpost_wire::{MsgId, decode, encode};

/// Largest value the command bucket accepts: an outcome with two capped outputs
/// plus the signed command, with room to spare under NATS' 1 MiB payload.
pub const MAX_VALUE: i32 = 1024 * 1024;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("jetstream: {0}")]
    Kv(String),
    #[error("record {key} in bucket {bucket} does not decode: {source}")]
    Decode {
        bucket: String,
        key: String,
        source: outpost_wire::DecodeError,
    },
}

/// Create `key` with `value`: its revision, or `None` when the key exists already.
async fn create_new(kv: &kv::Store, key: &str, value: Bytes) -> Result<Option<u64>, StoreError> {
    match kv.create(key, value).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(kv_err(e)),
    }
}

fn kv_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Kv(e.to_string())
}

/// The result of a compare-and-set.
pub enum Cas {
    Done(u64),
    /// Someone else wrote first: reload and try again.
    Conflict,
}

#[derive(Clone)]
pub struct Store {
    commands: kv::Store,
    nodes: kv::Store,
    last: kv::Store,
}

async fn bucket(
    js: &jetstream::Context,
    name: String,
    description: &str,
) -> Result<kv::Store, StoreError> {
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name,
        description: description.into(),
        history: 1,
        max_value_size: MAX_VALUE,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(kv_err)
}

fn key(id: &MsgId) -> String {
    id.to_string()
}

/// KV key of the last outcome per (node, method, domain); `_` stands for no domain.
pub fn last_key(node: &str, method: &str, domain: &str) -> String {
    let d = if domain.is_empty() { "_" } else { domain };
    format!("{node}.{method}.{d}")
}

impl Store {
    /// Open the buckets, creating them on first start.
    pub async fn open(js: &jetstream::Context, prefix: &str) -> Result<Store, StoreError> {
        Ok(Store {
            commands: bucket(js, format!("{prefix}-commands"), "outpost commands").await?,
            nodes: bucket(js, format!("{prefix}-nodes"), "outpost units").await?,
            last: bucket(
                js,
                format!("{prefix}-last"),
                "outpost last outcome per (node, method, domain)",
            )
            .await?,
        })
    }

    /// Persist a new command; `Ok(None)` when the id exists already.
    pub async fn create_command(&self, c: &StoredCommand) -> Result<Option<u64>, StoreError> {
        create_new(&self.commands, &key(&c.record.id), Bytes::from(encode(c))).await
    }

    pub async fn get_command(
        &self,
        id: &MsgId,
    ) -> Result<Option<(StoredCommand, u64)>, StoreError> {
        let k = key(id);
        let Some(entry) = self.commands.entry(k.clone()).await.map_err(kv_err)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let c = decode(&entry.value).map_err(|source| StoreError::Decode {
            bucket: "commands".into(),
            key: k,
            source,
        })?;
        Ok(Some((c, entry.revision)))
    }

    pub async fn update_command(
        &self,
        c: &StoredCommand,
        revision: u64,
    ) -> Result<Cas, StoreError> {
        match self
            .commands
            .update(key(&c.record.id), Bytes::from(encode(c)), revision)
            .await
        {
            Ok(rev) => Ok(Cas::Done(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
            Err(e) => Err(kv_err(e)),
        }
    }

    /// Every stored command (at start-up, to pick up where the hub stood).
    pub async fn all_commands(&self) -> Result<Vec<(StoredCommand, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut keys = match self.commands.keys().await {
            Ok(k) => k,
            Err(e) => return Err(kv_err(e)),
        };
        let mut ids = Vec::new();
        while let Some(k) = keys.next().await {
            ids.push(k.map_err(kv_err)?);
        }
        for k in ids {
            let Ok(id) = k.parse::<MsgId>() else { continue };
            if let Some(c) = self.get_command(&id).await? {
                out.push(c);
            }
        }
        Ok(out)
    }

    pub async fn put_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.nodes
            .put(n.name.clone(), Bytes::from(encode(n)))
            .await
            .map(|_| ())
            .map_err(kv_err)
    }

    pub async fn all_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        let mut keys = self.nodes.keys().await.map_err(kv_err)?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(kv_err)?);
        }
        for k in names {
            if let Some(v) = self.nodes.get(k.clone()).await.map_err(kv_err)? {
                match decode(&v) {
                    Ok(n) => out.push(n),
                    Err(source) => {
                        return Err(StoreError::Decode {
                            bucket: "nodes".into(),
                            key: k,
                            source,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Write the first last outcome of a key; `Ok(None)` when the key exists.
    pub async fn create_last(&self, key: &str, l: &LastOutcome) -> Result<Option<u64>, StoreError> {
        create_new(&self.last, key, Bytes::from(encode(l))).await
    }

    /// Replace a key's last outcome if it is still at `revision`.
    pub async fn update_last(
        &self,
        key: &str,
        l: &LastOutcome,
        revision: u64,
    ) -> Result<Cas, StoreError> {
        match self
            .last
            .update(key, Bytes::from(encode(l)), revision)
            .await
        {
            Ok(rev) => Ok(Cas::Done(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
            Err(e) => Err(kv_err(e)),
        }
    }

    /// A key's last outcome and its revision.
    pub async fn get_last(&self, key: &str) -> Result<Option<(LastOutcome, u64)>, StoreError> {
        let Some(entry) = self.last.entry(key).await.map_err(kv_err)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        decode(&entry.value)
            .map(|l| Some((l, entry.revision)))
            .map_err(|source| StoreError::Decode {
                bucket: "last".into(),
                key: key.into(),
                source,
            })
    }
}
