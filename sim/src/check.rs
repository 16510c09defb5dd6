//! Invariant checkers: election safety, log matching, linearizability.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// One client operation on a region's policy, as the client saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The region.
    pub region: usize,
    /// The client.
    pub client: usize,
    /// What it did.
    pub kind: OpKind,
    /// Simulated µs when it was sent.
    pub invoke_us: u64,
    /// Simulated µs when the answer came; `None` when the outcome is unknown
    /// (a timeout: the write may still take effect, at any later time).
    pub return_us: Option<u64>,
}

/// A policy write (the value is the policy's `per_agent.burst`, unique per
/// write) or a linearizable read and the value it returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Wrote this value.
    Write(u32),
    /// Read this value (`None`: no policy yet).
    Read(Option<u32>),
}

/// The linearizability search gives up (and says so) past this many states.
const MAX_STATES: usize = 2_000_000;

/// Checks that `ops` (one region's history) is linearizable as a single
/// register starting empty (Wing & Gong's search with Lowe's memoisation,
/// as in Porcupine). Returns a short explanation when it is not.
pub fn linearizable(ops: &[Op]) -> Result<(), String> {
    // A write whose outcome is unknown and whose value no read returned may
    // be taken as never applied: dropping it cannot hide a violation (no
    // read ever fell between it and the next write). This keeps the search
    // small when a node fails many writes with unknown outcome.
    let read: HashSet<u32> = ops
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::Read(v) => v,
            OpKind::Write(_) => None,
        })
        .collect();
    let mut ops: Vec<&Op> = ops
        .iter()
        .filter(|o| match o.kind {
            OpKind::Write(v) => o.return_us.is_some() || read.contains(&v),
            OpKind::Read(_) => true,
        })
        .collect();
    ops.sort_by_key(|o| (o.invoke_us, o.client));
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let must = ops.iter().filter(|o| o.return_us.is_some()).count();
    let mut seen: HashSet<(Vec<u64>, Option<u32>)> = HashSet::new();
    // Iterative depth-first search: (linearized set, state, count of finished ops linearized).
    let mut stack = vec![(vec![0u64; words], None::<u32>, 0usize)];
    let mut deepest = 0usize;
    let mut stuck: (Vec<u64>, Option<u32>) = (vec![0u64; words], None);
    while let Some((done, state, finished)) = stack.pop() {
        if seen.len() > MAX_STATES {
            return Err(format!(
                "inconclusive: more than {MAX_STATES} partial orders of {n} operations explored"
            ));
        }
        if finished == must {
            return Ok(());
        }
        if finished > deepest {
            deepest = finished;
            stuck = (done.clone(), state);
        }
        // An op may go next if no other pending op returned before it was invoked.
        let horizon = ops
            .iter()
            .enumerate()
            .filter(|(i, _)| done[i / 64] & (1 << (i % 64)) == 0)
            .filter_map(|(_, o)| o.return_us)
            .min()
            .unwrap_or(u64::MAX);
        for (i, op) in ops.iter().enumerate() {
            if done[i / 64] & (1 << (i % 64)) != 0 || op.invoke_us > horizon {
                continue;
            }
            let next = match op.kind {
                OpKind::Write(v) => Some(v),
                OpKind::Read(v) if v == state => state,
                OpKind::Read(_) => continue,
            };
            let mut now_done = done.clone();
            now_done[i / 64] |= 1 << (i % 64);
            if seen.insert((now_done.clone(), next)) {
                let f = finished + usize::from(op.return_us.is_some());
                stack.push((now_done, next, f));
            }
        }
    }
    let (done, state) = stuck;
    let blocked = ops
        .iter()
        .enumerate()
        .filter(|(i, o)| done[i / 64] & (1 << (i % 64)) == 0 && o.return_us.is_some())
        .min_by_key(|(_, o)| o.return_us)
        .map(|(_, o)| {
            format!(
                "; first stuck: client {} {:?} during {:.3}–{:.3} s, when the register held {:?}",
                o.client,
                o.kind,
                o.invoke_us as f64 / 1e6,
                o.return_us.unwrap_or(0) as f64 / 1e6,
                state
            )
        })
        .unwrap_or_default();
    Err(format!(
        "no linearization of {n} operations exists: at most {deepest} of the {must} completed ones can be ordered consistently with their real-time order and the reads' values{blocked}"
    ))
}

