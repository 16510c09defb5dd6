//! What the leader of a region group does on its own, decided without IO so
//! the node and the simulator run the same rules:
//!
//! 1. every live member of the region that is not in the group is added as a
//!    learner, so each node holds the region state (one change at a time);
//! 2. a voter that the membership view shows dead (or no longer shows) for
//!    `replace_after` is replaced by a live learner, in one membership change;
//! 3. a learner that the view shows dead (or no longer shows) for
//!    `remove_learner_after` leaves the group: the leader stops replicating
//!    to it (it joins again as a learner if it comes back).

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_types::MemberState;
use tokio::time::Instant;

/// One change for the leader to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add this peer as a learner.
    AddLearner(String),
    /// Replace voter `dead` by learner `learner`.
    ReplaceVoter {
        /// The voter that stayed dead.
        dead: String,
        /// A live learner.
        learner: String,
    },
    /// A voter is overdue but no learner is alive to replace it.
    NoReplacement(String),
    /// Remove this learner: it has been gone for `remove_learner_after`.
    RemoveLearner(String),
}

/// The leader's memory between two rounds: since when each voter looks dead.
#[derive(Debug, Clone)]
pub struct Housekeeper {
    replace_after: Duration,
    dead_since: BTreeMap<String, Instant>,
    remove_learner_after: Duration,
    learner_gone_since: BTreeMap<String, Instant>,
    /// Most learners the group takes (any key may claim a region until
    /// admission control exists: an unbounded group is a leader's DoS).
    max_learners: usize,
}

impl Housekeeper {
    /// Replaces voters dead for `replace_after`; removes learners gone for
    /// `remove_learner_after`.
    pub fn new(replace_after: Duration, remove_learner_after: Duration) -> Self {
        Self {
            replace_after,
            dead_since: BTreeMap::new(),
            remove_learner_after,
            learner_gone_since: BTreeMap::new(),
            max_learners: usize::MAX,
        }
    }

    /// Takes at most `max` learners: a newcomer past that waits, unless a
    /// learner that is gone can make room (it is removed at once).
    pub fn with_max_learners(mut self, max: usize) -> Self {
        self.max_learners = max;
        self
    }

    /// One round. `region` is the membership view of the region (peer id
    /// and state, this node included); `voters` and `learners` the group's.
    pub fn plan(
        &mut self,
        me: &str,
        is_leader: bool,
        voters: &[String],
        learners: &[String],
        region: &[(String, MemberState)],
        now: Instant,
    ) -> Option<Action> {
        if !is_leader {
            self.dead_since.clear();
            self.learner_gone_since.clear();
            return None;
        }
        let state_of = |peer: &str| region.iter().find(|(p, _)| p == peer).map(|(_, s)| *s);
        self.dead_since.retain(|peer, _| voters.contains(peer));
        for voter in voters {
            match state_of(voter) {
                Some(MemberState::Alive) | Some(MemberState::Suspect) => {
                    self.dead_since.remove(voter);
                }
                _ if voter == me => {}
                _ => {
                    self.dead_since.entry(voter.clone()).or_insert(now);
                }
            }
        }
        self.learner_gone_since
            .retain(|peer, _| learners.contains(peer));
        for learner in learners {
            match state_of(learner) {
                Some(MemberState::Alive) | Some(MemberState::Suspect) => {
                    self.learner_gone_since.remove(learner);
                }
                _ => {
                    self.learner_gone_since
                        .entry(learner.clone())
                        .or_insert(now);
                }
            }
        }
        let overdue_voter = self
            .dead_since
            .iter()
            .find(|(_, since)| now.duration_since(**since) >= self.replace_after)
            .map(|(dead, _)| dead.clone());
        let live_learner = learners
            .iter()
            .find(|l| state_of(l) == Some(MemberState::Alive));
        if let (Some(dead), Some(learner)) = (&overdue_voter, live_learner) {
            return Some(Action::ReplaceVoter {
                dead: dead.clone(),
                learner: learner.clone(),
            });
        }
        // Newcomers after the voters: a stream of joining (or fake) nodes
        // must not keep a dead voter from being replaced.
        if let Some((newcomer, _)) = region
            .iter()
            .find(|(p, s)| *s == MemberState::Alive && !voters.contains(p) && !learners.contains(p))
        {
            if learners.len() < self.max_learners {
                return Some(Action::AddLearner(newcomer.clone()));
            }
            let gone = learners.iter().find(|l| {
                !matches!(
                    state_of(l),
                    Some(MemberState::Alive) | Some(MemberState::Suspect)
                )
            });
            if let Some(gone) = gone {
                return Some(Action::RemoveLearner(gone.clone()));
            }
        }
        // A voter with no replacement must not keep gone learners forever.
        let gone_learner = self
            .learner_gone_since
            .iter()
            .find(|(_, since)| now.duration_since(**since) >= self.remove_learner_after)
            .map(|(gone, _)| Action::RemoveLearner(gone.clone()));
        gone_learner.or(overdue_voter.map(Action::NoReplacement))
    }

