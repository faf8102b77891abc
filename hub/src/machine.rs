//! The command state machine: every change to a command's record, as a pure function
//! of the record and one event. No I/O, no clock: the caller passes the time. The
//! ledger ([`crate::ledger`]) is the only caller; every state the operator sees, every
//! event published and every metric later comes through here.
//!
//! ```text
//!                 attempt (no answer)      ack Accepted / Duplicate(Pending)
//!   Queued ──────────────▶ Sent ────────────────────────────▶ Accepted ──started──▶ Running
//!     │ ack Running          │ ack Running ────────────────────────────────────────▶ │
//!     │                      │ ack Rejected ─────────────▶ Rejected                   │
//!     │ deadline, never      │ deadline, never reached ──▶ Expired  ◀── ack Rejected(Expired)
//!     │ reached              │ (unconfirmed: keep asking the unit)                    │
//!     └──────────────────────┴──── outcome ──▶ Succeeded | Failed | TimedOut | Rejected | Expired
//!                                                         (from any open state) ◀─────┘
//!   any open state ── unit revoked ──▶ Cancelled
//! ```
//! The full table is [`step`]'s match and ADR 0011; `tests` walk every pair.
//!
//! Two rules carry the delivery guarantees:
//! - **A final state never changes.** Anything that arrives for a final command is
//!   ignored (and the caller logs why).
//! - **`Expired` means "never ran", so it is set only when that is known**: no delivery
//!   may have reached the unit (every attempt failed before the unit, e.g. no
//!   responders), or the unit itself refused it as expired. A passed deadline after an
//!   unanswered delivery keeps the command open (`unconfirmed`) and the hub keeps
//!   asking the unit, which answers `Duplicate` (it has it) or `Rejected(Expired)` (it
//!   never accepted it, and now never will: units judge deadlines by hub time).

use outpost_wire::api::{CmdState, CommandRecord};
use outpost_wire::limits::{MAX_NOTE, truncate};
use outpost_wire::{AckKind, Outcome, Recorded, RejectCode, Status};

/// Something that happened to a command, at hub time `at` (ms).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A delivery went out and no answer came back. `reached`: the unit may have got
    /// it (a timeout, a broken connection); false when the broker said nobody was
    /// subscribed (nothing was delivered).
    NoAnswer { at: u64, why: String, reached: bool },
    /// The unit's ACK. `probe`: the hub re-sent a command the unit had accepted, to
    /// learn what became of it (its outcome was receipted but not kept).
    Ack { at: u64, kind: AckKind, probe: bool },
    /// The unit reported that the command started (unit clock).
    Started { at: u64, unit_at: u64 },
    /// The unit's outcome.
    Outcome { at: u64, outcome: Outcome },
    /// The hub's clock passed the deadline.
    DeadlinePassed { at: u64 },
    /// The hub stopped the command (the unit was revoked).
    Cancel { at: u64, why: String },
}

/// Why an event left the record as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The command is final; nothing changes it.
    Final,
    /// The event says nothing new in this state (a late or repeated report).
    Stale,
    /// The deadline passed but a delivery may have reached the unit: still open.
    Unconfirmed,
}

/// Whether the ledger must write this transition before it answers anyone, or may
/// let a following one carry it (ADR 0006: most outcomes follow their ACK within a
/// second, and the final write then carries the acceptance too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    Now,
    Deferred,
}

/// The new record, and how urgently it must be written.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub record: CommandRecord,
    pub persist: Persist,
}

fn open(state: CmdState) -> bool {
    !state.is_final()
}

fn waiting(state: CmdState) -> bool {
    matches!(state, CmdState::Queued | CmdState::Sent)
}

fn note(r: &mut CommandRecord, text: impl AsRef<str>) {
    r.note = truncate(text.as_ref(), MAX_NOTE);
}

