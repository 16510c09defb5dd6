//! Where the region leader places an agent: on the live node that holds its
//! dataset, else on one that holds its models, else on the least loaded;
//! ties go to the smallest node id, so every leader decides alike.

use std::cmp::Reverse;

/// A node of the region, as the leader sees it for one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its peer id.
    pub node: String,
    /// Alive in the membership view.
    pub alive: bool,
    /// Holds the agent's dataset (false when the agent has none).
    pub holds_dataset: bool,
    /// How many of the agent's models it holds.
    pub models_held: usize,
    /// Its load (tasks in flight), lower is better.
    pub load: u32,
}

fn rank(c: &Candidate) -> impl Ord + '_ {
    (
        Reverse(c.holds_dataset),
        Reverse(c.models_held),
        c.load,
        c.node.as_str(),
    )
}

/// The node to place the agent on, if any node is alive.
pub fn place(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates
        .iter()
        .filter(|c| c.alive)
        .min_by_key(|c| rank(c))
}

/// Whether an agent active on `current` should move to `best`: its node is
/// gone, or the data is elsewhere (a dataset put after the agent was
/// placed). Never for load alone: a move costs a checkpoint and a new epoch.
pub fn should_move(current: Option<&Candidate>, best: &Candidate) -> bool {
    match current {
        None => true,
        Some(current) if !current.alive => true,
        Some(current) => best.holds_dataset && !current.holds_dataset && best.node != current.node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, dataset: bool, models: usize, load: u32) -> Candidate {
        Candidate {
            node: id.into(),
            alive: true,
            holds_dataset: dataset,
            models_held: models,
            load,
        }
    }

    #[test]
    fn the_data_first_then_the_models_then_the_least_loaded() {
        let nodes = vec![
            node("a", false, 0, 0),
            node("b", false, 2, 9),
            node("c", true, 0, 50),
        ];
        assert_eq!(place(&nodes).map(|c| c.node.as_str()), Some("c"));
        assert_eq!(place(&nodes[..2]).map(|c| c.node.as_str()), Some("b"));
        let idle = vec![
            node("z", false, 0, 3),
            node("y", false, 0, 1),
            node("x", false, 0, 1),
        ];
        assert_eq!(
            place(&idle).map(|c| c.node.as_str()),
            Some("x"),
            "ties: smallest id"
        );
    }

    #[test]
    fn dead_nodes_are_never_chosen() {
        let mut data = node("c", true, 2, 0);
        data.alive = false;
        let nodes = vec![data, node("a", false, 0, 5)];
        assert_eq!(place(&nodes).map(|c| c.node.as_str()), Some("a"));
        assert_eq!(place(&nodes[..1]), None);
    }

    #[test]
    fn an_agent_moves_to_its_data_or_off_a_dead_node_only() {
        let here = node("a", false, 2, 0);
        let data = node("c", true, 0, 90);
        assert!(should_move(Some(&here), &data));
        assert!(!should_move(Some(&data), &data));
        assert!(
            !should_move(Some(&here), &node("b", false, 2, 0)),
            "not for load"
        );
        let mut dead = here.clone();
        dead.alive = false;
        assert!(should_move(Some(&dead), &node("b", false, 0, 0)));
        assert!(should_move(None, &here));
    }
}
