//! The leader's placement round: every agent not placed, or whose host is
//! gone or draining, or whose data is elsewhere, gets a lease on the best
//! node of the region (see `mesh_agent::placement`), with the next epoch.
//! A draining node is no candidate. The node's leader and the simulator's
//! run this same round.

use consensus::{MoveReason, RegionCommand, RegionState};
use mesh_agent::{place, should_move, Candidate};
use mesh_types::{MemberState, MemberView, Region};

/// The lease grants the region's leader should propose now, given its
/// applied `state` and its view of the `members` (every region's).
///
/// `settled`: the leader's member view has run for the failure detector's
/// `dead_after` at least. Before that, a host missing from the view may
/// simply not be heard from yet (a leader just started or restarted), and
/// is not taken for gone: only a view that had time to hear a host can
/// say it is dead (`mesh_task::lease` counts on that wait).
pub fn round(
    state: &RegionState,
    members: &[MemberView],
    region: &Region,
    settled: bool,
) -> Vec<RegionCommand> {
    let mut grants = Vec::new();
    let in_group = |peer: &str| {
        state
            .membership
            .membership()
            .nodes()
            .any(|(_, n)| n.peer_id == peer)
    };
    for (name, entry) in &state.agents {
        let dataset = entry
            .manifest
            .dataset
            .as_ref()
            .and_then(|d| state.datasets.get(d));
        let candidates: Vec<Candidate> = members
            .iter()
            .filter(|m| &m.region == region)
            .map(|m| Candidate {
                node: m.peer_id.0.clone(),
                // A node outside the group could not read its lease.
                alive: m.state == MemberState::Alive
                    && in_group(&m.peer_id.0)
                    && !state.draining.contains(&m.peer_id.0),
                holds_dataset: dataset.is_some_and(|d| d.node == m.peer_id.0),
                models_held: entry
                    .manifest
                    .models
                    .iter()
                    .filter(|model| m.models.contains(&model.name))
                    .count(),
                load: 0,
            })
            .collect();
        let Some(best) = place(&candidates) else {
            continue;
        };
        // The host keeps its agent while merely suspect (a pause, a slow
        // link): moving costs a new epoch. Dead, left, forgotten or
        // draining: it moves.
        let draining = entry
            .lease
            .as_ref()
            .is_some_and(|l| state.draining.contains(&l.node));
        let current = entry.lease.as_ref().map(|lease| {
            let host = members.iter().find(|m| m.peer_id.0 == lease.node);
            let alive = !draining
                && match host {
                    Some(m) => matches!(m.state, MemberState::Alive | MemberState::Suspect),
                    None => !settled,
                };
            candidates
                .iter()
                .find(|c| c.node == lease.node)
                .cloned()
                .map(|c| Candidate { alive, ..c })
                .unwrap_or_else(|| Candidate {
                    node: lease.node.clone(),
                    alive,
                    holds_dataset: false,
                    models_held: 0,
                    load: 0,
                })
        });
        if !should_move(current.as_ref(), best) {
            continue;
        }
        let reason = match &current {
            None => MoveReason::Placed,
            Some(_) if draining => MoveReason::Drain,
            Some(c) if !c.alive => MoveReason::HostDown,
            Some(_) => MoveReason::TowardData,
        };
        grants.push(RegionCommand::MoveAgent {
            agent: name.clone(),
            to: best.node.clone(),
            after_epoch: entry.epoch,
            reason,
        });
    }
    grants
}
