//! The region state machine: the applied policy and its version, the
//! deployed agents with their leases, the datasets, the last applied log id
//! and membership, persisted as one versioned value in
//! `Column::StateMachine`; the current snapshot in `Column::Snapshot`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Cursor;
use std::sync::Arc;

use mesh_store::{Column, Durability, Store, WriteOp};
use mesh_types::agent::Manifest;
use mesh_types::policy::Policy;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::log_sync::LogSync;
use crate::types::{
    Dataset, Lease, Move, MoveReason, NodeId, PolicyV1, RegionCommand, RegionNode, RegionResponse,
    ReplicaSet, TypeConfig,
};

/// The state, in this build's shape. Builds before result regions kept it
/// under [`STATE_BEFORE_V3`], builds before replica sets under
/// [`STATE_V3`] (each read once, then deleted): bincode is not
/// self-describing, so a new key keeps old and new bytes apart.
const STATE: &[u8] = b"state4";
const STATE_V3: &[u8] = b"state3";
const STATE_BEFORE_V3: &[u8] = b"state";
/// Snapshot data of this build starts with this; the builds before replica
/// sets wrote [`SNAPSHOT_MAGIC_V3`]; older snapshots have none (their first
/// byte is an `Option` tag, 0 or 1).
const SNAPSHOT_MAGIC: &[u8] = b"AMS4";
const SNAPSHOT_MAGIC_V3: &[u8] = b"AMS3";
const SNAPSHOT: &[u8] = b"current";
/// Claims are kept one key each (`claim\0` + the claim's log index,
/// big-endian) beside the state, so applying a claim writes one key, not
/// the whole claim window, and forgetting the oldest is one range delete.
const CLAIM_PREFIX: &[u8] = b"claim\0";
const CLAIM_END: &[u8] = b"claim\x01";

fn claim_key(index: u64) -> Vec<u8> {
    let mut key = CLAIM_PREFIX.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Everything the region group agrees on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegionState {
    /// The last entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The membership as of `last_applied`.
    pub membership: StoredMembership<NodeId, RegionNode>,
    /// The policy in force, if one was applied.
    pub policy: Option<Policy>,
    /// The log index at which `policy` was applied (0: none yet).
    pub policy_version: u64,
    /// Deployed agents, by name.
    pub agents: BTreeMap<String, AgentEntry>,
    /// Registered datasets, by name.
    pub datasets: BTreeMap<String, Dataset>,
    /// The last epoch of each removed agent: deployed again, it goes on
    /// from there, so an epoch is never reused for a name.
    pub retired_epochs: BTreeMap<String, u64>,
    /// Task ids claimed by their hosts, in the claim window.
    pub claims: Claims,
    /// Where each agent's host copies its state (issue 14), as the host
    /// set it under its lease: a new host restores from one of them.
    pub replicas: BTreeMap<String, ReplicaSet>,
    /// Nodes being drained: placement moves their agents off and places
    /// none on them.
    pub draining: BTreeSet<String>,
    /// Each agent's last moves ([`MOVES_KEPT`] at most), oldest first.
    pub moves: BTreeMap<String, VecDeque<Move>>,
}

/// Moves kept per agent in the region state.
pub const MOVES_KEPT: usize = 16;

/// Claims kept at most per region (the oldest is forgotten first).
pub const CLAIMS_MAX: usize = 50_000;
/// Claims are kept this long, by the newest claim's clock.
pub const CLAIMS_KEPT_MS: u64 = 10 * 60 * 1000;
/// How far one claim may move the window's clock forward: a clock that
/// jumps (a step of NTP, a resumed VM) moves it no faster than this per
/// claim, so one bad clock cannot make the region forget its claims.
pub const CLAIM_CLOCK_STEP_MAX_MS: u64 = 5_000;

/// One claimed task id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The agent.
    pub agent: String,
    /// The host that claimed it.
    pub node: String,
    /// The lease epoch it ran under.
    pub epoch: u64,
    /// The log index of the claim.
    pub index: u64,
    /// The host's clock at the claim.
    pub at_ms: u64,
}

/// Shards of the claims by task id, and claims per chunk of the order.
const SHARDS: usize = 64;
const CHUNK: usize = 256;

/// The task ids the region's hosts claimed before running them, for the
/// last [`CLAIMS_KEPT_MS`] and at most [`CLAIMS_MAX`]: within that window
/// a task id runs once in its region, wherever its agent moves.
///
/// Every read of the region state clones it, and a claim is applied to a
/// clone, so it is kept in small shared pieces (copy on write): a clone
/// copies pointers, and a claim copies one shard of the ids (about
/// 1/64th) and one chunk of the order (at most 256 entries), never the
/// whole window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// The claims by task id, in [`SHARDS`] shards by a hash of the id
    /// (empty while there is none).
    by_id: Vec<Arc<BTreeMap<String, Claim>>>,
    /// (log index, task id) of every claim, oldest first, in chunks of at
    /// most [`CHUNK`].
    order: std::collections::VecDeque<Arc<Vec<(u64, String)>>>,
    len: usize,
    /// The newest claim's clock.
    newest_ms: u64,
}