/// Apply one event to a record. Returns the changed record, or why nothing changed.
pub fn step(rec: &CommandRecord, ev: &Event) -> Result<Applied, Ignored> {
    if rec.state.is_final() {
        return Err(Ignored::Final);
    }
    let mut r = rec.clone();
    let persist = match ev {
        Event::NoAnswer { at, why, reached } => {
            if !waiting(r.state) {
                // A probe of an accepted command that went unanswered: nothing learnt.
                return Err(Ignored::Stale);
            }
            r.state = CmdState::Sent;
            r.attempts += 1;
            r.last_attempt_at = *at;
            r.unconfirmed |= *reached;
            note(&mut r, why);
            Persist::Now
        }
        Event::Ack { at, kind, probe } => return ack(r, *at, kind, *probe),
        Event::Started { at, unit_at } => {
            if r.state == CmdState::Running {
                return Err(Ignored::Stale);
            }
            // From Queued/Sent too: the ACK was lost, the report was not.
            r.accepted_at.get_or_insert(*at);
            r.state = CmdState::Running;
            r.started_at = Some(*unit_at);
            r.unconfirmed = false;
            Persist::Deferred
        }
        Event::Outcome { at, outcome } => {
            r.state = CmdState::of(&outcome.status);
            r.accepted_at.get_or_insert(*at);
            r.started_at.get_or_insert(outcome.started_at);
            r.finished_at = Some(*at);
            r.outcome = Some(outcome.clone());
            r.unconfirmed = false;
            // An outcome is the truth: delivery notes no longer matter.
            r.note.clear();
            Persist::Now
        }
        Event::DeadlinePassed { at } => {
            if !waiting(r.state) {
                // Accepted: the unit owns it now, and refuses to start it late itself.
                return Err(Ignored::Stale);
            }
            if r.unconfirmed {
                if r.note.starts_with(UNCONFIRMED_NOTE) {
                    return Err(Ignored::Unconfirmed);
                }
                let text = format!(
                    "{UNCONFIRMED_NOTE} ({} delivery attempts, the last unanswered); asking the unit until it says",
                    r.attempts
                );
                note(&mut r, text);
                return Ok(Applied {
                    record: r,
                    persist: Persist::Now,
                });
            }
            r.state = CmdState::Expired;
            r.finished_at = Some(*at);
            let last = if r.note.is_empty() {
                "never delivered".to_string()
            } else {
                r.note.clone()
            };
            let text = format!(
                "deadline passed after {} delivery attempts, none reached the unit; {last}",
                r.attempts
            );
            note(&mut r, text);
            Persist::Now
        }
        Event::Cancel { at, why } => {
            let ran = matches!(r.state, CmdState::Accepted | CmdState::Running) || r.unconfirmed;
            r.state = CmdState::Cancelled;
            r.finished_at = Some(*at);
            note(
                &mut r,
                if ran {
                    format!("{why}; the unit may have run it, its outcome will not arrive")
                } else {
                    format!("{why}; it never ran")
                },
            );
            Persist::Now
        }
    };
    Ok(Applied { record: r, persist })
}

/// The note of a command whose deadline passed while the unit may have it.
pub const UNCONFIRMED_NOTE: &str = "deadline passed, but the unit may have accepted it";

