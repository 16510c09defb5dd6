//! Three region groups in one process, linked by an in-memory transport
//! that runs the real RPC encoding: bootstrap, policy writes through the
//! leader, reads everywhere, a learner catching up, a failed voter replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_store::{MemStore, Store};
use mesh_types::policy::Policy;

use crate::rpc::{serve, Transport};
use crate::{GroupError, RaftSettings, RegionGroup};

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
            Some(g) => Ok(serve(g.raft(), &request).await),
            None => Err(format!("no route to {peer_id}")),
        }
    }
}

async fn start(transport: &LocalTransport, peer: &str) -> RegionGroup {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let own = LocalTransport {
        me: peer.to_owned(),
        ..transport.clone()
    };
    let group = RegionGroup::open(&RaftSettings::default(), store, peer, own)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_agree_on_policy_and_a_learner_catches_up() {
    let transport = LocalTransport::default();
    let peers = ["peer-a", "peer-b", "peer-c"].map(String::from);
    let mut groups = Vec::new();
    for p in &peers {
        groups.push(start(&transport, p).await);
    }
    groups[0].initialize(&peers).await.expect("initialize");
    assert!(matches!(
        groups[0].initialize(&peers).await,
        Err(GroupError::AlreadyInitialized)
    ));

    let leader = leader_of(&groups).await;
    let follower = groups
        .iter()
        .find(|g| !g.is_leader())
        .cloned()
        .expect("a follower");
    match follower.set_policy(policy(7)).await {
        Err(GroupError::NotLeader { leader: Some(l) }) => assert_eq!(Some(l), leader.leader()),
        other => panic!("a follower must point at the leader, got {other:?}"),
    }
    let version = leader.set_policy(policy(7)).await.expect("write");
    wait_for("every replica applied the policy", || {
        groups
            .iter()
            .all(|g| g.local_state().policy_version == version)
    })
    .await;
    assert_eq!(follower.local_state().policy, Some(policy(7)));
    let read = leader.consistent_state().await.expect("linearizable read");
    assert_eq!(read.policy_version, version);
    assert!(matches!(
        follower.consistent_state().await,
        Err(GroupError::NotLeader { .. })
    ));

    let learner = start(&transport, "peer-d").await;
    leader.add_learner("peer-d").await.expect("add learner");
    wait_for("the learner applied the policy", || {
        learner.local_state().policy_version == version
    })
    .await;
    let status = leader.status();
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
    let transport = LocalTransport::default();
    let peers = ["peer-a", "peer-b", "peer-c"].map(String::from);
    let mut groups = Vec::new();
    for p in &peers {
        groups.push(start(&transport, p).await);
    }
    groups[0].initialize(&peers).await.expect("initialize");
    let leader = leader_of(&groups).await;
    let _learner = start(&transport, "peer-d").await;
    leader.add_learner("peer-d").await.expect("add learner");

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
    leader
        .replace_voter(&dead_peer, "peer-d")
        .await
        .expect("replace");
    let (voters, learners) = leader.members();
    assert!(
        voters.contains(&"peer-d".to_string()) && !voters.contains(&dead_peer),
        "{voters:?}"
    );
    assert!(
        learners.is_empty(),
        "the dead voter left the group: {learners:?}"
    );
    leader
        .set_policy(policy(9))
        .await
        .expect("write with the new voter set");

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
    assert!(err.retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}