/// FNV-1a: a shard that does not change between builds or processes.
fn shard_of(task_id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

impl Claims {
    /// The claim of `task_id`, if it is in the window.
    pub fn get(&self, task_id: &str) -> Option<&Claim> {
        self.by_id.get(shard_of(task_id))?.get(task_id)
    }

    /// Claims held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every claim, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Claim)> {
        self.order
            .iter()
            .flat_map(|chunk| chunk.iter())
            .filter_map(|(index, id)| self.get(id).filter(|c| c.index == *index).map(|c| (id, c)))
    }

    /// No claims, only the window's clock: what the state blob keeps (the
    /// claims themselves are kept one key each).
    fn clock_only(&self) -> Self {
        Claims {
            newest_ms: self.newest_ms,
            ..Claims::default()
        }
    }

    /// The oldest and the newest claim's log index.
    fn bounds(&self) -> (Option<u64>, Option<u64>) {
        (
            self.order.front().and_then(|c| c.first()).map(|(i, _)| *i),
            self.order.back().and_then(|c| c.last()).map(|(i, _)| *i),
        )
    }

    /// The writes that turn the stored claims, whose bounds were `before`,
    /// into these: claims past the newest are new, and claims are
    /// forgotten oldest first.
    fn changes_since(
        &self,
        before: (Option<u64>, Option<u64>),
    ) -> Result<Vec<WriteOp>, codec::CodecError> {
        let mut ops = Vec::new();
        let (first_now, _) = self.bounds();
        if let Some(first_before) = before.0 {
            let kept_from = first_now.unwrap_or(u64::MAX);
            if kept_from > first_before {
                ops.push(WriteOp::DeleteRange {
                    column: Column::StateMachine,
                    from: claim_key(first_before),
                    to: claim_key(kept_from),
                });
            }
        }
        let mut added = Vec::new();
        'chunks: for chunk in self.order.iter().rev() {
            for (index, id) in chunk.iter().rev() {
                if before.1.is_some_and(|newest| *index <= newest) {
                    break 'chunks;
                }
                added.push((*index, id));
            }
        }
        for (index, id) in added.into_iter().rev() {
            if let Some(claim) = self.get(id).filter(|c| c.index == index) {
                ops.push(WriteOp::Put {
                    column: Column::StateMachine,
                    key: claim_key(index),
                    value: codec::encode(&(id, claim))?,
                });
            }
        }
        Ok(ops)
    }

    /// The writes that store exactly these claims.
    fn rewrite(&self) -> Result<Vec<WriteOp>, codec::CodecError> {
        let mut ops = vec![WriteOp::DeleteRange {
            column: Column::StateMachine,
            from: CLAIM_PREFIX.to_vec(),
            to: CLAIM_END.to_vec(),
        }];
        for (id, claim) in self.iter() {
            ops.push(WriteOp::Put {
                column: Column::StateMachine,
                key: claim_key(claim.index),
                value: codec::encode(&(id, claim))?,
            });
        }
        Ok(ops)
    }

    /// The claims stored in `store`.
    fn load(store: &dyn Store) -> Result<Self, String> {
        let mut claims = Claims::default();
        let mut failed = None;
        store
            .scan(
                Column::StateMachine,
                CLAIM_PREFIX,
                Some(CLAIM_END),
                &mut |k, v| match codec::decode::<(String, Claim)>(v) {
                    Ok((id, claim)) => {
                        claims.push(id, claim);
                        true
                    }
                    Err(e) => {
                        failed = Some(format!("the stored claim {k:?} is unreadable: {e}"));
                        false
                    }
                },
            )
            .map_err(|e| e.to_string())?;
        match failed {
            Some(e) => Err(e),
            None => Ok(claims),
        }
    }

    /// Adds a claim newer than every one held (no forgetting).
    fn push(&mut self, task_id: String, claim: Claim) {
        if self.by_id.is_empty() {
            self.by_id = (0..SHARDS).map(|_| Arc::new(BTreeMap::new())).collect();
        }
        self.newest_ms = self.newest_ms.max(claim.at_ms);
        let index = claim.index;
        let shard = shard_of(&task_id);
        if Arc::make_mut(&mut self.by_id[shard])
            .insert(task_id.clone(), claim)
            .is_none()
        {
            self.len += 1;
        }
        match self.order.back_mut() {
            Some(chunk) if chunk.len() < CHUNK => Arc::make_mut(chunk).push((index, task_id)),
            _ => self.order.push_back(Arc::new(vec![(index, task_id)])),
        }
    }

    fn insert(&mut self, task_id: String, mut claim: Claim) {
        if self.newest_ms > 0 {
            claim.at_ms = claim
                .at_ms
                .min(self.newest_ms.saturating_add(CLAIM_CLOCK_STEP_MAX_MS));
        }
        self.push(task_id, claim);
        // Forget the oldest while past the window.
        while let Some(chunk) = self.order.front() {
            let Some((index, id)) = chunk.first() else {
                self.order.pop_front();
                continue;
            };
            // A claim taken over by a newer epoch (failover) is listed again
            // at its new index: its old place in the order holds nothing.
            let current = self.get(id).filter(|c| c.index == *index);
            let live = current.is_some();
            let expired =
                current.is_some_and(|c| c.at_ms.saturating_add(CLAIMS_KEPT_MS) < self.newest_ms);
            if live && self.len <= CLAIMS_MAX && !expired {
                break;
            }
            let id = id.clone();
            if let Some(front) = self.order.front_mut() {
                let chunk = Arc::make_mut(front);
                chunk.remove(0);
                if chunk.is_empty() {
                    self.order.pop_front();
                }
            }
            if !live {
                continue;
            }
            if Arc::make_mut(&mut self.by_id[shard_of(&id)])
                .remove(&id)
                .is_some()
            {
                self.len -= 1;
            }
        }
    }
}

/// Claims as they are written in a snapshot: the newest clock, and every
/// claim oldest first.
#[derive(Serialize, Deserialize)]
struct StoredClaims {
    newest_ms: u64,
    claims: Vec<(String, Claim)>,
}

impl Serialize for Claims {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StoredClaims {
            newest_ms: self.newest_ms,
            claims: self.iter().map(|(id, c)| (id.clone(), c.clone())).collect(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredClaims::deserialize(deserializer)?;
        let mut claims = Claims::default();
        for (id, claim) in stored.claims {
            claims.push(id, claim);
        }
        claims.newest_ms = claims.newest_ms.max(stored.newest_ms);
        Ok(claims)
    }
}

/// An agent deployed to the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEntry {
    /// The manifest of its latest deploy.
    pub manifest: Manifest,
    /// The log index of its latest deploy.
    pub deployed_at: u64,
    /// Where it is active, if it is placed.
    pub lease: Option<Lease>,
    /// The epoch of the last lease granted (0: never placed).
    pub epoch: u64,
}

impl RegionState {
    /// Applies one command at log index `index`, as the state machine does
    /// for a committed entry (for tests of code above the group).
    pub fn apply(&mut self, index: u64, command: RegionCommand) -> RegionResponse {
        apply_command(self, index, command)
    }
}

