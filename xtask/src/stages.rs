//! The stage table of `cargo xtask ci`: every stage with its wall time and result,
//! printed at the end of the run, on failure too (the failed stage is named), so a
//! cold run shows where its time went. `cargo xtask fresh-ci` reads the table back
//! from the log by its [`TABLE_HEADER`].

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The first line of the table, which `fresh-ci` looks for in the log.
pub const TABLE_HEADER: &str = "ci: stage table (wall time)";
/// The table's last line starts with this.
pub const TABLE_FOOTER: &str = "ci: total";

/// One row: a stage, or a part of one (a test binary), indented under it.
struct Row {
    name: String,
    took: Duration,
    result: String,
    /// A part of the stage above (a test binary): shown indented, not added to totals.
    part: bool,
}

pub struct Stages {
    t0: Instant,
    rows: Vec<Row>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            t0: Instant::now(),
            rows: vec![],
        }
    }
}

impl Stages {
    /// Run one stage, timed; its error names the stage.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("\n== ci: {name} (at {})", clock(self.t0.elapsed()));
        let t = Instant::now();
        let r = f();
        self.rows.push(Row {
            name: name.into(),
            took: t.elapsed(),
            result: match &r {
                Ok(_) => "ok".into(),
                Err(_) => "FAILED".into(),
            },
            part: false,
        });
        r.with_context(|| format!("ci stage `{name}` failed"))
    }

    /// Run `f` on a thread while the next stages go on; [`Stages::join`] waits for it
    /// and records its row (its wall time overlaps the rows between).
    pub fn background<T: Send + 'static>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Background<T> {
        eprintln!(
            "\n== ci: {name} starts in the background (at {})",
            clock(self.t0.elapsed())
        );
        let t = Instant::now();
        let handle = std::thread::spawn(move || {
            let r = f();
            (r, t.elapsed())
        });
        Background {
            name: name.into(),
            handle: Some(handle),
        }
    }

    pub fn join<T>(&mut self, mut b: Background<T>) -> Result<T> {
        let name = std::mem::take(&mut b.name);
        let joined = b.handle.take().map(|h| h.join());
        let (r, took) = match joined {
            Some(Ok(v)) => v,
            _ => (Err(anyhow::anyhow!("{name} panicked")), Duration::ZERO),
        };
        self.rows.push(Row {
            name: format!("{name} (background)"),
            took,
            result: match &r {
                Ok(_) => "ok".into(),
                Err(_) => "FAILED".into(),
            },
            part: false,
        });
        r.with_context(|| format!("ci stage `{name}` failed"))
    }

    /// A stage timed by the caller (one that records parts of its own).
    pub fn record(&mut self, name: &str, took: Duration, ok: bool) {
        self.rows.push(Row {
            name: name.into(),
            took,
            result: if ok { "ok" } else { "FAILED" }.into(),
            part: false,
        });
    }

    /// A part of the stage that is running now (shown under it once it ends).
    fn part(&mut self, name: String, took: Duration, result: String) {
        self.rows.push(Row {
            name,
            took,
            result,
            part: true,
        });
    }

    /// The table, ending in the total and, if a stage failed, which one.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{TABLE_HEADER}");
        let _ = writeln!(s, "  {:<44} {:>8}  result", "stage", "time");
        // Parts are pushed before the stage that holds them ends: print each stage's
        // parts after its own row.
        let mut pending: Vec<&Row> = vec![];
        for r in &self.rows {
            if r.part {
                pending.push(r);
                continue;
            }
            let _ = writeln!(s, "  {:<44} {:>8}  {}", r.name, clock(r.took), r.result);
            for p in pending.drain(..) {
                let _ = writeln!(s, "    {:<42} {:>8}  {}", p.name, clock(p.took), p.result);
            }
        }
        let failed = self.rows.iter().find(|r| !r.part && r.result != "ok");
        let _ = write!(
            s,
            "{TABLE_FOOTER} {}{}",
            clock(self.t0.elapsed()),
            match failed {
                Some(r) => format!(", FAILED at {}", r.name),
                None => ", all green".into(),
            }
        );
        s
    }
}

/// A stage running on its own thread. Dropped without [`Stages::join`] (an earlier
/// stage failed), it is still waited for, so no child of it outlives the run.
pub struct Background<T> {
    name: String,
    handle: Option<JoinHandle<(Result<T>, Duration)>>,
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            eprintln!("ci: waiting for {} to finish before stopping", self.name);
            let _ = h.join();
        }
    }
}

/// `1m05s`, `12.3s`, `1h02m`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// What one line of `cargo test` output means for the table.
#[derive(Debug, PartialEq)]
enum Event {
    /// `Running tests/it/e2e.rs (target/debug/deps/e2e-1a2b)` or `Doc-tests outpost_wire`.
    Start(String),
    /// `test result: ok. 25 passed; 0 failed; ...`
    Result(String),
}

fn event(line: &str) -> Option<Event> {
    let l = line.trim();
    if let Some(rest) = l.strip_prefix("Running ") {
        // The binary's file name without cargo's hash; unit tests say so.
        let exe = rest
            .rsplit_once('(')
            .map(|(_, p)| p.trim_end_matches(')'))
            .unwrap_or(rest);
        let stem = exe.rsplit('/').next().unwrap_or(exe);
        let name = stem.rsplit_once('-').map(|(n, _)| n).unwrap_or(stem);
        let kind = if rest.starts_with("unittests") {
            "unit"
        } else {
            "test"
        };
        return Some(Event::Start(format!("{kind} {name}")));
    }
    if let Some(c) = l.strip_prefix("Doc-tests ") {
        return Some(Event::Start(format!("doctests {c}")));
    }
    l.strip_prefix("test result: ")
        .map(|r| Event::Result(r.to_string()))
}

