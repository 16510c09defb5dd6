//! The node record: what a node says about itself on the gossip topic, and the
//! member view that the membership engine derives from records.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Region, UnixMillis};

/// A node's identity as text: the base58 libp2p peer id of its ed25519 key.
/// Kept as a string here so that this crate needs no crypto; `mesh-net`
/// checks that it matches the key that signed the record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    /// The first characters after the common `12D3KooW` prefix, for tables.
    pub fn short(&self) -> &str {
        Self::short_str(&self.0)
    }

    /// [`NodeId::short`] of a peer id given as text.
    pub fn short_str(peer_id: &str) -> &str {
        let s = peer_id.strip_prefix("12D3KooW").unwrap_or(peer_id);
        s.get(..s.len().min(8)).unwrap_or(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A model a node holds, by content hash. Filled in by the models issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelAdvert {
    /// Registry name, e.g. `all-minilm-l6-v2`.
    pub name: String,
    /// Hex sha256 of the weights file.
    pub sha256: String,
}

/// How busy a node is, for placement. Filled in by the agents issue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Tasks running right now.
    pub tasks_running: u32,
    /// Agents active on the node.
    pub agents_active: u32,
}

/// A node's place in its region's Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftRole {
    /// Votes in elections and counts toward the quorum.
    Voter,
    /// Holds a replica of the region state, does not vote.
    Learner,
}

impl RaftRole {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Voter => "voter",
            Self::Learner => "learner",
        }
    }
}

/// What a node gossips about itself, on start and every announce interval.
///
/// Ordering: of two records from one node, the one with the higher `seq`
/// wins. `seq` is `(generation << 32) | counter`, where `generation` is
/// persisted in the data dir and bumped at every start, so a restarted node
/// always wins over its previous life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Who: must equal the peer id of the key that signed the record.
    pub node_id: NodeId,
    /// Where the node runs and whose policy it follows.
    pub region: Region,
    /// Multiaddrs the node can be dialed on.
    pub addrs: Vec<String>,
    /// `AGENTMESH_VERSION` of the sender.
    pub version: String,
    /// Wall clock of the sender when this process started.
    pub started_at_ms: UnixMillis,
    /// Monotonic across restarts; see the type docs.
    pub seq: u64,
    /// Wall clock of the sender when this record was made; records too far in
    /// the receiver's future are ignored.
    pub sent_at_ms: UnixMillis,
    /// True in the last record a node sends before it stops on purpose.
    pub leaving: bool,
    /// Models held (later issue).
    pub models: Vec<ModelAdvert>,
    /// Dataset names held (later issue).
    pub datasets: Vec<String>,
    /// Current load (later issue).
    pub load: Load,
    /// The API address its operator advertises to people (`--advertise-api`);
    /// nodes never use it: node-to-node requests go over libp2p.
    pub api: Option<String>,
    /// Role in its region's Raft group; `None` before the region is bootstrapped.
    pub raft: Option<RaftRole>,
}

/// Where a member stands in the local view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heard from within the suspicion timeout.
    Alive,
    /// Silent past the suspicion timeout; not yet declared dead.
    Suspect,
    /// Silent past the death timeout.
    Dead,
    /// Said it was leaving.
    Left,
}

impl MemberState {
    /// Every state, in display order.
    pub const ALL: [MemberState; 4] = [Self::Alive, Self::Suspect, Self::Dead, Self::Left];

    /// The lowercase name used in JSON, tables and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Dead => "dead",
            Self::Left => "left",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `GET /v1/members` and `agentmesh members --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    /// The member's peer id.
    pub peer_id: NodeId,
    /// Its region.
    pub region: Region,
    /// Alive, suspect, dead or left.
    pub state: MemberState,
    /// Its advertised multiaddrs.
    pub addrs: Vec<String>,
    /// Milliseconds since a fresh record from it arrived (0 for the local node).
    pub last_seen_ms: u64,
    /// Its agentmesh version.
    pub version: String,
    /// True for the node that answered.
    #[serde(default)]
    pub is_self: bool,
    /// Its HTTP API address.
    #[serde(default)]
    pub api: Option<String>,
    /// Its role in its region's Raft group, if the region is bootstrapped.
    #[serde(default)]
    pub raft: Option<RaftRole>,
    /// The models it holds (names; their hashes are in its record).
    #[serde(default)]
    pub models: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        NodeRecord {
            node_id: NodeId("12D3KooWAbCdEfGhIjKl".into()),
            region: Region::parse("eu-west").expect("valid"),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            version: "0.1.0".into(),
            started_at_ms: 1,
            seq: 2,
            sent_at_ms: 3,
            leaving: false,
            models: vec![ModelAdvert {
                name: "m".into(),
                sha256: "00".into(),
            }],
            datasets: vec!["d".into()],
            load: Load::default(),
            api: Some("127.0.0.1:7070".into()),
            raft: Some(RaftRole::Voter),
        }
    }

    #[test]
    fn record_round_trips_through_bincode() {
        let r = record();
        let bytes = bincode::serde::encode_to_vec(&r, bincode::config::standard()).expect("encode");
        let (back, _): (NodeRecord, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
        assert_eq!(back, r);
    }

    #[test]
    fn short_id_drops_the_common_prefix() {
        assert_eq!(record().node_id.short(), "AbCdEfGh");
        assert_eq!(NodeId("abc".into()).short(), "abc");
    }
}
