//! Bytes on the wire for typical messages: outpost (postcard, no headers) against the
//! seed project's CBOR positional array with its NATS headers, and against JSON
//! (see ../shared/seed-message.md for the seed's field list and typical values).

use base64::Engine;
use ciborium::Value;
use outpost_wire::sign::SigningKey;
use outpost_wire::{
    Ack, AckKind, Command, Exec, Hello, Method, MsgId, Outcome, Status, encode, now_ms,
};

/// One row: what is measured, and its size in each encoding (payload + headers).
pub struct Row {
    pub what: &'static str,
    pub outpost: usize,
    pub seed: usize,
    pub json: usize,
    pub note: &'static str,
}

/// NATS header block the seed puts on every message (`fromNode`, `serial`, `cmp`).
fn seed_headers(from: &str) -> usize {
    format!("NATS/1.0\r\nfromNode: {from}\r\nserial: cbor\r\ncmp: none\r\n\r\n").len()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}
fn int(i: i64) -> Value {
    Value::Integer(i.into())
}
fn texts(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| text(s)).collect())
}

/// The seed's message as its 23-element positional array.
#[allow(clippy::too_many_arguments)]
fn seed_msg(
    to: &str,
    from: &str,
    data: &[u8],
    method: &str,
    args: &[&str],
    sig: &[u8],
    is_reply: bool,
    previous: Option<Value>,
) -> Value {
    Value::Array(vec![
        text(to),
        Value::Array(vec![]),
        int(42),
        Value::Bytes(data.to_vec()),
        text(method),
        texts(args),
        Value::Bytes(sig.to_vec()),
        text("REQToFileAppend"),
        Value::Array(vec![]),
        Value::Bool(is_reply),
        text(from),
        int(5),
        int(2),
        Value::Bool(false),
        int(3),
        int(5),
        int(3),
        int(10),
        int(10),
        text("cli"),
        text("uname.result"),
        previous.unwrap_or(Value::Null),
        Value::Array(vec![]),
    ])
}

/// The same message as a JSON object (Go's encoding/json: bytes as base64).
fn seed_json(v: &Value) -> serde_json::Value {
    const NAMES: [&str; 23] = [
        "toNode",
        "toNodes",
        "id",
        "data",
        "method",
        "methodArgs",
        "argSignature",
        "replyMethod",
        "replyMethodArgs",
        "isReply",
        "fromNode",
        "ACKTimeout",
        "retryWait",
        "isSubPublishedMsg",
        "retries",
        "replyACKTimeout",
        "replyRetries",
        "methodTimeout",
        "replyMethodTimeout",
        "directory",
        "fileName",
        "previousMessage",
        "schedule",
    ];
    fn conv(v: &Value) -> serde_json::Value {
        match v {
            Value::Text(s) => s.clone().into(),
            Value::Integer(i) => i128::from(*i)
                .to_string()
                .parse::<i64>()
                .unwrap_or(0)
                .into(),
            Value::Bool(b) => (*b).into(),
            Value::Null => serde_json::Value::Null,
            Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
            Value::Array(a) if a.len() == 23 => seed_json(v),
            Value::Array(a) => a.iter().map(conv).collect::<Vec<_>>().into(),
            _ => serde_json::Value::Null,
        }
    }
    let Value::Array(fields) = v else {
        return serde_json::Value::Null;
    };
    NAMES
        .iter()
        .zip(fields)
        .map(|(k, f)| (k.to_string(), conv(f)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn cbor(v: &Value) -> usize {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("cbor");
    out.len()
}

pub fn rows() -> Vec<Row> {
    let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().expect("key")).expect("key");
    let now = now_ms();
    let cmd = Command {
        id: MsgId::new(now),
        from: "central".into(),
        to: "pi-17".into(),
        issued_at: now,
        deadline: now + 3_600_000,
        domain: String::new(),
        timeout_ms: 10_000,
        method: Method::Exec(Exec {
            argv: vec!["bash".into(), "-c".into(), "uname -a".into()],
            env: vec![],
            cwd: None,
        }),
        sent_at: now,
    };
    let signed = key.sign(&cmd);
    let ack = encode(&Ack {
        command: cmd.id,
        kind: AckKind::Running,
    });
    let output = vec![b'x'; 100];
    let outcome = encode(&Outcome {
        command: cmd.id,
        status: Status::Succeeded,
        exit_code: Some(0),
        stdout: output.clone(),
        stderr: vec![],
        truncated: false,
        started_at: now,
        duration_ms: 12,
    });
    let hello = encode(&Hello {
        agent_version: "0.1.0".into(),
        arch: "aarch64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-56-arm64".into(),
        uptime_s: 86_400,
        agent_started_at: now,
        labels: vec![],
        outbox_depth: 0,
        pending: 0,
        interval_s: 15,
        proto_min: 1,
        proto_max: outpost_wire::PROTOCOL,
        methods: ["ping", "exec", "file.write", "file.read", "hub.keys"]
            .iter()
            .map(|m| m.to_string())
            .collect(),
        allowed: vec!["ping".into(), "exec".into()],
        sent_at: now,
        keys: vec![[0; 8]],
    });

    let args = ["bash", "-c", "uname -a"];
    let sig = [7u8; 64];
    let seed_cmd = seed_msg(
        "pi-17",
        "central",
        &[],
        "REQCliCommand",
        &args,
        &sig,
        false,
        None,
    );
    let seed_reply = seed_msg(
        "central",
        "pi-17",
        &output,
        "REQToFileAppend",
        &[],
        &[],
        true,
        Some(seed_cmd.clone()),
    );
    let seed_hello = seed_msg(
        "central",
        "pi-17",
        &[9u8; 32],
        "REQHello",
        &[],
        &[],
        false,
        None,
    );
    let h_central = seed_headers("central");
    let h_pi = seed_headers("pi-17");
    let json = |v: &Value| serde_json::to_vec(&seed_json(v)).expect("json").len();
    vec![
        Row {
            what: "exec command, signed",
            outpost: signed.len(),
            seed: cbor(&seed_cmd) + h_central,
            json: json(&seed_cmd) + h_central,
            note: "outpost signs the whole command; the seed signed only the args",
        },
        Row {
            what: "ACK",
            outpost: ack.len(),
            seed: 0,
            json: 0,
            note: "the seed's ACK is an empty payload that cannot say which message it acknowledges",
        },
        Row {
            what: "outcome, 100 B output",
            outpost: outcome.len(),
            seed: cbor(&seed_reply) + h_pi,
            json: json(&seed_reply) + h_pi,
            note: "the seed's reply embeds the whole request",
        },
        Row {
            what: "hello",
            outpost: hello.len(),
            seed: cbor(&seed_hello) + h_pi,
            json: json(&seed_hello) + h_pi,
            note: "outpost's hello carries inventory; the seed's only a public key",
        },
    ]
}
