//! The openraft type configuration of a region group.

use std::fmt;
use std::io::Cursor;

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
    /// Replace the region policy. The caller MUST have validated it.
    SetPolicy(Policy),
    /// Concurrent policy writes committed together (see `crate::batcher`):
    /// applied in order at one log index; the last one is in force.
    SetPolicies(Vec<Policy>),
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
