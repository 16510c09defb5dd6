//! Three region groups in one process, linked by an in-memory transport
//! that runs the real RPC encoding: bootstrap, policy writes through the
//! leader, reads everywhere, a learner catching up, a failed voter replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_store::{MemStore, Store};
use mesh_types::policy::Policy;

use crate::rpc::{serve, Transport};
use crate::{GroupError, LogSync, RaftSettings, RegionGroup};

/// Routes encoded requests to the groups in this process; a peer in `down`
/// is unreachable, as after a crash.
#[derive(Clone, Default)]
struct LocalTransport {
    /// The sender; a node that is down neither sends nor receives.
    me: String,
    groups: Arc<Mutex<BTreeMap<String, RegionGroup>>>,
    down: Arc<Mutex<BTreeSet<String>>>,
}

impl Transport for LocalTransport {
    async fn call(&self, peer_id: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
        {
            let down = self.down.lock().expect("lock");
            if down.contains(peer_id) || down.contains(&self.me) {
                return Err(format!("{peer_id} is unreachable from {}", self.me));
            }
        }
        let group = self.groups.lock().expect("lock").get(peer_id).cloned();
        match group {
            Some(g) => Ok(serve(&g, &self.me, &request).await),
            None => Err(format!("no route to {peer_id}")),
        }
    }
}

async fn start(transport: &LocalTransport, peer: &str) -> RegionGroup {
    start_with(transport, peer, LogSync::Thread).await
}

async fn start_with(transport: &LocalTransport, peer: &str, sync: LogSync) -> RegionGroup {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let own = LocalTransport {
        me: peer.to_owned(),
        ..transport.clone()
    };
    let group = RegionGroup::open(&RaftSettings::default(), store, sync, peer, own)
        .await
        .expect("open group");
    transport
        .groups
        .lock()
        .expect("lock")
        .insert(peer.to_owned(), group.clone());
    group
}

async fn wait_for<F: Fn() -> bool>(what: &str, check: F) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

fn policy(burst: u32) -> Policy {
    let mut p = Policy::default();
    p.rate_limits.per_agent.burst = burst;
    p
}

