//! One region's Raft group as the node uses it: open it on a store, start it
//! with a set of voters, propose policy, read policy locally or through the
//! leader, add learners, replace voters, and report status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use mesh_store::Store;
use mesh_types::policy::Policy;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};

use crate::batcher::{PolicyApplied, PolicyWrites};
use crate::rpc::{BootstrapPromise, Network, RaftReply, RaftRequest, Transport};
use crate::types::{node_id_of, NodeId, RegionCommand, RegionNode, RegionResponse, TypeConfig};
use crate::{LogStore, LogSync, RegionState, RegionStateMachine};

/// Raft timings. The defaults fit a LAN (and a loaded 2-core test machine);
/// for a region spread over a WAN with round trips of R ms, use a heartbeat
/// of about 2R and election timeouts of about 10R to 20R.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    /// Leader heartbeat. Default 100.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout. Default 500.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout. Default 1000.
    pub election_timeout_max_ms: u64,
    /// How long a write may wait for a quorum before it fails as retryable. Default 5000.
    pub write_timeout_ms: u64,
    /// Build a snapshot after this many entries since the last one. Default 5000.
    pub snapshot_after_entries: u64,
    /// A voter the membership view shows dead for this long is replaced by a
    /// live learner. Default 60000.
    pub replace_dead_voter_after_ms: u64,
    /// A learner the membership view shows dead (or has forgotten) for this
    /// long leaves the group; it joins again if it comes back. Default
    /// 600000 (ten minutes: a restart or a short maintenance keeps it).
    pub remove_gone_learner_after_ms: u64,
    /// Log entries kept behind a snapshot, so a slightly lagging member catches
    /// up from the log rather than a snapshot (openraft#1706). Default 1000.
    pub logs_kept_after_snapshot: u64,
    /// Most learners the leader adds. Until admission control exists any
    /// key may claim a region; past this a newcomer waits for a learner to
    /// go (a gone learner is removed at once to make room). Default 64.
    pub max_learners: usize,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            write_timeout_ms: 5000,
            snapshot_after_entries: 5000,
            replace_dead_voter_after_ms: 60_000,
            remove_gone_learner_after_ms: 600_000,
            logs_kept_after_snapshot: 1000,
            max_learners: 64,
        }
    }
}

impl RaftSettings {
    /// Every problem with the timings.
    pub fn validate(&self) -> Result<(), String> {
        let config = self.openraft_config()?;
        config
            .validate()
            .map(|_| ())
            .map_err(|e| format!("invalid [raft] settings: {e}"))?;
        if self.write_timeout_ms == 0 {
            return Err("raft.write_timeout_ms must be greater than 0".into());
        }
        if self.max_learners == 0 {
            return Err("raft.max_learners must be greater than 0, or no node joins the region's group as a learner".into());
        }
        Ok(())
    }

