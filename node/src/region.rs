//! The node's side of its region group: Raft RPCs in and out over the mesh,
//! the leader's housekeeping (learners in, dead voters out), and the
//! requests the API serves (bootstrap, policy, status).
//!
//! ```text
//!  mesh_net InboundRpc ──> serve(raft) ──> reply          MeshTransport ──> Network::rpc ──> peer
//!  every HOUSEKEEPING_INTERVAL:  gossip role ◄── group membership
//!                                leader: alive region members not in group ──> add_learner
//!                                leader: voter dead > replace_after ──> replace by a live learner
//! ```

use std::sync::Arc;
use std::time::Duration;

use consensus::housekeeping::{Action, Housekeeper};
use consensus::rpc::{serve, Transport};
use consensus::{GroupError, RaftSettings, RegionGroup};
use libp2p::PeerId;
use mesh_net::{InboundRpc, Network};
use mesh_types::{MemberState, MemberView, RaftRole, Region};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the leader checks for members to add or replace.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Inbound Raft RPCs answered at once; more wait in mesh-net's bounded queue.
const RPC_CONCURRENCY: usize = 64;

/// Raft RPCs over the mesh's libp2p connections. Logs a peer's link once
/// when it starts failing and once when it works again, never once per
/// retry (the leader retries a gone member many times a second).
#[derive(Debug, Clone)]
pub struct MeshTransport {
    network: Network,
    /// Peers whose last call failed.
    failing: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl MeshTransport {
    /// Raft RPCs over `network`.
    pub fn new(network: Network) -> Self {
        Self {
            network,
            failing: Arc::default(),
        }
    }

    fn note(&self, peer_id: &str, result: &Result<Vec<u8>, String>) {
        let Ok(mut failing) = self.failing.lock() else {
            return;
        };
        match result {
            Ok(_) => {
                if failing.remove(peer_id) {
                    info!(peer = %peer_id, "Raft calls to this peer work again");
                }
            }
            Err(e) => {
                // Bounded: one entry per peer of the region group.
                if failing.insert(peer_id.to_owned()) {
                    warn!(peer = %peer_id, error = %e, "Raft calls to this peer fail; logged again only once they work");
                }
            }
        }
    }
}

impl Transport for MeshTransport {
    async fn call(&self, peer_id: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let peer: PeerId = peer_id
            .parse()
            .map_err(|e| format!("bad peer id {peer_id}: {e}"))?;
        let result = self.network.rpc(peer, request).await;
        self.note(peer_id, &result);
        result
    }
}

/// Answers peers' Raft RPCs until the channel closes. Once this node is in
/// a group, only from its voters as this node's log knows them: only a
/// voter can lead or campaign, and a learner (which any key may become
/// until admission control exists: the leader adds every region node) never
/// sends a Raft RPC. Before this node is in a group at all (a new node the
/// leader is adding, a bootstrap's proposer), from a node of the region as
/// the gossip view sees it. Anyone else is refused before the request is
/// decoded (issue 12, finding 2).
///
/// Strict on purpose: a follower whose log is so far behind that it does
/// not list the current leader as a voter (it missed the leader's promotion)
/// refuses that leader until it is wiped and re-added; the gossip view
/// cannot vouch instead, since any key may gossip a record that claims the
/// region (see SECURITY.md).
pub async fn serve_rpcs(
    group: RegionGroup,
    network: Network,
    region: Region,
    mut inbound: mpsc::Receiver<InboundRpc>,
) {
    let permits = Arc::new(Semaphore::new(RPC_CONCURRENCY));
    let mut warned: Option<std::time::Instant> = None;
    while let Some(rpc) = inbound.recv().await {
        let from = rpc.from.to_base58();
        if !may_send_raft(&group, &network, &region, &rpc.from, &from).await {
            if group.role_of(&from) == Some(false)
                && warned.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(60))
            {
                // A learner does not send Raft RPCs: it was promoted and this
                // node's log has not heard. It cannot catch up from that leader.
                warned = Some(std::time::Instant::now());
                warn!(%from, "refusing Raft RPCs of a node this node's log lists as a learner: if it is now a voter (promoted while this node was away), this node cannot catch up; wipe its data dir and let the leader add it again");
            } else {
                tracing::debug!(%from, "refused a Raft RPC from a peer outside the region");
            }
            rpc.reply.send(consensus::rpc::refusal(&format!(
                "{from} is not a voter of region {region}'s group as this node's log knows it"
            )));
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let group = group.clone();
        tokio::spawn(async move {
            let answer = serve(&group, &from, &rpc.request).await;
            rpc.reply.send(answer);
            drop(permit);
        });
    }
}

async fn may_send_raft(
    group: &RegionGroup,
    network: &Network,
    region: &Region,
    peer: &PeerId,
    peer_id: &str,
) -> bool {
    match group.role_of(peer_id) {
        Some(voter) => return voter,
        None if group.is_bootstrapped() => return false,
        None => {}
    }
    matches!(
        network.member(peer).await,
        Ok(Some((MemberState::Alive | MemberState::Suspect, record))) if &record.region == region
    )
}

/// The leader's housekeeping and the gossip of this node's role, until `shutdown`.
pub async fn housekeeping(
    group: RegionGroup,
    network: Network,
    region: Region,
    settings: RaftSettings,
    dead_after: Duration,
    shutdown: CancellationToken,
) {
    // Placement takes a host missing from the view for gone only once the
    // view had the failure detector's time to hear it.
    let started = tokio::time::Instant::now();
    let mut keeper = Housekeeper::new(
        Duration::from_millis(settings.replace_dead_voter_after_ms),
        Duration::from_millis(settings.remove_gone_learner_after_ms),
    )
    .with_max_learners(settings.max_learners);
    let mut interval = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Ok(snapshot) = network.snapshot().await else {
            return;
        };
        let (voters, learners) = group.members();
        let me = snapshot
            .members
            .iter()
            .find(|m| m.is_self)
            .map(|m| m.peer_id.0.clone())
            .unwrap_or_default();
        let role = if voters.contains(&me) {
            Some(RaftRole::Voter)
        } else if learners.contains(&me) {
            Some(RaftRole::Learner)
        } else {
            None
        };
        let _ = network.set_raft_role(role).await;
        let in_region: Vec<(String, MemberState)> = snapshot
            .members
            .iter()
            .filter(|m| m.region == region)
            .map(|m| (m.peer_id.0.clone(), m.state))
            .collect();
        let plan = keeper.plan(
            &me,
            group.is_leader(),
            &voters,
            &learners,
            &in_region,
            tokio::time::Instant::now(),
        );
        match plan {
            None => {}
            Some(Action::AddLearner(peer)) => match group.add_learner(&peer).await {
                Ok(()) => info!(%peer, %region, "added a learner to the region group"),
                Err(e) => warn!(%peer, error = %e, "cannot add a learner yet"),
            },
            Some(Action::ReplaceVoter { dead, learner }) => {
                match group.replace_voter(&dead, &learner).await {
                    Ok(()) => {
                        info!(%dead, replacement = %learner, %region, "replaced a dead voter");
                        keeper.replaced(&dead);
                    }
                    Err(GroupError::ChangeInProgress) => {}
                    Err(e) => warn!(voter = %dead, error = %e, "cannot replace the dead voter yet"),
                }
            }
            Some(Action::NoReplacement(dead)) => {
                warn!(voter = %dead, "a voter is dead but no live learner can replace it")
            }
            Some(Action::RemoveLearner(peer)) => match group.remove_learner(&peer).await {
                Ok(()) => info!(%peer, %region, "removed a learner gone past its timeout"),
                Err(GroupError::ChangeInProgress) => {}
                Err(e) => warn!(%peer, error = %e, "cannot remove the gone learner yet"),
            },
        }
        if group.is_leader() {
            let settled = started.elapsed() >= dead_after;
            place_agents(&group, &snapshot.members, &region, settled).await;
        }
    }
}

