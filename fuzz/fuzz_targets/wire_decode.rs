//! Every wire type's decoder on arbitrary bytes: an error or a value, never a panic,
//! and whatever decodes re-encodes to the same bytes (postcard is canonical here).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_wire::api::{ApiReply, CommandRecord, NodeRecord, SendRequest, StoredCommand};
use outpost_wire::{Ack, Command, Hello, Log, Outcome, Receipt, decode, encode, sign};

fn round_trip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    if let Ok(v) = decode::<T>(data) {
        assert_eq!(encode(&v), data, "decode then encode changed the bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Command>(data);
    round_trip::<Ack>(data);
    round_trip::<Outcome>(data);
    round_trip::<Receipt>(data);
    round_trip::<Hello>(data);
    round_trip::<Log>(data);
    round_trip::<SendRequest>(data);
    round_trip::<StoredCommand>(data);
    round_trip::<CommandRecord>(data);
    round_trip::<NodeRecord>(data);
    round_trip::<ApiReply<Vec<u8>>>(data);
    let _ = sign::peek_unverified(data);
});
