//! The agent's durable state directory: what it accepted, what is running, and the
//! outbox of outcomes not yet confirmed by the hub. See docs/adr/0002-agent-state-dir.md.
//!
//! ```text
//! <state_dir>/queued/<seq>-<id>   accepted, not started   (encoded Command)
//! <state_dir>/running/<seq>-<id>  started, not finished   (the same file, renamed)
//! <state_dir>/outbox/<seq>-<id>   finished, not receipted (encoded Outcome)
//! <state_dir>/journal             one line per finished command: `<id> <deadline> <status hex>`
//! ```
//! Every file is written to a temporary name, fsynced, renamed and its directory
//! fsynced, so a crash or power cut at any point leaves the old state or the new one.
//! The journal is append-only; a torn last line is skipped when it is read.

use outpost_wire::{Command, MsgId, Outcome, Recorded, Status, decode, encode, now_ms};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Finished commands remembered for duplicate detection, at most. A replay of a
/// command forgotten earlier is still refused when its deadline has passed.
pub const MAX_SEEN: usize = 4096;
/// How long past its deadline a finished command is remembered: covers clock skew
/// between hub and unit, so a late re-delivery is answered `Duplicate`, not run.
pub const RETAIN_AFTER_DEADLINE_MS: u64 = 24 * 3600 * 1000;

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
    pub name: String,
    pub command: Command,
}

/// What `open` found to do after a restart.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Accepted before the restart and never started: run them, in this order.
    pub queued: Vec<Ticket>,
    /// Were running when the agent died: reported failed ("interrupted").
    pub interrupted: Vec<MsgId>,
}

#[derive(Debug, Clone)]
struct Seen {
    deadline: u64,
    recorded: Recorded,
}

/// The state directory, opened.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    seen: HashMap<MsgId, Seen>,
    next_seq: u64,
    journal: File,
    journal_lines: usize,
    max_seen: usize,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

/// Write `bytes` to `dir/name` atomically and durably.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = dir.join(format!(".tmp-{name}"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(err("create", &tmp))?;
    f.write_all(bytes).map_err(err("write", &tmp))?;
    f.sync_all().map_err(err("fsync", &tmp))?;
    fs::rename(&tmp, &dst).map_err(err("rename into place", &dst))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync directory", dir))
}

/// Sorted entry names of one subdirectory, skipping temporaries.
fn list(dir: &Path) -> Result<Vec<String>, StateError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(err("list", dir))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// `<seq>-<id>` → (seq, id).
fn parse_name(name: &str) -> Option<(u64, MsgId)> {
    let (seq, id) = name.split_once('-')?;
    Some((u64::from_str_radix(seq, 16).ok()?, id.parse().ok()?))
}

impl StateDir {
    /// Open (creating if needed) and recover: interrupted commands get their
    /// "interrupted" outcome in the outbox before anything else happens.
    pub fn open(root: &Path) -> Result<(StateDir, Recovery), StateError> {
        for sub in ["queued", "running", "outbox"] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(err("create", &d))?;
        }
        let jpath = root.join("journal");
        let mut seen = HashMap::new();
        let mut journal_lines = 0;
        match fs::read_to_string(&jpath) {
            Ok(text) => {
                for line in text.lines() {
                    journal_lines += 1;
                    if let Some((id, s)) = parse_journal_line(line) {
                        seen.insert(id, s);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("read", &jpath)(e)),
        }
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jpath)
            .map_err(err("open", &jpath))?;
        let mut dir = StateDir {
            root: root.to_path_buf(),
            seen,
            next_seq: 0,
            journal,
            journal_lines,
            max_seen: MAX_SEEN,
        };
        let recovery = dir.recover()?;
        dir.prune(now_ms());
        Ok((dir, recovery))
    }

