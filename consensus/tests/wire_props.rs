//! Property tests of the consensus codec (issue 12): every Raft request and
//! reply as a node sends them, and every value the log, the vote store, the
//! state machine and the bootstrap promise write to disk, round-trips
//! through `consensus::codec`; truncated bytes are an error, bit-flipped
//! bytes an error or another value, arbitrary bytes never a panic.
//!
//! `write_fuzz_seeds` (ignored) writes the seed corpus of the raft_rpc fuzz
//! target into fuzz/seeds/raft_rpc:
//! `cargo test -p consensus --test wire_props -- --ignored write_fuzz_seeds`.

use std::collections::BTreeMap;
use std::fmt::Debug;

use consensus::codec::{self, CodecError};
use consensus::rpc::{BootstrapPromise, RaftReply, RaftRequest};
use consensus::{RegionCommand, RegionNode, RegionState, TypeConfig};
use mesh_types::policy::{AllowedModel, Policy, Rate, RateLimits, ResidencyRule};
use mesh_types::Region;
use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    AnyError, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    SnapshotSegmentId, StorageError, StorageIOError, StoredMembership, Vote,
};
use proptest::prelude::*;
use proptest::strategy::LazyJust;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(".{0,24}").expect("a valid regex")
}

fn region() -> impl Strategy<Value = Region> {
    "[a-z]([a-z0-9-]{0,12}[a-z0-9])?".prop_map(|s| Region::parse(&s).expect("a valid region"))
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::collection::vec(
            (
                text(),
                prop::collection::vec(region(), 0..3),
                prop::collection::vec(region(), 0..3),
            )
                .prop_map(|(tag, regions, results)| ResidencyRule {
                    tag,
                    regions,
                    results,
                }),
            0..3,
        ),
        prop::collection::vec(
            (text(), "[0-9a-f]{64}").prop_map(|(name, sha256)| AllowedModel { name, sha256 }),
            0..3,
        ),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(|(residency, models, (a, b, c, d))| Policy {
            residency,
            models,
            rate_limits: RateLimits {
                per_agent: Rate {
                    per_second: a,
                    burst: b,
                },
                per_client: Rate {
                    per_second: c,
                    burst: d,
                },
            },
        })
}

fn vote() -> impl Strategy<Value = Vote<u64>> {
    (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(term, node, committed)| {
        if committed {
            Vote::new_committed(term, node)
        } else {
            Vote::new(term, node)
        }
    })
}

fn log_id() -> impl Strategy<Value = LogId<u64>> {
    (any::<u64>(), 0u64..8, any::<u64>())
        .prop_map(|(term, node, index)| LogId::new(CommittedLeaderId::new(term, node), index))
}

fn membership() -> impl Strategy<Value = Membership<u64, RegionNode>> {
    (
        prop::collection::btree_set(0u64..8, 1..4),
        prop::collection::btree_set(0u64..8, 0..3),
    )
        .prop_map(|(voters, learners)| {
            let nodes: BTreeMap<u64, RegionNode> = voters
                .iter()
                .chain(&learners)
                .map(|id| {
                    (
                        *id,
                        RegionNode {
                            peer_id: format!("12D3KooPeer{id}"),
                        },
                    )
                })
                .collect();
            Membership::new(vec![voters], nodes)
        })
}

fn stored_membership() -> impl Strategy<Value = StoredMembership<u64, RegionNode>> {
    (prop::option::of(log_id()), membership()).prop_map(|(l, m)| StoredMembership::new(l, m))
}

fn entry() -> impl Strategy<Value = Entry<TypeConfig>> {
    let payload = prop_oneof![
        Just(EntryPayload::Blank),
        policy().prop_map(|p| EntryPayload::Normal(RegionCommand::SetPolicy(p))),
        prop::collection::vec(policy(), 0..3)
            .prop_map(|p| EntryPayload::Normal(RegionCommand::SetPolicies(p))),
        membership().prop_map(EntryPayload::Membership),
    ];
    (log_id(), payload).prop_map(|(log_id, payload)| Entry { log_id, payload })
}

fn promise() -> impl Strategy<Value = BootstrapPromise> {
    (
        prop::collection::btree_set("12D3Koo[A-Za-z0-9]{8}", 1..5),
        any::<u64>(),
    )
        .prop_map(|(voters, attempt)| {
            let voters: Vec<String> = voters.into_iter().collect();
            BootstrapPromise {
                proposer: voters[0].clone(),
                voters,
                attempt,
            }
        })
}

