//! The hub's state in JetStream key-value buckets. There is no other database.
//!
//! | bucket | key | value | kept |
//! |---|---|---|---|
//! | `<p>-open` | command id | `StoredCommand`, not final | until final, then purged (marker kept an hour) |
//! | `<p>-history` | command id | `StoredCommand`, final | `retention` (default 30 days), `max_age` |
//! | `<p>-nodes` | node | `NodeRecord` | written when a unit's inventory changes |
//! | `<p>-last` | `<node>.<method>.<domain or =>` | `LastOutcome` | always |
//!
//! A hub start reads `open` and `nodes` only, so it takes as long with a million
//! finished commands as with none (ADR 0011). Open records are updated by
//! compare-and-set on their revision, so two writers (two tasks now, two hub
//! processes later) never lose each other's transition. A command becomes final by a
//! `create` in `history` (which only one writer can win) followed by a purge in
//! `open`; a hub that dies between the two finds the pair at its next start and
//! finishes the purge.
//!
//! A record that does not decode is skipped and reported, never fatal: the hub must
//! start whatever is in its buckets.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::api::{LastOutcome, NodeRecord, StoredCommand};
use outpost_wire::{MsgId, Wire, decode, encode};
use std::time::Duration;
use tracing::{info, warn};

/// The hub's buckets, `<prefix>-<name>`; `commands` is version 1's, read once to migrate.
pub const BUCKETS: [&str; 5] = ["open", "history", "nodes", "last", "commands"];

/// Largest value any bucket accepts: one NATS message.
pub const MAX_VALUE: i32 = outpost_wire::MAX_PAYLOAD as i32;
/// How long finished commands are kept unless the operator says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the purge marker of a command that left `open` stays: long enough for
/// another hub watching the bucket to see it go, short enough that a start never
/// reads more than an hour of them.
pub const OPEN_MARKER_TTL: Duration = Duration::from_secs(3600);

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

fn kv_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Kv(e.to_string())
}

/// The result of a compare-and-set.
#[derive(Debug, PartialEq, Eq)]
pub enum Cas {
    Done(u64),
    /// Someone else wrote first: reload and try again.
    Conflict,
}

/// How the hub keeps history.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Finished commands are dropped this long after they finished.
    pub max_age: Duration,
    /// At most this many bytes of history (oldest dropped first); -1: no limit.
    pub max_bytes: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: DEFAULT_RETENTION,
            max_bytes: -1,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    prefix: String,
    open: kv::Store,
    history: kv::Store,
    nodes: kv::Store,
    last: kv::Store,
}

/// What the start-up read found in `open`.
#[derive(Default)]
pub struct OpenCommands {
    pub commands: Vec<(StoredCommand, u64)>,
    /// Records that did not decode (reported, skipped).
    pub damaged: usize,
}

fn bucket_config(name: String, description: &str) -> kv::Config {
    kv::Config {
        bucket: name,
        description: description.into(),
        history: 1,
        max_value_size: MAX_VALUE,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Open a bucket, creating it on first use; bring its limits to what `want` says.
async fn bucket(js: &jetstream::Context, want: kv::Config) -> Result<kv::Store, StoreError> {
    let name = want.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => {
            let stream = format!("KV_{name}");
            let mut info = js
                .get_stream(&stream)
                .await
                .map_err(kv_err)?
                .cached_info()
                .clone();
            let c = &mut info.config;
            let max_age = want.max_age;
            // 0 (or less) means no limit, which the server stores as -1.
            let max_bytes = if want.max_bytes > 0 {
                want.max_bytes
            } else {
                -1
            };
            if c.max_age != max_age || c.max_bytes != max_bytes {
                info!(bucket = %name, max_age_s = max_age.as_secs(), max_bytes, "bucket limits changed");
                c.max_age = max_age;
                c.max_bytes = max_bytes;
                js.update_stream(c.clone()).await.map_err(kv_err)?;
            }
            Ok(store)
        }
        Err(_) => js.create_key_value(want).await.map_err(kv_err),
    }
}

/// Create `key` with `value`: its revision, or `None` when the key exists already.
async fn create_new(kv: &kv::Store, key: &str, value: Bytes) -> Result<Option<u64>, StoreError> {
    match kv.create(key, value).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(kv_err(e)),
    }
}

