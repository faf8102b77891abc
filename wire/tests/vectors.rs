//! Exact-bytes test vectors, one per message type, and the no-panic property of the decoder.
//!
//! A vector that changes is a wire break: bump `PROTOCOL_VERSION` and update
//! `docs/wire-spec.md` together with it, never just the hex here.

use outpost_wire::api::*;
use outpost_wire::*;
use proptest::prelude::*;

const ID: MsgId = MsgId([
    0x01, 0x8f, 0x00, 0x00, 0x00, 0x2a, 0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9,
]);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn exec_command() -> Command {
    Command {
        id: ID,
        from: "central".into(),
        to: "pi-17".into(),
        issued_at: 1_764_000_000_000,
        deadline: 1_764_000_300_000,
        domain: String::new(),
        timeout_ms: 10_000,
        method: Method::Exec(Exec {
            argv: vec!["bash".into(), "-c".into(), "uname -a".into()],
            env: vec![],
            cwd: None,
        }),
    }
}

/// Encode, compare with the vector, decode back, compare with the value.
fn check<T>(value: &T, vector: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value);
    assert_eq!(hex(&bytes), vector, "encoding of {value:?}");
    assert_eq!(&decode::<T>(&bytes).unwrap(), value);
}

#[test]
fn command_vector() {
    check(
        &exec_command(),
        "01018f0000002aa0a1a2a3a4a5a6a7a8a90763656e7472616c0570692d313780d0dfb4ab33e0f7f1b4ab3300904e01030462617368022d6308756e616d65202d610000",
    );
}

#[test]
fn ack_vectors() {
    check(
        &Ack {
            command: ID,
            kind: AckKind::Accepted,
        },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a900",
    );
    check(
        &Ack {
            command: ID,
            kind: AckKind::Duplicate(Recorded::Finished(Status::Succeeded)),
        },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a9010100",
    );
    check(
        &Ack {
            command: ID,
            kind: AckKind::Rejected(Rejection {
                code: RejectCode::NotAllowed,
                detail: "exec".into(),
            }),
        },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a902040465786563",
    );
}

#[test]
fn outcome_vector() {
    check(
        &Outcome {
            command: ID,
            status: Status::Failed("exit code 2".into()),
            exit_code: Some(2),
            stdout: b"out".to_vec(),
            stderr: b"".to_vec(),
            truncated: false,
            started_at: 1_764_000_000_100,
            duration_ms: 250,
        },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a9010b6578697420636f646520320104036f75740000e4d0dfb4ab33fa01",
    );
}

#[test]
fn receipt_hello_log_vectors() {
    check(
        &Receipt { command: ID },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a9",
    );
    check(
        &Hello {
            agent_version: "0.1.0".into(),
            arch: "aarch64".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.1.0-56-arm64".into(),
            uptime_s: 3600,
            agent_started_at: 1_764_000_000_000,
            labels: vec![("site".into(), "ship-3".into())],
            outbox_depth: 0,
            pending: 1,
            interval_s: 15,
        },
        "0105302e312e3007616172636836341e44656269616e20474e552f4c696e75782031322028626f6f6b776f726d290e362e312e302d35362d61726d3634901c80d0dfb4ab3301047369746506736869702d3300010f",
    );
    check(
        &Log {
            level: Level::Warn,
            at: 1_764_000_000_000,
            message: "disk full".into(),
            command: Some(ID),
        },
        "010180d0dfb4ab33096469736b2066756c6c01018f0000002aa0a1a2a3a4a5a6a7a8a9",
    );
}

#[test]
fn api_vectors() {
    check(
        &SendRequest {
            id: ID,
            to: "pi-17".into(),
            domain: "nginx".into(),
            method: Method::Ping,
            timeout_ms: 0,
            ttl_ms: 60_000,
        },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a90570692d3137056e67696e780000e0d403",
    );
}

#[test]
fn decode_errors_are_clear() {
    assert_eq!(decode::<Receipt>(&[]), Err(DecodeError::Empty));
    assert_eq!(
        decode::<Receipt>(&[9, 1]),
        Err(DecodeError::Version { got: 9 })
    );
    let mut b = encode(&Receipt { command: ID });
    b.push(0);
    assert_eq!(decode::<Receipt>(&b), Err(DecodeError::Trailing(1)));
    assert!(matches!(
        decode::<Receipt>(&[1, 2]),
        Err(DecodeError::Malformed(_))
    ));
    // An over-long varint (0 as `80 00`) is refused: one value, one byte form.
    let overlong = [1, 0x80, 0x00];
    assert_eq!(decode::<u32>(&overlong), Err(DecodeError::NonCanonical));
    assert_eq!(decode::<u32>(&[1, 0x00]), Ok(0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Arbitrary bytes decode to an error or a value, never a panic.
    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Command>(&bytes);
        let _ = decode::<Ack>(&bytes);
        let _ = decode::<Outcome>(&bytes);
        let _ = decode::<Hello>(&bytes);
        let _ = decode::<Log>(&bytes);
        let _ = decode::<Receipt>(&bytes);
        let _ = decode::<SendRequest>(&bytes);
        let _ = decode::<StoredCommand>(&bytes);
        let _ = sign::peek_unverified(&bytes);
    }

    /// Garbage behind a valid version byte exercises the decoder itself.
    #[test]
    fn versioned_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = vec![PROTOCOL_VERSION];
        b.extend(bytes);
        let _ = decode::<Command>(&b);
        let _ = decode::<Outcome>(&b);
        let _ = decode::<Hello>(&b);
        let _ = decode::<StoredCommand>(&b);
    }

    /// Mutating one byte of a valid command never panics the decoder.
    #[test]
    fn mutated_command_never_panics(pos in 0usize..80, val in any::<u8>()) {
        let mut b = encode(&exec_command());
        let p = pos % b.len();
        b[p] = val;
        let _ = decode::<Command>(&b);
    }
}