/// Applies one command to `state` at log index `index`.
fn apply_command(state: &mut RegionState, index: u64, command: RegionCommand) -> RegionResponse {
    match command {
        RegionCommand::SetPolicy(policy) => apply_policies(state, index, vec![policy]),
        RegionCommand::SetPolicies(policies) => apply_policies(state, index, policies),
        RegionCommand::SetPolicyV1(policy) => apply_policies(state, index, vec![policy.into()]),
        RegionCommand::SetPoliciesV1(policies) => apply_policies(
            state,
            index,
            policies.into_iter().map(Policy::from).collect(),
        ),
        RegionCommand::DeployAgent(manifest) => {
            let retired = state.retired_epochs.remove(&manifest.name).unwrap_or(0);
            let entry = state
                .agents
                .entry(manifest.name.clone())
                .or_insert_with(|| AgentEntry {
                    manifest: manifest.clone(),
                    deployed_at: index,
                    lease: None,
                    epoch: retired,
                });
            entry.manifest = manifest;
            entry.deployed_at = index;
            RegionResponse::AgentDeployed { version: index }
        }
        RegionCommand::RemoveAgent(name) => match state.agents.remove(&name) {
            Some(entry) => {
                state.replicas.remove(&name);
                state.moves.remove(&name);
                state.retired_epochs.insert(name, entry.epoch);
                RegionResponse::AgentRemoved { found: true }
            }
            None => RegionResponse::AgentRemoved { found: false },
        },
        RegionCommand::RegisterDataset(dataset) => {
            state.datasets.insert(dataset.name.clone(), dataset);
            RegionResponse::DatasetRegistered { version: index }
        }
        RegionCommand::GrantLease {
            agent,
            node,
            after_epoch,
        } => grant(state, index, agent, node, after_epoch, MoveReason::Unstated),
        RegionCommand::MoveAgent {
            agent,
            to,
            after_epoch,
            reason,
        } => {
            if !state
                .membership
                .membership()
                .nodes()
                .any(|(_, n)| n.peer_id == to)
            {
                return RegionResponse::MoveRefused {
                    why: format!("{to} is not a member of the region's group"),
                };
            }
            if state.draining.contains(&to) {
                return RegionResponse::MoveRefused {
                    why: format!("{to} is draining"),
                };
            }
            grant(state, index, agent, to, after_epoch, reason)
        }
        RegionCommand::SetDraining { node, draining } => {
            if draining {
                if !state
                    .membership
                    .membership()
                    .nodes()
                    .any(|(_, n)| n.peer_id == node)
                {
                    return RegionResponse::MoveRefused {
                        why: format!("{node} is not a member of the region's group"),
                    };
                }
                state.draining.insert(node);
            } else {
                state.draining.remove(&node);
            }
            RegionResponse::DrainingSet { index }
        }
        RegionCommand::ClaimTaskV1 {
            agent,
            task_id,
            node,
            epoch,
            at_ms,
        } => apply_claim(state, index, agent, task_id, node, epoch, at_ms, false),
        RegionCommand::ClaimTask {
            agent,
            task_id,
            node,
            epoch,
            at_ms,
        } => apply_claim(state, index, agent, task_id, node, epoch, at_ms, true),
        RegionCommand::SetReplicas {
            agent,
            node,
            epoch,
            replicas,
        } => {
            let lease = state.agents.get(&agent).and_then(|e| e.lease.clone());
            if !lease
                .as_ref()
                .is_some_and(|l| l.node == node && l.epoch == epoch)
            {
                return RegionResponse::ClaimRefused { lease };
            }
            state.replicas.insert(
                agent,
                ReplicaSet {
                    host: node,
                    epoch,
                    nodes: replicas,
                    set_at: index,
                },
            );
            RegionResponse::ReplicasSet { index }
        }
    }
}

/// A lease for `agent` on `node` with the next epoch, if its epoch is still
/// `after_epoch`; the move is recorded with `reason`.
fn grant(
    state: &mut RegionState,
    index: u64,
    agent: String,
    node: String,
    after_epoch: u64,
    reason: MoveReason,
) -> RegionResponse {
    let Some(entry) = state.agents.get_mut(&agent) else {
        return RegionResponse::LeaseRefused { epoch: 0 };
    };
    if entry.epoch != after_epoch {
        return RegionResponse::LeaseRefused { epoch: entry.epoch };
    }
    let epoch = entry.epoch.saturating_add(1);
    entry.epoch = epoch;
    let from = entry.lease.replace(Lease {
        node: node.clone(),
        epoch,
        granted_at: index,
    });
    let moves = state.moves.entry(agent).or_default();
    moves.push_back(Move {
        epoch,
        from: from.map(|l| l.node),
        to: node,
        reason,
        at: index,
    });
    while moves.len() > MOVES_KEPT {
        moves.pop_front();
    }
    RegionResponse::LeaseGranted { epoch }
}

/// A task claim; with `take_over`, the current lease holder takes over a
/// claim its agent's older epoch made (see [`RegionCommand::ClaimTask`]).
#[allow(clippy::too_many_arguments)]
fn apply_claim(
    state: &mut RegionState,
    index: u64,
    agent: String,
    task_id: String,
    node: String,
    epoch: u64,
    at_ms: u64,
    take_over: bool,
) -> RegionResponse {
    let lease = state.agents.get(&agent).and_then(|e| e.lease.clone());
    let holds = lease
        .as_ref()
        .is_some_and(|l| l.node == node && l.epoch == epoch);
    let mut taken_over = None;
    if let Some(claim) = state.claims.get(&task_id) {
        let older = claim.agent == agent && claim.epoch < epoch;
        if !(take_over && older && holds) {
            return RegionResponse::TaskAlreadyClaimed {
                agent: claim.agent.clone(),
                node: claim.node.clone(),
                epoch: claim.epoch,
            };
        }
        taken_over = Some((claim.node.clone(), claim.epoch));
    }
    if !holds {
        return RegionResponse::ClaimRefused { lease };
    }
    state.claims.insert(
        task_id,
        Claim {
            agent,
            node,
            epoch,
            index,
            at_ms,
        },
    );
    match taken_over {
        Some((node, epoch)) => RegionResponse::TaskTakenOver { index, node, epoch },
        None => RegionResponse::TaskClaimed { index },
    }
}

fn apply_policies(state: &mut RegionState, index: u64, policies: Vec<Policy>) -> RegionResponse {
    if let Some(policy) = policies.into_iter().last() {
        state.policy = Some(policy);
        state.policy_version = index;
    }
    RegionResponse::PolicySet {
        version: state.policy_version,
    }
}

/// The region state as builds before agents stored it.
#[derive(Deserialize)]
struct RegionStateV1 {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, RegionNode>,
    policy: Option<PolicyV1>,
    policy_version: u64,
}

/// The region state as builds before task claims stored it.
#[derive(Deserialize)]
struct RegionStateV2 {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, RegionNode>,
    policy: Option<PolicyV1>,
    policy_version: u64,
    agents: BTreeMap<String, AgentEntry>,
    datasets: BTreeMap<String, Dataset>,
    retired_epochs: BTreeMap<String, u64>,
}