    fn recover(&mut self) -> Result<Recovery, StateError> {
        let mut rec = Recovery::default();
        let outbox = list(&self.root.join("outbox"))?;
        let mut in_outbox = std::collections::HashSet::new();
        for name in &outbox {
            let Some((seq, id)) = parse_name(name) else {
                continue;
            };
            self.next_seq = self.next_seq.max(seq + 1);
            in_outbox.insert(id);
            let path = self.root.join("outbox").join(name);
            let bytes = fs::read(&path).map_err(err("read", &path))?;
            if let Ok(o) = decode::<Outcome>(&bytes) {
                self.seen.entry(id).or_insert(Seen {
                    deadline: now_ms(),
                    recorded: Recorded::Finished(o.status),
                });
            }
        }
        for (sub, is_running) in [("running", true), ("queued", false)] {
            for name in list(&self.root.join(sub))? {
                let Some((seq, id)) = parse_name(&name) else {
                    continue;
                };
                self.next_seq = self.next_seq.max(seq + 1);
                let path = self.root.join(sub).join(&name);
                if in_outbox.contains(&id) {
                    // Finished just before the crash; its outcome is already safe.
                    fs::remove_file(&path).map_err(err("remove", &path))?;
                    continue;
                }
                let bytes = fs::read(&path).map_err(err("read", &path))?;
                let Ok(command) = decode::<Command>(&bytes) else {
                    // Only our own atomic writes create these files; a bad one means
                    // outside damage. Keep it aside for a human, never run it.
                    let bad = self.root.join(format!("{name}.corrupt"));
                    fs::rename(&path, &bad).map_err(err("set aside", &path))?;
                    continue;
                };
                let ticket = Ticket { name, command };
                if is_running {
                    let started = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let outcome = Outcome {
                        command: id,
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
                    self.finish(&ticket, &outcome)?;
                    rec.interrupted.push(id);
                } else {
                    self.seen.insert(
                        id,
                        Seen {
                            deadline: ticket.command.deadline,
                            recorded: Recorded::Pending,
                        },
                    );
                    rec.queued.push(ticket);
                }
            }
        }
        Ok(rec)
    }

    /// What the unit recorded for a command id, if it has seen it.
    pub fn lookup(&self, id: &MsgId) -> Option<Recorded> {
        self.seen.get(id).map(|s| s.recorded.clone())
    }

    /// Commands accepted and not yet finished.
    pub fn pending(&self) -> usize {
        self.seen
            .values()
            .filter(|s| s.recorded == Recorded::Pending)
            .count()
    }

    /// Durably record acceptance. Only after this returns may the command be ACKed.
    pub fn accept(&mut self, command: &Command) -> Result<Ticket, StateError> {
        let name = format!("{:016x}-{}", self.next_seq, command.id);
        write_atomic(&self.root.join("queued"), &name, &encode(command))?;
        self.next_seq += 1;
        self.seen.insert(
            command.id,
            Seen {
                deadline: command.deadline,
                recorded: Recorded::Pending,
            },
        );
        Ok(Ticket {
            name,
            command: command.clone(),
        })
    }

    /// Mark a command started: from here a crash reports it interrupted.
    pub fn start(&mut self, t: &Ticket) -> Result<(), StateError> {
        let from = self.root.join("queued").join(&t.name);
        let to = self.root.join("running").join(&t.name);
        fs::rename(&from, &to).map_err(err("move to running", &from))?;
        sync_dir(&self.root.join("running"))?;
        sync_dir(&self.root.join("queued"))
    }

    /// Durably record the outcome (outbox first, then journal, then drop the marker).
    pub fn finish(&mut self, t: &Ticket, outcome: &Outcome) -> Result<(), StateError> {
        write_atomic(&self.root.join("outbox"), &t.name, &encode(outcome))?;
        let line = format!(
            "{} {} {}\n",
            t.command.id,
            t.command.deadline,
            hex(&encode(&outcome.status))
        );
        let jpath = self.root.join("journal");
        self.journal
            .write_all(line.as_bytes())
            .and_then(|_| self.journal.sync_data())
            .map_err(err("append to", &jpath))?;
        self.journal_lines += 1;
        for sub in ["running", "queued"] {
            let p = self.root.join(sub).join(&t.name);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("remove", &p)(e)),
            }
        }
        self.seen.insert(
            t.command.id,
            Seen {
                deadline: t.command.deadline,
                recorded: Recorded::Finished(outcome.status.clone()),
            },
        );
        self.prune(now_ms());
        Ok(())
    }

    /// Outbox entries, oldest first.
    pub fn outbox(&self) -> Result<Vec<PathBuf>, StateError> {
        let dir = self.root.join("outbox");
        Ok(list(&dir)?.into_iter().map(|n| dir.join(n)).collect())
    }

    /// Where a finished command's outcome waits in the outbox.
    pub fn outbox_path(&self, t: &Ticket) -> PathBuf {
        self.root.join("outbox").join(&t.name)
    }

    /// The hub confirmed receipt: drop the entry.
    pub fn delivered(&self, path: &Path) -> Result<(), StateError> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err("remove", path)(e)),
            _ => Ok(()),
        }
    }

    /// Forget finished commands past their retention, then the oldest beyond
    /// `MAX_SEEN`; rewrite the journal when it has grown to twice what it holds.
    fn prune(&mut self, now: u64) {
        self.seen.retain(|_, s| {
            s.recorded == Recorded::Pending
                || s.deadline.saturating_add(RETAIN_AFTER_DEADLINE_MS) > now
        });
        if self.seen.len() > self.max_seen {
            let mut finished: Vec<(u64, MsgId)> = self
                .seen
                .iter()
                .filter(|(_, s)| s.recorded != Recorded::Pending)
                .map(|(id, s)| (s.deadline, *id))
                .collect();
            finished.sort();
            let excess = self.seen.len() - self.max_seen;
            for (_, id) in finished.into_iter().take(excess) {
                self.seen.remove(&id);
            }
        }
        if self.journal_lines > 2 * self.seen.len() + 64 {
            // Best effort: a failed compaction leaves the longer, still valid journal.
            let _ = self.compact();
        }
    }

    fn compact(&mut self) -> Result<(), StateError> {
        let mut text = String::new();
        let mut n = 0;
        for (id, s) in &self.seen {
            if let Recorded::Finished(status) = &s.recorded {
                text.push_str(&format!("{id} {} {}\n", s.deadline, hex(&encode(status))));
                n += 1;
            }
        }
        write_atomic(&self.root, "journal", text.as_bytes())?;
        let jpath = self.root.join("journal");
        self.journal = OpenOptions::new()
            .append(true)
            .open(&jpath)
            .map_err(err("open", &jpath))?;
        self.journal_lines = n;
        Ok(())
    }
}

