//! Whom to dial, and when. Pure: time comes in, dial decisions go out.
//!
//! Two jobs:
//! - **Bootstrap.** While the node has no peer at all, dial every bootstrap
//!   address, backing off exponentially per address; the shell logs each
//!   retry so an operator sees that nobody answers. Once any peer is
//!   connected the backoffs reset; they start again if the node is ever
//!   alone again (a partition, a restart of every peer).
//! - **Top-up.** While fewer than `target_peers` are connected, dial members
//!   we know of but are not connected to, each at most once per
//!   [`PEER_RETRY_MS`], a few per call, so one bootstrap peer is enough and
//!   losing it does not cut the node off.

use std::collections::BTreeMap;

use mesh_types::UnixMillis;

/// Wait before dialing the same member again after a top-up dial.
pub const PEER_RETRY_MS: u64 = 5_000;
/// Most top-up dials started per call: spreads the dials of a large mesh over
/// a few ticks instead of opening dozens of connections at once.
pub const TOP_UP_DIALS_PER_POLL: usize = 4;

#[derive(Debug, Clone)]
struct BootstrapPeer<A> {
    addr: A,
    next_attempt_at: UnixMillis,
    backoff_ms: u64,
    attempts: u32,
}

/// One bootstrap dial to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapDial<A> {
    /// Where.
    pub addr: A,
    /// 1 for the first try.
    pub attempt: u32,
    /// When the next try will be, if this one fails and the node is still alone.
    pub retry_in_ms: u64,
}

/// The dial planner. `A` is the address type (a `Multiaddr` in the node),
/// `P` the peer id type.
#[derive(Debug)]
pub struct Dialer<A, P> {
    bootstrap: Vec<BootstrapPeer<A>>,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    target_peers: usize,
    peer_next_attempt_at: BTreeMap<P, UnixMillis>,
}

impl<A: Clone, P: Ord + Clone> Dialer<A, P> {
    /// A planner that dials `bootstrap` at the first poll.
    pub fn new(
        bootstrap: Vec<A>,
        backoff_initial_ms: u64,
        backoff_max_ms: u64,
        target_peers: usize,
    ) -> Self {
        Self {
            bootstrap: bootstrap
                .into_iter()
                .map(|addr| BootstrapPeer {
                    addr,
                    next_attempt_at: 0,
                    backoff_ms: backoff_initial_ms,
                    attempts: 0,
                })
                .collect(),
            backoff_initial_ms,
            backoff_max_ms: backoff_max_ms.max(backoff_initial_ms),
            target_peers,
            peer_next_attempt_at: BTreeMap::new(),
        }
    }

    /// Bootstrap dials due now, given how many peers are connected.
    pub fn poll_bootstrap(
        &mut self,
        now: UnixMillis,
        connected_peers: usize,
    ) -> Vec<BootstrapDial<A>> {
        if connected_peers > 0 {
            for peer in &mut self.bootstrap {
                peer.next_attempt_at = now;
                peer.backoff_ms = self.backoff_initial_ms;
                peer.attempts = 0;
            }
            return Vec::new();
        }
        let mut dials = Vec::new();
        for peer in &mut self.bootstrap {
            if now < peer.next_attempt_at {
                continue;
            }
            peer.attempts += 1;
            peer.next_attempt_at = now + peer.backoff_ms;
            dials.push(BootstrapDial {
                addr: peer.addr.clone(),
                attempt: peer.attempts,
                retry_in_ms: peer.backoff_ms,
            });
            peer.backoff_ms = (peer.backoff_ms * 2).min(self.backoff_max_ms);
        }
        dials
    }

    /// Members to dial now. `candidates` are known live members that are not
    /// connected, in a stable order.
    pub fn poll_top_up(
        &mut self,
        now: UnixMillis,
        connected_peers: usize,
        candidates: impl IntoIterator<Item = P>,
    ) -> Vec<P> {
        let wanted = self
            .target_peers
            .saturating_sub(connected_peers)
            .min(TOP_UP_DIALS_PER_POLL);
        let mut dials = Vec::new();
        for peer in candidates {
            if dials.len() >= wanted {
                break;
            }
            let due = self
                .peer_next_attempt_at
                .get(&peer)
                .is_none_or(|&at| now >= at);
            if due {
                self.peer_next_attempt_at
                    .insert(peer.clone(), now + PEER_RETRY_MS);
                dials.push(peer);
            }
        }
        // Forget retry times long past, so the map stays as small as the mesh.
        self.peer_next_attempt_at
            .retain(|_, at| *at + PEER_RETRY_MS > now);
        dials
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer() -> Dialer<&'static str, u32> {
        Dialer::new(vec!["a", "b"], 100, 1_000, 3)
    }

    #[test]
    fn alone_it_dials_every_bootstrap_with_exponential_backoff() {
        let mut d = dialer();
        let first = d.poll_bootstrap(0, 0);
        assert_eq!(
            first.iter().map(|x| x.addr).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(first[0].retry_in_ms, 100);
        assert!(d.poll_bootstrap(99, 0).is_empty());
        let second = d.poll_bootstrap(100, 0);
        assert_eq!((second[0].attempt, second[0].retry_in_ms), (2, 200));
        assert!(d.poll_bootstrap(299, 0).is_empty());
        assert_eq!(d.poll_bootstrap(300, 0)[0].retry_in_ms, 400);
    }

    #[test]
    fn backoff_stops_growing_at_the_maximum() {
        let mut d = dialer();
        let mut now = 0;
        let mut last = 0;
        for _ in 0..10 {
            let dials = d.poll_bootstrap(now, 0);
            last = dials[0].retry_in_ms;
            now += last;
        }
        assert_eq!(last, 1_000);
    }

    #[test]
    fn connected_means_no_bootstrap_dials_and_a_fresh_backoff_later() {
        let mut d = dialer();
        d.poll_bootstrap(0, 0);
        d.poll_bootstrap(100, 0);
        assert!(d.poll_bootstrap(5_000, 1).is_empty());
        // Alone again: dial at once, with the initial backoff.
        let dials = d.poll_bootstrap(5_001, 0);
        assert_eq!((dials[0].attempt, dials[0].retry_in_ms), (1, 100));
    }

    #[test]
    fn top_up_fills_to_the_target_and_waits_before_redialing() {
        let mut d = dialer();
        assert_eq!(d.poll_top_up(0, 1, [7, 8, 9]), vec![7, 8]);
        assert!(d.poll_top_up(10, 3, [9]).is_empty(), "at target");
        assert_eq!(
            d.poll_top_up(20, 1, [7, 8, 9]),
            vec![9],
            "7 and 8 were dialed just now"
        );
        assert_eq!(d.poll_top_up(PEER_RETRY_MS, 1, [7, 8]), vec![7, 8]);
    }

    #[test]
    fn top_up_spreads_a_large_mesh_over_several_polls() {
        let mut d: Dialer<&str, u32> = Dialer::new(vec![], 100, 1_000, 50);
        assert_eq!(d.poll_top_up(0, 0, 0..40).len(), TOP_UP_DIALS_PER_POLL);
    }
}