/// The region state as builds before replica sets stored it.
#[derive(Deserialize)]
struct RegionStateV3 {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, RegionNode>,
    policy: Option<Policy>,
    policy_version: u64,
    agents: BTreeMap<String, AgentEntry>,
    datasets: BTreeMap<String, Dataset>,
    retired_epochs: BTreeMap<String, u64>,
    claims: Claims,
}

fn decode_state_v3(bytes: &[u8]) -> Result<RegionState, codec::CodecError> {
    let v3 = codec::decode::<RegionStateV3>(bytes)?;
    Ok(RegionState {
        last_applied: v3.last_applied,
        membership: v3.membership,
        policy: v3.policy,
        policy_version: v3.policy_version,
        agents: v3.agents,
        datasets: v3.datasets,
        retired_epochs: v3.retired_epochs,
        claims: v3.claims,
        ..RegionState::default()
    })
}

/// Decodes a region state stored by the builds before result regions (the
/// first had no agents or datasets, the second no task claims), so a
/// node's store survives the upgrade.
fn decode_state_before_v3(bytes: &[u8]) -> Result<RegionState, codec::CodecError> {
    let e = match codec::decode::<RegionStateV2>(bytes) {
        Ok(v2) => {
            return Ok(RegionState {
                last_applied: v2.last_applied,
                membership: v2.membership,
                policy: v2.policy.map(Policy::from),
                policy_version: v2.policy_version,
                agents: v2.agents,
                datasets: v2.datasets,
                retired_epochs: v2.retired_epochs,
                ..RegionState::default()
            })
        }
        Err(e) => e,
    };
    match codec::decode::<RegionStateV1>(bytes) {
        Ok(v1) => Ok(RegionState {
            last_applied: v1.last_applied,
            membership: v1.membership,
            policy: v1.policy.map(Policy::from),
            policy_version: v1.policy_version,
            ..RegionState::default()
        }),
        Err(_) => Err(e),
    }
}

/// Snapshot data: this build's (after [`SNAPSHOT_MAGIC`]) or an older one's.
fn decode_snapshot_data(bytes: &[u8]) -> Result<RegionState, codec::CodecError> {
    if let Some(rest) = bytes.strip_prefix(SNAPSHOT_MAGIC) {
        return codec::decode::<RegionState>(rest);
    }
    match bytes.strip_prefix(SNAPSHOT_MAGIC_V3) {
        Some(rest) => decode_state_v3(rest),
        None => decode_state_before_v3(bytes),
    }
}

fn encode_snapshot_data(state: &RegionState) -> Result<Vec<u8>, codec::CodecError> {
    let mut data = SNAPSHOT_MAGIC.to_vec();
    data.extend(codec::encode(state)?);
    Ok(data)
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, RegionNode>,
    data: Vec<u8>,
}

fn sm_read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::error(e.to_string())).into()
}

fn sm_write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snapshot_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

/// The state machine of one region group. Clones share the store and a
/// consistent copy of the state is read through [`RegionStateMachine::state`].
#[derive(Debug, Clone)]
pub struct RegionStateMachine {
    store: Arc<dyn Store>,
    state: Arc<std::sync::RwLock<RegionState>>,
    /// Counts snapshots built by this process, for unique snapshot ids.
    snapshots_built: Arc<std::sync::atomic::AtomicU64>,
    /// Where writes that fsync run.
    io: LogSync,
}

impl RegionStateMachine {
    /// Loads the state persisted in `store`, or starts empty. When the
    /// durable snapshot is newer than the saved state (the state is written
    /// unsynced, and a crash may land between the two), the snapshot's state
    /// is the one to resume from: the log it covers may be purged already.
    pub fn open(store: Arc<dyn Store>) -> StorageResult<Self> {
        let old = store
            .get(Column::StateMachine, STATE_BEFORE_V3)
            .map_err(sm_read_err)?;
        let v3 = store
            .get(Column::StateMachine, STATE_V3)
            .map_err(sm_read_err)?;
        let mut state = match store
            .get(Column::StateMachine, STATE)
            .map_err(sm_read_err)?
        {
            Some(bytes) => codec::decode::<RegionState>(&bytes).map_err(sm_read_err)?,
            None => match (&v3, &old) {
                (Some(bytes), _) => decode_state_v3(bytes).map_err(sm_read_err)?,
                (None, Some(bytes)) => decode_state_before_v3(bytes).map_err(sm_read_err)?,
                (None, None) => RegionState::default(),
            },
        };
        // The claims of the saved state are kept one key each beside it,
        // written in the same batches; the blob keeps the window's clock.
        let clock = state.claims.newest_ms;
        state.claims = Claims::load(&*store).map_err(sm_read_err)?;
        state.claims.newest_ms = state.claims.newest_ms.max(clock);
        if let Some(bytes) = store.get(Column::Snapshot, SNAPSHOT).map_err(sm_read_err)? {
            let stored: StoredSnapshot = codec::decode(&bytes).map_err(sm_read_err)?;
            if stored.meta.last_log_id > state.last_applied {
                let mut from_snapshot: RegionState =
                    decode_snapshot_data(&stored.data).map_err(sm_read_err)?;
                from_snapshot.last_applied = stored.meta.last_log_id;
                from_snapshot.membership = stored.meta.last_membership;
                // The claim keys belong to the older state: store the
                // snapshot's before anything is applied on top of it.
                let ops = from_snapshot.claims.rewrite().map_err(sm_write_err)?;
                store.write(ops, Durability::Sync).map_err(sm_write_err)?;
                state = from_snapshot;
            }
        }
        if old.is_some() || v3.is_some() {
            // Moved to this build's key, with the old ones gone, at once.
            let without_claims = RegionState {
                claims: Claims::default(),
                ..state.clone()
            };
            let ops = vec![
                WriteOp::Put {
                    column: Column::StateMachine,
                    key: STATE.to_vec(),
                    value: codec::encode(&without_claims).map_err(sm_write_err)?,
                },
                WriteOp::Delete {
                    column: Column::StateMachine,
                    key: STATE_BEFORE_V3.to_vec(),
                },
                WriteOp::Delete {
                    column: Column::StateMachine,
                    key: STATE_V3.to_vec(),
                },
            ];
            store.write(ops, Durability::Sync).map_err(sm_write_err)?;
        }
        Ok(Self {
            store,
            state: Arc::new(std::sync::RwLock::new(state)),
            snapshots_built: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            io: LogSync::Thread,
        })
    }