fn ack(mut r: CommandRecord, at: u64, kind: &AckKind, probe: bool) -> Result<Applied, Ignored> {
    let was_waiting = waiting(r.state);
    let answered = |r: &mut CommandRecord| {
        if was_waiting {
            r.attempts += 1;
            r.last_attempt_at = at;
        }
        r.unconfirmed = false;
    };
    let persist = match kind {
        AckKind::Accepted | AckKind::Duplicate(Recorded::Pending) => {
            if !was_waiting {
                return Err(Ignored::Stale);
            }
            answered(&mut r);
            r.state = CmdState::Accepted;
            r.accepted_at = Some(at);
            r.note.clear();
            Persist::Deferred
        }
        AckKind::Running => {
            if r.state == CmdState::Running {
                return Err(Ignored::Stale);
            }
            answered(&mut r);
            r.state = CmdState::Running;
            r.accepted_at.get_or_insert(at);
            r.started_at.get_or_insert(at);
            r.note.clear();
            Persist::Deferred
        }
        AckKind::Duplicate(Recorded::Finished(status)) => {
            answered(&mut r);
            r.accepted_at.get_or_insert(at);
            if probe && !was_waiting {
                // The unit finished it and has no outcome left to send (its outbox is
                // empty): the outcome was receipted but the store lost it. The status
                // is all that is left.
                r.state = CmdState::of(status);
                r.finished_at = Some(at);
                r.outcome = Some(Outcome {
                    command: r.id,
                    status: status.clone(),
                    exit_code: None,
                    stdout: vec![],
                    stderr: vec![],
                    truncated: false,
                    started_at: r.started_at.unwrap_or(0),
                    duration_ms: 0,
                });
                note(
                    &mut r,
                    "the unit reported only the status: its outcome was receipted but not stored",
                );
                Persist::Now
            } else {
                if !was_waiting {
                    return Err(Ignored::Stale);
                }
                // Its outcome is in the unit's outbox, on its way: wait for it.
                r.state = CmdState::Accepted;
                note(
                    &mut r,
                    format!(
                        "the unit finished it ({}); its outcome is on the way",
                        status.word()
                    ),
                );
                Persist::Deferred
            }
        }
        AckKind::Rejected(rej) => {
            if !was_waiting {
                // A unit that accepted a command never rejects it later; a probe of
                // one it forgot (past its deadline) says nothing about how it ended.
                return Err(Ignored::Stale);
            }
            answered(&mut r);
            r.state = if rej.code == RejectCode::Expired {
                CmdState::Expired
            } else {
                CmdState::Rejected
            };
            r.finished_at = Some(at);
            r.outcome = Some(Outcome {
                command: r.id,
                status: Status::Rejected(rej.clone()),
                exit_code: None,
                stdout: vec![],
                stderr: vec![],
                truncated: false,
                started_at: 0,
                duration_ms: 0,
            });
            note(&mut r, rej.to_string());
            Persist::Now
        }
        AckKind::Busy => {
            if !was_waiting {
                return Err(Ignored::Stale);
            }
            r.state = CmdState::Sent;
            r.attempts += 1;
            r.last_attempt_at = at;
            // Busy is an answer: the unit did not record it.
            note(
                &mut r,
                "unit busy (queue or duplicate memory full): delivering again later",
            );
            Persist::Now
        }
    };
    Ok(Applied { record: r, persist })
}