/// Election safety, keyed the way openraft 0.9 defines a leader: by its
/// leader id, (term, node). openraft's default (without the
/// `single-term-leader` feature, which we do not enable: it makes every
/// split vote cost a whole new term) lets two nodes each lead the same term
/// under two leader ids, because a vote for (term, B) outranks one for
/// (term, A) when B > A; so "one leader per term" is not an invariant of the
/// protocol we run. What must hold is that a leader id is established once:
/// the same (term, node) never leads from two process lives. A node that
/// resumed leadership after a restart would write new entries under log ids
/// it may already have sent, with other content, before its crash.
#[derive(Debug, Default)]
pub struct Elections {
    /// (region, term, node) -> the process life (start count) that led it.
    leaders: BTreeMap<(usize, u64, String), u64>,
    /// Violations reported already (once each, not at every observation).
    reported: std::collections::BTreeSet<(usize, u64, String, u64)>,
    /// Leader changes seen (a new (term, leader) pair).
    pub changes: u64,
}

impl Elections {
    /// Records that `node`, in its process life `life`, leads `region` in
    /// `term`; an error if that leader id already led from another life.
    pub fn observe(
        &mut self,
        region: usize,
        term: u64,
        node: &str,
        life: u64,
    ) -> Result<(), String> {
        match self.leaders.get(&(region, term, node.to_owned())) {
            Some(first) if *first != life => {
                if !self.reported.insert((region, term, node.to_owned(), life)) {
                    return Ok(());
                }
                Err(format!(
                "region {region}: {node} leads term {term} again after a restart (process life {life}, first led it in life {first}): a leader id must be established once, by an election"
                ))
            }
            Some(_) => Ok(()),
            None => {
                self.leaders.insert((region, term, node.to_owned()), life);
                self.changes += 1;
                Ok(())
            }
        }
    }
}

/// What identifies one log entry's content: its whole log id (term, leader
/// node, index) and a hash of its payload. Two entries with an equal log id
/// but another payload are exactly what a leader that reuses log ids makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryDigest {
    /// The term of the leader that wrote it.
    pub term: u64,
    /// The Raft node id of that leader.
    pub leader: u64,
    /// A hash of the encoded payload.
    pub payload: u64,
}

impl EntryDigest {
    /// The digest of `entry`.
    pub fn of(entry: &openraft::Entry<consensus::TypeConfig>) -> Self {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same bytes hash alike in every run.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match consensus::codec::encode(&entry.payload) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.to_string().hash(&mut h),
        }
        Self {
            term: entry.log_id.leader_id.term,
            leader: entry.log_id.leader_id.node_id,
            payload: h.finish(),
        }
    }
}

/// Log matching and state machine safety: every node applies the same entry
/// (same log id, same payload) at every index.
#[derive(Debug, Default)]
pub struct AppliedLogs {
    entries: BTreeMap<(usize, u64), EntryDigest>,
}

impl AppliedLogs {
    /// `node` of `region` has applied `entry` at `index`.
    pub fn observe(
        &mut self,
        region: usize,
        index: u64,
        entry: EntryDigest,
        node: &str,
    ) -> Result<(), String> {
        match self.entries.insert((region, index), entry) {
            Some(t) if t != entry => Err(format!(
                "region {region}: {node} applied {entry:?} at index {index}, where another node applied {t:?}"
            )),
            _ => Ok(()),
        }
    }
}

/// State machine safety: every node whose state machine stands at index i
/// holds the same state there (policy version and policy).
#[derive(Debug, Default)]
pub struct AppliedStates {
    states: BTreeMap<(usize, u64), (u64, Option<u32>)>,
    reported: std::collections::BTreeSet<(usize, u64, String)>,
}

