//! What the broker spends on each way of keeping a command's records, pipelined as
//! the hub runs them (64 commands in flight), on fresh buckets configured as the
//! hub's: a plain put (the baseline), version 1's `create` then `update` of one
//! record, and the `open`/`history` pair's `create`, `create` and `purge` (with the
//! purge marker's TTL). Broker CPU per command from /proc ticks.

use anyhow::Result;
use async_nats::Client;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;

/// One way of storing a command.
#[derive(Clone, Copy)]
pub enum Scheme {
    /// One put per command.
    Put,
    /// Version 1: `create`, then `update` with the final record (compare-and-set).
    CreateUpdate,
    /// `create` in open, `create` in history, `purge` in open (marker TTL 1 h).
    OpenHistory,
    /// The same with a purge whose marker has no TTL (it stays: not what the hub
    /// does, which would read every marker at start; measured to price the TTL).
    OpenHistoryNoTtl,
}

fn config(name: &str) -> kv::Config {
    kv::Config {
        bucket: name.into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Broker CPU per command (µs) and commands per second for `scheme`.
pub async fn measure(
    c: &Client,
    broker_pid: u32,
    scheme: Scheme,
    n: usize,
    tag: &str,
) -> Result<(f64, f64)> {
    let js = jetstream::new(c.clone());
    let a = js.create_key_value(config(&format!("ops-{tag}-a"))).await?;
    let mut open = config(&format!("ops-{tag}-b"));
    if matches!(scheme, Scheme::OpenHistory | Scheme::OpenHistoryNoTtl) {
        open.limit_markers = Some(Duration::from_secs(3600));
    }
    let b = js.create_key_value(open).await?;
    let value = Bytes::from(vec![7u8; 250]);
    let t0 = std::time::Instant::now();
    let c0 = super::cpu_ticks(broker_pid);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let (a, b, v) = (a.clone(), b.clone(), value.clone());
            async move {
                let key = format!("k{i}");
                match scheme {
                    Scheme::Put => {
                        a.put(&key, v).await?;
                    }
                    Scheme::CreateUpdate => {
                        let rev = a.create(&key, v.clone()).await?;
                        a.update(&key, v, rev).await?;
                    }
                    Scheme::OpenHistory => {
                        b.create(&key, v.clone()).await?;
                        a.create(&key, v).await?;
                        b.purge_with_ttl(&key, Duration::from_secs(3600)).await?;
                    }
                    Scheme::OpenHistoryNoTtl => {
                        b.create(&key, v.clone()).await?;
                        a.create(&key, v).await?;
                        b.purge(&key).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .for_each(|r| async move { r.expect("store op") })
        .await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let us = (super::cpu_ticks(broker_pid) - c0) as f64 * 10_000.0 / n as f64;
    Ok((us, rate))
}
