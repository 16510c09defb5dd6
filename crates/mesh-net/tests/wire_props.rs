//! Property tests of mesh-net's wire messages (issue 12): every message
//! round-trips, and truncated or bit-flipped bytes are an error (or, where
//! nothing is signed, a different message), never a panic.
//!
//! `write_fuzz_seeds` (ignored) writes the seed corpora of the fuzz targets
//! envelope_open, sync_decode, raft_link_frame and forward into fuzz/seeds/:
//! `cargo test -p mesh-net --test wire_props -- --ignored write_fuzz_seeds`.

use futures::io::Cursor;
use libp2p::identity::Keypair;
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;
use mesh_net::codec::FrameCodec;
use mesh_net::envelope::{self, EnvelopeError, RECORD_STRING_MAX};
use mesh_net::forward::{self, ForwardRequest, ForwardResponse};
use mesh_net::sync::{SyncEntry, SyncMessage};
use mesh_types::{Load, ModelAdvert, NodeId, NodeRecord, RaftRole, Region};
use proptest::prelude::*;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/props/1");

fn short_string() -> impl Strategy<Value = String> {
    // Any unicode, up to a few dozen characters: under RECORD_STRING_MAX bytes.
    proptest::string::string_regex(".{0,40}").expect("a valid regex")
}

fn region() -> impl Strategy<Value = Region> {
    "[a-z]([a-z0-9-]{0,20}[a-z0-9])?".prop_map(|s| Region::parse(&s).expect("a valid region"))
}

