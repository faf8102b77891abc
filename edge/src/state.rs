//! The agent's durable state: one append-only log of what it accepted, started and
//! finished, holding the outbox of outcomes the hub has not receipted yet. See
//! docs/adr/0009-agent-state-log.md (it replaced the file-per-command layout of
//! ADR 0002, which cost about seven fsyncs per command).
//!
//! ```text
//! <state_dir>/log, one line per transition, appended:
//!   A <seq> <id> <command hex>           accepted, not started          fdatasync
//!   S <id> <started ms>                  started, not finished          fdatasync
//!   F <seq> <id> <deadline> <outcome hex> finished, outcome not receipted fdatasync
//!   D <id>                               receipted                      (no sync)
//!   R <id> <deadline> <status hex>       finished and receipted, remembered to answer
//!                                        a re-delivery `Duplicate` (written by compaction)
//! ```
//! Three fdatasyncs per command, two when it starts at once (`A` and `S` are synced
//! together). A lost `D` (power cut before the next sync) only sends that outcome
//! again, and the hub answers a duplicate outcome with a receipt.
//! A torn last line (power cut mid-append) is cut off when the log is opened; a
//! complete line that does not parse (outside damage) is skipped and copied to
//! `log.corrupt` for a human. When most of the log is dead it is rewritten (temporary
//! file, fsync, rename, directory fsync) with only what is live.
//!
//! Memory does not grow with the log: it is read line by line at open (a Pi Zero with
//! a long outbox must not run out of memory at every start), outcomes stay on disk
//! and are read back by offset, and the ids remembered for duplicate detection are
//! bounded by count ([`MAX_SEEN`]) and forgotten by the hub's clock, never the unit's
//! (ADR 0011).

use outpost_wire::{
    Command, MsgId, Outcome, Recorded, RejectCode, Rejection, Status, decode, encode, now_ms,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Finished commands remembered for duplicate detection, at most (about 40 bytes
/// each). An id is forgotten only once its deadline has passed by the hub's clock (a
/// re-delivery is then refused as expired, never run); when this many are still
/// within their deadline the unit answers new commands `Busy` rather than forget one.
pub const MAX_SEEN: usize = 16_384;
/// How long past its deadline (hub clock) a finished command is still remembered, so
/// that a late re-delivery gets `Duplicate` with what happened, not `Expired`.
pub const RETAIN_AFTER_DEADLINE_MS: u64 = 3600 * 1000;
/// The log is compacted once it is this much larger than twice what is live in it.
const COMPACT_SLACK_BYTES: u64 = 1 << 20;
const COMPACT_SLACK_LINES: usize = 64;

/// A state-dir operation failed; names the file and the operation.
#[derive(Debug, thiserror::Error)]
#[error("state dir: cannot {op} {path}: {source}")]
pub struct StateError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One accepted command on its way through the state dir.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Acceptance order on this unit.
    pub seq: u64,
    pub command: Command,
}

/// What `open` found to do after a restart.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Accepted before the restart and never started: run them, in this order.
    pub queued: Vec<Ticket>,
    /// Were running when the agent died: reported failed ("interrupted").
    pub interrupted: Vec<MsgId>,
    /// Complete log lines that did not parse (outside damage), copied to `log.corrupt`.
    pub corrupt_lines: usize,
    /// Entries taken over from the layout of ADR 0002 (an agent upgraded in place).
    pub imported: usize,
}

/// What is remembered of a command: its deadline and how it stands, without the
/// reason texts (a duplicate is answered with the status; the outcome itself is in,
/// or went through, the outbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    deadline: u64,
    kept: Kept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Pending,
    Succeeded,
    Failed,
    TimedOut,
    Rejected(RejectCode),
    Expired,
}

/// The reason a remembered status stands for, its text not kept.
const NOT_KEPT: &str = "(reason not kept; see the command's outcome)";

impl Kept {
    fn of(r: &Recorded) -> Kept {
        match r {
            Recorded::Pending => Kept::Pending,
            Recorded::Finished(Status::Succeeded) => Kept::Succeeded,
            Recorded::Finished(Status::Failed(_)) => Kept::Failed,
            Recorded::Finished(Status::TimedOut) => Kept::TimedOut,
            Recorded::Finished(Status::Rejected(r)) => Kept::Rejected(r.code),
            Recorded::Finished(Status::Expired(_)) => Kept::Expired,
        }
    }

    fn recorded(self) -> Recorded {
        let done = Recorded::Finished;
        match self {
            Kept::Pending => Recorded::Pending,
            Kept::Succeeded => done(Status::Succeeded),
            Kept::Failed => done(Status::Failed(NOT_KEPT.into())),
            Kept::TimedOut => done(Status::TimedOut),
            Kept::Rejected(code) => done(Status::Rejected(Rejection {
                code,
                detail: NOT_KEPT.into(),
            })),
            Kept::Expired => done(Status::Expired(NOT_KEPT.into())),
        }
    }
}

