//! The openraft type configuration of a region group.

use std::fmt;
use std::io::Cursor;

use mesh_types::agent::Manifest;
use mesh_types::policy::Policy;
use serde::{Deserialize, Serialize};

/// Raft node ids are u64 (openraft's storage suite needs `From<u64>`); a
/// node's id is derived from its peer id, see [`node_id_of`].
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The region group's types.
    pub TypeConfig:
        D = RegionCommand,
        R = RegionResponse,
        NodeId = NodeId,
        Node = RegionNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::MeshRuntime,
);

/// What a member of a region group is, beyond its id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionNode {
    /// Base58 libp2p peer id: where Raft RPCs go.
    pub peer_id: String,
}

impl fmt::Display for RegionNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.peer_id)
    }
}

/// A change to the region state, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionCommand {
    /// A policy as builds before result regions wrote it (read from old
    /// logs, never written): applied as [`RegionCommand::SetPolicy`].
    SetPolicyV1(PolicyV1),
    /// Policies as builds before result regions wrote them (never written).
    SetPoliciesV1(Vec<PolicyV1>),
    /// Deploy an agent, or a new version of it (its lease is kept). The
    /// caller MUST have checked the manifest (`mesh_agent::manifest::check`).
    DeployAgent(Manifest),
    /// Remove an agent and its lease.
    RemoveAgent(String),
    /// Register a dataset held by a node (or its new contents).
    RegisterDataset(Dataset),
    /// Activate `agent` on `node` with the next epoch, if its epoch is still
    /// `after_epoch` (compare-and-set: two leaders' placements cannot both
    /// win, and every later write names the epoch it holds).
    GrantLease {
        /// The agent.
        agent: String,
        /// Where it goes.
        node: String,
        /// The epoch the placer saw.
        after_epoch: u64,
    },
    /// A claim as builds before failover wrote it (read from old logs,
    /// never written): like [`RegionCommand::ClaimTask`], except that a
    /// task id claimed under an older epoch stays claimed.
    ClaimTaskV1 {
        /// The agent.
        agent: String,
        /// The task id.
        task_id: String,
        /// The host's peer id.
        node: String,
        /// The epoch of the lease the host holds.
        epoch: u64,
        /// The host's wall clock, in ms since the Unix epoch: claims older
        /// than the window, by the newest claim's clock, are forgotten.
        at_ms: u64,
    },
    /// Replace the region policy. The caller MUST have validated it.
    SetPolicy(Policy),
    /// Concurrent policy writes committed together (see `crate::batcher`):
    /// applied in order at one log index; the last one is in force.
    SetPolicies(Vec<Policy>),
    /// A host claims a task id before it runs the task (the fence of
    /// issue 13): applied only while `node` holds `agent`'s lease at
    /// `epoch`, and only once per task id in the region's claim window
    /// (see [`crate::state_machine::Claims`]), so a task runs at most once
    /// even when its agent moves and its client retries on the new host.
    ///
    /// A task id claimed for the same agent under an older epoch is taken
    /// over by the current lease holder (failover, issue 14): the old host
    /// cannot have answered it, because the new host sealed the agent's
    /// checkpoint replicas before it claims anything (`mesh_task::checkpoint`)
    /// and the old host answers only after every replica stored the task.
    ClaimTask {
        /// The agent.
        agent: String,
        /// The task id.
        task_id: String,
        /// The host's peer id.
        node: String,
        /// The epoch of the lease the host holds.
        epoch: u64,
        /// The host's wall clock, in ms since the Unix epoch: claims older
        /// than the window, by the newest claim's clock, are forgotten.
        at_ms: u64,
    },
    /// A host names the nodes it copies `agent`'s state to (issue 14):
    /// applied only while `node` holds the agent's lease at `epoch`, so a
    /// host whose lease moved on cannot change them. The host copies its
    /// whole state to new replicas before it names them, and answers a
    /// task only after every named replica stored it; a new host restores
    /// from any one of them.
    SetReplicas {
        /// The agent.
        agent: String,
        /// The host's peer id.
        node: String,
        /// The epoch of the lease the host holds.
        epoch: u64,
        /// The replicas' peer ids.
        replicas: Vec<String>,
    },
    /// Move (or first place) `agent` to `to` with the next epoch, if its
    /// epoch is still `after_epoch` (as [`RegionCommand::GrantLease`]), and
    /// record why: `agent list`, the new host's audit record of the move
    /// and its log say it. Refused ([`RegionResponse::MoveRefused`]) when
    /// `to` is not a member of the region's group or is draining.
    MoveAgent {
        /// The agent.
        agent: String,
        /// Where it goes.
        to: String,
        /// The epoch the mover saw.
        after_epoch: u64,
        /// Why it moves.
        reason: MoveReason,
    },
    /// Mark `node` draining (placement moves its agents to other nodes and
    /// places none there, so it may stop) or take the mark off.
    SetDraining {
        /// The node's peer id.
        node: String,
        /// Draining or not.
        draining: bool,
    },
}

/// Why an agent's lease moved (in JSON: `placed`, `host-down`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveReason {
    /// Its first placement (or after it was unplaced).
    Placed,
    /// Its host is dead, has left, or is not known any more.
    HostDown,
    /// Its dataset is on the new host (migration toward data).
    TowardData,
    /// An operator asked (`agentmesh agent move`).
    Operator,
    /// Its host is draining (`agentmesh node drain`).
    Drain,
    /// Granted by a build that did not record why (a `GrantLease` entry).
    Unstated,
}