fn install_snapshot() -> impl Strategy<Value = InstallSnapshotRequest<TypeConfig>> {
    (
        vote(),
        prop::option::of(log_id()),
        stored_membership(),
        text(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(
            |(vote, last_log_id, last_membership, snapshot_id, offset, data, done)| {
                InstallSnapshotRequest {
                    vote,
                    meta: SnapshotMeta {
                        last_log_id,
                        last_membership,
                        snapshot_id,
                    },
                    offset,
                    data,
                    done,
                }
            },
        )
}

fn request() -> impl Strategy<Value = RaftRequest> {
    prop_oneof![
        (
            vote(),
            prop::option::of(log_id()),
            prop::collection::vec(entry(), 0..4),
            prop::option::of(log_id()),
        )
            .prop_map(|(vote, prev_log_id, entries, leader_commit)| {
                RaftRequest::AppendEntries(AppendEntriesRequest {
                    vote,
                    prev_log_id,
                    entries,
                    leader_commit,
                })
            }),
        (vote(), prop::option::of(log_id()))
            .prop_map(|(v, l)| RaftRequest::Vote(VoteRequest::new(v, l))),
        install_snapshot().prop_map(RaftRequest::InstallSnapshot),
        promise().prop_map(RaftRequest::Bootstrap),
        promise().prop_map(RaftRequest::BootstrapRelease),
    ]
}

fn fatal() -> impl Strategy<Value = Fatal<u64>> {
    prop_oneof![
        Just(Fatal::Panicked),
        Just(Fatal::Stopped),
        text().prop_map(
            |m| Fatal::StorageError(StorageError::from(StorageIOError::read_logs(
                AnyError::error(m)
            )))
        ),
    ]
}

fn reply() -> impl Strategy<Value = RaftReply> {
    let append = prop_oneof![
        LazyJust::new(|| AppendEntriesResponse::Success),
        LazyJust::new(|| AppendEntriesResponse::Conflict),
        prop::option::of(log_id()).prop_map(AppendEntriesResponse::PartialSuccess),
        vote().prop_map(AppendEntriesResponse::HigherVote),
    ];
    prop_oneof![
        append.prop_map(|r| RaftReply::AppendEntries(Ok(r))),
        fatal().prop_map(|f| RaftReply::AppendEntries(Err(RaftError::Fatal(f)))),
        (vote(), any::<bool>(), prop::option::of(log_id())).prop_map(
            |(vote, vote_granted, last_log_id)| RaftReply::Vote(Ok(VoteResponse {
                vote,
                vote_granted,
                last_log_id,
            }))
        ),
        fatal().prop_map(|f| RaftReply::Vote(Err(RaftError::Fatal(f)))),
        vote().prop_map(|vote| RaftReply::InstallSnapshot(Ok(InstallSnapshotResponse { vote }))),
        (text(), any::<u64>(), any::<u64>()).prop_map(|(id, a, b)| {
            RaftReply::InstallSnapshot(Err(RaftError::APIError(
                InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: SnapshotSegmentId {
                        id: id.clone(),
                        offset: a,
                    },
                    got: SnapshotSegmentId { id, offset: b },
                }),
            )))
        }),
        text().prop_map(RaftReply::Refused),
        prop::result::maybe_ok(Just(()), text()).prop_map(RaftReply::Bootstrap),
    ]
}

fn region_state() -> impl Strategy<Value = RegionState> {
    (
        prop::option::of(log_id()),
        stored_membership(),
        prop::option::of(policy()),
        any::<u64>(),
    )
        .prop_map(
            |(last_applied, membership, policy, policy_version)| RegionState {
                last_applied,
                membership,
                policy,
                policy_version,
                ..RegionState::default()
            },
        )
}

/// Round trip, compared by re-encoding (the Raft messages have no
/// `PartialEq`, and openraft's `Debug` of a payload hides it) and by
/// `Debug`; then the truncation and the bit flip.
fn check<T: Serialize + DeserializeOwned + Debug>(
    value: &T,
    cut: prop::sample::Index,
    flip: (prop::sample::Index, u8),
) -> Result<(), TestCaseError> {
    let bytes = codec::encode(value).expect("encodes");
    let decoded: T = codec::decode(&bytes).expect("decodes");
    prop_assert_eq!(format!("{decoded:?}"), format!("{value:?}"));
    prop_assert_eq!(codec::encode(&decoded).expect("encodes"), bytes.clone());

    let len = cut.index(bytes.len());
    let truncated = codec::decode::<T>(&bytes[..len]);
    prop_assert!(
        truncated.is_err(),
        "{} of {} bytes decoded: {:?}",
        len,
        bytes.len(),
        truncated
    );

    let mut flipped = bytes.clone();
    let i = flip.0.index(flipped.len());
    flipped[i] ^= 1 << flip.1;
    match codec::decode::<T>(&flipped) {
        // Equal values encode alike: another encoding is another value.
        Ok(other) => prop_assert_ne!(codec::encode(&other).expect("encodes"), bytes),
        Err(CodecError::Version { .. }) => prop_assert_eq!(i, 0),
        Err(_) => {}
    }
    Ok(())
}

