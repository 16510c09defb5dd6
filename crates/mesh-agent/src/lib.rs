//! Agents and tasks, the parts that are pure decisions (issue 13): tested
//! without IO and run as they are by the node and by the simulator.
//!
//! ```text
//!   agent.toml ──> manifest::parse ──> manifest::check(registry, policy, region) ──> Raft
//!   region's nodes + datasets ──> placement::place(manifest) ──> node (a lease, epoch + 1)
//!   executed task ──> audit::Chain::append(record) ──> sealed record (hash of the one before)
//! ```

pub mod audit;
pub mod manifest;
pub mod placement;

pub use audit::{AuditRecord, Chain, ChainError, SealedRecord};
pub use manifest::{AgentKind, Manifest, ModelInfo, ModelRef};
pub use placement::{place, should_move, Candidate};