/// Runs `op` on the current leader; retries when leadership moved meanwhile
/// (an election on a loaded machine is legitimate, not a failure).
async fn on_leader<T, F, Fut>(groups: &[RegionGroup], what: &str, op: F) -> T
where
    F: Fn(RegionGroup) -> Fut,
    Fut: std::future::Future<Output = Result<T, GroupError>>,
{
    for _ in 0..20 {
        let leader = leader_of(groups).await;
        match op(leader).await {
            Ok(value) => return value,
            Err(e) if e.retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: the leader kept changing")
}

async fn leader_of(groups: &[RegionGroup]) -> RegionGroup {
    wait_for("a leader is elected", || {
        groups.iter().any(RegionGroup::is_leader)
    })
    .await;
    groups
        .iter()
        .find(|g| g.is_leader())
        .cloned()
        .expect("a leader")
}

/// Three groups on one in-process transport, started with all three as voters.
async fn three_voters() -> (LocalTransport, [String; 3], Vec<RegionGroup>) {
    three_voters_with(LogSync::Thread).await
}

async fn three_voters_with(sync: LogSync) -> (LocalTransport, [String; 3], Vec<RegionGroup>) {
    let transport = LocalTransport::default();
    let peers = ["peer-a", "peer-b", "peer-c"].map(String::from);
    let mut groups = Vec::new();
    for p in &peers {
        groups.push(start_with(&transport, p, sync).await);
    }
    groups[0].initialize(&peers).await.expect("initialize");
    (transport, peers, groups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_agree_on_policy_and_a_learner_catches_up() {
    let (transport, peers, groups) = three_voters().await;
    assert!(matches!(
        groups[0].initialize(&peers).await,
        Err(GroupError::AlreadyInitialized)
    ));

    // A follower refuses a write and names the leader. Under load an
    // election may be running; then the leader is legitimately unknown for a
    // moment, so ask again once the group agrees on a leader.
    let peer_ids: Vec<String> = groups.iter().map(|g| g.status().node).collect();
    let mut named = None;
    for _ in 0..50 {
        let leader = leader_of(&groups).await;
        let follower = groups
            .iter()
            .find(|g| !g.is_leader())
            .cloned()
            .expect("a follower");
        match follower.set_policy(policy(7)).await {
            Err(GroupError::NotLeader { leader: Some(l) }) => {
                assert_ne!(l, follower.status().node, "a follower named itself");
                named = Some((l, leader));
                break;
            }
            // An election is running: wait for it rather than spinning through it.
            Err(GroupError::NotLeader { leader: None }) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            // It became the leader between the check and the write: ask again.
            Ok(_) => assert!(follower.is_leader(), "a follower accepted a write"),
            Err(other) => panic!("a follower must point at the leader, got {other:?}"),
        }
    }
    let (named, _) = named.expect("a follower named the leader within 50 tries");
    assert!(peer_ids.contains(&named), "{named} is not a member");
    let version = on_leader(&groups, "write", |l| async move {
        l.set_policy(policy(7)).await.map(|a| a.version)
    })
    .await;
    wait_for("every replica applied the policy", || {
        groups
            .iter()
            .all(|g| g.local_state().policy_version == version)
    })
    .await;
    assert!(groups
        .iter()
        .all(|g| g.local_state().policy == Some(policy(7))));
    let read = on_leader(&groups, "linearizable read", |l| async move {
        l.consistent_state().await
    })
    .await;
    assert!(read.policy_version >= version);
    let follower = groups
        .iter()
        .find(|g| !g.is_leader())
        .cloned()
        .expect("a follower");
    assert!(
        matches!(
            follower.consistent_state().await,
            Err(GroupError::NotLeader { .. })
        ) || follower.is_leader()
    );

    let learner = start(&transport, "peer-d").await;
    on_leader(&groups, "add learner", |l| async move {
        l.add_learner("peer-d").await
    })
    .await;
    wait_for("the learner applied the policy", || {
        learner.local_state().policy_version == version
    })
    .await;
    let status = leader_of(&groups).await.status();
    assert_eq!(
        status.members.iter().filter(|m| m.role == "voter").count(),
        3
    );
    assert_eq!(
        status
            .members
            .iter()
            .filter(|m| m.role == "learner")
            .count(),
        1
    );
    assert_eq!(status.role, "leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_replaced_by_a_learner_and_a_minority_cannot_commit() {
    let (transport, _, groups) = three_voters().await;
    let _learner = start(&transport, "peer-d").await;
    on_leader(&groups, "add learner", |l| async move {
        l.add_learner("peer-d").await
    })
    .await;

    let dead = groups
        .iter()
        .find(|g| !g.is_leader())
        .cloned()
        .expect("a follower");
    let dead_peer = dead.status().node;
    transport
        .down
        .lock()
        .expect("lock")
        .insert(dead_peer.clone());
    let live: Vec<RegionGroup> = groups
        .iter()
        .filter(|g| g.status().node != dead_peer)
        .cloned()
        .collect();
    let dead_ref = dead_peer.clone();
    on_leader(&live, "replace", |l| {
        let dead = dead_ref.clone();
        async move { l.replace_voter(&dead, "peer-d").await }
    })
    .await;
    let leader = leader_of(&live).await;
    let (voters, learners) = leader.members();
    assert!(
        voters.contains(&"peer-d".to_string()) && !voters.contains(&dead_peer),
        "{voters:?}"
    );
    assert!(
        learners.is_empty(),
        "the dead voter left the group: {learners:?}"
    );
    on_leader(&live, "write with the new voter set", |l| async move {
        l.set_policy(policy(9)).await.map(|a| a.version)
    })
    .await;
    let leader = leader_of(&live).await;

    // Cut the leader off from both other voters: it cannot commit, and says so in bounded time.
    let others: Vec<String> = voters
        .into_iter()
        .filter(|v| Some(v) != leader.leader().as_ref())
        .collect();
    for o in &others {
        transport.down.lock().expect("lock").insert(o.clone());
    }
    let started = std::time::Instant::now();
    let err = leader
        .set_policy(policy(10))
        .await
        .expect_err("a minority must not commit");
    // Proposed by the cut-off leader: its outcome is unknown (it would
    // commit if the others came back), which is not a retryable refusal.
    assert!(
        matches!(err, GroupError::OutcomeUnknown(_)) || err.retryable(),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Concurrent writes are committed together: each writer learns its version,
/// exactly one write per version is the one in force, and the policy every
/// replica ends with is that of the highest version.
///
/// On one thread with a paused clock (time moves only when every task
/// waits) and the log syncs as tasks: a loaded machine cannot starve the
/// heartbeats into an election, so every write must succeed (it used to run
/// on real time and pass with half of them failed).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn concurrent_policy_writes_commit_in_batches() {
    let (_, _, groups) = three_voters_with(LogSync::Task {
        latency: Duration::from_micros(200),
    })
    .await;
    // Settle on a leader that stays: one write through it first.
    on_leader(&groups, "first write", |l| async move {
        l.set_policy(policy(1)).await.map(|a| a.version)
    })
    .await;
    let leader = leader_of(&groups).await;

    let writes = 200u32;
    let mut tasks = tokio::task::JoinSet::new();
    for burst in 1000..1000 + writes {
        let l = leader.clone();
        tasks.spawn(async move { (burst, l.set_policy(policy(burst)).await) });
    }
    let mut in_force: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut superseded = 0;
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        let (burst, result) = joined.expect("task");
        let applied = match result {
            Ok(applied) => applied,
            Err(e) => {
                eprintln!("write {burst}: {e}");
                failed += 1;
                continue;
            }
        };
        if applied.superseded {
            superseded += 1;
        } else {
            in_force.entry(applied.version).or_default().push(burst);
        }
    }
    // One write in force per version, and the others of its batch superseded.
    assert!(in_force.values().all(|w| w.len() == 1), "{in_force:?}");
    assert_eq!(failed, 0, "{failed} of {writes} writes failed");
    assert_eq!(in_force.len() + superseded, writes as usize);
    assert!(
        in_force.len() < writes as usize,
        "200 concurrent writes were never batched"
    );
    let (&last_version, last_write) = in_force.iter().next_back().expect("a version");
    let expected = policy(last_write[0]);
    wait_for("every replica has the last write", || {
        groups.iter().all(|g| {
            let s = g.local_state();
            s.policy_version == last_version && s.policy.as_ref() == Some(&expected)
        })
    })
    .await;
}

/// Regression (issue 12, finding 3): after a first chunk at offset 0, a
/// chunk at offset 2^46 made openraft grow the snapshot buffer to that size
/// (the process aborted); it is refused now, and so is a snapshot past
/// SNAPSHOT_BYTES_MAX.
#[tokio::test]
async fn a_snapshot_chunk_at_a_huge_offset_is_refused_not_an_abort() {
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{SnapshotMeta, Vote};

    use crate::rpc::{RaftReply, RaftRequest};

    let (_, _, groups) = three_voters().await;
    let follower = groups[1].clone();
    let chunk = |offset: u64, data: Vec<u8>| {
        let rpc = InstallSnapshotRequest::<crate::TypeConfig> {
            vote: Vote::new_committed(1_000, crate::types::node_id_of("peer-x")),
            meta: SnapshotMeta {
                snapshot_id: "forged".into(),
                ..Default::default()
            },
            offset,
            data,
            done: false,
        };
        crate::codec::encode(&RaftRequest::InstallSnapshot(rpc)).expect("encode")
    };
    let refused = |answer: &[u8]| {
        matches!(
            crate::codec::decode::<RaftReply>(answer),
            Ok(RaftReply::InstallSnapshot(Err(
                openraft::error::RaftError::APIError(
                    openraft::error::InstallSnapshotError::SnapshotMismatch(_)
                )
            )))
        )
    };
    let first = serve(&follower, "peer-x", &chunk(0, vec![1, 2, 3])).await;
    assert!(!refused(&first));
    for (offset, data) in [(1u64 << 46, vec![1]), (4, vec![1]), (3, vec![0; 16])] {
        let answer = serve(&follower, "peer-x", &chunk(offset, data.clone())).await;
        // A gap (offset 4 after 3 bytes) is refused; continuing at 3 is not.
        assert_eq!(refused(&answer), offset != 3, "offset {offset}");
    }
    let past = serve(
        &follower,
        "peer-x",
        &chunk(crate::group::SNAPSHOT_BYTES_MAX, vec![1]),
    )
    .await;
    assert!(refused(&past));
}

/// Regression (issue 12, finding 2, in part): an AppendEntries that speaks
/// for another node than its sender (here: the real leader's id, sent by a
/// follower) is refused before openraft sees it; so is a Vote for someone
/// else and a bootstrap request of another proposer.
#[tokio::test]
async fn a_request_that_speaks_for_another_node_is_refused() {
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::Vote;

    use crate::rpc::{BootstrapPromise, RaftReply, RaftRequest};

    let (_, peers, groups) = three_voters().await;
    let leader = leader_of(&groups).await;
    let leader_peer = leader.status().node;
    let follower = groups
        .iter()
        .find(|g| !g.is_leader())
        .cloned()
        .expect("a follower");
    let stranger = peers
        .iter()
        .find(|p| **p != leader_peer && **p != follower.status().node)
        .cloned()
        .expect("a third peer");
    let refused = |answer: Vec<u8>| {
        matches!(
            crate::codec::decode::<RaftReply>(&answer),
            Ok(RaftReply::Refused(_))
        )
    };
    let forged = RaftRequest::AppendEntries(AppendEntriesRequest {
        vote: Vote::new_committed(1_000, crate::types::node_id_of(&leader_peer)),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    });
    let bytes = crate::codec::encode(&forged).expect("encode");
    assert!(refused(serve(&follower, &stranger, &bytes).await));
    let vote = RaftRequest::Vote(VoteRequest::new(
        Vote::new(1_000, crate::types::node_id_of(&leader_peer)),
        None,
    ));
    let bytes = crate::codec::encode(&vote).expect("encode");
    assert!(refused(serve(&follower, &stranger, &bytes).await));
    let promise = RaftRequest::Bootstrap(BootstrapPromise {
        voters: peers.to_vec(),
        proposer: leader_peer.clone(),
        attempt: 1,
    });
    let bytes = crate::codec::encode(&promise).expect("encode");
    assert!(refused(serve(&follower, &stranger, &bytes).await));
    // The group still has its leader and commits.
    on_leader(&groups, "a write after the forgeries", |l| async move {
        l.set_policy(policy(77)).await.map(|a| a.version)
    })
    .await;
}

/// Regression (issue 12, found by the snapshot_chunk fuzz target): an
/// InstallSnapshot (or AppendEntries) whose vote is not committed reached
/// openraft, which assumes a replicating leader's vote is committed: its
/// core hit an assertion and stopped that node's Raft. Refused before it
/// gets there; the node goes on committing.
#[tokio::test]
async fn a_replication_request_with_an_uncommitted_vote_is_refused() {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest};
    use openraft::{SnapshotMeta, Vote};

    use crate::rpc::{RaftReply, RaftRequest};

    let (_, peers, groups) = three_voters().await;
    let follower = groups
        .iter()
        .find(|g| !g.is_leader())
        .cloned()
        .expect("a follower");
    let sender = peers
        .iter()
        .find(|p| **p != follower.status().node)
        .cloned()
        .expect("another peer");
    let uncommitted = Vote::new(170, crate::types::node_id_of(&sender));
    let requests = [
        RaftRequest::InstallSnapshot(InstallSnapshotRequest::<crate::TypeConfig> {
            vote: uncommitted,
            meta: SnapshotMeta {
                snapshot_id: "s".into(),
                ..Default::default()
            },
            offset: 0,
            data: crate::codec::encode(&crate::RegionState::default()).expect("encode"),
            done: true,
        }),
        RaftRequest::AppendEntries(AppendEntriesRequest {
            vote: uncommitted,
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }),
    ];
    for request in requests {
        let bytes = crate::codec::encode(&request).expect("encode");
        let answer = serve(&follower, &sender, &bytes).await;
        assert!(
            matches!(
                crate::codec::decode::<RaftReply>(&answer),
                Ok(RaftReply::Refused(_))
            ),
            "not refused"
        );
    }
    assert!(follower.stopped().is_none(), "the follower's Raft runs on");
    on_leader(
        &groups,
        "a write after the uncommitted votes",
        |l| async move { l.set_policy(policy(78)).await.map(|a| a.version) },
    )
    .await;
}
