//! The region state machine: the applied policy and its version, the
//! deployed agents with their leases, the datasets, the last applied log id
//! and membership, persisted as one versioned value in
//! `Column::StateMachine`; the current snapshot in `Column::Snapshot`.

use std::collections::BTreeMap;
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
use crate::types::{Dataset, Lease, NodeId, RegionCommand, RegionNode, RegionResponse, TypeConfig};

const STATE: &[u8] = b"state";
const SNAPSHOT: &[u8] = b"current";

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

/// Applies one command to `state` at log index `index`.
fn apply_command(state: &mut RegionState, index: u64, command: RegionCommand) -> RegionResponse {
    match command {
        RegionCommand::SetPolicy(policy) => apply_policies(state, index, vec![policy]),
        RegionCommand::SetPolicies(policies) => apply_policies(state, index, policies),
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
        } => match state.agents.get_mut(&agent) {
            None => RegionResponse::LeaseRefused { epoch: 0 },
            Some(entry) if entry.epoch != after_epoch => {
                RegionResponse::LeaseRefused { epoch: entry.epoch }
            }
            Some(entry) => {
                let epoch = entry.epoch.saturating_add(1);
                entry.epoch = epoch;
                entry.lease = Some(Lease {
                    node,
                    epoch,
                    granted_at: index,
                });
                RegionResponse::LeaseGranted { epoch }
            }
        },
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
    policy: Option<Policy>,
    policy_version: u64,
}

/// Decodes a stored region state, of this build or of the one before
/// (which had no agents or datasets), so a node's store survives the upgrade.
fn decode_state(bytes: &[u8]) -> Result<RegionState, codec::CodecError> {
    match codec::decode::<RegionState>(bytes) {
        Ok(state) => Ok(state),
        Err(e) => match codec::decode::<RegionStateV1>(bytes) {
            Ok(v1) => Ok(RegionState {
                last_applied: v1.last_applied,
                membership: v1.membership,
                policy: v1.policy,
                policy_version: v1.policy_version,
                ..RegionState::default()
            }),
            Err(_) => Err(e),
        },
    }
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
        let mut state = match store
            .get(Column::StateMachine, STATE)
            .map_err(sm_read_err)?
        {
            Some(bytes) => decode_state(&bytes).map_err(sm_read_err)?,
            None => RegionState::default(),
        };
        if let Some(bytes) = store.get(Column::Snapshot, SNAPSHOT).map_err(sm_read_err)? {
            let stored: StoredSnapshot = codec::decode(&bytes).map_err(sm_read_err)?;
            if stored.meta.last_log_id > state.last_applied {
                let mut from_snapshot: RegionState =
                    decode_state(&stored.data).map_err(sm_read_err)?;
                from_snapshot.last_applied = stored.meta.last_log_id;
                from_snapshot.membership = stored.meta.last_membership;
                state = from_snapshot;
            }
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

    async fn replace_state(
        &self,
        state: RegionState,
        extra: Vec<WriteOp>,
        durability: Durability,
    ) -> StorageResult<()> {
        let mut ops = vec![WriteOp::Put {
            column: Column::StateMachine,
            key: STATE.to_vec(),
            value: codec::encode(&state).map_err(sm_write_err)?,
        }];
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
        let data = codec::encode(&state).map_err(snapshot_err)?;
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
        self.replace_state(state, Vec::new(), Durability::Buffered)
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
        let mut state: RegionState = codec::decode(&data).map_err(snapshot_err)?;
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
        self.replace_state(state, vec![snapshot_op], Durability::Sync)
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

    #[test]
    fn a_state_stored_by_the_build_before_agents_still_opens() {
        #[derive(Serialize)]
        struct V1 {
            last_applied: Option<LogId<NodeId>>,
            membership: StoredMembership<NodeId, RegionNode>,
            policy: Option<Policy>,
            policy_version: u64,
        }
        let bytes = codec::encode(&V1 {
            last_applied: None,
            membership: StoredMembership::default(),
            policy: Some(Policy::default()),
            policy_version: 42,
        })
        .expect("encode");
        let state = decode_state(&bytes).expect("decodes");
        assert_eq!(state.policy_version, 42);
        assert!(state.agents.is_empty());
        let now = codec::encode(&state).expect("encode");
        assert_eq!(decode_state(&now).expect("decodes"), state);
        assert!(decode_state(&now[..now.len() / 2]).is_err());
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
}