/// Where a line's hex payload lies in the log.
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u64,
    len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Queued,
    Running { started: u64 },
    Outbox { deadline: u64 },
}

/// An entry that is not done: accepted, running, or finished and not yet receipted.
/// `span` is the command's hex (queued, running) or the outcome's (outbox).
#[derive(Debug, Clone, Copy)]
struct Live {
    id: MsgId,
    stage: Stage,
    span: Span,
}

/// The state directory, opened.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    path: PathBuf,
    log: File,
    /// Bytes and lines in the log, all complete.
    len: u64,
    lines: usize,
    seen: HashMap<MsgId, Seen>,
    live: BTreeMap<u64, Live>,
    seq_of: HashMap<MsgId, u64>,
    next_seq: u64,
    max_seen: usize,
    /// Hub time before which every forgotten id's deadline lies, kept in `hub-time`.
    hub_floor: u64,
}

/// The file that keeps [`StateDir::hub_floor`] across restarts.
pub const HUB_TIME_FILE: &str = "hub-time";

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Fault injection for the tests of compaction: `OUTPOST_STATE_FAULT=<point>` makes
/// the named step fail. Test builds only.
#[cfg(test)]
fn fault(point: &str) -> Result<(), StateError> {
    FAULT.with(|f| {
        if f.borrow().as_deref() == Some(point) {
            Err(StateError {
                op: "inject a fault at",
                path: PathBuf::from(point),
                source: io::Error::other("injected"),
            })
        } else {
            Ok(())
        }
    })
}

#[cfg(not(test))]
fn fault(_point: &str) -> Result<(), StateError> {
    Ok(())
}

#[cfg(test)]
thread_local! {
    static FAULT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync directory", dir))
}

fn open_log(path: &Path) -> Result<File, StateError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(err("open", path))
}

/// A line's payload: everything after the last space.
fn payload_span(line_at: u64, line: &str) -> Span {
    let start = line.rfind(' ').map_or(0, |i| i + 1);
    Span {
        at: line_at + start as u64,
        len: (line.len() - start) as u64,
    }
}

