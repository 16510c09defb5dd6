//! Snapshot chunks (issue 12, finding 3) through the real server path:
//! `consensus::rpc::serve` on a fresh, uninitialized region group (an
//! in-memory store) for each input, with a sequence of InstallSnapshot
//! chunks derived from the input. Each chunk speaks for the peer that sends
//! it, so it passes the sender check and reaches
//! `RegionGroup::admit_snapshot_chunk` and then openraft, which writes it
//! into its snapshot buffer; a finished snapshot is decoded and installed.
//!
//! Checked: nothing panics (the Raft core included: a chunk under an
//! uncommitted vote tripped openraft's assertion, found here and refused in
//! `rpc::serve` since); every reply decodes; a chunk that would end
//! past `SNAPSHOT_BYTES_MAX`, or start past what was received of its
//! snapshot (a gap), or continue a snapshot that did not start at offset 0,
//! is refused. libFuzzer's malloc limit (scripts/fuzz.sh) catches a buffer
//! grown past the cap by anything else.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use consensus::group::SNAPSHOT_BYTES_MAX;
use consensus::rpc::{serve, RaftReply, RaftRequest, Transport};
use consensus::types::node_id_of;
use consensus::{LogSync, RaftSettings, RegionGroup, RegionNode, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::raft::InstallSnapshotRequest;
use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership, Vote};

const SELF: &str = "peer-self";
const SENDER: &str = "peer-leader";
/// Largest chunk the fuzzer makes; openraft's own chunks are 1 MiB.
const CHUNK_MAX: u64 = 2 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
struct NoNetwork;

impl Transport for NoNetwork {
    fn call(
        &self,
        _peer_id: &str,
        _request: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, String>> + Send {
        async { Err("no network in the fuzzer".to_owned()) }
    }
}

#[derive(Debug, Arbitrary)]
enum Offset {
    Zero,
    /// Where the snapshot being received ends.
    AtEnd,
    /// Before its end.
    Back(u32),
    /// Past its end: a gap.
    Ahead(u32),
    /// Just below (or past) the cap.
    NearCap(u32),
    Raw(u64),
}

#[derive(Debug, Arbitrary)]
struct Chunk {
    snapshot: u8,
    offset: Offset,
    len: u32,
    byte: u8,
    done: bool,
    term: u8,
    committed: bool,
    last_index: Option<u16>,
    self_a_voter: bool,
    /// The chunk's data as given (the snapshot bytes), when `len` is 0.
    data: Vec<u8>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn request(chunk: &Chunk, offset: u64) -> InstallSnapshotRequest<TypeConfig> {
    let leader = node_id_of(SENDER);
    let term = u64::from(chunk.term) + 1;
    let vote = if chunk.committed {
        Vote::new_committed(term, leader)
    } else {
        Vote::new(term, leader)
    };
    let mut voters = std::collections::BTreeSet::from([leader]);
    if chunk.self_a_voter {
        voters.insert(node_id_of(SELF));
    }
    let nodes = voters
        .iter()
        .map(|id| {
            let peer_id = if *id == leader { SENDER } else { SELF };
            (
                *id,
                RegionNode {
                    peer_id: peer_id.to_owned(),
                },
            )
        })
        .collect::<std::collections::BTreeMap<_, _>>();
    let last_log_id = chunk
        .last_index
        .map(|i| LogId::new(CommittedLeaderId::new(term, leader), u64::from(i)));
    let data = if chunk.len == 0 {
        chunk.data.clone()
    } else {
        vec![chunk.byte; (u64::from(chunk.len) % CHUNK_MAX) as usize]
    };
    InstallSnapshotRequest {
        vote,
        meta: SnapshotMeta {
            last_log_id,
            last_membership: StoredMembership::new(
                last_log_id,
                Membership::new(vec![voters], nodes),
            ),
            snapshot_id: ["a", "b", "c"][usize::from(chunk.snapshot % 3)].to_owned(),
        },
        offset,
        data,
        done: chunk.done,
    }
}

async fn run(chunks: Vec<Chunk>) {
    let group = RegionGroup::open(
        &RaftSettings::default(),
        Arc::new(mesh_store::MemStore::new()),
        LogSync::Task {
            latency: std::time::Duration::ZERO,
        },
        SELF,
        NoNetwork,
    )
    .await
    .expect("a group opens on an empty store");
    // What the sender knows was taken: the snapshot being sent and its length.
    let mut stream: Option<(String, u64)> = None;
    for chunk in chunks.iter().take(48) {
        let id = ["a", "b", "c"][usize::from(chunk.snapshot % 3)];
        let received = match &stream {
            Some((current, n)) if current == id => Some(*n),
            _ => None,
        };
        let end_so_far = received.unwrap_or(0);
        let offset = match chunk.offset {
            Offset::Zero => 0,
            Offset::AtEnd => end_so_far,
            Offset::Back(n) => end_so_far.saturating_sub(u64::from(n)),
            Offset::Ahead(n) => end_so_far.saturating_add(u64::from(n).max(1)),
            Offset::NearCap(n) => SNAPSHOT_BYTES_MAX.saturating_sub(u64::from(n)),
            Offset::Raw(n) => n,
        };
        let rpc = request(chunk, offset);
        let len = rpc.data.len() as u64;
        let vote = rpc.vote;
        let done = rpc.done;
        let bytes = consensus::codec::encode(&RaftRequest::InstallSnapshot(rpc))
            .expect("a request encodes");
        let answer = serve(&group, SENDER, &bytes).await;
        let reply = consensus::codec::decode::<RaftReply>(&answer).expect("a reply decodes");
        // openraft's answer, or None when serve refused the request before
        // openraft saw it (a chunk under an uncommitted vote: not a leader's).
        let result = match reply {
            RaftReply::InstallSnapshot(result) => Some(result),
            RaftReply::Refused(_) => None,
            other => panic!("an InstallSnapshot request got another reply: {other:?}"),
        };
        let refused = result.as_ref().is_none_or(|r| r.is_err());
        let past_cap = offset
            .checked_add(len)
            .is_none_or(|e| e > SNAPSHOT_BYTES_MAX);
        let gap = offset > 0 && received.is_none_or(|n| offset > n);
        if past_cap || gap {
            assert!(
                refused,
                "chunk at {offset} of {len} bytes (received {received:?}) was not refused"
            );
        }
        // As serve records it (RegionGroup::snapshot_chunk_done).
        let taken = result.is_some_and(|r| r.is_ok_and(|r| vote >= r.vote));
        let same = stream.as_ref().is_some_and(|(current, _)| current == id);
        if !taken {
            if same {
                stream = None;
            }
        } else if done {
            if same || offset == 0 {
                stream = None;
            }
        } else {
            let end = offset + len;
            let n = if same { end_so_far.max(end) } else { end };
            assert!(n <= SNAPSHOT_BYTES_MAX, "{n} bytes taken of one snapshot");
            stream = Some((id.to_owned(), n));
        }
    }
    let _ = group.raft().shutdown().await;
}

fuzz_target!(|chunks: Vec<Chunk>| {
    runtime().block_on(run(chunks));
});
