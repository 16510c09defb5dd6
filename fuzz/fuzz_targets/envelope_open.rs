//! `mesh_net::envelope::open`: a gossiped (or synced) signed node record.
//!
//! Every input is tried twice: as a whole envelope (what a peer sends), and
//! as the record bytes inside an envelope signed here with a fixed key, so
//! the fuzzer also reaches the record decoder and the limits behind the
//! signature check (a key made on the spot gets there too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use libp2p::identity::Keypair;
use mesh_net::envelope::{self, RECORD_ADDRS_MAX, RECORD_ITEMS_MAX, RECORD_STRING_MAX};
use serde::Serialize;

/// The wire form of `mesh_net::envelope`'s private `Envelope`; must match it.
#[derive(Serialize)]
struct Envelope<'a> {
    format: u8,
    record: &'a [u8],
    public_key: Vec<u8>,
    signature: Vec<u8>,
}

/// Must match `SIGNING_DOMAIN` in crates/mesh-net/src/envelope.rs.
const SIGNING_DOMAIN: &[u8] = b"agentmesh/node-record/1:";

/// The key the seeds' records are signed with (fuzz/seeds/envelope_open).
fn fixed_key() -> Keypair {
    Keypair::ed25519_from_bytes([0x42; 32]).expect("32 bytes make an ed25519 key")
}

fn check(bytes: &[u8]) {
    let Ok((record, signer)) = envelope::open(bytes) else {
        return;
    };
    assert_eq!(record.node_id.0, signer.to_base58());
    assert!(record.addrs.len() <= RECORD_ADDRS_MAX);
    assert!(record.models.len() <= RECORD_ITEMS_MAX);
    assert!(record.datasets.len() <= RECORD_ITEMS_MAX);
    assert!(record.version.len() <= RECORD_STRING_MAX);
    let key = fixed_key();
    if signer == key.public().to_peer_id() {
        let sealed = envelope::seal(&key, &record).expect("an opened record seals again");
        let (again, _) = envelope::open(&sealed).expect("a sealed record opens");
        assert_eq!(again, record);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let key = fixed_key();
    let signature = key
        .sign(&[SIGNING_DOMAIN, data].concat())
        .expect("ed25519 signs");
    let wrapped = Envelope {
        format: 1,
        record: data,
        public_key: key.public().encode_protobuf(),
        signature,
    };
    let wire =
        bincode::serde::encode_to_vec(&wrapped, bincode::config::standard()).expect("encodes");
    check(&wire);
});