impl StateDir {
    /// Open (creating if needed) and recover: interrupted commands get their
    /// "interrupted" outcome in the outbox before anything else happens.
    pub fn open(root: &Path) -> Result<(StateDir, Recovery), StateError> {
        fs::create_dir_all(root).map_err(err("create", root))?;
        let path = root.join("log");
        let fresh = !path.exists();
        let log = open_log(&path)?;
        if fresh {
            sync_dir(root)?;
        }
        let file_len = log.metadata().map_err(err("read", &path))?.len();
        let mut dir = StateDir {
            root: root.to_path_buf(),
            path: path.clone(),
            log,
            len: 0,
            lines: 0,
            seen: HashMap::new(),
            live: BTreeMap::new(),
            seq_of: HashMap::new(),
            next_seq: 0,
            max_seen: MAX_SEEN,
            hub_floor: fs::read_to_string(root.join(HUB_TIME_FILE))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
        };
        let mut rec = Recovery::default();
        // Line by line: memory is the longest line, not the log.
        let mut corrupt: Option<File> = None;
        let mut at = 0u64;
        {
            let reading = File::open(&path).map_err(err("open", &path))?;
            let mut reader = BufReader::with_capacity(64 * 1024, reading);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(err("read", &path))?;
                if n == 0 || buf.last() != Some(&b'\n') {
                    // The end, or a torn last line (power cut mid-append).
                    break;
                }
                let line = &buf[..n - 1];
                let ok = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| dir.replay(l, at));
                if ok.is_none() {
                    let p = dir.root.join("log.corrupt");
                    if corrupt.is_none() {
                        corrupt = Some(
                            OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&p)
                                .map_err(err("open", &p))?,
                        );
                    }
                    if let Some(f) = corrupt.as_mut() {
                        f.write_all(&buf).map_err(err("write", &p))?;
                    }
                    rec.corrupt_lines += 1;
                }
                at += n as u64;
                dir.lines += 1;
            }
        }
        // A torn last line: cut it off, so the next line starts clean.
        if at < file_len {
            dir.log
                .set_len(at)
                .and_then(|_| dir.log.sync_data())
                .map_err(err("cut the torn end of", &path))?;
        }
        dir.len = at;
        rec.imported = dir.import_legacy()?;
        let entries: Vec<(u64, Live)> = dir.live.iter().map(|(s, l)| (*s, *l)).collect();
        for (seq, l) in entries {
            if matches!(l.stage, Stage::Outbox { .. }) {
                continue;
            }
            // Queued or running: its command is the A line's payload, read back now
            // (only these few are ever held in memory).
            let Some(command) = dir
                .read_span(l.span)
                .ok()
                .and_then(|t| unhex(&t))
                .and_then(|b| decode::<Command>(&b).ok())
            else {
                continue;
            };
            let ticket = Ticket { seq, command };
            match l.stage {
                Stage::Queued => rec.queued.push(ticket),
                Stage::Running { started } => {
                    let outcome = Outcome {
                        command: l.id,
                        status: Status::Failed(
                            "interrupted: the agent stopped while the command was running".into(),
                        ),
                        exit_code: None,
                        stdout: vec![],
                        stderr: vec![],
                        truncated: false,
                        started_at: started,
                        duration_ms: now_ms().saturating_sub(started).min(u32::MAX as u64) as u32,
                    };
                    dir.finish(&ticket, &outcome)?;
                    rec.interrupted.push(l.id);
                }
                Stage::Outbox { .. } => {}
            }
        }
        // Forget nothing yet: the hub's clock is unknown until it speaks.
        dir.prune(None);
        Ok((dir, rec))
    }

    /// Apply one log line read back at offset `at`; `None` if it does not parse.
    fn replay(&mut self, line: &str, at: u64) -> Option<()> {
        let mut f = line.split(' ');
        match f.next()? {
            "A" => {
                let seq: u64 = f.next()?.parse().ok()?;
                let id: MsgId = f.next()?.parse().ok()?;
                let command: Command = decode(&unhex(f.next()?)?).ok()?;
                if command.id != id || f.next().is_some() {
                    return None;
                }
                self.remember(id, command.deadline, Recorded::Pending);
                self.put_live(seq, id, Stage::Queued, payload_span(at, line));
            }
            "S" => {
                let id: MsgId = f.next()?.parse().ok()?;
                let started: u64 = f.next()?.parse().ok()?;
                let seq = self.seq_of.get(&id)?;
                let l = self.live.get_mut(seq)?;
                l.stage = Stage::Running { started };
            }
            "F" => {
                let seq: u64 = f.next()?.parse().ok()?;
                let id: MsgId = f.next()?.parse().ok()?;
                let deadline: u64 = f.next()?.parse().ok()?;
                let outcome: Outcome = decode(&unhex(f.next()?)?).ok()?;
                if outcome.command != id || f.next().is_some() {
                    return None;
                }
                self.remember(id, deadline, Recorded::Finished(outcome.status));
                self.put_live(seq, id, Stage::Outbox { deadline }, payload_span(at, line));
            }
            "D" => {
                let id: MsgId = f.next()?.parse().ok()?;
                if let Some(seq) = self.seq_of.remove(&id) {
                    self.live.remove(&seq);
                }
            }
            "R" => {
                let id: MsgId = f.next()?.parse().ok()?;
                let deadline: u64 = f.next()?.parse().ok()?;
                let status: Status = decode(&unhex(f.next()?)?).ok()?;
                self.remember(id, deadline, Recorded::Finished(status));
            }
            _ => return None,
        }
        Some(())
    }

    /// Record what is known of a command for duplicate detection.
    fn remember(&mut self, id: MsgId, deadline: u64, recorded: Recorded) {
        self.seen.insert(
            id,
            Seen {
                deadline,
                kept: Kept::of(&recorded),
            },
        );
    }

    /// Track a live entry under its acceptance number (which later ones follow).
    fn put_live(&mut self, seq: u64, id: MsgId, stage: Stage, span: Span) {
        self.next_seq = self.next_seq.max(seq + 1);
        if let Some(old) = self.seq_of.insert(id, seq)
            && old != seq
        {
            self.live.remove(&old);
        }
        self.live.insert(seq, Live { id, stage, span });
    }

    /// Append one complete line; synced when `sync`. Returns the line's offset. A
    /// failed append is cut off again, so a retry starts on a clean line.
    fn append(&mut self, line: &str, sync: bool) -> Result<u64, StateError> {
        let at = self.len;
        let r = self
            .log
            .write_all(line.as_bytes())
            .and_then(|_| if sync { self.log.sync_data() } else { Ok(()) });
        match r {
            Ok(()) => {
                self.len += line.len() as u64;
                self.lines += 1;
                Ok(at)
            }
            Err(e) => {
                let _ = self.log.set_len(at);
                Err(err("append to", &self.path)(e))
            }
        }
    }

    fn read_span(&self, span: Span) -> Result<String, StateError> {
        let mut buf = vec![0u8; span.len as usize];
        self.log
            .read_exact_at(&mut buf, span.at)
            .map_err(err("read", &self.path))?;
        String::from_utf8(buf).map_err(|_| {
            err("read", &self.path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "log entry is not text",
            ))
        })
    }

    /// What the unit recorded for a command id, if it has seen it.
    pub fn lookup(&self, id: &MsgId) -> Option<Recorded> {
        self.seen.get(id).map(|s| s.kept.recorded())
    }

    /// Commands accepted and not yet finished.
    pub fn pending(&self) -> usize {
        self.live
            .values()
            .filter(|l| !matches!(l.stage, Stage::Outbox { .. }))
            .count()
    }

    /// Whether the duplicate memory is full of ids it may not forget yet (their
    /// deadlines have not passed): new commands must wait (`Busy`).
    pub fn full(&self) -> bool {
        self.seen.len() >= self.max_seen
    }

    /// Durably record acceptance (and, when `start`, that it started at once: both
    /// lines, one sync). Only after this returns may the command be ACKed.
    pub fn accept(&mut self, command: &Command, start: bool) -> Result<Ticket, StateError> {
        let seq = self.next_seq;
        let a = format!("A {seq} {} {}\n", command.id, hex(&encode(command)));
        let now = now_ms();
        let line = if start {
            format!("{a}S {} {now}\n", command.id)
        } else {
            a.clone()
        };
        let at = self.append(&line, true)?;
        if start {
            // Two lines in one append.
            self.lines += 1;
        }
        self.remember(command.id, command.deadline, Recorded::Pending);
        let span = payload_span(at, a.trim_end());
        let stage = if start {
            Stage::Running { started: now }
        } else {
            Stage::Queued
        };
        self.put_live(seq, command.id, stage, span);
        Ok(Ticket {
            seq,
            command: command.clone(),
        })
    }

    /// Mark a command started: from here a crash reports it interrupted.
    pub fn start(&mut self, t: &Ticket) -> Result<(), StateError> {
        let now = now_ms();
        self.append(&format!("S {} {now}\n", t.command.id), true)?;
        if let Some(l) = self.live.get_mut(&t.seq) {
            l.stage = Stage::Running { started: now };
        }
        Ok(())
    }

    /// Durably record the outcome: it is in the outbox until `delivered`.
    pub fn finish(&mut self, t: &Ticket, outcome: &Outcome) -> Result<(), StateError> {
        let deadline = t.command.deadline;
        let line = format!(
            "F {} {} {deadline} {}\n",
            t.seq,
            t.command.id,
            hex(&encode(outcome))
        );
        let at = self.append(&line, true)?;
        let span = payload_span(at, line.trim_end());
        self.put_live(t.seq, t.command.id, Stage::Outbox { deadline }, span);
        self.remember(
            t.command.id,
            deadline,
            Recorded::Finished(outcome.status.clone()),
        );
        Ok(())
    }

    /// Outbox entries (finished, not receipted), oldest first.
    pub fn outbox(&self) -> Vec<MsgId> {
        self.live
            .values()
            .filter(|l| matches!(l.stage, Stage::Outbox { .. }))
            .map(|l| l.id)
            .collect()
    }

    /// The encoded outcome of an outbox entry, as it goes on the wire.
    pub fn outcome_bytes(&self, id: &MsgId) -> Result<Option<Vec<u8>>, StateError> {
        let Some(l) = self.seq_of.get(id).and_then(|s| self.live.get(s)) else {
            return Ok(None);
        };
        if !matches!(l.stage, Stage::Outbox { .. }) {
            return Ok(None);
        }
        let text = self.read_span(l.span)?;
        unhex(&text).map(Some).ok_or_else(|| {
            err("read", &self.path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "outbox entry is not hex",
            ))
        })
    }

    /// The hub confirmed receipt: the entry leaves the outbox. Not synced: if this
    /// line is lost the outcome is sent once more, and receipted once more.
    pub fn delivered(&mut self, id: &MsgId) -> Result<(), StateError> {
        let Some(seq) = self.seq_of.get(id).copied() else {
            return Ok(());
        };
        if !matches!(
            self.live.get(&seq).map(|l| l.stage),
            Some(Stage::Outbox { .. })
        ) {
            return Ok(());
        }
        self.seq_of.remove(id);
        self.live.remove(&seq);
        let r = self.append(&format!("D {id}\n"), false).map(|_| ());
        self.maybe_compact();
        r
    }

    /// Forget finished, receipted commands whose deadline passed (with a margin) by
    /// the hub's clock `hub_now` (unknown: forget nothing); compact the log when most
    /// of it is dead. Never forgets an id still within its deadline: at [`MAX_SEEN`] of
    /// those, [`StateDir::full`] says so and the unit answers `Busy`.
    pub fn prune(&mut self, hub_now: Option<u64>) {
        if let Some(now) = hub_now {
            let keep = |live: &HashMap<MsgId, u64>, id: &MsgId, s: &Seen| {
                s.kept == Kept::Pending
                    || live.contains_key(id)
                    || s.deadline.saturating_add(RETAIN_AFTER_DEADLINE_MS) > now
            };
            let newest_dropped = self
                .seen
                .iter()
                .filter(|(id, s)| !keep(&self.seq_of, id, s))
                .map(|(_, s)| s.deadline)
                .max();
            // Before an id is forgotten, the hub time that makes its re-delivery
            // expired is kept on disk (about once an hour): after a restart the clock
            // cannot be set back before it by a replayed command.
            if let Some(d) = newest_dropped
                && d >= self.hub_floor
                && let Err(e) = self.save_hub_floor(now)
            {
                tracing::warn!(error = %e, "cannot keep the hub time; forgetting no ids");
                return self.maybe_compact();
            }
            let live = &self.seq_of;
            self.seen.retain(|id, s| keep(live, id, s));
        }
        self.maybe_compact();
    }

    /// Hub time known to have passed when the agent last forgot ids (0: never).
    pub fn hub_floor(&self) -> u64 {
        self.hub_floor
    }

    fn save_hub_floor(&mut self, now: u64) -> Result<(), StateError> {
        let path = self.root.join(HUB_TIME_FILE);
        let tmp = self.root.join("hub-time.tmp");
        let mut f = File::create(&tmp).map_err(err("create", &tmp))?;
        f.write_all(format!("{now}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(err("rename", &path))?;
        sync_dir(&self.root)?;
        self.hub_floor = now;
        Ok(())
    }

    fn maybe_compact(&mut self) {
        let live_bytes: u64 = self.live.values().map(|l| l.span.len + 64).sum();
        let kept = self.seen.len() + self.live.len();
        if self.lines > 2 * kept + COMPACT_SLACK_LINES
            || self.len > 2 * (live_bytes + 128 * self.seen.len() as u64) + COMPACT_SLACK_BYTES
        {
            // Best effort: a failed compaction leaves the longer, still valid log.
            let _ = self.compact();
        }
    }

    /// Rewrite the log with only what is live and what is remembered.
    fn compact(&mut self) -> Result<(), StateError> {
        let tmp = self.root.join(".log.tmp");
        let file = File::create(&tmp).map_err(err("create", &tmp))?;
        let mut w = BufWriter::new(file);
        let mut len = 0u64;
        let mut lines = 0usize;
        let mut live = BTreeMap::new();
        let mut put = |w: &mut BufWriter<File>, line: &str| -> Result<u64, StateError> {
            let at = len;
            w.write_all(line.as_bytes()).map_err(err("write", &tmp))?;
            len += line.len() as u64;
            lines += 1;
            Ok(at)
        };
        for (id, s) in &self.seen {
            if let Recorded::Finished(status) = s.kept.recorded()
                && !self.seq_of.contains_key(id)
            {
                let line = format!("R {id} {} {}\n", s.deadline, hex(&encode(&status)));
                put(&mut w, &line)?;
            }
        }
        for (&seq, l) in &self.live {
            let payload = self.read_span(l.span)?;
            let line = match l.stage {
                Stage::Queued | Stage::Running { .. } => format!("A {seq} {} {payload}\n", l.id),
                Stage::Outbox { deadline } => {
                    format!("F {seq} {} {deadline} {payload}\n", l.id)
                }
            };
            let at = put(&mut w, &line)?;
            live.insert(
                seq,
                Live {
                    span: payload_span(at, line.trim_end()),
                    ..*l
                },
            );
            if let Stage::Running { started } = l.stage {
                put(&mut w, &format!("S {} {started}\n", l.id))?;
            }
        }
        let file = w
            .into_inner()
            .map_err(|e| err("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(err("fsync", &tmp))?;
        // The handle to append to from now on, opened before the rename: a rename that
        // succeeds and a reopen that then fails would leave the agent appending to the
        // old, unlinked file (every later line lost).
        let new_log = open_log(&tmp)?;
        fault("compact:before-rename")?;
        fs::rename(&tmp, &self.path).map_err(err("rename into place", &self.path))?;
        // From here the new file is the log, whatever else fails.
        self.log = new_log;
        self.len = len;
        self.lines = lines;
        self.live = live;
        fault("compact:after-rename")?;
        sync_dir(&self.root)
    }

    /// Take over the layout of ADR 0002 (`queued/`, `running/`, `outbox/` with one
    /// file per command, and a `journal`), left by an agent upgraded in place:
    /// appended to the log, synced, then removed. Returns how many entries it took.
    fn import_legacy(&mut self) -> Result<usize, StateError> {
        let journal = self.root.join("journal");
        let subs = ["queued", "running", "outbox"];
        if !journal.exists() && subs.iter().all(|s| !self.root.join(s).exists()) {
            return Ok(0);
        }
        let mut lines = Vec::new();
        if let Ok(text) = fs::read_to_string(&journal) {
            for l in text.lines() {
                let mut f = l.split(' ');
                if let (Some(id), Some(deadline), Some(status), None) =
                    (f.next(), f.next(), f.next(), f.next())
                {
                    lines.push(format!("R {id} {deadline} {status}"));
                }
            }
        }
        for sub in subs {
            let dir = self.root.join(sub);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.') && !n.ends_with(".corrupt"))
                .collect();
            names.sort();
            for name in names {
                let Some((seq, id)) = name.split_once('-').and_then(|(s, i)| {
                    Some((u64::from_str_radix(s, 16).ok()?, i.parse::<MsgId>().ok()?))
                }) else {
                    continue;
                };
                let path = dir.join(&name);
                let bytes = fs::read(&path).map_err(err("read", &path))?;
                let modified = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                match sub {
                    "outbox" => lines.push(format!("F {seq} {id} {} {}", now_ms(), hex(&bytes))),
                    _ => {
                        lines.push(format!("A {seq} {id} {}", hex(&bytes)));
                        if sub == "running" {
                            lines.push(format!("S {id} {modified}"));
                        }
                    }
                }
            }
        }
        let mut taken = 0;
        for line in &lines {
            let at = self.append(&format!("{line}\n"), false)?;
            // A running entry is an `A` and an `S` line; count it once.
            if self.replay(line, at).is_some() && !line.starts_with('S') {
                taken += 1;
            }
        }
        self.log.sync_data().map_err(err("fsync", &self.path))?;
        for sub in subs {
            let dir = self.root.join(sub);
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(err("remove", &dir))?;
            }
        }
        if journal.exists() {
            fs::remove_file(&journal).map_err(err("remove", &journal))?;
        }
        sync_dir(&self.root)?;
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_wire::Method;

    fn cmd(n: u8) -> Command {
        Command {
            id: MsgId([n; 16]),
            from: "hub".into(),
            to: "pi".into(),
            issued_at: 0,
            deadline: now_ms() + 60_000,
            domain: String::new(),
            timeout_ms: 0,
            method: Method::Ping,
            sent_at: 0,
        }
    }

    fn outcome(id: MsgId) -> Outcome {
        Outcome {
            command: id,
            status: Status::Succeeded,
            exit_code: Some(0),
            stdout: b"hi".to_vec(),
            stderr: vec![],
            truncated: false,
            started_at: 1,
            duration_ms: 1,
        }
    }

    fn log_lines(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join("log"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn restart_recovers_queued_interrupted_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, rec) = StateDir::open(dir.path()).unwrap();
            assert!(rec.queued.is_empty());
            let a = s.accept(&cmd(1), false).unwrap();
            let b = s.accept(&cmd(2), false).unwrap();
            let c = s.accept(&cmd(3), false).unwrap();
            let d = s.accept(&cmd(4), false).unwrap();
            s.start(&a).unwrap();
            s.finish(&a, &outcome(a.command.id)).unwrap();
            s.start(&b).unwrap();
            s.start(&d).unwrap();
            // c and e stay queued, in acceptance order; b and d are "running" when
            // everything is dropped (a crash).
            let e = s.accept(&cmd(5), false).unwrap();
            assert_eq!(s.lookup(&c.command.id), Some(Recorded::Pending));
            assert_eq!(s.lookup(&e.command.id), Some(Recorded::Pending));
            assert_eq!(s.pending(), 4);
        }
        let (mut s, rec) = StateDir::open(dir.path()).unwrap();
        let queued: Vec<MsgId> = rec.queued.iter().map(|t| t.command.id).collect();
        assert_eq!(queued, vec![MsgId([3; 16]), MsgId([5; 16])]);
        assert_eq!(rec.interrupted, vec![MsgId([2; 16]), MsgId([4; 16])]);
        assert_eq!(rec.corrupt_lines, 0);
        assert_eq!(
            s.lookup(&MsgId([1; 16])),
            Some(Recorded::Finished(Status::Succeeded))
        );
        assert!(matches!(
            s.lookup(&MsgId([2; 16])),
            Some(Recorded::Finished(Status::Failed(_)))
        ));
        let outbox = s.outbox();
        assert_eq!(
            outbox,
            vec![MsgId([1; 16]), MsgId([2; 16]), MsgId([4; 16])],
            "a's outcome, then the interrupted b and d, in acceptance order"
        );
        let sent: Outcome = decode(&s.outcome_bytes(&outbox[0]).unwrap().unwrap()).unwrap();
        assert_eq!(sent, outcome(MsgId([1; 16])));
        for id in &outbox {
            s.delivered(id).unwrap();
        }
        assert!(s.outcome_bytes(&outbox[0]).unwrap().is_none());
        // Delivered outcomes are still remembered through the log; queued ones are
        // still queued.
        drop(s);
        let (s, rec) = StateDir::open(dir.path()).unwrap();
        assert!(s.outbox().is_empty());
        assert!(rec.interrupted.is_empty(), "interrupted only once");
        assert_eq!(rec.queued.len(), 2);
        assert!(s.lookup(&MsgId([1; 16])).is_some());
        assert!(s.lookup(&MsgId([2; 16])).is_some());
    }

    #[test]
    fn three_synced_lines_per_command() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = StateDir::open(dir.path()).unwrap();
        let a = s.accept(&cmd(1), false).unwrap();
        s.start(&a).unwrap();
        s.finish(&a, &outcome(a.command.id)).unwrap();
        s.delivered(&a.command.id).unwrap();
        let kinds: Vec<String> = log_lines(dir.path())
            .iter()
            .map(|l| l[..1].to_string())
            .collect();
        assert_eq!(kinds, ["A", "S", "F", "D"]);
    }

    #[test]
    fn torn_last_line_is_cut_and_the_next_line_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            let a = s.accept(&cmd(1), false).unwrap();
            s.finish(&a, &outcome(a.command.id)).unwrap();
        }
        let mut j = OpenOptions::new()
            .append(true)
            .open(dir.path().join("log"))
            .unwrap();
        j.write_all(b"A 7 0101010101 12").unwrap();
        {
            let (mut s, rec) = StateDir::open(dir.path()).unwrap();
            assert_eq!(rec.corrupt_lines, 0, "a torn line is not damage");
            assert!(s.lookup(&MsgId([1; 16])).is_some());
            s.accept(&cmd(2), false).unwrap();
        }
        let (s, rec) = StateDir::open(dir.path()).unwrap();
        assert_eq!(rec.corrupt_lines, 0);
        assert_eq!(rec.queued.len(), 1, "the line after the cut parses");
        assert_eq!(s.lookup(&MsgId([2; 16])), Some(Recorded::Pending));
    }

    #[test]
    fn damaged_line_is_set_aside_and_the_rest_recovers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            s.accept(&cmd(1), false).unwrap();
        }
        let mut j = OpenOptions::new()
            .append(true)
            .open(dir.path().join("log"))
            .unwrap();
        j.write_all(b"A 1 not-an-id zz\n").unwrap();
        drop(j);
        {
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            s.accept(&cmd(2), false).unwrap();
        }
        let (_, rec) = StateDir::open(dir.path()).unwrap();
        assert_eq!(rec.corrupt_lines, 1);
        assert_eq!(rec.queued.len(), 2);
        let aside = fs::read_to_string(dir.path().join("log.corrupt")).unwrap();
        assert!(aside.contains("not-an-id"), "{aside}");
    }

    #[test]
    fn ids_are_forgotten_by_hub_time_only_and_the_log_compacts_keeping_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = StateDir::open(dir.path()).unwrap();
        s.max_seen = 50;
        let waiting = s.accept(&cmd(200), false).unwrap();
        let running = s.accept(&cmd(201), true).unwrap();
        let unreceipted = s.accept(&cmd(202), false).unwrap();
        s.finish(&unreceipted, &outcome(unreceipted.command.id))
            .unwrap();
        let mut ids = vec![];
        for i in 0..300u64 {
            let mut c = cmd(0);
            c.id = MsgId::new(i);
            c.deadline = 1_000 + i;
            ids.push(c.id);
            let t = s.accept(&c, true).unwrap();
            s.finish(&t, &outcome(c.id)).unwrap();
            s.delivered(&c.id).unwrap();
            // The unit's own clock plays no part: without hub time nothing goes.
            s.prune(None);
        }
        assert!(s.full(), "full of ids it may not forget yet");
        assert!(s.lookup(&ids[0]).is_some());
        // Hub time past the first 100 deadlines (and the margin): those go, no others.
        s.prune(Some(1_099 + RETAIN_AFTER_DEADLINE_MS));
        assert!(s.lookup(&ids[0]).is_none() && s.lookup(&ids[99]).is_none());
        assert!(s.lookup(&ids[100]).is_some() && s.lookup(&ids[299]).is_some());
        // Live ones are never forgotten, whatever the time.
        s.prune(Some(u64::MAX));
        for live in [&waiting, &running, &unreceipted] {
            assert!(s.lookup(&live.command.id).is_some());
        }
        assert!(!s.full());
        let lines = log_lines(dir.path()).len();
        assert!(lines <= 2 * 10 + 64 + 8, "log has {lines} lines");
        drop(s);
        let (s, rec) = StateDir::open(dir.path()).unwrap();
        // The hub time at which ids were first forgotten survives the restart; it is
        // past every forgotten deadline (the last one, 1,299), so it was not rewritten.
        assert_eq!(s.hub_floor(), 1_099 + RETAIN_AFTER_DEADLINE_MS);
        assert_eq!(rec.corrupt_lines, 0);
        assert_eq!(rec.queued.len(), 1);
        assert_eq!(rec.queued[0].command.id, waiting.command.id);
        assert_eq!(rec.interrupted, vec![running.command.id]);
        assert_eq!(
            s.outbox(),
            vec![running.command.id, unreceipted.command.id],
            "the interrupted one and the unreceipted one, in acceptance order"
        );
        let o: Outcome =
            decode(&s.outcome_bytes(&unreceipted.command.id).unwrap().unwrap()).unwrap();
        assert_eq!(o.stdout, b"hi");
    }

    #[test]
    fn accepted_and_started_together_cost_one_sync_and_recover_as_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            s.accept(&cmd(1), true).unwrap();
        }
        let kinds: Vec<String> = log_lines(dir.path())
            .iter()
            .map(|l| l[..1].to_string())
            .collect();
        assert_eq!(kinds, ["A", "S"]);
        let (s, rec) = StateDir::open(dir.path()).unwrap();
        assert_eq!(rec.interrupted, vec![MsgId([1; 16])]);
        assert_eq!(s.outbox().len(), 1);
    }

    #[test]
    fn a_compaction_that_fails_after_its_rename_keeps_writing_to_the_new_log() {
        for point in ["compact:before-rename", "compact:after-rename"] {
            let dir = tempfile::tempdir().unwrap();
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            let keep = s.accept(&cmd(9), false).unwrap();
            for i in 0..100u64 {
                let mut c = cmd(0);
                c.id = MsgId::new(i);
                let t = s.accept(&c, true).unwrap();
                s.finish(&t, &outcome(c.id)).unwrap();
                s.delivered(&c.id).unwrap();
            }
            FAULT.with(|f| *f.borrow_mut() = Some(point.into()));
            assert!(s.compact().is_err(), "{point}: the fault fired");
            FAULT.with(|f| *f.borrow_mut() = None);
            // What comes after the failed compaction is in the log the next start reads.
            let later = s.accept(&cmd(10), false).unwrap();
            drop(s);
            let (_, rec) = StateDir::open(dir.path()).unwrap();
            let queued: Vec<MsgId> = rec.queued.iter().map(|t| t.command.id).collect();
            assert_eq!(
                queued,
                vec![keep.command.id, later.command.id],
                "{point}: nothing written after the failure is lost"
            );
            assert_eq!(rec.corrupt_lines, 0, "{point}");
        }
    }

    #[test]
    fn opening_a_long_log_holds_one_line_at_a_time() {
        // 40 MB of outbox: outcomes stay on disk, read back by offset.
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            for i in 0..40u64 {
                let mut c = cmd(0);
                c.id = MsgId::new(i + 1);
                let t = s.accept(&c, true).unwrap();
                let mut o = outcome(c.id);
                o.stdout = vec![b'y'; 512 * 1024];
                s.finish(&t, &o).unwrap();
            }
        }
        let size = std::fs::metadata(dir.path().join("log")).unwrap().len();
        assert!(size > 40_000_000, "{size}");
        let before = peak_rss_kib();
        let (s, _) = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.outbox().len(), 40);
        let grew = peak_rss_kib().saturating_sub(before);
        // One line (1 MiB of hex) and bookkeeping, not 40 MB.
        assert!(grew < 16 * 1024, "opening grew the peak RSS by {grew} KiB");
    }

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn the_file_per_command_layout_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["queued", "running", "outbox"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let (q, r, o) = (cmd(1), cmd(2), cmd(3));
        let name = |seq: u64, c: &Command| format!("{seq:016x}-{}", c.id);
        fs::write(root.join("queued").join(name(5, &q)), encode(&q)).unwrap();
        fs::write(root.join("running").join(name(4, &r)), encode(&r)).unwrap();
        fs::write(
            root.join("outbox").join(name(3, &o)),
            encode(&outcome(o.id)),
        )
        .unwrap();
        let done = MsgId([9; 16]);
        fs::write(
            root.join("journal"),
            format!("{done} {} {}\n", now_ms(), hex(&encode(&Status::Succeeded))),
        )
        .unwrap();
        let (mut s, rec) = StateDir::open(root).unwrap();
        assert_eq!(rec.imported, 4);
        assert_eq!(rec.queued.len(), 1);
        assert_eq!(rec.queued[0].command, q);
        assert_eq!(rec.interrupted, vec![r.id]);
        assert_eq!(s.outbox(), vec![o.id, r.id], "oldest first");
        assert_eq!(s.lookup(&done), Some(Recorded::Finished(Status::Succeeded)));
        for sub in ["queued", "running", "outbox", "journal"] {
            assert!(!root.join(sub).exists(), "{sub} is left behind");
        }
        // New acceptances continue after the imported sequence numbers.
        assert!(s.accept(&cmd(7), false).unwrap().seq > 5);
    }

    #[test]
    fn unwritable_state_dir_is_a_clear_error() {
        let e = StateDir::open(Path::new("/proc/outpost-cannot-exist")).unwrap_err();
        assert!(e.to_string().contains("/proc/outpost-cannot-exist"), "{e}");
    }
}