fn parse_journal_line(line: &str) -> Option<(MsgId, Seen)> {
    let mut parts = line.split(' ');
    let id = parts.next()?.parse().ok()?;
    let deadline = parts.next()?.parse().ok()?;
    let status: Status = decode(&unhex(parts.next()?)?).ok()?;
    Some((
        id,
        Seen {
            deadline,
            recorded: Recorded::Finished(status),
        },
    ))
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

    #[test]
    fn restart_recovers_queued_interrupted_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, rec) = StateDir::open(dir.path()).unwrap();
            assert!(rec.queued.is_empty());
            let a = s.accept(&cmd(1)).unwrap();
            let b = s.accept(&cmd(2)).unwrap();
            let c = s.accept(&cmd(3)).unwrap();
            s.start(&a).unwrap();
            s.finish(&a, &outcome(a.command.id)).unwrap();
            s.start(&b).unwrap();
            // c stays queued; b is "running" when we drop everything (a crash).
            assert_eq!(s.lookup(&c.command.id), Some(Recorded::Pending));
        }
        let (s, rec) = StateDir::open(dir.path()).unwrap();
        assert_eq!(rec.queued.len(), 1);
        assert_eq!(rec.queued[0].command.id, MsgId([3; 16]));
        assert_eq!(rec.interrupted, vec![MsgId([2; 16])]);
        assert_eq!(
            s.lookup(&MsgId([1; 16])),
            Some(Recorded::Finished(Status::Succeeded))
        );
        assert!(matches!(
            s.lookup(&MsgId([2; 16])),
            Some(Recorded::Finished(Status::Failed(_)))
        ));
        let outbox = s.outbox().unwrap();
        assert_eq!(outbox.len(), 2, "a's outcome and b's interrupted outcome");
        for p in &outbox {
            s.delivered(p).unwrap();
        }
        // Delivered outcomes are still remembered through the journal.
        drop(s);
        let (s, _) = StateDir::open(dir.path()).unwrap();
        assert!(s.outbox().unwrap().is_empty());
        assert!(s.lookup(&MsgId([1; 16])).is_some());
        assert!(s.lookup(&MsgId([2; 16])).is_some());
    }

    #[test]
    fn torn_journal_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = StateDir::open(dir.path()).unwrap();
            let a = s.accept(&cmd(1)).unwrap();
            s.finish(&a, &outcome(a.command.id)).unwrap();
        }
        let mut j = OpenOptions::new()
            .append(true)
            .open(dir.path().join("journal"))
            .unwrap();
        j.write_all(b"0101010101 12").unwrap();
        let (s, _) = StateDir::open(dir.path()).unwrap();
        assert!(s.lookup(&MsgId([1; 16])).is_some());
    }

    #[test]
    fn seen_set_is_bounded_and_journal_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = StateDir::open(dir.path()).unwrap();
        s.max_seen = 50;
        for i in 0..150 {
            let mut c = cmd(0);
            c.id = MsgId::new(i as u64);
            let t = s.accept(&c).unwrap();
            s.finish(&t, &outcome(c.id)).unwrap();
            s.delivered(&dir.path().join("outbox").join(&t.name))
                .unwrap();
        }
        assert!(s.seen.len() <= 50);
        let lines = fs::read_to_string(dir.path().join("journal"))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * 50 + 64 + 1, "journal has {lines} lines");
    }

    #[test]
    fn unwritable_state_dir_is_a_clear_error() {
        let e = StateDir::open(Path::new("/proc/outpost-cannot-exist")).unwrap_err();
        assert!(e.to_string().contains("/proc/outpost-cannot-exist"), "{e}");
    }
}
