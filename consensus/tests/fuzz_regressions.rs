//! Inputs that crash (or crashed) a decoder of the consensus codec, kept as
//! regression tests next to the fuzz targets (fuzz/, scripts/fuzz.sh): each
//! must now decode to an error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use consensus::codec::{self, CodecError};
use consensus::rpc::{serve, RaftReply, RaftRequest, Transport};
use consensus::types::node_id_of;
use consensus::{LogSync, RaftSettings, RegionGroup, RegionNode, TypeConfig};
use openraft::error::{Fatal, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest};
use openraft::{
    AnyError, CommittedLeaderId, LogId, Membership, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};

/// A Raft reply whose storage error's `AnyError` has `source` errors nested
/// `depth` deep: each level is 3 bytes on the way in (no type, an empty
/// message, `Some`) and 2 on the way out (no context, no backtrace).
fn nested_error_reply(depth: usize) -> Vec<u8> {
    let reply = RaftReply::AppendEntries(Err(RaftError::Fatal(Fatal::StorageError(
        StorageError::from(StorageIOError::read_logs(AnyError::error("QQ"))),
    ))));
    let mut bytes = codec::encode(&reply).expect("encodes");
    // The innermost AnyError: no type, "QQ", no source, no context, no backtrace.
    let leaf = [0, 2, b'Q', b'Q', 0, 0, 0];
    let at = bytes
        .windows(leaf.len())
        .position(|w| w == leaf)
        .expect("the AnyError in the encoding");
    let mut nested = [0u8, 0, 1].repeat(depth);
    nested.extend_from_slice(&[0, 0, 0, 0, 0]);
    nested.extend_from_slice(&[0, 0].repeat(depth));
    bytes.splice(at..at + leaf.len(), nested);
    bytes
}

/// Found while writing the raft_rpc fuzz target (a coverage-guided fuzzer
/// gains no coverage from deeper nesting, so it is kept here by hand): a
/// reply nesting error sources a million deep (5 MB, under the 16 MiB frame limit) overflowed the stack
/// of the thread decoding it (bincode has no depth limit, and the decode,
/// the drop and the `Display` of such an error all recurse). A peer that is
/// asked anything can answer that. Refused now at a fixed depth.
#[test]
fn a_reply_with_errors_nested_a_million_deep_is_an_error_not_a_stack_overflow() {
    let bytes = nested_error_reply(1_000_000);
    assert!(bytes.len() < 16 * 1024 * 1024);
    let decoded = codec::decode::<RaftReply>(&bytes);
    assert!(matches!(decoded, Err(CodecError::Decode(_))), "{decoded:?}");
}

/// A few levels of nesting are what openraft's own errors have: fine.
#[test]
fn a_reply_with_a_few_nested_errors_decodes() {
    let decoded = codec::decode::<RaftReply>(&nested_error_reply(8)).expect("decodes");
    assert!(matches!(
        decoded,
        RaftReply::AppendEntries(Err(RaftError::Fatal(_)))
    ));
}

#[derive(Debug, Clone, Copy)]
struct NoNetwork;

impl Transport for NoNetwork {
    fn call(
        &self,
        _peer_id: &str,
        _request: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, String>> + Send {
        async { Err("no network in this test".to_owned()) }
    }
}

/// A fresh, uninitialized group on an in-memory store, as the fuzz target
/// snapshot_chunk opens one for each input.
async fn fresh_group() -> RegionGroup {
    RegionGroup::open(
        &RaftSettings::default(),
        Arc::new(mesh_store::MemStore::new()),
        LogSync::Task {
            latency: std::time::Duration::ZERO,
        },
        "peer-self",
        NoNetwork,
    )
    .await
    .expect("a group opens on an empty store")
}

/// Found by the snapshot_chunk fuzz target (crash-1cdee409…, 17 bytes): one
/// chunk, the whole snapshot (offset 0, done) of 196,610 bytes of 0x11,
/// from its sender but under a vote that is not committed (term 170). It
/// reached openraft, whose core asserts that a replicating leader's vote is
/// committed: the assertion stopped the node's Raft (debug builds). Refused
/// in `rpc::serve` now (a leader's vote is always committed); likewise an
/// AppendEntries under such a vote.
#[tokio::test]
async fn a_snapshot_under_an_uncommitted_vote_is_refused_and_raft_keeps_running() {
    let group = fresh_group().await;
    let sender = "peer-leader";
    let leader = node_id_of(sender);
    let vote = Vote::new(170, leader);
    let last_log_id = Some(LogId::new(CommittedLeaderId::new(170, leader), 11_565));
    let nodes: BTreeMap<u64, RegionNode> = [(
        leader,
        RegionNode {
            peer_id: sender.to_owned(),
        },
    )]
    .into();
    let chunk = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: SnapshotMeta {
            last_log_id,
            last_membership: StoredMembership::new(
                last_log_id,
                Membership::new(vec![BTreeSet::from([leader])], nodes),
            ),
            snapshot_id: "b".to_owned(),
        },
        offset: 0,
        data: vec![0x11; 196_610],
        done: true,
    };
    let request = codec::encode(&RaftRequest::InstallSnapshot(chunk)).expect("encodes");
    let answer = codec::decode::<RaftReply>(&serve(&group, sender, &request).await)
        .expect("the answer decodes");
    assert!(matches!(answer, RaftReply::Refused(_)), "{answer:?}");

    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let request = codec::encode(&RaftRequest::AppendEntries(append)).expect("encodes");
    let answer = codec::decode::<RaftReply>(&serve(&group, sender, &request).await)
        .expect("the answer decodes");
    assert!(matches!(answer, RaftReply::Refused(_)), "{answer:?}");

    // The Raft core still runs: it answers a metrics read and did not stop.
    tokio::task::yield_now().await;
    assert_eq!(group.stopped(), None);
    let _ = group.status();
}