async fn get<T: Wire>(
    kv: &kv::Store,
    bucket: &str,
    key: &str,
) -> Result<Option<(T, u64)>, StoreError> {
    let Some(entry) = kv.entry(key.to_string()).await.map_err(kv_err)? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    decode(&entry.value)
        .map(|v| Some((v, entry.revision)))
        .map_err(|source| StoreError::Decode {
            bucket: bucket.into(),
            key: key.into(),
            source,
        })
}

/// Every live value of a bucket with its revision, read in one pass (a watch over the
/// last value per key), not one request per key. Values that do not decode are
/// reported and counted, never fatal.
async fn load_all<T: Wire>(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<(Vec<(T, u64)>, usize), StoreError> {
    use jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(kv_err)?;
    // An ordered consumer over the last message per key: it says up front how many
    // it will deliver, so an empty (or all-deleted) bucket is not waited on.
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(kv_err)?;
    let (mut out, mut damaged) = (Vec::new(), 0);
    if consumer.info().await.map_err(kv_err)?.num_pending == 0 {
        return Ok((out, damaged));
    }
    let mut messages = consumer.messages().await.map_err(kv_err)?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(kv_err)?;
        let info = m.info().map_err(kv_err)?;
        let (revision, pending) = (info.stream_sequence, info.pending);
        // A delete, a purge or a server marker carries a header saying so.
        let removed = m.headers.as_ref().is_some_and(|h| {
            h.get("KV-Operation").is_some() || h.get("Nats-Marker-Reason").is_some()
        });
        if !removed {
            match decode::<T>(&m.payload) {
                Ok(v) => out.push((v, revision)),
                Err(e) => {
                    damaged += 1;
                    warn!(bucket, key = %m.subject, error = %e, "damaged record skipped");
                }
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok((out, damaged))
}

/// KV key of the last outcome per (node, method, domain). `=` stands for no domain:
/// no node, method or domain can contain it (domains are `A-Z a-z 0-9 _ -`), so no
/// two triples share a key. (Version 1 hubs used `_`, which is also a domain.)
pub fn last_key(node: &str, method: &str, domain: &str) -> String {
    let d = if domain.is_empty() { "=" } else { domain };
    format!("{node}.{method}.{d}")
}

impl Store {
    /// Open the buckets, creating them on first start, and take over a version 1
    /// hub's single `commands` bucket if there is one.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        retention: Retention,
    ) -> Result<Store, StoreError> {
        let mut open_cfg =
            bucket_config(format!("{prefix}-open"), "outpost commands not final yet");
        open_cfg.limit_markers = Some(OPEN_MARKER_TTL);
        let mut history_cfg =
            bucket_config(format!("{prefix}-history"), "outpost finished commands");
        history_cfg.max_age = retention.max_age;
        history_cfg.max_bytes = retention.max_bytes;
        let store = Store {
            js: js.clone(),
            prefix: prefix.to_string(),
            open: bucket(js, open_cfg).await?,
            history: bucket(js, history_cfg).await?,
            nodes: bucket(
                js,
                bucket_config(format!("{prefix}-nodes"), "outpost units"),
            )
            .await?,
            last: bucket(
                js,
                bucket_config(
                    format!("{prefix}-last"),
                    "outpost last outcome per (node, method, domain)",
                ),
            )
            .await?,
        };
        store.migrate_v1(js, prefix).await?;
        Ok(store)
    }

    /// A version 1 hub kept every command, open or final, in `<p>-commands`: move the
    /// open ones to `open` and the final ones to `history`, then drop the old bucket.
    /// Runs once; reads the old bucket in one pass.
    async fn migrate_v1(&self, js: &jetstream::Context, prefix: &str) -> Result<(), StoreError> {
        let name = format!("{prefix}-commands");
        if js.get_key_value(&name).await.is_err() {
            return Ok(());
        }
        let (all, damaged) = load_all::<StoredCommand>(js, &name).await?;
        let (mut open, mut done) = (0, 0);
        for (c, _) in &all {
            let key = c.record.id.to_string();
            let bucket = if c.record.state.is_final() {
                done += 1;
                &self.history
            } else {
                open += 1;
                &self.open
            };
            create_new(bucket, &key, Bytes::from(encode(c))).await?;
        }
        js.delete_key_value(&name).await.map_err(kv_err)?;
        info!(
            open,
            finished = done,
            damaged,
            "took over the version 1 commands bucket"
        );
        Ok(())
    }

    /// Persist a new command; `Ok(None)` when the key has any message: the command
    /// is open, or finished within the purge marker's TTL (the marker counts, unlike
    /// in `kv::Store::create`, which writes over a marker after reading it). One
    /// write, no read, for a new id.
    pub async fn create_open(&self, c: &StoredCommand) -> Result<Option<u64>, StoreError> {
        // Revision 0: the stream must hold no message for the key.
        Ok(match self.update_open(c, 0).await? {
            Cas::Done(rev) => Some(rev),
            Cas::Conflict => None,
        })
    }

    pub async fn update_open(&self, c: &StoredCommand, revision: u64) -> Result<Cas, StoreError> {
        match self
            .open
            .update(c.record.id.to_string(), Bytes::from(encode(c)), revision)
            .await
        {
            Ok(rev) => Ok(Cas::Done(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
            Err(e) => Err(kv_err(e)),
        }
    }

    /// Write a final record. `Ok(false)`: it is in history already (someone finished
    /// it first; that version stands).
    pub async fn create_final(&self, c: &StoredCommand) -> Result<bool, StoreError> {
        Ok(create_new(
            &self.history,
            &c.record.id.to_string(),
            Bytes::from(encode(c)),
        )
        .await?
        .is_some())
    }

    /// Drop a command from `open` (after its final record is in history).
    pub async fn purge_open(&self, id: &MsgId) -> Result<(), StoreError> {
        self.open
            .purge_with_ttl(id.to_string(), OPEN_MARKER_TTL)
            .await
            .map_err(kv_err)
    }

    pub async fn get_open(&self, id: &MsgId) -> Result<Option<(StoredCommand, u64)>, StoreError> {
        get(&self.open, "open", &id.to_string()).await
    }

    pub async fn get_final(&self, id: &MsgId) -> Result<Option<StoredCommand>, StoreError> {
        Ok(get(&self.history, "history", &id.to_string())
            .await?
            .map(|(c, _)| c))
    }

    /// Every command not final yet (at start-up).
    pub async fn open_commands(&self) -> Result<OpenCommands, StoreError> {
        let (commands, damaged) = load_all(&self.js, &format!("{}-open", self.prefix)).await?;
        Ok(OpenCommands { commands, damaged })
    }

    pub async fn put_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.nodes
            .put(n.name.clone(), Bytes::from(encode(n)))
            .await
            .map(|_| ())
            .map_err(kv_err)
    }

    /// Every unit record; the count of damaged ones (skipped).
    pub async fn all_nodes(&self) -> Result<(Vec<NodeRecord>, usize), StoreError> {
        let (all, damaged) = load_all(&self.js, &format!("{}-nodes", self.prefix)).await?;
        Ok((all.into_iter().map(|(n, _)| n).collect(), damaged))
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
        get(&self.last, "last", key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_keys_never_collide() {
        assert_ne!(last_key("pi", "exec", ""), last_key("pi", "exec", "_"));
        assert_ne!(last_key("pi", "exec", ""), last_key("pi", "exec", "-"));
        assert_eq!(last_key("pi", "file.write", "nginx"), "pi.file.write.nginx");
    }
}