    /// `dead` left the group.
    pub fn replaced(&mut self, dead: &str) {
        self.dead_since.remove(dead);
        self.learner_gone_since.remove(dead);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn view(v: &[(&str, MemberState)]) -> Vec<(String, MemberState)> {
        v.iter().map(|(p, st)| (p.to_string(), *st)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_becomes_a_learner_and_a_dead_voter_is_replaced_in_time() {
        use MemberState::*;
        let mut k = Housekeeper::new(Duration::from_secs(60), Duration::from_secs(600));
        let voters = s(&["a", "b", "c"]);
        let t0 = Instant::now();
        let region = view(&[("a", Alive), ("b", Alive), ("c", Alive), ("d", Alive)]);
        assert_eq!(
            k.plan("a", true, &voters, &[], &region, t0),
            Some(Action::AddLearner("d".into()))
        );
        assert_eq!(k.plan("b", false, &voters, &[], &region, t0), None);
        let learners = s(&["d"]);
        let region = view(&[("a", Alive), ("b", Alive), ("c", Dead), ("d", Alive)]);
        assert_eq!(k.plan("a", true, &voters, &learners, &region, t0), None);
        let later = t0 + Duration::from_secs(59);
        assert_eq!(k.plan("a", true, &voters, &learners, &region, later), None);
        let due = t0 + Duration::from_secs(60);
        assert_eq!(
            k.plan("a", true, &voters, &learners, &region, due),
            Some(Action::ReplaceVoter {
                dead: "c".into(),
                learner: "d".into()
            })
        );
        // Back in time: the clock restarts for c.
        let region = view(&[("a", Alive), ("b", Alive), ("c", Alive), ("d", Alive)]);
        assert_eq!(k.plan("a", true, &voters, &learners, &region, due), None);
        let region = view(&[("a", Alive), ("b", Alive), ("c", Dead), ("d", Dead)]);
        assert_eq!(k.plan("a", true, &voters, &learners, &region, due), None);
        assert_eq!(
            k.plan(
                "a",
                true,
                &voters,
                &learners,
                &region,
                due + Duration::from_secs(60)
            ),
            Some(Action::NoReplacement("c".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_learner_gone_past_the_timeout_is_removed_and_one_back_in_time_is_not() {
        use MemberState::*;
        let mut k = Housekeeper::new(Duration::from_secs(60), Duration::from_secs(300));
        let voters = s(&["a", "b", "c"]);
        let learners = s(&["d", "e"]);
        let t0 = Instant::now();
        // e is no longer in the view at all (forgotten), d is dead.
        let region = view(&[("a", Alive), ("b", Alive), ("c", Alive), ("d", Dead)]);
        assert_eq!(k.plan("a", true, &voters, &learners, &region, t0), None);
        let t1 = t0 + Duration::from_secs(299);
        assert_eq!(k.plan("a", true, &voters, &learners, &region, t1), None);
        let t2 = t0 + Duration::from_secs(300);
        let first = k.plan("a", true, &voters, &learners, &region, t2);
        assert_eq!(first, Some(Action::RemoveLearner("d".into())));
        // d came back in time: only e is removed.
        let region = view(&[("a", Alive), ("b", Alive), ("c", Alive), ("d", Alive)]);
        assert_eq!(
            k.plan("a", true, &voters, &learners, &region, t2),
            Some(Action::RemoveLearner("e".into()))
        );
        // A follower forgets what it tracked.
        assert_eq!(k.plan("b", false, &voters, &learners, &region, t2), None);
    }

    #[test]
    fn learners_are_capped_and_a_gone_one_makes_room() {
        let now = Instant::now();
        let mut keeper = Housekeeper::new(Duration::from_secs(60), Duration::from_secs(600))
            .with_max_learners(2);
        let voters = vec!["a".to_owned()];
        let learners = vec!["l1".to_owned(), "l2".to_owned()];
        let mut region = vec![
            ("a".to_owned(), MemberState::Alive),
            ("l1".to_owned(), MemberState::Alive),
            ("l2".to_owned(), MemberState::Alive),
            ("new".to_owned(), MemberState::Alive),
        ];
        assert_eq!(
            keeper.plan("a", true, &voters, &learners, &region, now),
            None,
            "full of live learners: the newcomer waits"
        );
        region[2].1 = MemberState::Dead;
        assert_eq!(
            keeper.plan("a", true, &voters, &learners, &region, now),
            Some(Action::RemoveLearner("l2".into())),
            "a gone learner makes room at once"
        );
        assert_eq!(
            keeper.plan("a", true, &voters, &["l1".to_owned()], &region, now),
            Some(Action::AddLearner("new".into()))
        );
    }

    #[test]
    fn a_stream_of_newcomers_does_not_delay_replacing_a_dead_voter() {
        let t0 = Instant::now();
        let mut keeper = Housekeeper::new(Duration::from_secs(10), Duration::from_secs(600));
        let voters = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let learners = vec!["l".to_owned()];
        let mut region = vec![
            ("a".to_owned(), MemberState::Alive),
            ("b".to_owned(), MemberState::Alive),
            ("c".to_owned(), MemberState::Dead),
            ("l".to_owned(), MemberState::Alive),
        ];
        for round in 0..12u64 {
            // A new node joins every round.
            region.push((format!("new-{round}"), MemberState::Alive));
            let action = keeper.plan(
                "a",
                true,
                &voters,
                &learners,
                &region,
                t0 + Duration::from_secs(round),
            );
            if round >= 10 {
                assert_eq!(
                    action,
                    Some(Action::ReplaceVoter {
                        dead: "c".into(),
                        learner: "l".into()
                    }),
                    "round {round}"
                );
            }
        }
    }
}