/// Whether a delivery task should (still) send this command: waiting for acceptance.
pub fn wants_delivery(r: &CommandRecord) -> bool {
    open(r.state) && waiting(r.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_wire::{MsgId, Rejection};

    fn rec(state: CmdState) -> CommandRecord {
        CommandRecord {
            id: MsgId([1; 16]),
            node: "pi".into(),
            method: "exec".into(),
            domain: String::new(),
            issued_at: 10,
            deadline: 1000,
            state,
            attempts: 0,
            last_attempt_at: 0,
            accepted_at: None,
            finished_at: None,
            note: String::new(),
            outcome: None,
            started_at: None,
            unconfirmed: false,
        }
    }

    fn outcome(status: Status) -> Outcome {
        Outcome {
            command: MsgId([1; 16]),
            status,
            exit_code: Some(0),
            stdout: b"out".to_vec(),
            stderr: vec![],
            truncated: false,
            started_at: 20,
            duration_ms: 1,
        }
    }

    fn rejected(code: RejectCode) -> AckKind {
        AckKind::Rejected(Rejection {
            code,
            detail: "x".into(),
        })
    }

    /// Every event the machine knows, once each.
    fn events() -> Vec<Event> {
        let at = 50;
        let mut v = vec![
            Event::NoAnswer {
                at,
                why: "no responders".into(),
                reached: false,
            },
            Event::NoAnswer {
                at,
                why: "timeout".into(),
                reached: true,
            },
            Event::Started { at, unit_at: 49 },
            Event::Outcome {
                at,
                outcome: outcome(Status::Succeeded),
            },
            Event::Outcome {
                at,
                outcome: outcome(Status::Expired("late".into())),
            },
            Event::DeadlinePassed { at: 2000 },
            Event::Cancel {
                at,
                why: "unit revoked".into(),
            },
        ];
        for probe in [false, true] {
            for kind in [
                AckKind::Accepted,
                AckKind::Running,
                AckKind::Busy,
                AckKind::Duplicate(Recorded::Pending),
                AckKind::Duplicate(Recorded::Finished(Status::Succeeded)),
                rejected(RejectCode::NotAllowed),
                rejected(RejectCode::Expired),
            ] {
                v.push(Event::Ack { at, kind, probe });
            }
        }
        v
    }

    const ALL: [CmdState; 10] = [
        CmdState::Queued,
        CmdState::Sent,
        CmdState::Accepted,
        CmdState::Running,
        CmdState::Succeeded,
        CmdState::Failed,
        CmdState::TimedOut,
        CmdState::Rejected,
        CmdState::Expired,
        CmdState::Cancelled,
    ];

    /// The transitions the design allows (from, to); anything else is a bug.
    fn allowed(from: CmdState, to: CmdState) -> bool {
        use CmdState::*;
        if from.is_final() {
            return false;
        }
        match (from, to) {
            (_, Cancelled) => true,
            (Queued | Sent, Sent | Accepted | Running) => true,
            (Accepted, Running) => true,
            (Queued | Sent | Accepted | Running, s) if s.is_final() => true,
            (s, t) => s == t,
        }
    }

    #[test]
    fn every_state_and_event_obeys_the_table() {
        for from in ALL {
            for unconfirmed in [false, true] {
                let mut r = rec(from);
                r.unconfirmed = unconfirmed;
                for ev in events() {
                    match step(&r, &ev) {
                        Ok(a) => {
                            assert!(
                                allowed(from, a.record.state),
                                "{from:?} --{ev:?}--> {:?} is not in the table",
                                a.record.state
                            );
                            if a.record.state.is_final() {
                                assert_eq!(a.persist, Persist::Now, "final states are written now");
                                assert!(a.record.finished_at.is_some());
                            }
                            assert!(a.record.note.len() <= MAX_NOTE);
                        }
                        Err(Ignored::Final) => assert!(from.is_final()),
                        Err(_) => assert!(!from.is_final()),
                    }
                }
            }
        }
    }

    #[test]
    fn final_is_final() {
        for from in ALL.into_iter().filter(|s| s.is_final()) {
            for ev in events() {
                assert_eq!(
                    step(&rec(from), &ev),
                    Err(Ignored::Final),
                    "{from:?} {ev:?}"
                );
            }
        }
    }

    #[test]
    fn expired_only_when_never_reached_or_the_unit_says_so() {
        let late = Event::DeadlinePassed { at: 2000 };
        // Never reached: expired.
        let mut r = rec(CmdState::Sent);
        r.attempts = 3;
        let a = step(&r, &late).unwrap();
        assert_eq!(a.record.state, CmdState::Expired);
        assert!(a.record.note.contains("none reached"), "{}", a.record.note);
        // An unanswered delivery: still open, noted once, then left alone.
        let timeout = Event::NoAnswer {
            at: 900,
            why: "no ack within 1000 ms".into(),
            reached: true,
        };
        let r = step(&rec(CmdState::Queued), &timeout).unwrap().record;
        assert!(r.unconfirmed);
        let r = step(&r, &late).unwrap().record;
        assert_eq!(r.state, CmdState::Sent);
        assert!(r.note.starts_with(UNCONFIRMED_NOTE));
        assert_eq!(step(&r, &late), Err(Ignored::Unconfirmed));
        // Later attempts that reach nobody do not clear the doubt...
        let r2 = step(
            &r,
            &Event::NoAnswer {
                at: 2100,
                why: "no responders".into(),
                reached: false,
            },
        )
        .unwrap()
        .record;
        assert!(r2.unconfirmed);
        // ...the unit's own answer does: it never accepted it, so it never ran.
        let r3 = step(
            &r2,
            &Event::Ack {
                at: 2200,
                kind: rejected(RejectCode::Expired),
                probe: false,
            },
        )
        .unwrap()
        .record;
        assert_eq!(r3.state, CmdState::Expired);
        assert!(!r3.unconfirmed);
        // Or it did accept it before the deadline: it runs (or ran) exactly once.
        let r4 = step(
            &r2,
            &Event::Ack {
                at: 2200,
                kind: AckKind::Duplicate(Recorded::Pending),
                probe: false,
            },
        )
        .unwrap()
        .record;
        assert_eq!(r4.state, CmdState::Accepted);
    }

    #[test]
    fn an_outcome_is_the_truth_while_open_and_ignored_once_final() {
        for from in [
            CmdState::Queued,
            CmdState::Sent,
            CmdState::Accepted,
            CmdState::Running,
        ] {
            let a = step(
                &rec(from),
                &Event::Outcome {
                    at: 60,
                    outcome: outcome(Status::Failed("exit 3".into())),
                },
            )
            .unwrap();
            assert_eq!(a.record.state, CmdState::Failed);
            assert_eq!(a.record.accepted_at, Some(60), "a lost ACK is implied");
        }
        let expired = step(&rec(CmdState::Sent), &Event::DeadlinePassed { at: 2000 })
            .unwrap()
            .record;
        assert_eq!(
            step(
                &expired,
                &Event::Outcome {
                    at: 2100,
                    outcome: outcome(Status::Succeeded)
                }
            ),
            Err(Ignored::Final)
        );
    }

    #[test]
    fn duplicate_finished_waits_for_the_outcome_unless_probed() {
        let done = AckKind::Duplicate(Recorded::Finished(Status::Succeeded));
        let a = step(
            &rec(CmdState::Sent),
            &Event::Ack {
                at: 70,
                kind: done.clone(),
                probe: false,
            },
        )
        .unwrap();
        assert_eq!(a.record.state, CmdState::Accepted);
        assert!(a.record.note.contains("on the way"));
        // A probe of a command accepted long ago: its outcome was lost by the store.
        let a = step(
            &rec(CmdState::Accepted),
            &Event::Ack {
                at: 70,
                kind: done,
                probe: true,
            },
        )
        .unwrap();
        assert_eq!(a.record.state, CmdState::Succeeded);
        assert_eq!(a.persist, Persist::Now);
        assert!(a.record.note.contains("not stored"));
    }

    #[test]
    fn running_is_reported_and_acceptance_is_deferred() {
        let a = step(
            &rec(CmdState::Sent),
            &Event::Ack {
                at: 5,
                kind: AckKind::Running,
                probe: false,
            },
        )
        .unwrap();
        assert_eq!(
            (a.record.state, a.persist),
            (CmdState::Running, Persist::Deferred)
        );
        let a = step(
            &rec(CmdState::Accepted),
            &Event::Started { at: 9, unit_at: 8 },
        )
        .unwrap();
        assert_eq!(a.record.state, CmdState::Running);
        assert_eq!(a.record.started_at, Some(8));
        assert_eq!(
            step(&a.record, &Event::Started { at: 9, unit_at: 8 }),
            Err(Ignored::Stale)
        );
    }

    #[test]
    fn revoked_units_commands_are_cancelled_saying_whether_they_may_have_run() {
        let why = "unit revoked".to_string();
        let a = step(
            &rec(CmdState::Queued),
            &Event::Cancel {
                at: 1,
                why: why.clone(),
            },
        )
        .unwrap();
        assert_eq!(a.record.state, CmdState::Cancelled);
        assert!(a.record.note.contains("never ran"));
        let a = step(&rec(CmdState::Running), &Event::Cancel { at: 1, why }).unwrap();
        assert!(a.record.note.contains("may have run"));
    }

    #[test]
    fn notes_are_bounded() {
        let a = step(
            &rec(CmdState::Queued),
            &Event::NoAnswer {
                at: 1,
                why: "x".repeat(10_000),
                reached: false,
            },
        )
        .unwrap();
        assert!(a.record.note.len() <= MAX_NOTE);
    }
}