    /// A copy of the applied state, for local (possibly stale) reads.
    pub fn state(&self) -> RegionState {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Runs synced writes where `io` says (see [`LogSync::run`]).
    pub fn with_io(mut self, io: LogSync) -> Self {
        self.io = io;
        self
    }

    /// Writes `ops`: buffered ones inline (no fsync), synced ones off the runtime.
    async fn write(
        &self,
        ops: Vec<WriteOp>,
        durability: Durability,
    ) -> Result<(), mesh_store::StoreError> {
        match durability {
            Durability::Sync => {
                let store = self.store.clone();
                self.io
                    .run(move || store.write(ops, Durability::Sync))
                    .await
            }
            other => self.store.write(ops, other),
        }
    }

    /// Stores `state` (its claims as `claims` says: one key each) with
    /// `extra`, then makes it the applied state.
    async fn replace_state(
        &self,
        state: RegionState,
        claims: Vec<WriteOp>,
        extra: Vec<WriteOp>,
        durability: Durability,
    ) -> StorageResult<()> {
        let without_claims = RegionState {
            claims: state.claims.clock_only(),
            ..state.clone()
        };
        let mut ops = vec![WriteOp::Put {
            column: Column::StateMachine,
            key: STATE.to_vec(),
            value: codec::encode(&without_claims).map_err(sm_write_err)?,
        }];
        ops.extend(claims);
        ops.extend(extra);
        self.write(ops, durability).await.map_err(sm_write_err)?;
        let mut guard = self
            .state
            .write()
            .map_err(|_| sm_write_err("state lock poisoned"))?;
        *guard = state;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for RegionStateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let state = self.state();
        let data = encode_snapshot_data(&state).map_err(snapshot_err)?;
        let n = self
            .snapshots_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let snapshot_id = match state.last_applied {
            Some(last) => format!("{}-{}-{n}", last.leader_id, last.index),
            None => format!("--{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let op = WriteOp::Put {
            column: Column::Snapshot,
            key: SNAPSHOT.to_vec(),
            value: codec::encode(&stored).map_err(snapshot_err)?,
        };
        self.write(vec![op], Durability::Sync)
            .await
            .map_err(snapshot_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for RegionStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, RegionNode>)> {
        let state = self.state();
        Ok((state.last_applied, state.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<RegionResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state();
        let claims_before = state.claims.bounds();
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => RegionResponse::Applied,
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    RegionResponse::Applied
                }
                EntryPayload::Normal(command) => {
                    apply_command(&mut state, entry.log_id.index, command)
                }
            };
            responses.push(response);
        }
        // Buffered is enough: after a crash the state may be older than the
        // log, and openraft re-applies the committed entries after it (a
        // follower purges its log only once an installed snapshot is durable:
        // see install_snapshot and vendor/README.md).
        let claims = state
            .claims
            .changes_since(claims_before)
            .map_err(sm_write_err)?;
        self.replace_state(state, claims, Vec::new(), Durability::Buffered)
            .await?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RegionNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let mut state: RegionState = decode_snapshot_data(&data).map_err(snapshot_err)?;
        #[cfg(feature = "planted-bugs")]
        {
            use crate::group::planted::{on, INSTALL_FAILS};
            if on(&INSTALL_FAILS) {
                return Err(snapshot_err("planted bug: the install fails"));
            }
        }
        // The meta is authoritative for what the snapshot covers.
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let snapshot_op = WriteOp::Put {
            column: Column::Snapshot,
            key: SNAPSHOT.to_vec(),
            value: codec::encode(&stored).map_err(snapshot_err)?,
        };
        // Synced, state and snapshot in one batch: openraft answers the
        // leader once this returns, and purges the log the snapshot covers;
        // after a crash the node must resume from this snapshot, never from
        // an older state with the log it needs purged (issue 11, bug 3).
        let claims = state.claims.rewrite().map_err(snapshot_err)?;
        self.replace_state(state, claims, vec![snapshot_op], Durability::Sync)
            .await
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        match self
            .store
            .get(Column::Snapshot, SNAPSHOT)
            .map_err(sm_read_err)?
        {
            Some(bytes) => {
                let stored: StoredSnapshot = codec::decode(&bytes).map_err(sm_read_err)?;
                Ok(Some(Snapshot {
                    meta: stored.meta,
                    snapshot: Box::new(Cursor::new(stored.data)),
                }))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod command_tests {
    use mesh_types::agent::{AgentKind, Manifest};
    use mesh_types::Region;

    use super::*;

    fn manifest(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.into(),
            version: version.into(),
            kind: AgentKind::Echo,
            models: vec![],
            dataset: None,
            regions: vec![Region::parse("eu-west").expect("region")],
            concurrency: 4,
            latency_budget_ms: 100,
        }
    }

    fn grant(agent: &str, node: &str, after_epoch: u64) -> RegionCommand {
        RegionCommand::GrantLease {
            agent: agent.into(),
            node: node.into(),
            after_epoch,
        }
    }

    #[test]
    fn leases_are_granted_by_compare_and_set_on_the_epoch() {
        let mut state = RegionState::default();
        assert_eq!(
            apply_command(&mut state, 1, grant("echo", "a", 0)),
            RegionResponse::LeaseRefused { epoch: 0 },
            "an agent that is not deployed"
        );
        apply_command(
            &mut state,
            2,
            RegionCommand::DeployAgent(manifest("echo", "1")),
        );
        assert_eq!(
            apply_command(&mut state, 3, grant("echo", "a", 0)),
            RegionResponse::LeaseGranted { epoch: 1 }
        );
        // Two placers saw epoch 1: the first wins, the second is fenced off.
        assert_eq!(
            apply_command(&mut state, 4, grant("echo", "b", 1)),
            RegionResponse::LeaseGranted { epoch: 2 }
        );
        assert_eq!(
            apply_command(&mut state, 5, grant("echo", "c", 1)),
            RegionResponse::LeaseRefused { epoch: 2 }
        );
        let lease = state.agents["echo"].lease.clone().expect("lease");
        assert_eq!(
            (lease.node.as_str(), lease.epoch, lease.granted_at),
            ("b", 2, 4)
        );
        // A new version keeps the lease; removal drops it.
        assert_eq!(
            apply_command(
                &mut state,
                6,
                RegionCommand::DeployAgent(manifest("echo", "2"))
            ),
            RegionResponse::AgentDeployed { version: 6 }
        );
        assert_eq!(state.agents["echo"].manifest.version, "2");
        assert_eq!(state.agents["echo"].epoch, 2);
        assert_eq!(
            apply_command(&mut state, 7, RegionCommand::RemoveAgent("echo".into())),
            RegionResponse::AgentRemoved { found: true }
        );
        assert_eq!(
            apply_command(&mut state, 8, RegionCommand::RemoveAgent("echo".into())),
            RegionResponse::AgentRemoved { found: false }
        );
        // Deployed again: its epochs go on, never reused.
        apply_command(
            &mut state,
            9,
            RegionCommand::DeployAgent(manifest("echo", "3")),
        );
        assert_eq!(
            apply_command(&mut state, 10, grant("echo", "a", 2)),
            RegionResponse::LeaseGranted { epoch: 3 }
        );
    }

    fn old_policy() -> PolicyV1 {
        PolicyV1 {
            residency: vec![crate::types::ResidencyRuleV1 {
                tag: "pii-eu".into(),
                regions: vec![Region::parse("eu-west").expect("region")],
            }],
            models: vec![],
            rate_limits: Default::default(),
        }
    }

    #[test]
    fn a_state_stored_by_the_build_before_agents_still_opens() {
        #[derive(Serialize)]
        struct V1 {
            last_applied: Option<LogId<NodeId>>,
            membership: StoredMembership<NodeId, RegionNode>,
            policy: Option<PolicyV1>,
            policy_version: u64,
        }
        let bytes = codec::encode(&V1 {
            last_applied: None,
            membership: StoredMembership::default(),
            policy: Some(old_policy()),
            policy_version: 42,
        })
        .expect("encode");
        let state = decode_state_before_v3(&bytes).expect("decodes");
        assert_eq!(state.policy_version, 42);
        assert_eq!(state.policy, Some(old_policy().into()));
        assert!(state.agents.is_empty());
        let now = encode_snapshot_data(&state).expect("encode");
        assert_eq!(decode_snapshot_data(&now).expect("decodes"), state);
        assert!(decode_snapshot_data(&now[..now.len() / 2]).is_err());
        // An old build's snapshot data (no magic) still decodes.
        assert_eq!(decode_snapshot_data(&bytes).expect("decodes"), state);
    }

    /// Policies gained result regions (issue 13): the log entries and the
    /// state that builds before wrote still decode, and the state moves to
    /// its new key when the node opens.
    #[test]
    fn old_policy_entries_and_an_old_state_open_after_result_regions() {
        #[derive(Serialize)]
        enum OldCommand {
            SetPolicy(PolicyV1),
            #[allow(dead_code)]
            SetPolicies(Vec<PolicyV1>),
        }
        let bytes = codec::encode(&OldCommand::SetPolicy(old_policy())).expect("encode");
        let command: RegionCommand = codec::decode(&bytes).expect("an old entry decodes");
        let mut state = RegionState::default();
        apply_command(&mut state, 5, command);
        let policy = state.policy.clone().expect("applied");
        assert_eq!(policy.residency[0].tag, "pii-eu");
        assert!(policy.residency[0].results.is_empty());
        assert_eq!(state.policy_version, 5);

        #[derive(Serialize)]
        struct V2 {
            last_applied: Option<LogId<NodeId>>,
            membership: StoredMembership<NodeId, RegionNode>,
            policy: Option<PolicyV1>,
            policy_version: u64,
            agents: BTreeMap<String, AgentEntry>,
            datasets: BTreeMap<String, Dataset>,
            retired_epochs: BTreeMap<String, u64>,
        }
        let old_state = codec::encode(&V2 {
            last_applied: None,
            membership: StoredMembership::default(),
            policy: Some(old_policy()),
            policy_version: 5,
            agents: BTreeMap::new(),
            datasets: BTreeMap::new(),
            retired_epochs: BTreeMap::new(),
        })
        .expect("encode");
        let store: Arc<dyn Store> = Arc::new(mesh_store::MemStore::default());
        store
            .write(
                vec![WriteOp::Put {
                    column: Column::StateMachine,
                    key: STATE_BEFORE_V3.to_vec(),
                    value: old_state,
                }],
                Durability::Sync,
            )
            .expect("write");
        let opened = RegionStateMachine::open(store.clone())
            .expect("opens")
            .state();
        assert_eq!(opened.policy, Some(policy));
        assert!(store
            .get(Column::StateMachine, STATE_BEFORE_V3)
            .expect("read")
            .is_none());
        let again = RegionStateMachine::open(store).expect("reopens").state();
        assert_eq!(again, opened);
    }

    #[test]
    fn a_state_and_a_snapshot_of_the_build_before_replica_sets_still_open() {
        #[derive(Serialize)]
        struct V3 {
            last_applied: Option<LogId<NodeId>>,
            membership: StoredMembership<NodeId, RegionNode>,
            policy: Option<Policy>,
            policy_version: u64,
            agents: BTreeMap<String, AgentEntry>,
            datasets: BTreeMap<String, Dataset>,
            retired_epochs: BTreeMap<String, u64>,
            claims: Claims,
        }
        let mut agents = BTreeMap::new();
        agents.insert(
            "c".to_owned(),
            AgentEntry {
                manifest: manifest("c", "1"),
                deployed_at: 3,
                lease: None,
                epoch: 4,
            },
        );
        let v3 = V3 {
            last_applied: None,
            membership: StoredMembership::default(),
            policy: Some(Policy::default()),
            policy_version: 2,
            agents: agents.clone(),
            datasets: BTreeMap::new(),
            retired_epochs: BTreeMap::new(),
            claims: Claims::default(),
        };
        let bytes = codec::encode(&v3).expect("encode");
        let mut snapshot = SNAPSHOT_MAGIC_V3.to_vec();
        snapshot.extend(&bytes);
        let from_snapshot = decode_snapshot_data(&snapshot).expect("an AMS3 snapshot decodes");
        assert_eq!(from_snapshot.agents, agents);
        let store: Arc<dyn Store> = Arc::new(mesh_store::MemStore::default());
        store
            .write(
                vec![WriteOp::Put {
                    column: Column::StateMachine,
                    key: STATE_V3.to_vec(),
                    value: bytes,
                }],
                Durability::Sync,
            )
            .expect("write");
        let opened = RegionStateMachine::open(store.clone())
            .expect("opens")
            .state();
        assert_eq!(opened.agents, agents);
        assert_eq!(opened.policy_version, 2);
        assert!(store
            .get(Column::StateMachine, STATE_V3)
            .expect("read")
            .is_none());
        let again = RegionStateMachine::open(store).expect("reopens").state();
        assert_eq!(again, opened);
    }

    #[test]
    fn only_the_lease_holder_names_its_replicas() {
        let mut state = RegionState::default();
        apply_command(
            &mut state,
            1,
            RegionCommand::DeployAgent(manifest("c", "1")),
        );
        apply_command(&mut state, 2, grant("c", "a", 0));
        let set = |node: &str, epoch: u64| RegionCommand::SetReplicas {
            agent: "c".into(),
            node: node.into(),
            epoch,
            replicas: vec!["x".into(), "y".into()],
        };
        assert!(matches!(
            apply_command(&mut state, 3, set("b", 1)),
            RegionResponse::ClaimRefused { .. }
        ));
        assert_eq!(
            apply_command(&mut state, 4, set("a", 1)),
            RegionResponse::ReplicasSet { index: 4 }
        );
        assert_eq!(
            state.replicas["c"].nodes,
            vec!["x".to_owned(), "y".to_owned()]
        );
        apply_command(&mut state, 5, grant("c", "b", 1));
        assert!(
            matches!(
                apply_command(&mut state, 6, set("a", 1)),
                RegionResponse::ClaimRefused { .. }
            ),
            "the old host cannot change them after its lease moved"
        );
        assert_eq!(
            state.replicas["c"].host, "a",
            "kept for the new host to restore from"
        );
        apply_command(&mut state, 7, RegionCommand::RemoveAgent("c".into()));
        assert!(state.replicas.is_empty());
    }

    #[test]
    fn datasets_are_registered_and_replaced_by_name() {
        let mut state = RegionState::default();
        let docs = Dataset {
            name: "docs".into(),
            node: "a".into(),
            tags: vec!["pii-eu".into()],
            documents: 3,
            embed_model_sha256: "e".repeat(64),
        };
        assert_eq!(
            apply_command(&mut state, 9, RegionCommand::RegisterDataset(docs.clone())),
            RegionResponse::DatasetRegistered { version: 9 }
        );
        let more = Dataset {
            documents: 5,
            ..docs
        };
        apply_command(&mut state, 10, RegionCommand::RegisterDataset(more.clone()));
        assert_eq!(state.datasets["docs"], more);
        // Policy writes still work alongside.
        apply_command(&mut state, 11, RegionCommand::SetPolicy(Policy::default()));
        assert_eq!(state.policy_version, 11);
    }

    fn claim(task: &str, node: &str, epoch: u64, at_ms: u64) -> RegionCommand {
        RegionCommand::ClaimTask {
            agent: "echo".into(),
            task_id: task.into(),
            node: node.into(),
            epoch,
            at_ms,
        }
    }

    #[test]
    fn a_task_id_is_claimed_once_and_only_by_the_lease_holder() {
        let mut state = RegionState::default();
        apply_command(
            &mut state,
            1,
            RegionCommand::DeployAgent(manifest("echo", "1")),
        );
        assert!(matches!(
            apply_command(&mut state, 2, claim("t1", "a", 1, 0)),
            RegionResponse::ClaimRefused { lease: None }
        ));
        apply_command(&mut state, 3, grant("echo", "a", 0));
        assert_eq!(
            apply_command(&mut state, 4, claim("t1", "a", 1, 0)),
            RegionResponse::TaskClaimed { index: 4 }
        );
        // The host's own retry is told it holds the claim.
        assert_eq!(
            apply_command(&mut state, 5, claim("t1", "a", 1, 0)),
            RegionResponse::TaskAlreadyClaimed {
                agent: "echo".into(),
                node: "a".into(),
                epoch: 1
            }
        );
        // The agent moves; the old host is fenced off.
        apply_command(&mut state, 6, grant("echo", "b", 1));
        assert!(matches!(
            apply_command(&mut state, 7, claim("t2", "a", 1, 0)),
            RegionResponse::ClaimRefused {
                lease: Some(Lease { epoch: 2, .. })
            }
        ));
        // Before failover, an old epoch's claim stayed (old log entries
        // still apply so).
        let v1 = RegionCommand::ClaimTaskV1 {
            agent: "echo".into(),
            task_id: "t1".into(),
            node: "b".into(),
            epoch: 2,
            at_ms: 0,
        };
        assert_eq!(
            apply_command(&mut state, 8, v1),
            RegionResponse::TaskAlreadyClaimed {
                agent: "echo".into(),
                node: "a".into(),
                epoch: 1
            }
        );
        // The new lease holder takes over what the old epoch claimed (the
        // old host cannot have answered it: see `ClaimTask`); nobody else
        // does, and another agent's claim is never taken.
        assert!(matches!(
            apply_command(&mut state, 9, claim("t1", "c", 2, 0)),
            RegionResponse::TaskAlreadyClaimed { .. }
        ));
        assert_eq!(
            apply_command(&mut state, 10, claim("t1", "b", 2, 0)),
            RegionResponse::TaskTakenOver {
                index: 10,
                node: "a".into(),
                epoch: 1
            }
        );
        assert_eq!(
            apply_command(&mut state, 11, claim("t1", "b", 2, 0)),
            RegionResponse::TaskAlreadyClaimed {
                agent: "echo".into(),
                node: "b".into(),
                epoch: 2
            }
        );
        assert_eq!(
            apply_command(&mut state, 12, claim("t2", "b", 2, 0)),
            RegionResponse::TaskClaimed { index: 12 }
        );
        apply_command(
            &mut state,
            13,
            RegionCommand::DeployAgent(manifest("other", "1")),
        );
        apply_command(&mut state, 14, grant("other", "b", 0));
        let other = RegionCommand::ClaimTask {
            agent: "other".into(),
            task_id: "t2".into(),
            node: "b".into(),
            epoch: 1,
            at_ms: 0,
        };
        assert!(matches!(
            apply_command(&mut state, 15, other),
            RegionResponse::TaskAlreadyClaimed { .. }
        ));
    }

    #[test]
    fn a_taken_over_claim_is_kept_for_its_new_window_and_stored_once() {
        let mut state = RegionState::default();
        apply_command(
            &mut state,
            1,
            RegionCommand::DeployAgent(manifest("echo", "1")),
        );
        apply_command(&mut state, 2, grant("echo", "a", 0));
        apply_command(&mut state, 3, claim("t", "a", 1, 1_000));
        apply_command(&mut state, 4, grant("echo", "b", 1));
        let at = 1_000 + CLAIMS_KEPT_MS - CLAIM_CLOCK_STEP_MAX_MS;
        // Walk the clock to `at`, 5 s a claim.
        let mut index = 5;
        let mut now = 1_000;
        while now < at {
            now = (now + CLAIM_CLOCK_STEP_MAX_MS).min(at);
            apply_command(&mut state, index, claim(&format!("s{index}"), "b", 2, now));
            index += 1;
        }
        assert_eq!(
            apply_command(&mut state, index, claim("t", "b", 2, at)),
            RegionResponse::TaskTakenOver {
                index,
                node: "a".into(),
                epoch: 1
            }
        );
        let held = state.claims.len();
        // Past the first claim's window: its old place goes, the claim stays.
        apply_command(
            &mut state,
            index + 1,
            claim("u", "b", 2, at + 2 * CLAIM_CLOCK_STEP_MAX_MS),
        );
        assert_eq!(state.claims.get("t").map(|c| c.epoch), Some(2));
        assert_eq!(
            state
                .claims
                .iter()
                .filter(|(id, _)| id.as_str() == "t")
                .count(),
            1,
            "listed once"
        );
        assert!(state.claims.len() <= held + 1);
        // Past its own window it goes too.
        let mut later = at + 2 * CLAIM_CLOCK_STEP_MAX_MS;
        let mut i = index + 2;
        while later <= at + CLAIMS_KEPT_MS + CLAIM_CLOCK_STEP_MAX_MS {
            later += CLAIM_CLOCK_STEP_MAX_MS;
            apply_command(&mut state, i, claim(&format!("w{i}"), "b", 2, later));
            i += 1;
        }
        assert!(state.claims.get("t").is_none());
    }

    #[test]
    fn claims_are_forgotten_past_the_window_oldest_first() {
        let mut state = RegionState::default();
        apply_command(
            &mut state,
            1,
            RegionCommand::DeployAgent(manifest("echo", "1")),
        );
        apply_command(&mut state, 2, grant("echo", "a", 0));
        apply_command(&mut state, 3, claim("old", "a", 1, 1_000));
        // The clock moves 5 s a claim, to exactly the window's length.
        let steps = CLAIMS_KEPT_MS / CLAIM_CLOCK_STEP_MAX_MS;
        for k in 1..=steps {
            let at = 1_000 + k * CLAIM_CLOCK_STEP_MAX_MS;
            apply_command(&mut state, 3 + k, claim(&format!("s{k}"), "a", 1, at));
        }
        assert!(
            state.claims.get("old").is_some(),
            "exactly the window: kept"
        );
        let mid = format!("s{steps}");
        // A clock that jumps a day ahead moves the window 5 s only.
        apply_command(
            &mut state,
            4 + steps,
            claim("new", "a", 1, 1_000 + 86_400_000),
        );
        assert!(state.claims.get("old").is_none(), "past the window");
        assert!(
            state.claims.get("s1").is_some(),
            "the jump did not flush the window"
        );
        assert!(state.claims.get(&mid).is_some() && state.claims.get("new").is_some());
        for i in 0..CLAIMS_MAX as u64 {
            apply_command(
                &mut state,
                1_000 + i,
                claim(&format!("t{i}"), "a", 1, 1_000 + CLAIMS_KEPT_MS),
            );
        }
        assert_eq!(state.claims.len(), CLAIMS_MAX);
        assert!(state.claims.get(&mid).is_none() && state.claims.get("new").is_none());
        assert!(state.claims.get("t0").is_some());
    }

    #[tokio::test]
    async fn claims_are_stored_one_key_each_and_survive_a_restart() {
        use openraft::{CommittedLeaderId, EntryPayload};
        let store: Arc<dyn Store> = Arc::new(mesh_store::MemStore::default());
        let mut sm = RegionStateMachine::open(store.clone()).expect("opens");
        let entry = |index: u64, command: RegionCommand| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        };
        sm.apply(vec![
            entry(1, RegionCommand::DeployAgent(manifest("echo", "1"))),
            entry(2, grant("echo", "a", 0)),
            entry(3, claim("old", "a", 1, 1_000)),
        ])
        .await
        .expect("applies");
        // The window's clock moves on, 5 s a claim, past "old".
        let steps = CLAIMS_KEPT_MS / CLAIM_CLOCK_STEP_MAX_MS + 1;
        let mut batch: Vec<_> = (1..=steps)
            .map(|k| {
                let at = 1_000 + k * CLAIM_CLOCK_STEP_MAX_MS;
                entry(3 + k, claim(&format!("s{k}"), "a", 1, at))
            })
            .collect();
        batch.push(entry(4 + steps, claim("kept", "a", 1, 999_999_999)));
        batch.push(entry(5 + steps, claim("kept", "a", 1, 999_999_999)));
        sm.apply(batch).await.expect("applies");
        let mut keys = 0;
        store
            .scan(
                Column::StateMachine,
                CLAIM_PREFIX,
                Some(CLAIM_END),
                &mut |_, _| {
                    keys += 1;
                    true
                },
            )
            .expect("scans");
        assert_eq!(
            keys as usize,
            sm.state().claims.len(),
            "one key per claim held: the forgotten ones' keys are deleted"
        );
        let reopened = RegionStateMachine::open(store).expect("reopens").state();
        // The same claims and the same window clock (kept in the blob).
        assert_eq!(reopened.claims, sm.state().claims);
        assert_eq!(
            reopened.claims.get("kept").map(|c| c.index),
            Some(4 + steps)
        );
        assert!(reopened.claims.get("old").is_none());
    }

    #[test]
    fn a_state_stored_by_the_build_before_claims_still_opens() {
        #[derive(Serialize)]
        struct V2 {
            last_applied: Option<LogId<NodeId>>,
            membership: StoredMembership<NodeId, RegionNode>,
            policy: Option<PolicyV1>,
            policy_version: u64,
            agents: BTreeMap<String, AgentEntry>,
            datasets: BTreeMap<String, Dataset>,
            retired_epochs: BTreeMap<String, u64>,
        }
        let mut agents = BTreeMap::new();
        agents.insert(
            "echo".to_owned(),
            AgentEntry {
                manifest: manifest("echo", "1"),
                deployed_at: 3,
                lease: None,
                epoch: 2,
            },
        );
        let bytes = codec::encode(&V2 {
            last_applied: None,
            membership: StoredMembership::default(),
            policy: None,
            policy_version: 7,
            agents,
            datasets: BTreeMap::new(),
            retired_epochs: BTreeMap::new(),
        })
        .expect("encode");
        let state = decode_state_before_v3(&bytes).expect("decodes");
        assert_eq!((state.policy_version, state.agents["echo"].epoch), (7, 2));
        assert!(state.claims.is_empty());
    }
}
