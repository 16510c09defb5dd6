//! The leader's placement round: every agent not placed, or whose host is
//! gone, or whose data is elsewhere, gets a lease on the best node of the
//! region (see `mesh_agent::placement`), with the next epoch. The node's
//! leader and the simulator's run this same round.

use consensus::{RegionCommand, RegionState};
use mesh_agent::{place, should_move, Candidate};
use mesh_types::{MemberState, MemberView, Region};

/// The lease grants the region's leader should propose now, given its
/// applied `state` and its view of the `members` (every region's).
pub fn round(state: &RegionState, members: &[MemberView], region: &Region) -> Vec<RegionCommand> {
    let mut grants = Vec::new();
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
                alive: m.state == MemberState::Alive,
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
        // link): moving costs a new epoch. Dead, left or forgotten: it moves.
        let current = entry.lease.as_ref().map(|lease| {
            let host = members.iter().find(|m| m.peer_id.0 == lease.node);
            let alive =
                host.is_some_and(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect));
            candidates
                .iter()
                .find(|c| c.node == lease.node)
                .cloned()
                .map(|c| Candidate { alive, ..c })
                .unwrap_or_else(|| Candidate {
                    node: lease.node.clone(),
                    alive: false,
                    holds_dataset: false,
                    models_held: 0,
                    load: 0,
                })
        });
        if !should_move(current.as_ref(), best) {
            continue;
        }
        grants.push(RegionCommand::GrantLease {
            agent: name.clone(),
            node: best.node.clone(),
            after_epoch: entry.epoch,
        });
    }
    grants
}
