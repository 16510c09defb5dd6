//! The network of one node: a libp2p swarm plus the membership engine it feeds.
//!
//! ```text
//!   TCP/QUIC ── noise ── yamux ──┐
//!                                ├─ gossipsub  "agentmesh/members/1": signed NodeRecords
//!                                ├─ identify   listen addrs ──> kademlia
//!                                ├─ kademlia   finds every node from one bootstrap peer
//!                                ├─ mdns       (optional) LAN discovery
//!                                ├─ sync       push-pull of the member view when two nodes connect
//!                                ├─ raft       Raft RPCs of the region group: one long-lived stream
//!                                │            per peer (/agentmesh/raft/2, see raft_link)
//!                                └─ forward    API requests carried node to node, one stream each
//!                                             (/agentmesh/forward/1, see forward)
//!
//!   NetworkActor (owns the Swarm and the Membership engine)
//!        ▲  bounded mpsc of (Request, oneshot)       tick ──> Membership::handle
//!        │                                            gossip record ──> verify ──> Membership::handle
//!   Network handle (cloneable; used by the HTTP API)  Command::Announce ──> seal ──> publish
//! ```
//!
//! [`identity`] keeps the node's ed25519 key in its data dir, [`envelope`]
//! signs and checks records, [`dialer`] decides whom to dial and when
//! (pure, tested without IO), [`actor`] is the async shell.

pub mod actor;
pub mod admission;
pub mod codec;
pub mod config;
pub mod dialer;
pub mod envelope;
pub mod forward;
pub mod identity;
pub mod raft_link;
pub mod sync;

pub use actor::{Network, NetworkError, Ready, Snapshot, Started};
pub use config::Config;
pub use forward::{ForwardError, ForwardRequest, ForwardResponse, InboundForward};
pub use raft_link::{InboundRpc, RpcReply, RAFT_PROTOCOL};
