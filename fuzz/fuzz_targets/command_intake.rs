//! The agent's command path without I/O: decode → verify → hub-clock sample →
//! addressee → duplicate → deadline (hub clock) → arguments → allow-list. Half the inputs are taken as raw delivered
//! bytes (the forger's view); the other half, when they decode as a command, are
//! signed with the pinned key first, so the fuzzer also explores everything behind
//! the signature check (the view of someone who stole the hub's key).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_edge::clock::HubClock;
use outpost_edge::intake::{Context, Decision, decide};
use outpost_edge::policy::{AllowConfig, Policy};
use outpost_edge::protected::Protected;
use outpost_wire::sign::SigningKey;
use outpost_wire::{AckKind, Command, MsgId, Recorded, decode};
use std::sync::OnceLock;

// A key made once per fuzzing process; the target only needs it to be the pinned one.
fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| {
        let der = SigningKey::generate_pkcs8().expect("key");
        SigningKey::from_pkcs8(&der).expect("key")
    })
}

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        Policy::new(
            AllowConfig {
                methods: vec!["ping".into(), "exec".into(), "file.read".into()],
                exec: vec!["systemctl restart *".into(), "uname ...".into()],
                read: vec!["/var/log/".into()],
                env: vec!["TZ".into()],
                ..AllowConfig::default()
            },
            Protected::none().with_config(std::path::Path::new("/etc/outpost/edge.toml")),
        )
        .expect("policy")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let seen = |id: &MsgId| (id.0[0] == 0xAA).then_some(Recorded::Pending);
    // Between the seed corpus command's issue time and its deadline.
    let now = 1_764_000_100_000;
    let payload = if mode & 1 == 1 {
        match decode::<Command>(rest) {
            Ok(cmd) => key().sign(&cmd),
            Err(_) => return,
        }
    } else {
        rest.to_vec()
    };
    // The hub's clock as the unit knows it: set by an earlier command, moved on by
    // this one's signed `sent_at` if it is authentic.
    let clock = HubClock::new();
    clock.observe(now);
    let keys = [key().public()];
    let cx = Context {
        node: "pi-17",
        keys: &keys,
        policy: policy(),
        clock: &clock,
        full: mode & 2 == 2,
    };
    match decide(&payload, &cx, seen) {
        Decision::Accept(a) => {
            // Anything accepted must be authentic, for this unit, in time (hub
            // clock), allowed, and there must have been room to remember it.
            let cmd = a.command;
            assert_eq!(cmd.to, "pi-17");
            assert!(cmd.deadline >= now, "accepted past its deadline");
            assert!(policy().check(&cmd.method).is_ok());
            assert!(key().public().verify(&payload).is_ok());
            assert_eq!(a.signer, key().public());
            assert!(!cx.full, "accepted with the duplicate memory full");
        }
        Decision::Answer(ack, _) => {
            assert!(
                !matches!(ack.kind, AckKind::Accepted | AckKind::Running),
                "answered {:?} without accepting",
                ack.kind
            );
        }
    }
});