    fn openraft_config(&self) -> Result<openraft::Config, String> {
        Ok(openraft::Config {
            cluster_name: "agentmesh-region".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            // Keep logs through a long snapshot install (openraft#1706).
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            // Keep every RPC well under mesh-net's 16 MiB frame limit: at
            // most 64 entries of at most 64 KiB (the API's body limit), and
            // snapshots in 1 MiB chunks.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        })
    }
}

/// Bugs planted on purpose (feature `planted-bugs`): the simulator's test
/// switches one on and checks that an invariant catches it.
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::AtomicBool;

    /// `consistent_state` answers from the local replica without confirming
    /// leadership: a partitioned or lagging node serves stale reads.
    pub static STALE_READS: AtomicBool = AtomicBool::new(false);

    /// openraft's upstream start-up: a node whose saved vote is committed
    /// and its own resumes leadership of that term from disk (issue 11,
    /// bug 1), which our patch to openraft removed.
    pub use openraft::PLANTED_RESUME_LEADERSHIP as RESUME_LEADERSHIP;

    /// A bootstrap initializes without asking the voters to promise its
    /// voter set (issue 11, bug 2): two bootstraps with two views of the
    /// region make two groups.
    pub static BOOTSTRAP_WITHOUT_PROMISES: AtomicBool = AtomicBool::new(false);

    /// Installing a snapshot fails: the node's Raft stops, and it never
    /// catches up with its leader.
    pub static INSTALL_FAILS: AtomicBool = AtomicBool::new(false);

    /// True when `bug` is switched on.
    pub fn on(bug: &AtomicBool) -> bool {
        bug.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Why a group operation failed. `retryable()` says whether to try again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    /// This node is not the leader; send the request there.
    #[error("this node is not the leader of the region; the leader is {}", leader.as_deref().unwrap_or("unknown (an election is running)"))]
    NotLeader {
        /// Peer id of the leader, if known.
        leader: Option<String>,
    },
    /// No quorum answered in time, and nothing was proposed (or it was a
    /// read): safe to retry.
    #[error("the region did not commit within {0:?}: no quorum of voters is reachable; nothing was applied; retry when the region has a leader")]
    Timeout(Duration),
    /// A write was proposed but did not commit in time: it may still take
    /// effect later (when missing voters come back), or never. Not safe to
    /// retry blindly.
    #[error("the write was proposed but did not commit within {0:?}: its outcome is unknown (it may still take effect when the missing voters come back); read the policy to see whether it did before writing again")]
    OutcomeUnknown(Duration),
    /// A consistent read could not confirm the leader with a quorum.
    #[error("no quorum of voters confirmed the leader ({0}); retry when the region has a quorum")]
    NoQuorum(String),
    /// The group was already started.
    #[error("the region group is already bootstrapped")]
    AlreadyInitialized,
    /// Too many policy writes are waiting to be proposed.
    #[error("{0} policy writes are already waiting on this node; retry shortly")]
    Busy(usize),
    /// The voters of this bootstrap differ from a set a voter agreed to
    /// already (two bootstraps with different views of the region).
    #[error("{0}")]
    BootstrapConflict(String),
    /// The peer is not a member of the region's group.
    #[error("{0} is not a member of the region's group")]
    NotAMember(String),
    /// A voter could not be reached.
    #[error("{0}; retry when it is reachable")]
    Unreachable(String),
    /// A membership change is still in progress.
    #[error("a membership change is in progress; retry when it has committed")]
    ChangeInProgress,
    /// Anything else openraft reported.
    #[error("raft: {0}")]
    Raft(String),
}

impl GroupError {
    /// True when the same request may succeed later or elsewhere.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. }
                | Self::Timeout(_)
                | Self::NoQuorum(_)
                | Self::Busy(_)
                | Self::ChangeInProgress
                | Self::Unreachable(_)
        )
    }
}

/// One member's replication progress, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberProgress {
    /// Peer id.
    pub peer_id: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Highest log index known to match the leader's (leader only).
    pub matched: Option<u64>,
    /// Entries behind the leader's last log index (leader only).
    pub lag: Option<u64>,
    /// alive, suspect or dead in the answering node's membership view
    /// (`unknown` when the view no longer lists it); filled in by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// `region status` as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStatus {
    /// Whether the group has a membership at all.
    pub bootstrapped: bool,
    /// This node's peer id.
    pub node: String,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: String,
    /// Leader's peer id, if known.
    pub leader: Option<String>,
    /// Current term.
    pub term: u64,
    /// Last log index on this node.
    pub last_log_index: Option<u64>,
    /// Last index applied on this node.
    pub last_applied: Option<u64>,
    /// Version of the policy in force here (0: none).
    pub policy_version: u64,
    /// Log entries up to this index were compacted into a snapshot and purged;
    /// a member further behind catches up by installing the snapshot.
    pub log_purged_up_to: Option<u64>,
    /// Every member, voters first.
    pub members: Vec<MemberProgress>,
}

/// Most bytes of one snapshot a follower receives: the region state is a
/// few KiB today; this bounds what a peer's chunks can make it hold, and
/// stays well below the codec's decode limit (the stored snapshot must
/// decode again).
pub const SNAPSHOT_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// How long a bootstrap waits before asking an unreachable voter again.
const BOOTSTRAP_RETRY: Duration = Duration::from_millis(200);

/// Most voters a bootstrap may name (a region votes with a handful).
const BOOTSTRAP_VOTERS_MAX: usize = 64;
/// Longest peer id text accepted in a bootstrap (base58 ids are ~52 bytes).
const PEER_ID_LEN_MAX: usize = 128;

