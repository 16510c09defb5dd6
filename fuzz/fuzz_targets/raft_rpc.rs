//! `consensus::codec::decode` of everything a node decodes from a peer (a
//! Raft request, a Raft reply) or reads back from its disk (log entries,
//! the vote, log ids, the region state, the bootstrap promise). A value
//! that decodes must encode again and decode to the same thing.
#![no_main]

use consensus::codec;
use consensus::rpc::{BootstrapPromise, RaftReply, RaftRequest};
use consensus::{RegionState, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::{Entry, LogId, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as a `T`; if it does, re-encoding is stable (types
/// without `PartialEq` are compared by their encoding and `Debug` text).
fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(data: &[u8]) {
    let Ok(value) = codec::decode::<T>(data) else {
        return;
    };
    let bytes = codec::encode(&value).expect("a decoded value encodes");
    let again: T = codec::decode(&bytes).expect("an encoded value decodes");
    assert_eq!(format!("{again:?}"), format!("{value:?}"));
    assert_eq!(codec::encode(&again).expect("encodes"), bytes);
}

fuzz_target!(|data: &[u8]| {
    // From peers.
    round_trip::<RaftRequest>(data);
    round_trip::<RaftReply>(data);
    // From the disk.
    round_trip::<Entry<TypeConfig>>(data);
    round_trip::<Vote<u64>>(data);
    round_trip::<Option<LogId<u64>>>(data);
    round_trip::<LogId<u64>>(data);
    round_trip::<RegionState>(data);
    round_trip::<BootstrapPromise>(data);
});
