//! The hub at scale (issue 14): its start with a million finished commands in
//! history against its start with none, and `nodes` over 100,000 units with realistic
//! hellos against the same calls at 1,000 units, with the hub's memory per idle unit.
//! Every figure's baseline is measured in the same run.

use crate::{Report, ms, rss_kib, send_req, sim};
use anyhow::{Context, Result, ensure};
use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_hub::cli::{self, NodesFilter};
use outpost_tests::{Fleet, eventually};
use outpost_wire::api::{NodesPage, NodesRequest, StoredCommand};
use outpost_wire::subject::Subjects;
use outpost_wire::{MsgId, decode, encode, now_ms};
use std::time::{Duration, Instant};

fn hub_pid(f: &Fleet) -> Result<u32> {
    f.hub.as_ref().and_then(|h| h.pid()).context("hub pid")
}

/// A hub (re)start until it answers the API, as an operator's `nodes` after
/// `systemctl restart` sees it; the median of `runs`, and the RSS after the last
/// (settled for a second).
async fn hub_start(f: &mut Fleet, runs: usize) -> Result<(Duration, u64)> {
    let mut times = vec![];
    for _ in 0..runs {
        f.stop_hub();
        let t = Instant::now();
        f.start_hub().await?;
        times.push(t.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    times.sort();
    Ok((times[runs / 2], rss_kib(hub_pid(f)?)))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Hub start and memory with `n` finished commands stored against none. The stored
/// records are copies (new ids) of a real one: a command the hub ran to a simulated
/// unit and finished.
pub async fn history(f: &mut Fleet, op: &Client, r: &mut Report, n: usize) -> Result<()> {
    let s = Subjects::default();
    let unit = sim::start(f, "hist", 1, 1).await?;
    let rec = cli::send(op, &s, send_req(&unit.names[0]), true, false).await?;
    ensure!(rec.state.is_final(), "not final: {rec:?}");
    let js = async_nats::jetstream::new(op.clone());
    let kv = js.get_key_value(format!("{}-history", s.prefix())).await?;
    let template: StoredCommand =
        eventually("the finished record", Duration::from_secs(10), || {
            let (kv, id) = (kv.clone(), rec.id.to_string());
            async move { decode(&kv.get(id).await.ok()??).ok() }
        })
        .await?;
    drop(unit);

    let (t0, rss0) = hub_start(f, 5).await?;

    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|_| {
            let kv = kv.clone();
            let mut c = template.clone();
            let id = MsgId::new(now_ms());
            c.record.id = id;
            c.command.id = id;
            async move { kv.put(id.to_string(), Bytes::from(encode(&c))).await }
        })
        .buffer_unordered(256)
        .for_each(|r| async move {
            r.expect("history put");
        })
        .await;
    let fill = t.elapsed();
    let size = encode(&template).len();
    let mut stream = js.get_stream(format!("KV_{}-history", s.prefix())).await?;
    let stored = stream.info().await?.state.messages;
    ensure!(
        stored as usize > n,
        "history holds {stored} records, want {n}"
    );
    println!("history: {n} records ({size} bytes each) written in {fill:.1?}");

    let (t1, rss1) = hub_start(f, 5).await?;
    r.row(
        &format!("hub start, {n} finished commands stored"),
        ms(t1),
        format!("{} none", ms(t0)),
        format!("{:.2}×", t1.as_secs_f64() / t0.as_secs_f64()),
        "≤ 2× none",
    );
    r.row(
        &format!("hub RSS after start, {n} finished commands stored"),
        mib(rss1),
        format!("{} none", mib(rss0)),
        format!("{:.2}×", rss1 as f64 / rss0.max(1) as f64),
        "",
    );
    r.notes.push(format!(
        "hub start: from spawning `outpost-hub serve` until it answers a `nodes` call (polled every 50 ms), median of 5 restarts; {n} finished records of {size} bytes (copies of a real one under new ids) put in `<p>-history` in {fill:.1?} before the second set; a start reads `open` and `nodes` only (ADR 0011)"
    ));
    Ok(())
}

/// What an operator's `nodes` costs, from the operator's side: time to the first
/// page, to the whole list, and to a server-side filtered list; one unit by name.
struct Views {
    first: Duration,
    whole: Duration,
    filtered: Duration,
    one: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn views(op: &Client, n: usize, probe: &str) -> Result<Views> {
    let s = Subjects::default();
    let (mut first, mut whole, mut filtered, mut one) = (vec![], vec![], vec![], vec![]);
    for _ in 0..5 {
        let t = Instant::now();
        let mut t_first = None;
        let mut count = 0;
        cli::nodes_paged(op, &s, &NodesFilter::default(), |p| {
            t_first.get_or_insert(t.elapsed());
            count += p.nodes.len();
        })
        .await?;
        whole.push(t.elapsed());
        first.push(t_first.context("no page")?);
        ensure!(count >= n, "nodes listed {count} units, want {n}");

        let t = Instant::now();
        let filter = NodesFilter {
            selector: "role=camera".into(),
            ..Default::default()
        };
        let mut count = 0;
        cli::nodes_paged(op, &s, &filter, |p| count += p.nodes.len()).await?;
        filtered.push(t.elapsed());
        ensure!(count >= n / 3, "role=camera listed {count} units");

        let t = Instant::now();
        let found = cli::node(op, &s, probe).await?;
        one.push(t.elapsed());
        ensure!(found.is_some(), "no {probe}");
    }
    Ok(Views {
        first: median(first),
        whole: median(whole),
        filtered: median(filtered),
        one: median(one),
    })
}

/// Wait until the hub lists `n` units online (one page of one unit per poll: the
/// count comes with the first page).
async fn online(op: &Client, n: usize) -> Result<()> {
    let s = Subjects::default();
    let req = NodesRequest {
        online: Some(true),
        limit: 1,
        ..Default::default()
    };
    eventually(
        &format!("{n} units online"),
        Duration::from_secs(300),
        || async {
            let page: NodesPage = cli::call(op, &s, "nodes", &req).await.ok()?;
            (page.matched as usize >= n).then_some(())
        },
    )
    .await
}

/// `nodes` at `small` and at `large` units, the hub's memory per idle unit at
/// `large`, and its start with `large` units registered.
pub async fn fleet(
    f: &mut Fleet,
    op: &Client,
    r: &mut Report,
    small: usize,
    large: usize,
) -> Result<()> {
    // A fresh hub: its RSS before the units come is the daemon's own.
    let (t_empty, rss0) = hub_start(f, 3).await?;
    let few = sim::idle(f, "view", 0..small, 1000).await?;
    online(op, small).await?;
    let at_small = views(op, small, "view-000042").await?;
    drop(few);

    // They come in batches of 10,000, each once the hub has the one before: all at
    // once is a reconnect storm (issue 16), not what this measures.
    let t = Instant::now();
    let mut many = vec![];
    let mut from = 0;
    while from < large - small {
        let to = (from + 10_000).min(large - small);
        many.push(sim::idle(f, "unit", from..to, 1000).await?);
        online(op, small + to).await?;
        from = to;
    }
    let registered = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib(hub_pid(f)?);
    let probe = format!("unit-{:06}", (large - small) / 2);
    let at_large = views(op, large, &probe).await?;

    let row = |r: &mut Report, what: &str, big: Duration, base: Duration, target: &str| {
        r.row(
            &format!("nodes at {large} units: {what}"),
            ms(big),
            format!("{} at {small}", ms(base)),
            format!("{:.2}×", big.as_secs_f64() / base.as_secs_f64()),
            target,
        );
    };
    row(
        r,
        "first page",
        at_large.first,
        at_small.first,
        "≈ 1× (pages)",
    );
    row(
        r,
        "whole list",
        at_large.whole,
        at_small.whole,
        &format!("≈ {}× (linear)", large / small),
    );
    row(
        r,
        "`--selector role=camera`, whole",
        at_large.filtered,
        at_small.filtered,
        &format!("≈ {}× (linear)", large / small),
    );
    row(r, "one unit by name", at_large.one, at_small.one, "≈ 1×");
    r.row(
        &format!("hub RSS per idle unit ({large} units)"),
        format!("{:.2} KiB", rss1.saturating_sub(rss0) as f64 / large as f64),
        format!("{} before", mib(rss0)),
        "-".into(),
        "≤ 2 KiB",
    );
    let (t_large, rss_after) = hub_start(f, 3).await?;
    online(op, large).await.ok();
    r.row(
        &format!("hub start, {large} units registered"),
        ms(t_large),
        format!("{} none", ms(t_empty)),
        format!("{:.1}×", t_large.as_secs_f64() / t_empty.as_secs_f64()),
        "",
    );
    r.notes.push(format!(
        "nodes at {large} units: idle simulated units (1,000 to a connection) enrolled with labels site and role and one hello each as a Raspberry Pi agent sends it (Debian 12, kernel 6.6, five methods), in batches of 10,000, each once the hub lists the one before online; {large} registered and online in {registered:.1?}; times are the operator's (`outpost-hub nodes` pages of 500, each one API call), medians of 5; the baseline is the same call at {small} units in the same run; RSS per idle unit counts its enrolment entry, registry entry and stored record against the fresh hub's RSS; after a restart with {large} units the hub's RSS is {}",
        mib(rss_after)
    ));
    drop(many);
    Ok(())
}
