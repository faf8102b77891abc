//! Deciding about one delivered command, without I/O: signature, addressee,
//! duplicate, deadline (the hub's clock), arguments, allow-list, room — in that order.
//! The agent persists and queues what this accepts; the fuzzer drives it with
//! arbitrary bytes.

use crate::clock::HubClock;
use crate::methods;
use crate::policy::Policy;
use outpost_wire::sign::{self, PublicKey, VerifyError};
use outpost_wire::{Ack, AckKind, Command, MsgId, PROTOCOL_MIN, Recorded, RejectCode, Rejection};

/// What to do with a delivered payload.
#[derive(Debug)]
pub enum Decision {
    /// Authentic, new, in time, allowed: record it durably, then ACK.
    Accept(Accepted),
    /// Answer at once with this ACK (a duplicate, a rejection, busy) in protocol
    /// version `.1` (the command's own); never run anything.
    Answer(Ack, u8),
}

/// A command to accept, with what the agent needs to answer and to check it again.
#[derive(Debug)]
pub struct Accepted {
    pub command: Command,
    /// The protocol version it came in: the ACK goes back in it (the outcome in the
    /// hub's version as its hello reply said).
    pub version: u8,
    /// The trusted key that signed it (`hub.keys` must keep it).
    pub signer: PublicKey,
}

/// What the decision reads besides the payload.
pub struct Context<'a> {
    pub node: &'a str,
    /// The hub keys this unit trusts.
    pub keys: &'a [PublicKey],
    pub policy: &'a Policy,
    /// The agent's view of the hub's clock; a verified command's `sent_at` moves it.
    pub clock: &'a HubClock,
    /// The duplicate memory is full of ids within their deadline: answer `Busy`.
    pub full: bool,
}

/// Decide about `payload` delivered to this unit.
pub fn decide(
    payload: &[u8],
    cx: &Context<'_>,
    seen: impl Fn(&MsgId) -> Option<Recorded>,
) -> Decision {
    let verified = match sign::verify_any(cx.keys, payload) {
        Ok(v) => v,
        Err(e) => {
            // Name the command if the bytes say which (for the hub's record), and
            // answer in its version; act on nothing else in them.
            let (id, v) = sign::peek_unverified(payload)
                .map(|(c, v)| (c.id, v))
                .unwrap_or((MsgId([0; 16]), PROTOCOL_MIN));
            let code = match e {
                VerifyError::Decode(_) => RejectCode::Malformed,
                VerifyError::Short | VerifyError::BadSignature => RejectCode::BadSignature,
            };
            return reject(id, v, code, e.to_string());
        }
    };
    let (cmd, v) = (verified.command, verified.version);
    let id = cmd.id;
    // Signed by the hub: its clock reading is as good as the command.
    cx.clock.observe(cmd.sent_at);
    if cmd.to != cx.node {
        return reject(
            id,
            v,
            RejectCode::WrongNode,
            format!("addressed to {:?}, this is {:?}", cmd.to, cx.node),
        );
    }
    if let Some(recorded) = seen(&id) {
        return Decision::Answer(
            Ack {
                command: id,
                kind: AckKind::Duplicate(recorded),
            },
            v,
        );
    }
    // The hub's clock: a signed reading (version 2); a version 1 hub sends none, so
    // the unit's own clock it is, as version 1 always did.
    let now = cx
        .clock
        .now()
        .unwrap_or_else(|| outpost_wire::now_ms().max(cx.clock.floor()));
    if now > cmd.deadline {
        let whose = if v >= 2 { "hub clock" } else { "unit clock" };
        return reject(
            id,
            v,
            RejectCode::Expired,
            format!("deadline passed {} ms ago ({whose})", now - cmd.deadline),
        );
    }
    if let Err(detail) = methods::check_args(&cmd.method) {
        return reject(id, v, RejectCode::BadArgs, detail);
    }
    if let Err(r) = cx.policy.check(&cmd.method) {
        return Decision::Answer(
            Ack {
                command: id,
                kind: AckKind::Rejected(r.bounded()),
            },
            v,
        );
    }
    if cx.full {
        return Decision::Answer(
            Ack {
                command: id,
                kind: AckKind::Busy,
            },
            v,
        );
    }
    Decision::Accept(Accepted {
        command: cmd,
        version: v,
        signer: cx.keys[verified.key],
    })
}