impl MoveReason {
    /// A short name for tables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Placed => "placed",
            MoveReason::HostDown => "host-down",
            MoveReason::TowardData => "toward-data",
            MoveReason::Operator => "operator",
            MoveReason::Drain => "drain",
            MoveReason::Unstated => "unstated",
        }
    }
}

/// One move of an agent's lease, as the region state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The epoch of the new lease.
    pub epoch: u64,
    /// The previous host, if it was placed.
    pub from: Option<String>,
    /// The new host.
    pub to: String,
    /// Why.
    pub reason: MoveReason,
    /// The log index of the move.
    pub at: u64,
}

/// The nodes an agent's host copies its state to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    /// The host that named them.
    pub host: String,
    /// Its lease's epoch then.
    pub epoch: u64,
    /// The replicas' peer ids.
    pub nodes: Vec<String>,
    /// The log index it was set at.
    pub set_at: u64,
}

/// A policy as it was stored before residency rules named result regions:
/// the bytes of old log entries and states decode into it (bincode is not
/// self-describing, so a changed struct needs its old shape kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyV1 {
    /// Residency rules without result regions.
    pub residency: Vec<ResidencyRuleV1>,
    /// Allowed models.
    pub models: Vec<mesh_types::policy::AllowedModel>,
    /// Rate limits.
    pub rate_limits: mesh_types::policy::RateLimits,
}

/// A residency rule before result regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidencyRuleV1 {
    /// The tag.
    pub tag: String,
    /// Where such data may be processed (and, then, returned to).
    pub regions: Vec<mesh_types::Region>,
}

impl From<PolicyV1> for Policy {
    fn from(old: PolicyV1) -> Self {
        Policy {
            residency: old
                .residency
                .into_iter()
                .map(|r| mesh_types::policy::ResidencyRule {
                    tag: r.tag,
                    regions: r.regions,
                    results: Vec::new(),
                })
                .collect(),
            models: old.models,
            rate_limits: old.rate_limits,
        }
    }
}

/// A dataset as the region knows it: the documents stay on their node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// Its name, unique in the region.
    pub name: String,
    /// The peer id of the node that holds it.
    pub node: String,
    /// Its data tags (residency rules apply to each).
    pub tags: Vec<String>,
    /// How many documents it holds.
    pub documents: u64,
    /// sha256 of the model its vectors were made with.
    pub embed_model_sha256: String,
}

/// Where an agent is active: a lease with an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The host's peer id.
    pub node: String,
    /// Grows by one with every grant; never reused.
    pub epoch: u64,
    /// The log index of the grant.
    pub granted_at: u64,
}

/// What applying a command returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionResponse {
    /// A blank or membership entry.
    Applied,
    /// A policy write (or a batch of them) was applied at this version.
    PolicySet {
        /// The log index at which it was applied.
        version: u64,
    },
    /// An agent was deployed at this version.
    AgentDeployed {
        /// The log index.
        version: u64,
    },
    /// An agent removal was applied; `found` is false if there was none.
    AgentRemoved {
        /// Whether the agent existed.
        found: bool,
    },
    /// A dataset was registered at this version.
    DatasetRegistered {
        /// The log index.
        version: u64,
    },
    /// The lease was granted with this epoch.
    LeaseGranted {
        /// The new epoch.
        epoch: u64,
    },
    /// The lease was not granted: the agent is unknown, or its epoch moved
    /// on (`epoch` is the current one).
    LeaseRefused {
        /// The agent's current epoch (0: not deployed).
        epoch: u64,
    },
    /// The task id is claimed for this host: run it.
    TaskClaimed {
        /// The log index of the claim.
        index: u64,
    },
    /// The task id was claimed before, for `agent` by `node` at `epoch`
    /// (the same agent, host and epoch: a retried claim of its own; run
    /// it, once).
    TaskAlreadyClaimed {
        /// The agent it was claimed for.
        agent: String,
        /// The host that claimed it.
        node: String,
        /// Its epoch then.
        epoch: u64,
    },
    /// The claim was refused: the claimer does not hold the lease (any
    /// more); `lease` is where the agent is now, if it is placed.
    ClaimRefused {
        /// The current lease.
        lease: Option<Lease>,
    },
    /// The task id was claimed by the agent's current lease holder, taking
    /// over the claim of an older epoch (issue 14).
    TaskTakenOver {
        /// The log index.
        index: u64,
        /// The node of the claim taken over.
        node: String,
        /// Its epoch.
        epoch: u64,
    },
    /// The replica set was stored at this index.
    ReplicasSet {
        /// The log index.
        index: u64,
    },
    /// The move was refused, for this reason.
    MoveRefused {
        /// What was wrong.
        why: String,
    },
    /// The node's draining mark was set (or taken off) at this index.
    DrainingSet {
        /// The log index.
        index: u64,
    },
}

/// The Raft node id of a peer: the first 8 bytes (big-endian) of the sha256
/// of its peer id text. Stable across restarts and builds. A node that lost
/// its data dir has a new peer id, hence a new node id, and rejoins as a new
/// member: it never votes with an empty log under an old id (openraft#898).
pub fn node_id_of(peer_id: &str) -> NodeId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(peer_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        let a = node_id_of("12D3KooWAbc");
        assert_eq!(a, node_id_of("12D3KooWAbc"));
        assert_ne!(a, node_id_of("12D3KooWAbd"));
    }
}