impl AppliedStates {
    /// `node` of `region` stands at `index` with `state` (policy version,
    /// policy value); an error, once per node and index, if another node
    /// held another state there.
    pub fn observe(
        &mut self,
        region: usize,
        index: u64,
        state: (u64, Option<u32>),
        node: &str,
    ) -> Result<(), String> {
        let seen = *self.states.entry((region, index)).or_insert(state);
        if seen == state || !self.reported.insert((region, index, node.to_owned())) {
            return Ok(());
        }
        Err(format!(
            "region {region}: {node}'s state at index {index} is policy {:?} of version {}, where another node's was {:?} of version {}",
            state.1, state.0, seen.1, seen.0
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, kind: OpKind, invoke_us: u64, return_us: Option<u64>) -> Op {
        Op {
            region: 0,
            client,
            kind,
            invoke_us,
            return_us,
        }
    }

    #[test]
    fn sequential_and_concurrent_histories_are_accepted() {
        let h = vec![
            op(0, OpKind::Read(None), 0, Some(1)),
            op(0, OpKind::Write(1), 2, Some(5)),
            op(1, OpKind::Write(2), 3, Some(6)),
            // Both writes overlap this read: either order is fine.
            op(2, OpKind::Read(Some(1)), 4, Some(7)),
            op(2, OpKind::Read(Some(1)), 8, Some(9)),
        ];
        assert_eq!(linearizable(&h), Ok(()));
    }

    #[test]
    fn a_stale_read_is_refused() {
        let h = vec![
            op(0, OpKind::Write(1), 0, Some(1)),
            op(0, OpKind::Write(2), 2, Some(3)),
            op(1, OpKind::Read(Some(1)), 4, Some(5)),
        ];
        assert!(linearizable(&h).is_err());
    }

    #[test]
    fn a_timed_out_write_may_take_effect_late_or_never() {
        let late = vec![
            op(0, OpKind::Write(1), 0, None),
            op(1, OpKind::Read(None), 1, Some(2)),
            op(1, OpKind::Read(Some(1)), 10, Some(11)),
        ];
        assert_eq!(linearizable(&late), Ok(()));
        let never = vec![
            op(0, OpKind::Write(1), 0, None),
            op(1, OpKind::Read(None), 10, Some(11)),
        ];
        assert_eq!(linearizable(&never), Ok(()));
    }

    #[test]
    fn many_unobserved_writes_of_unknown_outcome_do_not_explode_the_search() {
        let mut h: Vec<Op> = (0..64)
            .map(|i| op(9, OpKind::Write(100 + i), i as u64, None))
            .collect();
        h.push(op(0, OpKind::Write(1), 100, Some(101)));
        h.push(op(1, OpKind::Read(Some(1)), 102, Some(103)));
        assert_eq!(linearizable(&h), Ok(()));
    }

    #[test]
    fn a_lost_acknowledged_write_is_refused() {
        let h = vec![
            op(0, OpKind::Write(1), 0, Some(1)),
            op(1, OpKind::Read(None), 5, Some(6)),
        ];
        assert!(linearizable(&h).is_err());
    }

    #[test]
    fn two_leaders_in_one_term_are_caught() {
        let mut e = Elections::default();
        e.observe(0, 1, "a", 1).expect("first");
        e.observe(0, 1, "a", 1).expect("same");
        e.observe(0, 2, "b", 1).expect("next term");
        e.observe(1, 2, "c", 1).expect("another region");
        // openraft 0.9 allows a second leader id in one term (a greater node id).
        e.observe(0, 2, "c", 1)
            .expect("another leader id of term 2");
        assert_eq!(e.changes, 4);
        // The same leader id after a restart: resumed leadership.
        assert!(e.observe(0, 2, "b", 2).is_err());
    }

    fn blank(term: u64, leader: u64, index: u64, value: Option<u32>) -> EntryDigest {
        let mut policy = mesh_types::policy::Policy::default();
        let payload = match value {
            Some(v) => {
                policy.rate_limits.per_agent.burst = v;
                openraft::EntryPayload::Normal(consensus::RegionCommand::SetPolicy(policy))
            }
            None => openraft::EntryPayload::Blank,
        };
        EntryDigest::of(&openraft::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(term, leader), index),
            payload,
        })
    }

    #[test]
    fn two_states_at_one_index_are_caught_once() {
        let mut states = AppliedStates::default();
        states.observe(0, 9, (7, Some(1)), "a").expect("first");
        states.observe(0, 9, (7, Some(1)), "b").expect("same state");
        states
            .observe(1, 9, (3, None), "c")
            .expect("another region");
        assert!(
            states.observe(0, 9, (7, None), "c").is_err(),
            "a lost policy"
        );
        assert!(
            states.observe(0, 9, (8, Some(1)), "d").is_err(),
            "another version"
        );
        states.observe(0, 9, (7, None), "c").expect("reported once");
    }

    #[test]
    fn an_equal_log_id_with_another_payload_is_caught() {
        let mut logs = AppliedLogs::default();
        logs.observe(0, 5, blank(2, 1, 5, Some(1)), "a")
            .expect("first");
        logs.observe(0, 5, blank(2, 1, 5, Some(1)), "b")
            .expect("same entry");
        // Same term, same index, same leader: another write.
        assert!(logs.observe(0, 5, blank(2, 1, 5, Some(2)), "c").is_err());
        // Same term and index, another leader id.
        assert!(logs.observe(0, 5, blank(2, 3, 5, Some(1)), "d").is_err());
    }
}