/// `ok. 25 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.1s`
/// -> `ok: 25 passed, 1 ignored`.
fn summary(r: &str) -> String {
    let (verdict, rest) = r.split_once(". ").unwrap_or((r, ""));
    let counts: Vec<&str> = rest
        .split(';')
        .map(str::trim)
        .filter(|c| {
            let n = c.split_whitespace().next().unwrap_or("0");
            n != "0" && !c.starts_with("finished") && !c.contains("measured")
        })
        .collect();
    if counts.is_empty() {
        return format!("{verdict}: no tests");
    }
    format!("{verdict}: {}", counts.join(", "))
}

/// The summary of the test binary that ran from `from` to `until`: its last result
/// line. A test that runs the binary again as a child (to check something in a fresh
/// process) prints the child's result line first.
fn result_in(evs: &[(Instant, Event)], from: Instant, until: Instant) -> String {
    evs.iter()
        .filter(|(at, _)| *at >= from && *at <= until)
        .filter_map(|(_, e)| match e {
            Event::Result(r) => Some(summary(r)),
            Event::Start(_) => None,
        })
        .next_back()
        .unwrap_or_else(|| "no result line (crashed?)".into())
}

/// Run `cargo test ...` with its output passed through, and a row per test binary
/// (and its compile before the first one) in the stage table.
pub fn cargo_test(stages: &mut Stages, mut cmd: Command) -> Result<()> {
    eprintln!("$ {}", crate::show(&cmd));
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let events: Arc<Mutex<Vec<(Instant, Event)>>> = Arc::default();
    let pump = |from: Box<dyn Read + Send>, to_stdout: bool| {
        let events = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(|l| l.ok()) {
                if let Some(e) = event(&line)
                    && let Ok(mut v) = events.lock()
                {
                    v.push((Instant::now(), e));
                }
                // Through our own handles, so the CI log keeps everything.
                if to_stdout {
                    let mut o = std::io::stdout().lock();
                    let _ = writeln!(o, "{line}");
                    let _ = o.flush();
                } else {
                    eprintln!("{line}");
                }
            }
        })
    };
    let out = pump(
        Box::new(child.stdout.take().context("no stdout pipe")?),
        true,
    );
    let err = pump(
        Box::new(child.stderr.take().context("no stderr pipe")?),
        false,
    );
    let status = child.wait()?;
    let _ = out.join();
    let _ = err.join();
    let end = Instant::now();

    let mut evs = std::mem::take(&mut *events.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    evs.sort_by_key(|e| e.0);
    let starts: Vec<(Instant, String)> = evs
        .iter()
        .filter_map(|(t, e)| match e {
            Event::Start(n) => Some((*t, n.clone())),
            Event::Result(_) => None,
        })
        .collect();
    let first = starts.first().map(|s| s.0).unwrap_or(end);
    stages.part(
        "build the tests".into(),
        first - t0,
        if starts.is_empty() && !status.success() {
            "FAILED".into()
        } else {
            "ok".into()
        },
    );
    for (i, (t, name)) in starts.iter().enumerate() {
        let until = starts.get(i + 1).map(|s| s.0).unwrap_or(end);
        let result = result_in(&evs, *t, until);
        stages.part(name.clone(), until - *t, result);
    }
    anyhow::ensure!(status.success(), "`cargo test` failed with {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_is_summed_up_by_its_last_result_line() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let evs = vec![
            (at(0), Event::Start("unit outpost_edge".into())),
            // A test that ran the binary again for one test, in a child process.
            (
                at(1),
                Event::Result(
                    "ok. 1 passed; 0 failed; 0 ignored; 0 measured; 60 filtered out; finished in 0.00s"
                        .into(),
                ),
            ),
            (
                at(2),
                Event::Result(
                    "ok. 61 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 8.51s"
                        .into(),
                ),
            ),
        ];
        assert_eq!(result_in(&evs, at(0), at(3)), "ok: 61 passed");
        assert_eq!(result_in(&evs, at(3), at(4)), "no result line (crashed?)");
        assert_eq!(
            summary(
                "ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s"
            ),
            "ok: no tests"
        );
    }

    #[test]
    fn reads_cargo_test_lines() {
        assert_eq!(
            event("     Running tests/it/e2e.rs (target/debug/deps/e2e-5f1c2a9b)"),
            Some(Event::Start("test e2e".into()))
        );
        assert_eq!(
            event("     Running unittests src/lib.rs (/t/debug/deps/outpost_wire-0a1b)"),
            Some(Event::Start("unit outpost_wire".into()))
        );
        assert_eq!(
            event("   Doc-tests outpost_wire"),
            Some(Event::Start("doctests outpost_wire".into()))
        );
        assert_eq!(event("test foo ... ok"), None);
        assert_eq!(
            summary(
                "ok. 25 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.10s"
            ),
            "ok: 25 passed, 1 ignored"
        );
        assert_eq!(
            summary(
                "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s"
            ),
            "FAILED: 3 passed, 2 failed"
        );
    }

    #[test]
    fn table_names_the_failed_stage() {
        let mut s = Stages::default();
        s.run("fmt", || Ok(())).unwrap();
        assert!(
            s.run("clippy", || -> Result<()> { anyhow::bail!("x") })
                .is_err()
        );
        let t = s.table();
        assert!(t.starts_with(TABLE_HEADER), "{t}");
        assert!(t.contains("FAILED at clippy"), "{t}");
        assert!(t.lines().last().unwrap().starts_with(TABLE_FOOTER), "{t}");
    }
}
