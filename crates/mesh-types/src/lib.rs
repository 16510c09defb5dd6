//! The vocabulary every agentmesh crate shares: node ids, region names, the
//! node record that nodes gossip, and the member states of the membership view.
//!
//! ```text
//!   node start ──> NodeRecord ──(signed by mesh-net)──> gossip topic
//!                                                          │
//!   membership engine <── verified NodeRecord <────────────┘
//!        │
//!        └──> MemberView { state: Alive | Suspect | Dead | Left } ──> HTTP API, CLI
//! ```
//!
//! No IO and no clocks here: time comes in as [`UnixMillis`] from the caller.

pub mod agent;
pub mod policy;
pub mod record;
pub mod region;

pub use record::{Load, MemberState, MemberView, ModelAdvert, NodeId, NodeRecord, RaftRole};
pub use region::{Region, RegionError};

/// Milliseconds since the Unix epoch. Every clock reading in agentmesh is passed
/// in as one of these, so the simulator can supply its own time.
pub type UnixMillis = u64;

/// The version of this build, carried in every node record.
pub const AGENTMESH_VERSION: &str = env!("CARGO_PKG_VERSION");
