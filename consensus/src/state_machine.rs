//! The region state machine: the applied policy and its version, the last
//! applied log id and membership, persisted as one versioned value in
//! `Column::StateMachine`; the current snapshot in `Column::Snapshot`.

use std::io::Cursor;
use std::sync::Arc;

use mesh_store::{Column, Durability, Store, WriteOp};
use mesh_types::policy::Policy;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::log_sync::LogSync;
use crate::types::{NodeId, RegionCommand, RegionNode, RegionResponse, TypeConfig};

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
            Some(bytes) => codec::decode(&bytes).map_err(sm_read_err)?,
            None => RegionState::default(),
        };
        if let Some(bytes) = store.get(Column::Snapshot, SNAPSHOT).map_err(sm_read_err)? {
            let stored: StoredSnapshot = codec::decode(&bytes).map_err(sm_read_err)?;
            if stored.meta.last_log_id > state.last_applied {
                let mut from_snapshot: RegionState =
                    codec::decode(&stored.data).map_err(sm_read_err)?;
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
                    let last = match command {
                        RegionCommand::SetPolicy(policy) => Some(policy),
                        RegionCommand::SetPolicies(policies) => policies.into_iter().last(),
                    };
                    if let Some(policy) = last {
                        state.policy = Some(policy);
                        state.policy_version = entry.log_id.index;
                    }
                    RegionResponse::PolicySet {
                        version: state.policy_version,
                    }
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