fn reject(command: MsgId, v: u8, code: RejectCode, detail: String) -> Decision {
    Decision::Answer(
        Ack {
            command,
            kind: AckKind::Rejected(Rejection { code, detail }.bounded()),
        },
        v,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_wire::sign::SigningKey;
    use outpost_wire::{Exec, Method, Status};

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    fn cmd(to: &str, deadline: u64, argv: &[&str]) -> Command {
        Command {
            id: MsgId([9; 16]),
            from: "hub".into(),
            to: to.into(),
            issued_at: 0,
            deadline,
            domain: String::new(),
            timeout_ms: 0,
            method: Method::Exec(Exec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: vec![],
                cwd: None,
            }),
            sent_at: 40,
        }
    }

    fn code(d: Decision) -> Option<RejectCode> {
        match d {
            Decision::Answer(
                Ack {
                    kind: AckKind::Rejected(r),
                    ..
                },
                _,
            ) => Some(r.code),
            _ => None,
        }
    }

    fn cx<'a>(
        node: &'a str,
        keys: &'a [PublicKey],
        policy: &'a Policy,
        clock: &'a HubClock,
    ) -> Context<'a> {
        Context {
            node,
            keys,
            policy,
            clock,
            full: false,
        }
    }

    #[test]
    fn every_check_in_order() {
        let k = key();
        let pk = [k.public()];
        let all = Policy::allow_all();
        let none = |_: &MsgId| None;
        let clock = HubClock::new();
        let good = k.sign(&cmd("pi", 100, &["true"]));
        assert!(matches!(
            decide(&good, &cx("pi", &pk, &all, &clock), none),
            Decision::Accept(_)
        ));
        // The signed sent_at set the unit's idea of hub time.
        assert!(clock.now().unwrap() >= 40);
        // Forged (other key), tampered, garbage.
        let forged = key().sign(&cmd("pi", 100, &["true"]));
        assert_eq!(
            code(decide(&forged, &cx("pi", &pk, &all, &clock), none)),
            Some(RejectCode::BadSignature)
        );
        let mut tampered = good.clone();
        let n = tampered.len() - 70;
        tampered[n] ^= 1;
        assert_eq!(
            code(decide(&tampered, &cx("pi", &pk, &all, &clock), none)),
            Some(RejectCode::BadSignature)
        );
        assert_eq!(
            code(decide(b"junk", &cx("pi", &pk, &all, &clock), none)),
            Some(RejectCode::BadSignature)
        );
        // For another unit, not allowed, bad args.
        assert_eq!(
            code(decide(&good, &cx("other", &pk, &all, &clock), none)),
            Some(RejectCode::WrongNode)
        );
        let ping_only =
            Policy::new(Default::default(), crate::protected::Protected::none()).unwrap();
        assert_eq!(
            code(decide(&good, &cx("pi", &pk, &ping_only, &clock), none)),
            Some(RejectCode::NotAllowed)
        );
        let empty = k.sign(&cmd("pi", 100, &[]));
        assert_eq!(
            code(decide(&empty, &cx("pi", &pk, &all, &clock), none)),
            Some(RejectCode::BadArgs)
        );
        // Replayed: answered with what was recorded, even past the deadline.
        let done = |_: &MsgId| Some(Recorded::Finished(Status::Succeeded));
        assert!(matches!(
            decide(&good, &cx("pi", &pk, &all, &clock), done),
            Decision::Answer(
                Ack {
                    kind: AckKind::Duplicate(_),
                    ..
                },
                2
            )
        ));
        // Memory full: busy, not accepted and not rejected.
        let mut full = cx("pi", &pk, &all, &clock);
        full.full = true;
        assert!(matches!(
            decide(&good, &full, none),
            Decision::Answer(
                Ack {
                    kind: AckKind::Busy,
                    ..
                },
                _
            )
        ));
    }

    #[test]
    fn deadlines_are_judged_by_hub_time_whatever_the_unit_clock_says() {
        let k = key();
        let pk = [k.public()];
        let all = Policy::allow_all();
        let none = |_: &MsgId| None;
        // The unit's clock is years off either way; only the hub's readings count.
        let clock = HubClock::new();
        let mut c = cmd("pi", 10_000, &["true"]);
        c.sent_at = 9_000;
        assert!(matches!(
            decide(&k.sign(&c), &cx("pi", &pk, &all, &clock), none),
            Decision::Accept(_)
        ));
        let mut late = cmd("pi", 10_000, &["true"]);
        late.id = MsgId([8; 16]);
        late.sent_at = 10_500;
        assert_eq!(
            code(decide(&k.sign(&late), &cx("pi", &pk, &all, &clock), none)),
            Some(RejectCode::Expired)
        );
        // A version 1 command carries no hub time: the unit's clock judges it.
        let v1 = k.sign_for(&cmd("pi", u64::MAX, &["true"]), 1);
        let fresh = HubClock::new();
        assert!(matches!(
            decide(&v1, &cx("pi", &pk, &all, &fresh), none),
            Decision::Accept(Accepted { version: 1, .. })
        ));
        // Just restarted, hub time not known yet, but the state dir says when ids
        // were last forgotten: a replayed command from before then is expired even
        // though its own sent_at is before its deadline.
        let restarted = HubClock::new();
        restarted.set_floor(20_000);
        let mut replay = cmd("pi", 10_000, &["true"]);
        replay.id = MsgId([9; 16]);
        replay.sent_at = 9_000;
        assert_eq!(
            code(decide(
                &k.sign(&replay),
                &cx("pi", &pk, &all, &restarted),
                none
            )),
            Some(RejectCode::Expired)
        );
    }

    #[test]
    fn any_trusted_key_and_only_those() {
        let (old, new) = (key(), key());
        let both = [old.public(), new.public()];
        let all = Policy::allow_all();
        let clock = HubClock::new();
        let d = decide(
            &new.sign(&cmd("pi", u64::MAX, &["true"])),
            &cx("pi", &both, &all, &clock),
            |_| None,
        );
        assert!(matches!(d, Decision::Accept(Accepted { signer, .. }) if signer == new.public()));
        assert_eq!(
            code(decide(
                &new.sign(&cmd("pi", u64::MAX, &["true"])),
                &cx("pi", &both[..1], &all, &clock),
                |_| None
            )),
            Some(RejectCode::BadSignature)
        );
    }
}
