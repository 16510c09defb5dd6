//! Region Raft groups. Each region's nodes form one openraft group that keeps
//! the region's policy (and, later, its agent directory) consistent.
//!
//! ```text
//!   policy apply ──> batcher ──> Raft::client_write(RegionCommand) ──> log (LogStore) ──> replicate
//!                                                              │ committed
//!                                                              ▼
//!                               RegionStateMachine::apply ──> RegionState { policy, policy_version }
//!   LogStore and RegionStateMachine persist through mesh_store::Store:
//!   rocksdb in a node, MemStore in tests and the simulator.
//! ```
//!
//! Why openraft 0.9 and not 0.10-alpha: 0.9 is the stable line with the v2
//! storage API (`RaftLogStorage` + `RaftStateMachine`) and its conformance
//! suite; 0.10 is still alpha. 0.9's `AsyncRuntime` is enough for the
//! simulator: [`runtime::MeshRuntime`] is tokio with a seedable RNG, and a
//! paused tokio clock drives openraft's timers. The one thing 0.10 has that
//! we need, a leader that replicates while its own log flush is in flight,
//! is a small patch to 0.9's core (vendor/README.md; [`log_sync`]).

// openraft's StorageError is large by design; every storage method returns it.
#![allow(clippy::result_large_err)]

pub mod batcher;
pub mod codec;
pub mod group;
pub mod housekeeping;
pub mod log_store;
pub mod log_sync;
pub mod rpc;
pub mod runtime;
pub mod state_machine;
pub mod types;

pub use batcher::PolicyApplied;
pub use group::{GroupError, RaftSettings, RegionGroup, RegionStatus};
pub use log_store::LogStore;
pub use log_sync::LogSync;
pub use state_machine::{AgentEntry, Claim, Claims, RegionState, RegionStateMachine};
pub use types::{
    Dataset, Lease, Move, MoveReason, PolicyV1, RegionCommand, RegionNode, RegionResponse,
    ReplicaSet, ResidencyRuleV1, TypeConfig,
};

#[cfg(test)]
mod suite;

#[cfg(test)]
mod group_tests;
