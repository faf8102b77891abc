//! The operator CLI: `send`, `nodes`, `show`. Talks to the hub daemon over
//! `<prefix>.api.*` and follows a command through `<prefix>.event.cmd.<id>`.

use crate::machine::UNCONFIRMED_NOTE;
use anyhow::{Context, anyhow, bail};
use async_nats::{Client, Request, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use outpost_wire::api::{
    ApiError, ApiReply, CmdState, CommandRecord, MAX_TARGETS, NodeRequest, NodeView, NodesPage,
    NodesRequest, SendManyReply, SendManyRequest, SendRequest, ShowRequest, Target,
};
use outpost_wire::subject::Subjects;
use outpost_wire::{MsgId, Status, Wire, decode, encode, now_ms};
use serde::{Serialize, de::DeserializeOwned};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// How long one API call may take before the CLI says the hub is not answering.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting `send` re-reads the record in case it missed an event
/// (for example across a hub restart).
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// Exit codes of `outpost-hub send`, besides the unit's own exit code.
pub mod exit {
    /// The command failed on the unit without an exit code (spawn error, killed, interrupted).
    pub const FAILED: u8 = 1;
    /// The method ran past its timeout on the unit and was killed.
    pub const TIMED_OUT: u8 = 124;
    /// The unit refused the command; it never ran.
    pub const REJECTED: u8 = 125;
    /// The deadline passed before the unit accepted it; it never ran.
    pub const EXPIRED: u8 = 126;
    /// The deadline passed, but the unit may have accepted it before (its ACK was
    /// lost): not known yet; the hub records the outcome if the unit reports one.
    pub const UNCONFIRMED: u8 = 75;
    /// outpost itself failed: bad input, broker or hub unreachable.
    pub const ERROR: u8 = 255;
}

/// One API call, with errors an operator can act on. A refusal by the hub is an
/// [`ApiError`] inside the `anyhow::Error` (downcast it to act on its code).
pub async fn call<Req: Wire, Resp: Serialize + DeserializeOwned>(
    client: &Client,
    subjects: &Subjects,
    name: &str,
    req: &Req,
) -> anyhow::Result<Resp> {
    let subject = subjects.api(name);
    let r = Request::new()
        .payload(Bytes::from(encode(req)))
        .timeout(Some(API_TIMEOUT));
    let msg = client.send_request(subject.clone(), r).await.map_err(|e| match e.kind() {
        RequestErrorKind::NoResponders => {
            anyhow!("no hub is serving {subject}: is `outpost-hub serve` running with the same --prefix?")
        }
        RequestErrorKind::TimedOut => anyhow!("the hub did not answer {subject} within {API_TIMEOUT:?}"),
        _ => anyhow!("{subject}: {e}"),
    })?;
    match decode::<ApiReply<Resp>>(&msg.payload)
        .context("undecodable hub reply (is the hub the same version as this CLI?)")?
    {
        ApiReply::Ok(v) => Ok(v),
        ApiReply::Err(e) => Err(anyhow::Error::new(e)),
    }
}

/// Queue a command and, unless `wait` is false, follow it to its final state.
/// Returns the final (or, without waiting, the queued) record.
pub async fn send(
    client: &Client,
    subjects: &Subjects,
    req: SendRequest,
    wait: bool,
    progress: bool,
) -> anyhow::Result<CommandRecord> {
    let id = req.id;
    // Subscribe before sending so no state change is missed.
    let mut events = client.subscribe(subjects.event(&id)).await?;
    let mut rec: CommandRecord = call(client, subjects, "send", &req).await?;
    if progress {
        eprintln!("outpost: command {id} queued for {}", req.to);
    }
    if !wait {
        return Ok(rec);
    }
    let mut last_state = rec.state;
    let mut last_note = String::new();
    while !rec.state.is_final() && !unconfirmed(&rec) {
        match tokio::time::timeout(POLL_EVERY, events.next()).await {
            Ok(Some(msg)) => {
                if let Ok(r) = decode::<CommandRecord>(&msg.payload) {
                    rec = r;
                }
            }
            Ok(None) => bail!("event subscription closed"),
            Err(_) => {
                if let Ok(r) = call(client, subjects, "show", &ShowRequest { id }).await {
                    rec = r;
                }
            }
        }
        if progress && (rec.state != last_state || rec.note != last_note) {
            match rec.state {
                CmdState::Sent => eprintln!("outpost: attempt {}: {}", rec.attempts, rec.note),
                s if !s.is_final() => eprintln!("outpost: {}", s.word()),
                _ => {}
            }
            last_state = rec.state;
            last_note = rec.note.clone();
        }
    }
    Ok(rec)
}

/// The deadline passed while the unit may have the command: `send` stops waiting.
pub fn unconfirmed(rec: &CommandRecord) -> bool {
    !rec.state.is_final() && rec.note.starts_with(UNCONFIRMED_NOTE)
}

/// `send` to many units: `send_many` calls in flight at once.
pub const SEND_MANY_CALLS: usize = 4;

/// What `send_many` is given besides its targets: the command they all get.
pub struct Many {
    pub domain: String,
    pub method: outpost_wire::Method,
    pub timeout_ms: u32,
    pub ttl_ms: u64,
}

/// One target of `send_many`: its final (or, without waiting, queued) record, or why
/// it was not queued.
pub type ManyResult = (String, Result<CommandRecord, ApiError>);

/// The same command to each of `targets` (in calls of at most `MAX_TARGETS`), and
/// unless `wait` is false, follow every one to its final state, with a progress bar
/// on a terminal when `progress`. Results are in the order of `targets`.
pub async fn send_many(
    client: &Client,
    subjects: &Subjects,
    targets: &[String],
    many: Many,
    wait: bool,
    progress: bool,
) -> anyhow::Result<Vec<ManyResult>> {
    // Subscribe before sending so no state change is missed.
    let mut events = client.subscribe(subjects.all_events()).await?;
    let mut results: Vec<ManyResult> = Vec::with_capacity(targets.len());
    let calls = targets.chunks(MAX_TARGETS as usize).map(|chunk| {
        let req = SendManyRequest {
            targets: chunk
                .iter()
                .map(|to| Target {
                    to: to.clone(),
                    id: MsgId::new(now_ms()),
                })
                .collect(),
            domain: many.domain.clone(),
            method: many.method.clone(),
            timeout_ms: many.timeout_ms,
            ttl_ms: many.ttl_ms,
        };
        async move {
            let reply: SendManyReply = call(client, subjects, "send_many", &req).await?;
            anyhow::ensure!(
                reply.len() == chunk.len(),
                "the hub answered {} of {} targets",
                reply.len(),
                chunk.len()
            );
            anyhow::Ok(chunk.iter().cloned().zip(reply).collect::<Vec<_>>())
        }
    });
    // A few calls at once keep the hub's cores busy; the replies stay in order.
    let parts: Vec<anyhow::Result<Vec<ManyResult>>> = futures_util::stream::iter(calls)
        .buffered(SEND_MANY_CALLS)
        .collect()
        .await;
    for part in parts {
        results.extend(part?);
    }
    if !wait {
        return Ok(results);
    }
    // Index of each command still on its way.
    let mut pending: HashMap<MsgId, usize> = results
        .iter()
        .enumerate()
        .filter_map(|(i, (_, r))| match r {
            Ok(rec) if !rec.state.is_final() && !unconfirmed(rec) => Some((rec.id, i)),
            _ => None,
        })
        .collect();
    let queued = results.iter().filter(|(_, r)| r.is_ok()).count() as u64;
    let bar = if progress && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(queued);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "outpost: {bar:30} {pos}/{len} units final, {msg} [{elapsed}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(queued - pending.len() as u64);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut not_ok = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(rec) if rec.state.is_final() && rec.state != CmdState::Succeeded))
        .count();
    // Other commands' events arrive on the same subscription: poll when none of ours
    // has moved for a while, not when the subscription is quiet.
    let mut progressed = tokio::time::Instant::now();
    while !pending.is_empty() {
        bar.set_message(format!("{not_ok} did not succeed"));
        let mut got = Vec::new();
        match tokio::time::timeout_at(progressed + POLL_EVERY, events.next()).await {
            Ok(Some(msg)) => {
                if let Ok(r) = decode::<CommandRecord>(&msg.payload) {
                    got.push(r);
                }
            }
            Ok(None) => bail!("event subscription closed"),
            // None of ours moved for a while: re-read what is still pending (events
            // can be missed across a hub restart).
            Err(_) => {
                progressed = tokio::time::Instant::now();
                let ids: Vec<MsgId> = pending.keys().copied().collect();
                got =
                    futures_util::stream::iter(ids)
                        .map(|id| async move {
                            call(client, subjects, "show", &ShowRequest { id }).await
                        })
                        .buffer_unordered(32)
                        .filter_map(|r| async move { r.ok() })
                        .collect()
                        .await;
            }
        }
        for r in got {
            if let Some(&i) = pending.get(&r.id) {
                progressed = tokio::time::Instant::now();
                if r.state.is_final() || unconfirmed(&r) {
                    pending.remove(&r.id);
                    bar.inc(1);
                    if r.state != CmdState::Succeeded {
                        not_ok += 1;
                    }
                }
                results[i].1 = Ok(r);
            }
        }
    }
    bar.finish_and_clear();
    Ok(results)
}

/// Print what `send` to many units ended with: each unit's output, its lines
/// prefixed with the unit's name (stdout to stdout, stderr to stderr), a status line
/// for each unit that did not succeed, and a summary on stderr.
pub fn print_many(results: &[ManyResult]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for (node, r) in results {
        match r {
            Ok(rec) => {
                if let Some(o) = &rec.outcome {
                    for line in String::from_utf8_lossy(&o.stdout).lines() {
                        writeln!(out, "{node}: {line}")?;
                    }
                    out.flush()?;
                    for line in String::from_utf8_lossy(&o.stderr).lines() {
                        eprintln!("{node}: {line}");
                    }
                }
                *counts.entry(rec.state.word()).or_default() += 1;
                if rec.state != CmdState::Succeeded {
                    eprintln!("outpost: {}", status_line(rec));
                }
            }
            Err(e) => {
                eprintln!("outpost: {node}: not queued: {e}");
                *counts.entry("not queued").or_default() += 1;
            }
        }
    }
    let summary: Vec<String> = counts.iter().map(|(w, n)| format!("{n} {w}")).collect();
    eprintln!("outpost: {} units: {}", results.len(), summary.join(", "));
    Ok(())
}

/// The exit code of `send` to many units: 255 if a unit's command could not be
/// queued; else 0 when no unit's command ended other than succeeded (without
/// waiting, most are still on their way); else the code of the first unit, in the
/// order given, that did not succeed, as `send` to it alone would end.
pub fn many_exit_code(results: &[ManyResult]) -> u8 {
    if results.iter().any(|(_, r)| r.is_err()) {
        return exit::ERROR;
    }
    results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .find(|rec| (rec.state.is_final() && rec.state != CmdState::Succeeded) || unconfirmed(rec))
        .map_or(0, exit_code)
}

/// The exit code `send` ends with for a final (or unconfirmed) record.
pub fn exit_code(rec: &CommandRecord) -> u8 {
    if unconfirmed(rec) {
        return exit::UNCONFIRMED;
    }
    match rec.state {
        CmdState::Succeeded => 0,
        CmdState::Failed => match rec.outcome.as_ref().and_then(|o| o.exit_code) {
            Some(c) if (1..=255).contains(&c) => c as u8,
            _ => exit::FAILED,
        },
        CmdState::TimedOut => exit::TIMED_OUT,
        CmdState::Rejected => exit::REJECTED,
        CmdState::Expired => exit::EXPIRED,
        _ => exit::ERROR,
    }
}

/// Print a final record for a person: the output on stdout/stderr, then a status line.
pub fn print_outcome(rec: &CommandRecord) -> std::io::Result<()> {
    if let Some(o) = &rec.outcome {
        std::io::stdout().write_all(&o.stdout)?;
        std::io::stdout().flush()?;
        std::io::stderr().write_all(&o.stderr)?;
    }
    eprintln!("outpost: {}", status_line(rec));
    Ok(())
}

fn status_line(rec: &CommandRecord) -> String {
    let mut s = format!("{} {} on {}", rec.method, rec.state.word(), rec.node);
    if let Some(o) = &rec.outcome {
        if let Some(c) = o.exit_code {
            s.push_str(&format!(", exit code {c}"));
        }
        s.push_str(&format!(", {} ms", o.duration_ms));
        match &o.status {
            Status::Failed(r) | Status::Expired(r) => s.push_str(&format!(": {r}")),
            Status::Rejected(r) => s.push_str(&format!(": {r}")),
            _ => {}
        }
        if o.truncated {
            s.push_str(" (output truncated)");
        }
    } else if !rec.note.is_empty() {
        s.push_str(&format!(": {}", rec.note));
    }
    if unconfirmed(rec) {
        s.push_str(&format!(
            " (its outcome is recorded if the unit reports one: outpost-hub show {})",
            rec.id
        ));
    }
    s
}

/// A record as JSON, with outputs as (lossy UTF-8) strings rather than byte arrays.
pub fn record_json(rec: &CommandRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(rec).unwrap_or_default();
    if let (Some(o), Some(out)) = (&rec.outcome, v.get_mut("outcome")) {
        out["stdout"] = String::from_utf8_lossy(&o.stdout).into();
        out["stderr"] = String::from_utf8_lossy(&o.stderr).into();
    }
    v
}

/// Which units `nodes` lists.
#[derive(Debug, Clone, Default)]
pub struct NodesFilter {
    pub online: Option<bool>,
    /// Name glob; empty for all.
    pub name: String,
    /// Label selector over enrolment labels; empty for all.
    pub selector: String,
}

/// Every unit that matches, page by page (each page one API call), handing each page
/// to `each` as it arrives.
pub async fn nodes_paged(
    client: &Client,
    subjects: &Subjects,
    filter: &NodesFilter,
    mut each: impl FnMut(&NodesPage),
) -> anyhow::Result<()> {
    let mut req = NodesRequest {
        after: String::new(),
        limit: 0,
        online: filter.online,
        name: filter.name.clone(),
        selector: filter.selector.clone(),
    };
    loop {
        let page: NodesPage = call(client, subjects, "nodes", &req).await?;
        each(&page);
        match page.next {
            Some(n) => req.after = n,
            None => return Ok(()),
        }
    }
}

/// Every unit the hub knows.
pub async fn nodes(client: &Client, subjects: &Subjects) -> anyhow::Result<Vec<NodeView>> {
    let mut all = vec![];
    nodes_paged(client, subjects, &NodesFilter::default(), |p| {
        all.extend(p.nodes.iter().cloned())
    })
    .await?;
    Ok(all)
}

/// One unit; `None` when the hub has never heard of it.
pub async fn node(
    client: &Client,
    subjects: &Subjects,
    name: &str,
) -> anyhow::Result<Option<NodeView>> {
    match call::<_, NodeView>(client, subjects, "node", &NodeRequest { name: name.into() }).await {
        Ok(v) => Ok(Some(v)),
        Err(e) => match e.downcast_ref::<ApiError>() {
            Some(a) if a.code == outpost_wire::api::ErrorCode::UnknownUnit => Ok(None),
            _ => Err(e),
        },
    }
}

/// What `wait-online` waits for.
#[derive(Debug, Clone, Default)]
pub struct OnlineWant {
    /// The agent must report exactly this version.
    pub agent_version: Option<String>,
    /// Its agent process must have started at or after this time (the unit's clock,
    /// ms since the epoch): a hello from before a restart does not count.
    pub started_after: Option<u64>,
}

/// Why a unit's view does not (yet) satisfy `want`; None when it does.
pub fn online_gap(n: Option<&NodeView>, want: &OnlineWant) -> Option<String> {
    let Some(n) = n.filter(|n| n.last_seen > 0) else {
        return Some("it has never said hello".into());
    };
    if !n.online {
        return Some(format!(
            "it is offline (last seen {})",
            ago(n.last_seen, now_ms())
        ));
    }
    if let Some(v) = &want.agent_version
        && &n.agent_version != v
    {
        return Some(format!("it runs agent {}, not {v}", n.agent_version));
    }
    if let Some(t) = want.started_after
        && n.agent_started_at < t
    {
        return Some(format!(
            "its agent started at {} ms, before {t} ms (no hello since the restart yet)",
            n.agent_started_at
        ));
    }
    None
}

/// Poll the hub until `node` is online as wanted (`Ok(Ok(view))`), or `limit` passes
/// (`Ok(Err(what the hub sees))`); `Err` when the hub cannot be asked.
pub async fn wait_online(
    client: &Client,
    subjects: &Subjects,
    node: &str,
    want: &OnlineWant,
    limit: Duration,
) -> anyhow::Result<Result<NodeView, String>> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let view = self::node(client, subjects, node).await?;
        match online_gap(view.as_ref(), want) {
            None => return Ok(Ok(view.expect("a gap-free view exists"))),
            Some(why) if tokio::time::Instant::now() >= end => {
                return Ok(Err(format!(
                    "{node} is not online as wanted after {limit:?}: {why}"
                )));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

pub async fn show(
    client: &Client,
    subjects: &Subjects,
    id: MsgId,
) -> anyhow::Result<CommandRecord> {
    call(client, subjects, "show", &ShowRequest { id }).await
}

/// "12s ago", "3m ago", "never".
pub fn ago(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// A clock offset for a table: "ok" within two seconds, else "+2d", "-5m", "+40s".
pub fn clock(offset: Option<i64>) -> String {
    let Some(ms) = offset else {
        return "-".into();
    };
    if ms.abs() <= 2000 {
        return "ok".into();
    }
    let (sign, s) = (if ms < 0 { '-' } else { '+' }, ms.unsigned_abs() / 1000);
    match s {
        0..=59 => format!("{sign}{s}s"),
        60..=3599 => format!("{sign}{}m", s / 60),
        3600..=86_399 => format!("{sign}{}h", s / 3600),
        _ => format!("{sign}{}d", s / 86_400),
    }
}

/// The `nodes` table (its header when `header`).
pub fn nodes_table(nodes: &[NodeView], header: bool) -> String {
    let now = now_ms();
    let head = [
        "NAME",
        "STATE",
        "SINCE",
        "LAST SEEN",
        "ARCH",
        "VERSION",
        "KERNEL",
        "CLOCK",
        "PENDING",
        "LABELS",
    ];
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                match (n.enrolled, n.online, n.last_seen) {
                    (false, _, _) => "revoked",
                    (_, true, _) => "online",
                    (_, false, 0) => "never-seen",
                    _ => "offline",
                }
                .into(),
                ago(n.since, now),
                ago(n.last_seen, now),
                n.arch.clone(),
                n.agent_version.clone(),
                n.kernel.clone(),
                clock(n.clock_offset_ms),
                n.pending.to_string(),
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    // Fixed widths, so that pages printed as they arrive line up.
    let widths = [16, 10, 9, 9, 7, 10, 16, 6, 7, 0];
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = if header {
        line(head.to_vec())
    } else {
        String::new()
    };
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `show` for a person.
pub fn record_text(rec: &CommandRecord) -> String {
    let now = now_ms();
    let mut s = format!(
        "command   {}\nnode      {}\nmethod    {}\ndomain    {}\nstate     {}\nissued    {}\ndeadline  {}\nattempts  {}\n",
        rec.id,
        rec.node,
        rec.method,
        if rec.domain.is_empty() {
            "-"
        } else {
            &rec.domain
        },
        rec.state.word(),
        ago(rec.issued_at, now),
        if rec.deadline > now {
            format!("in {}s", (rec.deadline - now) / 1000)
        } else {
            "passed".into()
        },
        rec.attempts,
    );
    if !rec.note.is_empty() {
        s.push_str(&format!("note      {}\n", rec.note));
    }
    if let Some(o) = &rec.outcome {
        s.push_str(&format!(
            "status    {}\nexit code {}\nduration  {} ms\ntruncated {}\n",
            status_line(rec),
            o.exit_code.map_or("-".into(), |c| c.to_string()),
            o.duration_ms,
            o.truncated
        ));
        if !o.stdout.is_empty() {
            s.push_str(&format!(
                "--- stdout\n{}",
                String::from_utf8_lossy(&o.stdout)
            ));
            if !o.stdout.ends_with(b"\n") {
                s.push('\n');
            }
        }
        if !o.stderr.is_empty() {
            s.push_str(&format!(
                "--- stderr\n{}",
                String::from_utf8_lossy(&o.stderr)
            ));
            if !o.stderr.ends_with(b"\n") {
                s.push('\n');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_and_table() {
        assert_eq!(ago(0, 5), "never");
        assert_eq!(ago(1000, 6000), "5s ago");
        assert_eq!(ago(1, 7_200_001), "2h ago");
        let n = NodeView {
            name: "pi-1".into(),
            online: true,
            since: now_ms(),
            last_seen: now_ms(),
            arch: "aarch64".into(),
            os: "Debian".into(),
            kernel: "6.1".into(),
            agent_version: "0.1.0".into(),
            agent_started_at: 1,
            labels: vec![("site".into(), "a".into())],
            pending: 2,
            enrolled: true,
            proto_min: 1,
            proto_max: 2,
            methods: vec!["ping".into()],
            allowed: vec!["ping".into()],
            clock_offset_ms: Some(2 * 86_400_000 + 5),
        };
        let want = OnlineWant {
            agent_version: Some("0.1.0".into()),
            started_after: Some(1),
        };
        assert_eq!(online_gap(Some(&n), &want), None);
        let newer = OnlineWant {
            agent_version: Some("0.2.0".into()),
            ..want.clone()
        };
        assert!(online_gap(Some(&n), &newer).unwrap().contains("not 0.2.0"));
        let later = OnlineWant {
            started_after: Some(2),
            ..want.clone()
        };
        assert!(
            online_gap(Some(&n), &later)
                .unwrap()
                .contains("no hello since")
        );
        assert!(online_gap(None, &want).unwrap().contains("never"));
        let t = nodes_table(&[n], true);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"));
        assert!(
            lines[1].contains("pi-1") && lines[1].contains("online") && lines[1].contains("site=a")
        );
        assert!(lines[1].contains("+2d"), "{}", lines[1]);
        assert_eq!(clock(Some(-1500)), "ok");
        assert_eq!(clock(Some(-300_000)), "-5m");
        assert_eq!(clock(None), "-");
    }
}