/// The leader's placement round (`mesh_task::placement::round`, which the
/// simulator runs too): every agent not placed, or whose host is gone, or
/// whose data is elsewhere, gets a lease on the best node of the region.
async fn place_agents(group: &RegionGroup, members: &[MemberView], region: &Region, settled: bool) {
    let state = group.local_state();
    for command in mesh_task::placement::round(&state, members, region, settled) {
        let (agent, node, reason) = match &command {
            consensus::RegionCommand::MoveAgent {
                agent, to, reason, ..
            } => (agent.clone(), to.clone(), *reason),
            _ => continue,
        };
        let from = state
            .agents
            .get(&agent)
            .and_then(|e| e.lease.as_ref())
            .map(|l| l.node.clone());
        match group.propose(command).await {
            Ok(consensus::RegionResponse::LeaseGranted { epoch }) => match from {
                None => info!(%agent, %node, epoch, %region, "placed an agent"),
                Some(from) => {
                    info!(%agent, %from, to = %node, epoch, reason = reason.as_str(), %region, "moved an agent")
                }
            },
            Ok(other) => {
                info!(%agent, ?other, "placement not applied (the agent changed meanwhile)")
            }
            Err(e) => warn!(%agent, error = %e, "cannot place the agent yet"),
        }
    }
}

/// The voters `region bootstrap` picks: the `count` live members of the
/// region with the smallest peer ids (base58 text order). Deterministic, so
/// the same request sent to any node picks the same voters.
pub fn pick_voters(members: &[MemberView], region: &Region, count: usize) -> Vec<String> {
    let mut live: Vec<String> = members
        .iter()
        .filter(|m| &m.region == region && m.state == MemberState::Alive)
        .map(|m| m.peer_id.0.clone())
        .collect();
    live.sort();
    live.truncate(count);
    live
}

#[cfg(test)]
mod tests {
    use mesh_types::NodeId;

    use super::*;

    fn member(id: &str, region: &str, state: MemberState) -> MemberView {
        MemberView {
            peer_id: NodeId(id.into()),
            region: Region::parse(region).expect("valid"),
            state,
            addrs: vec![],
            last_seen_ms: 0,
            version: "t".into(),
            is_self: false,
            api: None,
            raft: None,
            models: vec![],
        }
    }

    #[test]
    fn voters_are_the_live_members_of_the_region_with_the_smallest_ids() {
        let members = vec![
            member("d", "eu-west", MemberState::Alive),
            member("a", "us-east", MemberState::Alive),
            member("c", "eu-west", MemberState::Alive),
            member("b", "eu-west", MemberState::Dead),
            member("e", "eu-west", MemberState::Alive),
        ];
        let eu = Region::parse("eu-west").expect("valid");
        assert_eq!(pick_voters(&members, &eu, 2), vec!["c", "d"]);
        assert_eq!(
            pick_voters(&members, &eu, 5),
            vec!["c", "d", "e"],
            "only live ones, fewer if need be"
        );
    }
}
