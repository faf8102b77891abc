//! Deciding about one delivered command, without I/O: signature, addressee, duplicate,
//! deadline, arguments, allow-list — in that order. The agent persists and queues what
//! this accepts; the fuzzer drives it with arbitrary bytes.

use crate::methods;
use crate::policy::Policy;
use outpost_wire::sign::{self, PublicKey, VerifyError};
use outpost_wire::{Ack, AckKind, Command, MsgId, Recorded, RejectCode, Rejection};

/// What to do with a delivered payload.
#[derive(Debug)]
pub enum Decision {
    /// Authentic, new, in time, allowed: record it durably, then ACK `Accepted`.
    Accept(Command),
    /// Answer at once with this ACK (a duplicate or a rejection); never run anything.
    Answer(Ack),
}

/// Decide about `payload` delivered to `node` at `now` (unit clock, ms).
pub fn decide(
    payload: &[u8],
    node: &str,
    hub_key: &PublicKey,
    policy: &Policy,
    seen: impl Fn(&MsgId) -> Option<Recorded>,
    now: u64,
) -> Decision {
    let reject = |command: MsgId, code: RejectCode, detail: String| {
        Decision::Answer(Ack {
            command,
            kind: AckKind::Rejected(Rejection { code, detail }),
        })
    };
    let cmd = match hub_key.verify(payload) {
        Ok(c) => c,
        Err(e) => {
            // Name the command if the bytes say which (for the hub's record); act on
            // nothing else in them.
            let id = sign::peek_unverified(payload)
                .map(|c| c.id)
                .unwrap_or(MsgId([0; 16]));
            let code = match e {
                VerifyError::Decode(_) => RejectCode::Malformed,
                VerifyError::Short | VerifyError::BadSignature => RejectCode::BadSignature,
            };
            return reject(id, code, e.to_string());
        }
    };
    let id = cmd.id;
    if cmd.to != node {
        return reject(
            id,
            RejectCode::WrongNode,
            format!("addressed to {:?}, this is {node:?}", cmd.to),
        );
    }
    if let Some(recorded) = seen(&id) {
        return Decision::Answer(Ack {
            command: id,
            kind: AckKind::Duplicate(recorded),
        });
    }
    if now > cmd.deadline {
        return reject(
            id,
            RejectCode::Expired,
            format!("deadline passed {} ms ago (unit clock)", now - cmd.deadline),
        );
    }
    if let Err(detail) = methods::check_args(&cmd.method) {
        return reject(id, RejectCode::BadArgs, detail);
    }
    if let Err(r) = policy.check(&cmd.method) {
        return Decision::Answer(Ack {
            command: id,
            kind: AckKind::Rejected(r),
        });
    }
    Decision::Accept(cmd)
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
        }
    }

    fn code(d: Decision) -> Option<RejectCode> {
        match d {
            Decision::Answer(Ack {
                kind: AckKind::Rejected(r),
                ..
            }) => Some(r.code),
            _ => None,
        }
    }

    #[test]
    fn every_check_in_order() {
        let k = key();
        let pk = k.public();
        let all = Policy::allow_all();
        let none = |_: &MsgId| None;
        let good = k.sign(&cmd("pi", 100, &["true"]));
        assert!(matches!(
            decide(&good, "pi", &pk, &all, none, 50),
            Decision::Accept(_)
        ));
        // Forged (other key), tampered, garbage.
        let forged = key().sign(&cmd("pi", 100, &["true"]));
        assert_eq!(
            code(decide(&forged, "pi", &pk, &all, none, 50)),
            Some(RejectCode::BadSignature)
        );
        let mut tampered = good.clone();
        let n = tampered.len() - 70;
        tampered[n] ^= 1;
        assert_eq!(
            code(decide(&tampered, "pi", &pk, &all, none, 50)),
            Some(RejectCode::BadSignature)
        );
        assert_eq!(
            code(decide(b"junk", "pi", &pk, &all, none, 50)),
            Some(RejectCode::BadSignature)
        );
        // For another unit, expired, not allowed, bad args.
        assert_eq!(
            code(decide(&good, "other", &pk, &all, none, 50)),
            Some(RejectCode::WrongNode)
        );
        assert_eq!(
            code(decide(&good, "pi", &pk, &all, none, 101)),
            Some(RejectCode::Expired)
        );
        let ping_only =
            Policy::new(Default::default(), crate::protected::Protected::none()).unwrap();
        assert_eq!(
            code(decide(&good, "pi", &pk, &ping_only, none, 50)),
            Some(RejectCode::NotAllowed)
        );
        let empty = k.sign(&cmd("pi", 100, &[]));
        assert_eq!(
            code(decide(&empty, "pi", &pk, &all, none, 50)),
            Some(RejectCode::BadArgs)
        );
        // Replayed: answered with what was recorded, even past the deadline.
        let done = |_: &MsgId| Some(Recorded::Finished(Status::Succeeded));
        assert!(matches!(
            decide(&good, "pi", &pk, &all, done, 500),
            Decision::Answer(Ack {
                kind: AckKind::Duplicate(_),
                ..
            })
        ));
    }
}