/// How a voter busy with its own bootstrap says so (a retryable answer).
const BUSY_PROPOSING: &str = "is proposing a bootstrap of its own right now";

/// Where a bootstrap promise is kept (`Column::RaftMeta`).
const BOOTSTRAP_PROMISE: &[u8] = b"bootstrap_promise";

type BoxedCall =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;
/// The group's transport, type-erased: sends one request to a peer.
type Caller = Arc<dyn Fn(String, Vec<u8>) -> BoxedCall + Send + Sync>;

/// A region group of this node.
#[derive(Clone)]
pub struct RegionGroup {
    raft: Raft<TypeConfig>,
    state_machine: RegionStateMachine,
    store: Arc<dyn Store>,
    call: Caller,
    /// Serializes bootstrap promises and the initialization that follows them.
    bootstrap: Arc<tokio::sync::Mutex<()>>,
    /// The snapshot being received, if any: its id and the bytes accepted so far.
    snapshot_stream: Arc<std::sync::Mutex<Option<(String, u64)>>>,
    node_id: NodeId,
    peer_id: String,
    write_timeout: Duration,
    writes: PolicyWrites,
}

impl std::fmt::Debug for RegionGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionGroup")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl RegionGroup {
    /// Opens the group on `store`, resuming its log, vote and state; the
    /// leader's log syncs run as `log_sync` says.
    pub async fn open<T: Transport>(
        settings: &RaftSettings,
        store: Arc<dyn Store>,
        log_sync: LogSync,
        peer_id: &str,
        transport: T,
    ) -> Result<Self, GroupError> {
        let config = settings.openraft_config().map_err(GroupError::Raft)?;
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| GroupError::Raft(e.to_string()))?,
        );
        let state_machine = RegionStateMachine::open(store.clone())
            .map_err(|e| GroupError::Raft(e.to_string()))?
            .with_io(log_sync);
        let node_id = node_id_of(peer_id);
        let call: Caller = {
            let transport = transport.clone();
            Arc::new(move |peer: String, request: Vec<u8>| {
                let transport = transport.clone();
                Box::pin(async move { transport.call(&peer, request).await }) as BoxedCall
            })
        };
        let log = LogStore::new(store.clone(), node_id, log_sync)
            .map_err(|e| GroupError::Raft(format!("cannot start the log sync worker: {e}")))?;
        let raft = Raft::new(
            node_id,
            config,
            Network::new(transport),
            log,
            state_machine.clone(),
        )
        .await
        .map_err(|e| GroupError::Raft(e.to_string()))?;
        let write_timeout = Duration::from_millis(settings.write_timeout_ms);
        Ok(Self {
            writes: PolicyWrites::start(raft.clone(), write_timeout),
            raft,
            state_machine,
            store,
            call,
            bootstrap: Arc::new(tokio::sync::Mutex::new(())),
            snapshot_stream: Arc::default(),
            node_id,
            peer_id: peer_id.to_owned(),
            write_timeout,
        })
    }

    /// The openraft handle, for serving RPCs.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Starts the group with `voters` (peer ids), this node being the
    /// proposer (the one that initializes). The set is exactly what the
    /// caller computed (never recomputed here), and every voter must first
    /// promise it: a voter promises one set only, durably, so two bootstraps
    /// run with two views of the region cannot make two groups with a voter
    /// in both (issue 11, bug 2). When a voter refuses or cannot be reached,
    /// the proposer releases the promises it got and initializes nothing.
    /// Refused if the group has a membership already.
    pub async fn initialize(&self, voters: &[String]) -> Result<(), GroupError> {
        let mut sorted = voters.to_vec();
        sorted.sort();
        sorted.dedup();
        // The proposer is the smallest voter: proposers then only ask larger
        // ids, so two of them never wait on each other in a cycle.
        if sorted.first() != Some(&self.peer_id) {
            return Err(GroupError::BootstrapConflict(format!(
                "{} cannot propose a bootstrap of {sorted:?}: the proposer must be its first (smallest) voter",
                self.peer_id
            )));
        }
        let promise = BootstrapPromise {
            voters: sorted.clone(),
            proposer: self.peer_id.clone(),
            attempt: crate::runtime::next_seed(),
        };
        let _serial = self.bootstrap.lock().await;
        if self.is_bootstrapped() {
            return Err(GroupError::AlreadyInitialized);
        }
        #[cfg(feature = "planted-bugs")]
        if planted::on(&planted::BOOTSTRAP_WITHOUT_PROMISES) {
            return self.initialize_now(&sorted).await;
        }
        self.promise_locked(&promise)?;
        let mut asked = Vec::new();
        let mut refusal = None;
        for voter in sorted.iter().filter(|v| **v != self.peer_id) {
            // Asked, whatever the answer: a promise whose answer was lost
            // must be released too.
            asked.push(voter.clone());
            if let Err(e) = self
                .ask(voter, RaftRequest::Bootstrap(promise.clone()))
                .await
            {
                refusal = Some(e);
                break;
            }
        }
        if let Some(refusal) = refusal {
            for voter in &asked {
                if let Err(e) = self
                    .ask(voter, RaftRequest::BootstrapRelease(promise.clone()))
                    .await
                {
                    tracing::warn!(%voter, error = %e, "could not release a bootstrap promise");
                }
            }
            self.release_locked(&promise)?;
            return Err(refusal);
        }
        self.initialize_now(&sorted).await
    }

    async fn initialize_now(&self, voters: &[String]) -> Result<(), GroupError> {
        let members: BTreeMap<NodeId, RegionNode> = voters
            .iter()
            .map(|p| (node_id_of(p), RegionNode { peer_id: p.clone() }))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                Err(GroupError::AlreadyInitialized)
            }
            Err(e) => Err(GroupError::Raft(e.to_string())),
        }
    }

    /// Sends a bootstrap request to `voter`; its refusal, or why it did not
    /// answer. A voter this node cannot reach yet (a link not yet up, its
    /// addresses not yet gossiped) is asked again until the write timeout.
    async fn ask(&self, voter: &str, request: RaftRequest) -> Result<(), GroupError> {
        let bytes = crate::codec::encode(&request).map_err(|e| GroupError::Raft(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let call = (self.call)(voter.to_owned(), bytes.clone());
            let failed = match tokio::time::timeout(left, call).await {
                Err(_) => "no answer".to_owned(),
                Ok(Err(e)) => e,
                Ok(Ok(answer)) => match crate::codec::decode::<RaftReply>(&answer) {
                    Ok(RaftReply::Bootstrap(Ok(()))) => return Ok(()),
                    // Busy with a bootstrap of its own: ask again.
                    Ok(RaftReply::Bootstrap(Err(reason))) if reason.contains(BUSY_PROPOSING) => {
                        reason
                    }
                    Ok(RaftReply::Bootstrap(Err(reason))) => {
                        return Err(GroupError::BootstrapConflict(reason))
                    }
                    Ok(RaftReply::Refused(reason)) => {
                        return Err(GroupError::Unreachable(format!(
                            "voter {voter} refused the bootstrap request: {reason}"
                        )))
                    }
                    Ok(_) => {
                        return Err(GroupError::Raft(format!(
                            "voter {voter} answered a bootstrap request with another kind of reply"
                        )))
                    }
                    Err(e) => {
                        return Err(GroupError::Raft(format!(
                            "voter {voter}'s answer does not decode: {e}"
                        )))
                    }
                },
            };
            if tokio::time::Instant::now() + BOOTSTRAP_RETRY >= deadline {
                return Err(GroupError::Unreachable(format!(
                    "voter {voter} could not be asked to promise the bootstrap within {:?}: {failed}",
                    self.write_timeout
                )));
            }
            tokio::time::sleep(BOOTSTRAP_RETRY).await;
        }
    }

    /// A peer asks this node to promise `promise`'s voter set (see [`Self::initialize`]).
    /// A node busy proposing a bootstrap of its own answers at once rather
    /// than after it (two proposers asking each other would each wait out
    /// the other's timeout): the asker tries again until its deadline.
    pub async fn promise_bootstrap(&self, promise: &BootstrapPromise) -> Result<(), GroupError> {
        let Ok(_serial) = tokio::time::timeout(BOOTSTRAP_RETRY, self.bootstrap.lock()).await else {
            return Err(GroupError::Unreachable(format!(
                "{} {BUSY_PROPOSING}",
                self.peer_id
            )));
        };
        self.promise_locked(promise)
    }

    /// The proposer of `promise` gave it up: forget it, if it is the one held
    /// (the same attempt).
    pub async fn release_bootstrap(&self, promise: &BootstrapPromise) -> Result<(), GroupError> {
        let Ok(_serial) = tokio::time::timeout(BOOTSTRAP_RETRY, self.bootstrap.lock()).await else {
            return Err(GroupError::Unreachable(format!(
                "{} {BUSY_PROPOSING}",
                self.peer_id
            )));
        };
        self.release_locked(promise)
    }

    fn promised(&self) -> Result<Option<BootstrapPromise>, GroupError> {
        match self
            .store
            .get(mesh_store::Column::RaftMeta, BOOTSTRAP_PROMISE)
            .map_err(|e| GroupError::Raft(format!("cannot read the bootstrap promise: {e}")))?
        {
            Some(bytes) => crate::codec::decode(&bytes).map(Some).map_err(|e| {
                GroupError::Raft(format!("the stored bootstrap promise does not decode: {e}"))
            }),
            None => Ok(None),
        }
    }

    fn promise_locked(&self, promise: &BootstrapPromise) -> Result<(), GroupError> {
        // A promise comes from a peer and is stored: bounded.
        if promise.voters.len() > BOOTSTRAP_VOTERS_MAX
            || promise
                .voters
                .iter()
                .chain([&promise.proposer])
                .any(|v| v.len() > PEER_ID_LEN_MAX)
        {
            return Err(GroupError::BootstrapConflict(format!(
                "a bootstrap names at most {BOOTSTRAP_VOTERS_MAX} voters of at most {PEER_ID_LEN_MAX} bytes each"
            )));
        }
        let voters: BTreeSet<&String> = promise.voters.iter().collect();
        if !voters.contains(&self.peer_id) {
            return Err(GroupError::BootstrapConflict(format!(
                "{} is not among the voters {:?} it is asked to promise",
                self.peer_id, promise.voters
            )));
        }
        if self.is_bootstrapped() {
            let (group, _) = self.members();
            let group: BTreeSet<&String> = group.iter().collect();
            return if group == voters {
                Ok(())
            } else {
                Err(GroupError::BootstrapConflict(format!(
                    "{} is already a voter of the region's group with voters {group:?}, not {:?}; nothing to bootstrap",
                    self.peer_id, promise.voters
                )))
            };
        }
        match self.promised()? {
            Some(held) if held == *promise => Ok(()),
            // A later attempt of the same proposal takes the promise over,
            // so a late release of the earlier attempt cannot undo it.
            Some(held) if held.voters == promise.voters && held.proposer == promise.proposer => {
                self.save_promise(promise)
            }
            Some(held) => Err(GroupError::BootstrapConflict(format!(
                "{} promised to bootstrap the region with voters {:?} (proposed by {}), not {:?} (proposed by {}): two bootstraps ran with different views of the region; retry once every node of the region is up and sees the others alive",
                self.peer_id, held.voters, held.proposer, promise.voters, promise.proposer
            ))),
            None => self.save_promise(promise),
        }
    }

    fn save_promise(&self, promise: &BootstrapPromise) -> Result<(), GroupError> {
        let op = mesh_store::WriteOp::Put {
            column: mesh_store::Column::RaftMeta,
            key: BOOTSTRAP_PROMISE.to_vec(),
            value: crate::codec::encode(promise).map_err(|e| GroupError::Raft(e.to_string()))?,
        };
        self.store
            .write(vec![op], mesh_store::Durability::Sync)
            .map_err(|e| GroupError::Raft(format!("cannot save the bootstrap promise: {e}")))
    }

    fn release_locked(&self, promise: &BootstrapPromise) -> Result<(), GroupError> {
        if self.is_bootstrapped() || self.promised()?.as_ref() != Some(promise) {
            return Ok(());
        }
        let op = mesh_store::WriteOp::Delete {
            column: mesh_store::Column::RaftMeta,
            key: BOOTSTRAP_PROMISE.to_vec(),
        };
        self.store
            .write(vec![op], mesh_store::Durability::Sync)
            .map_err(|e| GroupError::Raft(format!("cannot release the bootstrap promise: {e}")))
    }

    /// True once the group has a membership (bootstrapped, or joined as learner).
    pub fn is_bootstrapped(&self) -> bool {
        let metrics = self.raft.metrics();
        let bootstrapped = metrics
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_some();
        bootstrapped
    }

    /// Proposes a validated policy; returns its version (the log index).
    /// Concurrent writes are committed together, see [`crate::batcher`].
    pub async fn set_policy(&self, policy: Policy) -> Result<PolicyApplied, GroupError> {
        self.writes.write(policy).await
    }

    /// Proposes one command other than a policy write (those go through
    /// [`Self::set_policy`], which batches them) and waits until it is
    /// applied here, at most the write timeout. Leader only.
    pub async fn propose(&self, command: RegionCommand) -> Result<RegionResponse, GroupError> {
        let write = self.raft.client_write(command);
        match tokio::time::timeout(self.write_timeout, write).await {
            // Proposed: it may still commit.
            Err(_) => Err(GroupError::OutcomeUnknown(self.write_timeout)),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(e)) => Err(write_error(&self.raft, e)),
        }
    }

    /// The applied state on this node, possibly behind the leader.
    pub fn local_state(&self) -> RegionState {
        self.state_machine.state()
    }

    /// A linearizable read: confirms leadership with a quorum, waits until
    /// the state machine has applied everything committed before the read.
    pub async fn consistent_state(&self) -> Result<RegionState, GroupError> {
        #[cfg(feature = "planted-bugs")]
        if planted::STALE_READS.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(self.state_machine.state());
        }
        let read = self.raft.ensure_linearizable();
        match tokio::time::timeout(self.write_timeout, read).await {
            Err(_) => Err(GroupError::Timeout(self.write_timeout)),
            Ok(Ok(_)) => Ok(self.state_machine.state()),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                f,
            )))) => Err(GroupError::NotLeader {
                // openraft names the leader only once its vote is committed
                // here; the metrics may know it a little earlier.
                leader: f.leader_node.map(|n| n.peer_id).or_else(|| self.leader()),
            }),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(
                q,
            )))) => Err(GroupError::NoQuorum(format!(
                "{} of the voters answered",
                q.got.len()
            ))),
            Ok(Err(e)) => Err(GroupError::Raft(e.to_string())),
        }
    }

    /// Adds `peer_id` as a learner (leader only), without waiting for it to catch up.
    pub async fn add_learner(&self, peer_id: &str) -> Result<(), GroupError> {
        let node = RegionNode {
            peer_id: peer_id.to_owned(),
        };
        let add = self.raft.add_learner(node_id_of(peer_id), node, false);
        match tokio::time::timeout(self.write_timeout, add).await {
            Err(_) => Err(GroupError::OutcomeUnknown(self.write_timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_error(&self.raft, e)),
        }
    }

    /// Replaces voter `dead` by learner `learner` in one membership change
    /// (openraft runs it as joint consensus and leaves the joint config when
    /// it commits). Leader only.
    pub async fn replace_voter(&self, dead: &str, learner: &str) -> Result<(), GroupError> {
        let metrics = self.raft.metrics().borrow().clone();
        let mut voters: BTreeSet<NodeId> =
            metrics.membership_config.membership().voter_ids().collect();
        voters.remove(&node_id_of(dead));
        voters.insert(node_id_of(learner));
        // retain = false: the dead voter leaves the group entirely.
        let change = self
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false);
        match tokio::time::timeout(self.write_timeout, change).await {
            Err(_) => Err(GroupError::OutcomeUnknown(self.write_timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_error(&self.raft, e)),
        }
    }

    /// Removes learner `peer_id` (leader only; housekeeping's gone learners).
    /// Refused if it became a voter meanwhile.
    pub async fn remove_learner(&self, peer_id: &str) -> Result<(), GroupError> {
        let (voters, _) = self.members();
        if voters.iter().any(|v| v == peer_id) {
            return Err(GroupError::Raft(format!(
                "{peer_id} is a voter now, not a learner: not removed"
            )));
        }
        self.remove_member(peer_id).await
    }

    /// Removes `peer_id` from the group (leader only), a learner or a voter
    /// (`region remove-node`; housekeeping for learners gone past their
    /// timeout): a member gone for good would otherwise be replicated to
    /// forever. Removing a voter shrinks the quorum; the last voter, and
    /// this leader itself, cannot be removed.
    pub async fn remove_member(&self, peer_id: &str) -> Result<(), GroupError> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let id = node_id_of(peer_id);
        if membership.get_node(&id).is_none() {
            return Err(GroupError::NotAMember(peer_id.to_owned()));
        }
        let mut voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) {
            if id == self.node_id {
                return Err(GroupError::Raft(format!(
                    "{peer_id} leads the region and cannot remove itself; stop it (another voter takes over) and remove it there"
                )));
            }
            if voters.len() == 1 {
                return Err(GroupError::Raft(format!(
                    "{peer_id} is the region's last voter and cannot be removed"
                )));
            }
            voters.remove(&id);
            let change = self
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), false);
            return match tokio::time::timeout(self.write_timeout, change).await {
                Err(_) => Err(GroupError::OutcomeUnknown(self.write_timeout)),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(write_error(&self.raft, e)),
            };
        }
        let gone: BTreeSet<NodeId> = [id].into();
        let change = self
            .raft
            .change_membership(ChangeMembers::RemoveNodes(gone), false);
        match tokio::time::timeout(self.write_timeout, change).await {
            Err(_) => Err(GroupError::OutcomeUnknown(self.write_timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_error(&self.raft, e)),
        }
    }

    /// Peer ids of the voters of the newest configuration: during a joint
    /// change, the one it moves to (a committed entry is on a majority of
    /// each configuration of a joint one).
    pub fn latest_voters(&self) -> Vec<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        membership
            .get_joint_config()
            .last()
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| membership.get_node(id).map(|n| n.peer_id.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Peer ids of the voters and of the learners.
    pub fn members(&self) -> (Vec<String>, Vec<String>) {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut v = Vec::new();
        let mut l = Vec::new();
        for (id, node) in membership.nodes() {
            if voters.contains(id) {
                v.push(node.peer_id.clone());
            } else {
                l.push(node.peer_id.clone());
            }
        }
        (v, l)
    }

    /// Whether `peer_id` is a voter (`Some(true)`) or a learner
    /// (`Some(false)`) of the group as this node's log knows it; `None` if
    /// neither. Reads the metrics in place (it runs for every inbound RPC).
    pub fn role_of(&self, peer_id: &str) -> Option<bool> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let id = node_id_of(peer_id);
        membership
            .get_node(&id)
            .filter(|n| n.peer_id == peer_id)
            .map(|_| membership.voter_ids().any(|v| v == id))
    }

    /// Checks a snapshot chunk before openraft writes it (issue 12, finding
    /// 3): openraft seeks to any offset a chunk names, so a chunk at 2^46
    /// grew the buffer to that size, and endless chunks grew it without
    /// bound. A chunk must start a snapshot (offset 0), or continue the one
    /// being received at most where it ended (a resent chunk rewrites what
    /// was written), and no snapshot may pass [`SNAPSHOT_BYTES_MAX`].
    pub fn admit_snapshot_chunk(
        &self,
        rpc: &openraft::raft::InstallSnapshotRequest<TypeConfig>,
    ) -> Result<(), String> {
        rpc.offset
            .checked_add(rpc.data.len() as u64)
            .filter(|end| *end <= SNAPSHOT_BYTES_MAX)
            .ok_or_else(|| {
                format!(
                    "snapshot chunk at offset {} of {} bytes passes the limit of {SNAPSHOT_BYTES_MAX} bytes",
                    rpc.offset,
                    rpc.data.len()
                )
            })?;
        if rpc.offset == 0 {
            return Ok(());
        }
        let stream = self
            .snapshot_stream
            .lock()
            .map_err(|_| "snapshot stream lock poisoned".to_owned())?;
        match stream.as_ref() {
            Some((id, received)) if *id == rpc.meta.snapshot_id && rpc.offset <= *received => {
                Ok(())
            }
            Some((id, received)) if *id == rpc.meta.snapshot_id => Err(format!(
                "snapshot chunk at offset {} leaves a gap: {received} bytes received so far",
                rpc.offset
            )),
            _ => Err(format!(
                "snapshot chunk at offset {} of a snapshot that did not start at offset 0",
                rpc.offset
            )),
        }
    }

    /// Records a chunk openraft took (`accepted`: it answered without an
    /// error and under the chunk's own vote) or refused. Only a chunk of the
    /// snapshot being received changes or ends its record.
    pub fn snapshot_chunk_done(&self, chunk: (String, u64, usize, bool), accepted: bool) {
        let (id, offset, len, done) = chunk;
        let Ok(mut stream) = self.snapshot_stream.lock() else {
            return;
        };
        let same = stream.as_ref().is_some_and(|(current, _)| *current == id);
        if !accepted {
            if same {
                *stream = None;
            }
            return;
        }
        if done {
            if same || offset == 0 {
                *stream = None;
            }
            return;
        }
        let end = offset.saturating_add(len as u64);
        let received = match stream.as_ref() {
            Some((current, received)) if *current == id => (*received).max(end),
            _ => end,
        };
        *stream = Some((id, received));
    }

    /// Why this node's Raft core stopped, if it did (a storage error, a
    /// panic): the node must then exit rather than run on without it.
    pub fn stopped(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        // A core that panicked never sets its running state: its metrics
        // sender is gone instead.
        if metrics.has_changed().is_err() {
            return Some("its core task ended (a panic)".to_owned());
        }
        let running = metrics.borrow().running_state.clone();
        running.err().map(|e| e.to_string())
    }

    /// True when this node leads the group.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Peer id of the leader, if known.
    pub fn leader(&self) -> Option<String> {
        leader_of(&self.raft)
    }

    /// The status as this node sees it; progress figures only on the leader.
    pub fn status(&self) -> RegionStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last_log = metrics.last_log_index;
        let mut members: Vec<MemberProgress> = membership
            .nodes()
            .map(|(id, node)| {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned())
                    .map(|m| m.map(|l| l.index).unwrap_or(0));
                MemberProgress {
                    peer_id: node.peer_id.clone(),
                    role: if voters.contains(id) {
                        "voter"
                    } else {
                        "learner"
                    }
                    .into(),
                    matched,
                    lag: matched.map(|m| last_log.unwrap_or(0).saturating_sub(m)),
                    state: None,
                }
            })
            .collect();
        members
            .sort_by(|a, b| (a.role != "voter", &a.peer_id).cmp(&(b.role != "voter", &b.peer_id)));
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let bootstrapped = membership.nodes().next().is_some();
        RegionStatus {
            bootstrapped,
            node: self.peer_id.clone(),
            role: role.into(),
            leader: metrics
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.peer_id.clone())),
            term: metrics.current_term,
            last_log_index: last_log,
            last_applied: metrics.last_applied.map(|l| l.index),
            policy_version: self.state_machine.state().policy_version,
            log_purged_up_to: metrics.purged.map(|l| l.index),
            members,
        }
    }

    /// Stops the Raft task.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }
}

/// The leader's peer id as this node's metrics know it.
pub(crate) fn leader_of(raft: &Raft<TypeConfig>) -> Option<String> {
    let metrics = raft.metrics().borrow().clone();
    let leader = metrics.current_leader?;
    metrics
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.peer_id.clone())
}

/// A failed client write or membership change as a [`GroupError`].
pub(crate) fn write_error(
    raft: &Raft<TypeConfig>,
    e: RaftError<NodeId, ClientWriteError<NodeId, RegionNode>>,
) -> GroupError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => GroupError::NotLeader {
            // openraft names the leader only once its vote is committed
            // here; the metrics may know it a little earlier.
            leader: f.leader_node.map(|n| n.peer_id).or_else(|| leader_of(raft)),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            openraft::error::ChangeMembershipError::InProgress(_),
        )) => GroupError::ChangeInProgress,
        other => GroupError::Raft(other.to_string()),
    }
}
