//! Exact-bytes test vectors of every message type in every protocol version, and the
//! no-panic property of the decoder.
//!
//! Version 1's vectors are the bytes released units and hubs speak: they never change.
//! Each is written by `encode_for(_, 1)` and read back by `decode`. Version 2's are
//! pinned the same way; a change to one is a wire break: a new version instead, with
//! `docs/wire-spec.md` updated together, never just the hex here.

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
        sent_at: 0,
    }
}

/// Encode for version 1, compare with the vector, decode back, compare with the value
/// (as version 1 carries it: the fields version 2 added at their version 1 defaults).
fn check<T>(value: &T, vector: &str)
where
    T: Wire + PartialEq + std::fmt::Debug,
{
    check_at(1, value, vector)
}

fn check_at<T>(v: u8, value: &T, vector: &str)
where
    T: Wire + PartialEq + std::fmt::Debug,
{
    let bytes = encode_for(value, v);
    assert_eq!(hex(&bytes), vector, "version {v} encoding of {value:?}");
    let (back, version) = decode_versioned::<T>(&bytes).unwrap();
    assert_eq!((&back, version), (value, v));
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

fn hello_v1() -> Hello {
    Hello {
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
        // What a version 1 hello stands for.
        proto_min: 1,
        proto_max: 1,
        methods: V1_METHODS.iter().map(|m| m.to_string()).collect(),
        allowed: vec![],
        sent_at: 0,
        keys: vec![],
    }
}

#[test]
fn receipt_hello_log_vectors() {
    check(
        &Receipt { command: ID },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a9",
    );
    check(
        &hello_v1(),
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

/// Version 1 API request bytes (released CLIs sent these); version 2 hubs answer
/// them with a version error, but the layout is pinned all the same.
#[test]
fn api_v1_layout() {
    let v1_send = "01018f0000002aa0a1a2a3a4a5a6a7a8a90570692d3137056e67696e780000e0d403";
    let req = SendRequest {
        id: ID,
        to: "pi-17".into(),
        domain: "nginx".into(),
        method: Method::Ping,
        timeout_ms: 0,
        ttl_ms: 60_000,
    };
    // Version 2 lays it out the same; only the version byte differs.
    assert_eq!(hex(&encode(&req))[2..], v1_send[2..]);
    assert_eq!(
        decode::<SendRequest>(&[1, 1]),
        Err(DecodeError::Version { got: 1 })
    );
}

/// Records a version 1 hub stored: an upgraded hub reads them.
#[test]
fn stored_v1_records_are_read() {
    let record = CommandRecord {
        id: ID,
        node: "pi-17".into(),
        method: "exec".into(),
        domain: String::new(),
        issued_at: 1_764_000_000_000,
        deadline: 1_764_000_300_000,
        state: CmdState::Accepted,
        attempts: 1,
        last_attempt_at: 1_764_000_000_010,
        accepted_at: Some(1_764_000_000_020),
        finished_at: None,
        note: String::new(),
        outcome: None,
        started_at: None,
        unconfirmed: false,
    };
    let key = sign::SigningKey::from_pkcs8(&sign::SigningKey::generate_pkcs8().unwrap()).unwrap();
    let old = v1::StoredCommand {
        record: (&record).into(),
        signed: key.sign_for(&exec_command(), 1),
    };
    let bytes = {
        let mut b = vec![1u8];
        b.extend(postcard::to_allocvec(&old).unwrap());
        b
    };
    let back: StoredCommand = decode(&bytes).unwrap();
    assert_eq!(back.record, record);
    assert_eq!(back.command, exec_command());
    check(
        &NodeRecord {
            name: "pi-17".into(),
            first_seen: 1,
            last_seen: 2,
            online_since: 1,
            hello: hello_v1(),
            clock_offset_ms: 0,
            hello_proto: 1,
        },
        "010570692d3137010201\
         05302e312e3007616172636836341e44656269616e20474e552f4c696e75782031322028626f6f6b776f726d290e362e312e302d35362d61726d3634901c80d0dfb4ab3301047369746506736869702d3300010f",
    );
    check(
        &LastOutcome {
            command: ID,
            status: Status::Succeeded,
            exit_code: Some(0),
            finished_at: 7,
        },
        "01018f0000002aa0a1a2a3a4a5a6a7a8a900010007",
    );
}

// ---- version 2 ---------------------------------------------------------------------

fn exec_command_v2() -> Command {
    Command {
        sent_at: 1_764_000_000_500,
        ..exec_command()
    }
}

#[test]
fn command_v2_vector() {
    check_at(2, &exec_command_v2(), V2_COMMAND);
    check_at(
        2,
        &Command {
            method: Method::HubKeys(HubKeys {
                keys: vec![[7; 32]],
            }),
            ..exec_command_v2()
        },
        V2_COMMAND_HUB_KEYS,
    );
    // Version 1 drops sent_at: the bytes are the released ones.
    assert_eq!(
        hex(&encode_for(&exec_command_v2(), 1)),
        hex(&encode_for(&exec_command(), 1))
    );
}

#[test]
fn ack_v2_vectors() {
    let running = Ack {
        command: ID,
        kind: AckKind::Running,
    };
    check_at(2, &running, V2_ACK_RUNNING);
    // A version 1 hub hears `Accepted`.
    assert_eq!(
        decode::<Ack>(&encode_for(&running, 1)).unwrap().kind,
        AckKind::Accepted
    );
    let expired = Status::Expired("deadline passed 5 ms before it could start".into());
    check_at(
        2,
        &Ack {
            command: ID,
            kind: AckKind::Duplicate(Recorded::Finished(expired.clone())),
        },
        V2_ACK_DUP_EXPIRED,
    );
    // A version 1 hub hears a failure that says why.
    let Status::Failed(why) = decode::<Status>(&encode_for(&expired, 1)).unwrap() else {
        panic!("expired maps to failed in version 1");
    };
    assert!(why.starts_with("expired before it started"), "{why}");
}

#[test]
fn started_hello_reply_vectors() {
    check_at(
        2,
        &Started {
            command: ID,
            at: 1_764_000_000_100,
        },
        V2_STARTED,
    );
    check_at(
        2,
        &HelloReply {
            proto_min: 1,
            proto_max: 2,
            hub_time: 1_764_000_000_000,
        },
        V2_HELLO_REPLY,
    );
    // Messages version 2 added do not exist in version 1.
    assert!(matches!(
        decode::<Started>(&[1, 0]),
        Err(DecodeError::Version { got: 1 })
    ));
}

#[test]
fn hello_v2_vector() {
    let h = Hello {
        proto_min: 1,
        proto_max: 2,
        methods: vec!["ping".into(), "exec".into()],
        allowed: vec!["ping".into()],
        sent_at: 1_764_000_000_001,
        keys: vec![[1, 2, 3, 4, 5, 6, 7, 8]],
        ..hello_v1()
    };
    check_at(2, &h, V2_HELLO);
    // What a version 1 hub reads: the released layout.
    assert_eq!(hex(&encode_for(&h, 1)), hex(&encode_for(&hello_v1(), 1)));
    // A later version appends fields: this build reads what it knows, skips the rest.
    let mut later = encode_for(&h, 2);
    later[0] = 3;
    later.extend([0x05, 0xaa]);
    assert_eq!(decode_versioned::<Hello>(&later).unwrap(), (h, 3));
}

#[test]
fn api_v2_vectors() {
    check_at(
        2,
        &SendRequest {
            id: ID,
            to: "pi-17".into(),
            domain: "nginx".into(),
            method: Method::Ping,
            timeout_ms: 0,
            ttl_ms: 60_000,
        },
        V2_SEND,
    );
    check_at(
        2,
        &NodesRequest {
            after: "pi-1".into(),
            limit: 500,
            online: Some(true),
            name: "pi-*".into(),
            selector: "site=oslo".into(),
        },
        V2_NODES,
    );
    check_at(
        2,
        &ApiReply::<()>::Err(ApiError::new(ErrorCode::UnknownUnit, "no unit pi-71")),
        V2_API_ERR,
    );
}

const V2_COMMAND: &str = "02018f0000002aa0a1a2a3a4a5a6a7a8a90763656e7472616c0570692d313780d0dfb4ab33e0f7f1b4ab3300904e01030462617368022d6308756e616d65202d610000f4d3dfb4ab33";
const V2_COMMAND_HUB_KEYS: &str = "02018f0000002aa0a1a2a3a4a5a6a7a8a90763656e7472616c0570692d313780d0dfb4ab33e0f7f1b4ab3300904e04010707070707070707070707070707070707070707070707070707070707070707f4d3dfb4ab33";
const V2_ACK_RUNNING: &str = "02018f0000002aa0a1a2a3a4a5a6a7a8a904";
const V2_ACK_DUP_EXPIRED: &str = "02018f0000002aa0a1a2a3a4a5a6a7a8a90101042a646561646c696e65207061737365642035206d73206265666f726520697420636f756c64207374617274";
const V2_STARTED: &str = "02018f0000002aa0a1a2a3a4a5a6a7a8a9e4d0dfb4ab33";
const V2_HELLO_REPLY: &str = "02010280d0dfb4ab33";
const V2_HELLO: &str = "0205302e312e3007616172636836341e44656269616e20474e552f4c696e75782031322028626f6f6b776f726d290e362e312e302d35362d61726d3634901c80d0dfb4ab3301047369746506736869702d3300010f0102020470696e670465786563010470696e6781d0dfb4ab33010102030405060708";
const V2_SEND: &str = "02018f0000002aa0a1a2a3a4a5a6a7a8a90570692d3137056e67696e780000e0d403";
const V2_NODES: &str = "020470692d31f40301010470692d2a09736974653d6f736c6f";
const V2_API_ERR: &str = "0201010d6e6f20756e69742070692d3731";

#[test]
fn decode_errors_are_clear() {
    assert_eq!(decode::<Receipt>(&[]), Err(DecodeError::Empty));
    assert_eq!(
        decode::<Receipt>(&[0, 1]),
        Err(DecodeError::Version { got: 0 })
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
        let _ = decode::<HelloReply>(&bytes);
        let _ = decode::<Started>(&bytes);
        let _ = decode::<SendRequest>(&bytes);
        let _ = decode::<NodesRequest>(&bytes);
        let _ = decode::<StoredCommand>(&bytes);
        let _ = sign::peek_unverified(&bytes);
    }

    /// Garbage behind a valid version byte exercises the decoder itself.
    #[test]
    fn versioned_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for v in [1u8, 2, 3] {
            let mut b = vec![v];
            b.extend(&bytes);
            let _ = decode::<Command>(&b);
            let _ = decode::<Ack>(&b);
            let _ = decode::<Outcome>(&b);
            let _ = decode::<Hello>(&b);
            let _ = decode::<StoredCommand>(&b);
            let _ = decode::<NodeRecord>(&b);
            let _ = decode::<ApiReply<NodesPage>>(&b);
        }
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