fn flip() -> impl Strategy<Value = (prop::sample::Index, u8)> {
    (any::<prop::sample::Index>(), 0u8..8)
}

proptest! {
    #[test]
    fn raft_requests_round_trip(v in request(), cut in any::<prop::sample::Index>(), f in flip()) {
        check(&v, cut, f)?;
    }

    #[test]
    fn raft_replies_round_trip(v in reply(), cut in any::<prop::sample::Index>(), f in flip()) {
        check(&v, cut, f)?;
    }

    #[test]
    fn log_entries_round_trip(v in entry(), cut in any::<prop::sample::Index>(), f in flip()) {
        check(&v, cut, f)?;
    }

    #[test]
    fn votes_and_log_ids_round_trip(
        v in vote(),
        l in prop::option::of(log_id()),
        cut in any::<prop::sample::Index>(),
        f in flip(),
    ) {
        check(&v, cut, f)?;
        // The committed id and the last purged id are stored as these.
        check(&l, cut, f)?;
    }

    #[test]
    fn region_states_round_trip(v in region_state(), cut in any::<prop::sample::Index>(), f in flip()) {
        check(&v, cut, f)?;
    }

    #[test]
    fn bootstrap_promises_round_trip(v in promise(), cut in any::<prop::sample::Index>(), f in flip()) {
        check(&v, cut, f)?;
    }

    #[test]
    fn snapshot_meta_round_trips(
        v in install_snapshot().prop_map(|r| r.meta),
        cut in any::<prop::sample::Index>(),
        f in flip(),
    ) {
        check(&v, cut, f)?;
    }

    #[test]
    fn any_bytes_decode_without_a_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Some(first) = bytes.first_mut() {
            *first = codec::FORMAT_VERSION;
        }
        let _ = codec::decode::<RaftRequest>(&bytes);
        let _ = codec::decode::<RaftReply>(&bytes);
        let _ = codec::decode::<Entry<TypeConfig>>(&bytes);
        let _ = codec::decode::<RegionState>(&bytes);
        let _ = codec::decode::<BootstrapPromise>(&bytes);
        let _ = codec::decode::<Vote<u64>>(&bytes);
    }

    #[test]
    fn a_huge_length_prefix_anywhere_is_an_error(v in request(), at in any::<prop::sample::Index>()) {
        // A varint claiming 2^46 put in at any place: an error (or another
        // value), never an allocation of 64 TiB.
        let mut bytes = codec::encode(&v).expect("encodes");
        let i = 1 + at.index(bytes.len() - 1);
        let mut huge = vec![0xFD];
        huge.extend_from_slice(&(1u64 << 46).to_le_bytes());
        bytes.splice(i..i, huge);
        let _ = codec::decode::<RaftRequest>(&bytes);
    }
}

/// Writes the seed corpus of the raft_rpc fuzz target (see the module docs).
#[test]
#[ignore = "writes fuzz/seeds; run by hand when a wire format changes"]
fn write_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/raft_rpc");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut runner = TestRunner::deterministic();
    let mut n = 0;
    let mut write = |bytes: Vec<u8>| {
        std::fs::write(dir.join(format!("seed-{n:02}")), bytes).expect("write seed");
        n += 1;
    };
    for _ in 0..12 {
        write(
            codec::encode(&request().new_tree(&mut runner).expect("value").current())
                .expect("encodes"),
        );
    }
    for _ in 0..8 {
        write(
            codec::encode(&reply().new_tree(&mut runner).expect("value").current())
                .expect("encodes"),
        );
    }
    for _ in 0..3 {
        write(
            codec::encode(&entry().new_tree(&mut runner).expect("value").current())
                .expect("encodes"),
        );
        write(
            codec::encode(
                &region_state()
                    .new_tree(&mut runner)
                    .expect("value")
                    .current(),
            )
            .expect("encodes"),
        );
        write(
            codec::encode(&promise().new_tree(&mut runner).expect("value").current())
                .expect("encodes"),
        );
    }
    write(codec::encode(&vote().new_tree(&mut runner).expect("value").current()).expect("encodes"));
    write(
        codec::encode(&Some(
            log_id().new_tree(&mut runner).expect("value").current(),
        ))
        .expect("encodes"),
    );
}
