//! Raft RPCs between the nodes of a region, over any [`Transport`] (in a
//! node, a long-lived libp2p stream per peer, `/agentmesh/raft/2`, see
//! `mesh_net::raft_link`; in tests and the simulator, in-process links). Messages are [`crate::codec`] values: a version byte, then
//! bincode 2. Snapshots travel as openraft's chunked InstallSnapshot RPCs.

use std::future::Future;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::types::{NodeId, RegionNode, TypeConfig};
use crate::RegionGroup;

/// Sends one request to a peer and returns its answer. Implementations MUST
/// time out (a dead peer must not hang Raft) and MUST NOT retry: Raft retries.
pub trait Transport: Clone + Send + Sync + 'static {
    /// `peer_id` is the base58 libp2p peer id of the target.
    fn call(
        &self,
        peer_id: &str,
        request: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}

/// A Raft request on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Elections.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A bootstrap's voter set, from the voter that will initialize the
    /// group (the proposer), to every other voter before it does: each
    /// voter promises one set only (see `RegionGroup::initialize`).
    Bootstrap(BootstrapPromise),
    /// The proposer gave a bootstrap up before initializing anything: the
    /// voters it asked may promise another set.
    BootstrapRelease(BootstrapPromise),
}

/// A voter set, sorted, the voter that proposed it, and which attempt of
/// that proposer's this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapPromise {
    /// Peer ids of the voters, sorted, no repeats.
    pub voters: Vec<String>,
    /// The voter that will initialize the group with them (the smallest).
    pub proposer: String,
    /// Drawn anew by each attempt: a late release of a failed attempt must
    /// not undo the promise a later attempt of the same set got.
    pub attempt: u64,
}

/// A Raft answer on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To [`RaftRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRequest::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The receiver could not decode the request.
    Refused(String),
    /// To [`RaftRequest::Bootstrap`] and [`RaftRequest::BootstrapRelease`]:
    /// `Err` says why the voter refused.
    Bootstrap(Result<(), String>),
}

/// Answers one encoded request from peer `from` (the peer id its
/// transport authenticated) with the local group; never fails (errors
/// travel back as [`RaftReply::Refused`] or inside the reply). A request
/// must come from the node it speaks for: AppendEntries and InstallSnapshot
/// from the leader of their vote, Vote from its candidate, a bootstrap
/// request from its proposer (issue 12, finding 2: anyone could impersonate
/// the leader). Whether the sender is a member of the group is not checked
/// yet (see the closing note of 2026-12-04).
pub async fn serve(group: &RegionGroup, from: &str, request: &[u8]) -> Vec<u8> {
    let raft = group.raft();
    let decoded = codec::decode::<RaftRequest>(request);
    if let Ok(request) = &decoded {
        if let Err(refusal) = speaks_for_itself(request, from) {
            tracing::debug!(%from, %refusal, "Raft request refused");
            return encode_reply(RaftReply::Refused(refusal));
        }
    }
    let reply = match decoded {
        Ok(RaftRequest::AppendEntries(rpc)) => {
            RaftReply::AppendEntries(raft.append_entries(rpc).await)
        }
        Ok(RaftRequest::Vote(rpc)) => RaftReply::Vote(raft.vote(rpc).await),
        Ok(RaftRequest::InstallSnapshot(rpc)) => match group.admit_snapshot_chunk(&rpc) {
            // As openraft answers a chunk out of order: the sender starts
            // the snapshot again from offset 0 at once.
            Err(refusal) => {
                tracing::debug!(%refusal, "snapshot chunk refused");
                let id = rpc.meta.snapshot_id.clone();
                RaftReply::InstallSnapshot(Err(RaftError::APIError(
                    InstallSnapshotError::SnapshotMismatch(openraft::error::SnapshotMismatch {
                        expect: openraft::SnapshotSegmentId {
                            id: id.clone(),
                            offset: 0,
                        },
                        got: openraft::SnapshotSegmentId {
                            id,
                            offset: rpc.offset,
                        },
                    }),
                )))
            }
            Ok(()) => {
                let chunk = (
                    rpc.meta.snapshot_id.clone(),
                    rpc.offset,
                    rpc.data.len(),
                    rpc.done,
                );
                let vote = rpc.vote;
                let result = raft.install_snapshot(rpc).await;
                // openraft answers Ok, with its own vote, a chunk whose vote
                // is below it: that one it ignored.
                let taken = result.as_ref().is_ok_and(|r| vote >= r.vote);
                group.snapshot_chunk_done(chunk, taken);
                RaftReply::InstallSnapshot(result)
            }
        },
        Ok(RaftRequest::Bootstrap(promise)) => RaftReply::Bootstrap(
            group
                .promise_bootstrap(&promise)
                .await
                .map_err(|e| e.to_string()),
        ),
        Ok(RaftRequest::BootstrapRelease(promise)) => RaftReply::Bootstrap(
            group
                .release_bootstrap(&promise)
                .await
                .map_err(|e| e.to_string()),
        ),
        Err(e) => RaftReply::Refused(e.to_string()),
    };
    encode_reply(reply)
}

