//! Every wire type's decoder on arbitrary bytes: an error or a value, never a panic,
//! and whatever decodes in a version this build speaks, with a canonical layout in
//! that version, re-encodes in it to the same bytes. (A newer version's appended
//! tail is ignored by design; a version 1 command is kept as signed, not re-encoded.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_wire::api::{ApiReply, CommandRecord, NodeRecord, SendRequest, StoredCommand};
use outpost_wire::api::{NodesPage, NodesRequest};
use outpost_wire::{
    Ack, Command, Hello, HelloReply, Log, Outcome, PROTOCOL, Receipt, Started, Wire,
    decode_versioned, encode_for, sign,
};

fn round_trip<T: Wire>(data: &[u8]) {
    if let Ok((v, version)) = decode_versioned::<T>(data) {
        if version <= PROTOCOL && T::canonical(version) {
            assert_eq!(
                encode_for(&v, version),
                data,
                "decode then encode changed the bytes"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Command>(data);
    round_trip::<Ack>(data);
    round_trip::<Outcome>(data);
    round_trip::<Receipt>(data);
    round_trip::<Hello>(data);
    round_trip::<Log>(data);
    round_trip::<HelloReply>(data);
    round_trip::<Started>(data);
    round_trip::<NodesRequest>(data);
    round_trip::<NodesPage>(data);
    round_trip::<SendRequest>(data);
    round_trip::<StoredCommand>(data);
    round_trip::<CommandRecord>(data);
    round_trip::<NodeRecord>(data);
    round_trip::<ApiReply<Vec<u8>>>(data);
    let _ = sign::peek_unverified(data);
});