/// A record of any node but the signer's id, which [`sealed`] fills in.
fn record() -> impl Strategy<Value = NodeRecord> {
    (
        (
            region(),
            prop::collection::vec(short_string(), 0..6),
            short_string(),
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
        (
            prop::collection::vec(
                (short_string(), "[0-9a-f]{0,64}")
                    .prop_map(|(name, sha256)| ModelAdvert { name, sha256 }),
                0..4,
            ),
            prop::collection::vec(short_string(), 0..4),
            (any::<u32>(), any::<u32>()).prop_map(|(tasks_running, agents_active)| Load {
                tasks_running,
                agents_active,
            }),
            prop::option::of(short_string()),
            prop::option::of(prop_oneof![Just(RaftRole::Voter), Just(RaftRole::Learner)]),
        ),
    )
        .prop_map(
            |(
                (region, addrs, version),
                (started_at_ms, seq, sent_at_ms, leaving),
                (models, datasets, load, api, raft),
            )| NodeRecord {
                node_id: NodeId(String::new()),
                region,
                addrs,
                version,
                started_at_ms,
                seq,
                sent_at_ms,
                leaving,
                models,
                datasets,
                load,
                api,
                raft,
            },
        )
}

/// A record sealed by a fresh key, as a node seals its own.
fn sealed(mut record: NodeRecord) -> (NodeRecord, Keypair, Vec<u8>) {
    let keypair = Keypair::generate_ed25519();
    record.node_id = NodeId(keypair.public().to_peer_id().to_base58());
    let bytes = envelope::seal(&keypair, &record).expect("a record within the limits seals");
    (record, keypair, bytes)
}

fn sync_message() -> impl Strategy<Value = SyncMessage> {
    prop::collection::vec(
        (prop::collection::vec(any::<u8>(), 0..200), any::<u64>())
            .prop_map(|(envelope, age_ms)| SyncEntry { envelope, age_ms }),
        0..8,
    )
    .prop_map(SyncMessage::new)
}

fn read_request(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    futures::executor::block_on(FrameCodec.read_request(&PROTOCOL, &mut Cursor::new(bytes)))
}

fn write_request(payload: Vec<u8>) -> Vec<u8> {
    futures::executor::block_on(async {
        let mut out = Cursor::new(Vec::new());
        FrameCodec
            .write_request(&PROTOCOL, &mut out, payload)
            .await
            .expect("a small frame writes");
        out.into_inner()
    })
}

fn forward_request() -> impl Strategy<Value = ForwardRequest> {
    (
        prop::sample::select(vec!["GET", "PUT", "POST", "DELETE"]),
        "/v1/[a-z/?=&-]{0,40}",
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(method, path, hops, body)| ForwardRequest {
            method: method.to_owned(),
            path,
            hops,
            body,
            deadline_ms: u64::from(hops) << 40,
        })
}

fn forward_response() -> impl Strategy<Value = ForwardResponse> {
    (any::<u16>(), prop::collection::vec(any::<u8>(), 0..256))
        .prop_map(|(status, body)| ForwardResponse { status, body })
}

proptest! {
    #[test]
    fn a_sealed_record_opens_to_itself(record in record()) {
        let (record, keypair, bytes) = sealed(record);
        let (opened, signer) = envelope::open(&bytes).expect("opens");
        prop_assert_eq!(opened, record);
        prop_assert_eq!(signer, keypair.public().to_peer_id());
    }

    #[test]
    fn a_truncated_envelope_is_refused(record in record(), cut in any::<prop::sample::Index>()) {
        let (_, _, bytes) = sealed(record);
        let len = cut.index(bytes.len());
        prop_assert!(envelope::open(&bytes[..len]).is_err());
    }

    #[test]
    fn a_bit_flipped_envelope_is_refused(
        record in record(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (_, _, mut bytes) = sealed(record);
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(envelope::open(&bytes).is_err(), "flip of bit {} at byte {} was accepted", bit, i);
    }

    #[test]
    fn a_string_past_the_limit_is_refused(record in record(), extra in 1usize..64) {
        let (mut record, keypair, _) = sealed(record);
        record.version = "v".repeat(RECORD_STRING_MAX + extra);
        let bytes = envelope::seal(&keypair, &record).expect("seals");
        prop_assert!(matches!(envelope::open(&bytes), Err(EnvelopeError::Malformed(_))));
    }

    #[test]
    fn any_bytes_open_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = envelope::open(&bytes);
    }

    #[test]
    fn a_sync_message_round_trips(message in sync_message()) {
        prop_assert_eq!(SyncMessage::decode(&message.encode()).expect("decodes"), message);
    }

    #[test]
    fn a_sync_message_with_sealed_records_round_trips(records in prop::collection::vec(record(), 0..4)) {
        let message = SyncMessage::new(
            records
                .into_iter()
                .map(|r| SyncEntry { envelope: sealed(r).2, age_ms: 7 })
                .collect(),
        );
        let decoded = SyncMessage::decode(&message.encode()).expect("decodes");
        for entry in &decoded.entries {
            envelope::open(&entry.envelope).expect("every record still opens");
        }
        prop_assert_eq!(decoded, message);
    }

    #[test]
    fn a_truncated_sync_message_is_refused(message in sync_message(), cut in any::<prop::sample::Index>()) {
        let bytes = message.encode();
        let len = cut.index(bytes.len());
        prop_assert!(SyncMessage::decode(&bytes[..len]).is_err());
    }

    #[test]
    fn a_bit_flipped_sync_message_is_refused_or_another(
        message in sync_message(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut bytes = message.encode();
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(decoded) = SyncMessage::decode(&bytes) {
            prop_assert_ne!(decoded, message);
        }
    }

    #[test]
    fn any_bytes_decode_as_sync_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = SyncMessage::decode(&bytes);
    }

    #[test]
    fn forwarded_requests_and_answers_round_trip(
        request in forward_request(),
        response in forward_response(),
    ) {
        prop_assert_eq!(forward::decode_request(&forward::encode_request(&request)), Ok(request));
        prop_assert_eq!(forward::decode_response(&forward::encode_response(&response)), Ok(response));
    }

    #[test]
    fn a_damaged_forwarded_request_is_refused_or_another(
        request in forward_request(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let bytes = forward::encode_request(&request);
        let len = cut.index(bytes.len());
        prop_assert!(forward::decode_request(&bytes[..len]).is_err());
        let mut flipped = bytes;
        let i = at.index(flipped.len());
        flipped[i] ^= 1 << bit;
        if let Ok(other) = forward::decode_request(&flipped) {
            prop_assert_ne!(&other, &request);
        }
        // Anything after the message is refused too.
        let mut longer = forward::encode_request(&request);
        longer.push(0);
        prop_assert!(forward::decode_request(&longer).is_err());
    }

    #[test]
    fn a_damaged_forwarded_answer_is_refused_or_another(
        response in forward_response(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let bytes = forward::encode_response(&response);
        let len = cut.index(bytes.len());
        prop_assert!(forward::decode_response(&bytes[..len]).is_err());
        let mut flipped = bytes;
        let i = at.index(flipped.len());
        flipped[i] ^= 1 << bit;
        if let Ok(other) = forward::decode_response(&flipped) {
            prop_assert_ne!(&other, &response);
        }
    }

    #[test]
    fn a_forward_frame_longer_than_its_limit_is_refused(len in 1025u32..=u32::MAX) {
        let err = futures::executor::block_on(forward::read_frame(
            &mut Cursor::new(len.to_be_bytes()),
            1024,
        ))
        .expect_err("too large");
        prop_assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_frame_round_trips(payload in prop::collection::vec(any::<u8>(), 0..2048)) {
        let wire = write_request(payload.clone());
        prop_assert_eq!(read_request(&wire).expect("reads"), payload);
    }

    #[test]
    fn a_truncated_frame_is_refused(
        payload in prop::collection::vec(any::<u8>(), 0..256),
        cut in any::<prop::sample::Index>(),
    ) {
        let wire = write_request(payload);
        let len = cut.index(wire.len());
        prop_assert!(read_request(&wire[..len]).is_err());
    }

    #[test]
    fn a_length_prefix_past_the_limit_is_refused(len in (mesh_net::codec::FRAME_LEN_MAX as u32 + 1)..=u32::MAX) {
        // Refused from the prefix alone: nothing is allocated for it.
        let err = read_request(&len.to_be_bytes()).expect_err("too large");
        prop_assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}

/// Writes the seed corpora of the mesh-net fuzz targets (see the module docs).
#[test]
#[ignore = "writes fuzz/seeds; run by hand when a wire format changes"]
fn write_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let write = |target: &str, name: String, bytes: &[u8]| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    let mut runner = TestRunner::deterministic();
    let mut records = Vec::new();
    for _ in 0..6 {
        records.push(record().new_tree(&mut runner).expect("a record").current());
    }
    // envelope_open signs raw input with this key (fuzz/fuzz_targets/envelope_open.rs).
    let fixed = Keypair::ed25519_from_bytes([0x42; 32]).expect("a key");
    let mut sealed_all = Vec::new();
    for (i, record) in records.iter().enumerate() {
        // Keys made from fixed bytes, so that the seeds stay the same.
        let key = Keypair::ed25519_from_bytes([i as u8 + 1; 32]).expect("a key");
        let mut theirs = record.clone();
        theirs.node_id = NodeId(key.public().to_peer_id().to_base58());
        let bytes = envelope::seal(&key, &theirs).expect("seals");
        write("envelope_open", format!("sealed-{i}"), &bytes);
        let mut own = record.clone();
        own.node_id = NodeId(fixed.public().to_peer_id().to_base58());
        let body =
            bincode::serde::encode_to_vec(&own, bincode::config::standard()).expect("encodes");
        write("envelope_open", format!("record-{i}"), &body);
        write(
            "envelope_open",
            format!("sealed-fixed-{i}"),
            &envelope::seal(&fixed, &own).expect("seals"),
        );
        sealed_all.push(bytes);
    }
    for n in [0, 1, 3, 6] {
        let message = SyncMessage::new(
            sealed_all
                .iter()
                .take(n)
                .enumerate()
                .map(|(i, e)| SyncEntry {
                    envelope: e.clone(),
                    age_ms: i as u64 * 1000,
                })
                .collect(),
        );
        write("sync_decode", format!("sync-{n}"), &message.encode());
    }
    for i in 0..4 {
        let request = forward_request()
            .new_tree(&mut runner)
            .expect("a request")
            .current();
        let bytes = forward::encode_request(&request);
        write("forward", format!("request-{i}"), &bytes);
        // As it travels: a 4-byte length, then the message.
        let mut frame = (bytes.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&bytes);
        write("forward", format!("frame-{i}"), &frame);
        let response = forward_response()
            .new_tree(&mut runner)
            .expect("an answer")
            .current();
        write(
            "forward",
            format!("response-{i}"),
            &forward::encode_response(&response),
        );
    }
    for (i, payload) in [
        Vec::new(),
        b"hello".to_vec(),
        SyncMessage::new(vec![]).encode(),
        sealed_all[0].clone(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut wire = write_request(payload.clone());
        write("raft_link_frame", format!("frame-{i}"), &wire);
        // Two frames: a request, then a response.
        wire.extend(write_request(payload));
        write("raft_link_frame", format!("frames-{i}"), &wire);
    }
}