/// The node a request speaks for must be the peer that sent it.
fn speaks_for_itself(request: &RaftRequest, from: &str) -> Result<(), String> {
    let sender = crate::types::node_id_of(from);
    // Only an elected leader replicates: its vote is committed. openraft
    // assumes so (an uncommitted one trips an assertion in the Raft core
    // that stops the node's Raft; found by fuzzing, issue 12).
    let uncommitted = match request {
        RaftRequest::AppendEntries(rpc) => !rpc.vote.is_committed(),
        RaftRequest::InstallSnapshot(rpc) => !rpc.vote.is_committed(),
        _ => false,
    };
    if uncommitted {
        return Err(
            "a replication request whose vote is not committed (only an elected leader replicates)"
                .into(),
        );
    }
    let (what, claimed) = match request {
        RaftRequest::AppendEntries(rpc) => ("AppendEntries", rpc.vote.leader_id().voted_for()),
        RaftRequest::InstallSnapshot(rpc) => ("InstallSnapshot", rpc.vote.leader_id().voted_for()),
        RaftRequest::Vote(rpc) => ("Vote", rpc.vote.leader_id().voted_for()),
        RaftRequest::Bootstrap(p) | RaftRequest::BootstrapRelease(p) => {
            return if p.proposer == from {
                Ok(())
            } else {
                Err(format!(
                    "a bootstrap request of {} sent by {from}",
                    p.proposer
                ))
            };
        }
    };
    if claimed == Some(sender) {
        Ok(())
    } else {
        Err(format!(
            "{what} speaks for node {claimed:?}, but {from} (node {sender}) sent it"
        ))
    }
}

/// The encoded answer that refuses a request, with why (for a node that
/// refuses a sender before decoding its request).
pub fn refusal(reason: &str) -> Vec<u8> {
    encode_reply(RaftReply::Refused(reason.to_owned()))
}

fn encode_reply(reply: RaftReply) -> Vec<u8> {
    codec::encode(&reply).unwrap_or_else(|e| {
        // A reply that does not encode is a bug; tell the caller rather than hang it.
        codec::encode(&RaftReply::Refused(format!("reply does not encode: {e}")))
            .unwrap_or_default()
    })
}

/// Creates one [`Client`] per target.
#[derive(Debug, Clone)]
pub struct Network<T> {
    transport: T,
}

impl<T: Transport> Network<T> {
    /// Raft networking over `transport`.
    pub fn new(transport: T) -> Self {
        Self { transport }
    }
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Client<T>;

    async fn new_client(&mut self, target: NodeId, node: &RegionNode) -> Self::Network {
        Client {
            target,
            peer_id: node.peer_id.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// Sends the RPCs of one replication stream.
#[derive(Debug)]
pub struct Client<T> {
    target: NodeId,
    peer_id: String,
    transport: T,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportFailure(String);

impl<T: Transport> Client<T> {
    async fn call<E: std::error::Error>(
        &self,
        request: RaftRequest,
    ) -> Result<RaftReply, RPCError<NodeId, RegionNode, RaftError<NodeId, E>>> {
        let bytes =
            codec::encode(&request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .transport
            .call(&self.peer_id, bytes)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&TransportFailure(e))))?;
        let reply: RaftReply =
            codec::decode(&answer).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let RaftReply::Refused(reason) = reply {
            return Err(RPCError::Network(NetworkError::new(&TransportFailure(
                format!("{} refused the request: {reason}", self.peer_id),
            ))));
        }
        Ok(reply)
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, RegionNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

fn unexpected<E: std::error::Error>(
    what: &str,
) -> RPCError<NodeId, RegionNode, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&TransportFailure(format!(
        "peer answered {what} with another kind of reply"
    ))))
}

impl<T: Transport> RaftNetwork<TypeConfig> for Client<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RegionNode, RaftError<NodeId>>>
    {
        match self.call(RaftRequest::AppendEntries(rpc)).await? {
            RaftReply::AppendEntries(result) => result.map_err(|e| self.remote(e)),
            _ => Err(unexpected("AppendEntries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RegionNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(RaftRequest::InstallSnapshot(rpc)).await? {
            RaftReply::InstallSnapshot(result) => result.map_err(|e| self.remote(e)),
            _ => Err(unexpected("InstallSnapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RegionNode, RaftError<NodeId>>> {
        match self.call(RaftRequest::Vote(rpc)).await? {
            RaftReply::Vote(result) => result.map_err(|e| self.remote(e)),
            _ => Err(unexpected("Vote")),
        }
    }
}
