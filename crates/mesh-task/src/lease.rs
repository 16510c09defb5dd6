//! The host's side of an agent's lease: a host out of contact with its
//! region's majority stops its agents before the majority can place them
//! elsewhere (issue 14, fencing).
//!
//! ```text
//!   host:      every KEEP_INTERVAL_MS, on a loop of its own that waits on
//!              nothing: contact(view) ── Err ──> Host::set_contact: every agent stopped, none activated
//!   majority:  leader's view: host dead (dead_after) ──> placement round ──> MoveAgent(E+1)
//! ```
//!
//! # Why the host stops first (the timing argument, with the numbers)
//!
//! A link to the host is cut, both ways, at real time `T`. Let
//! `I` = `announce_interval_ms`, `S` = `suspect_after_ms`, `D` =
//! `dead_after_ms` (membership, [`mesh_membership::Config`]: 500, 2000 and
//! 4000 by default), `K` = [`KEEP_INTERVAL_MS`] (200), `d` the longest
//! delivery delay of a record sent before the cut, and `ρ` the bound on
//! the rate at which two nodes' clocks drift apart, [`DRIFT_PPM_MAX`]
//! (500 ppm). Liveness is measured on the receiver's own clock from the
//! moment a record arrives, so clock offsets do not enter, only rates.
//!
//! - The host hears the majority's voters for the last time at `T + d` at
//!   the latest; `S` of its own clock later, at most `S(1 + ρ)` of real
//!   time, they are suspect in its view once the membership engine ticks
//!   (`t`, `network.tick_interval_ms`, which a node's configuration keeps
//!   below `I`), and the next contact check (`K`) stops its agents without
//!   waiting for any lock (a task that holds one finds the node stepped
//!   down before it records or answers): **the host stops by
//!   `T + d + S(1 + ρ) + t + K`.**
//! - The leader last heard the host's announcement sent before `T`, so
//!   sent at `T - I` at the earliest; it declares the host dead `D` of its
//!   clock after that, no sooner than `D(1 - ρ)` real time, and only then
//!   does a placement round propose a new lease. A leader whose member
//!   view is younger than `D` (just started) does not take a host missing
//!   from it for gone (`placement::round`'s `settled`), so this holds for
//!   a new leader too: **no new lease before `T - I + D(1 - ρ)`.**
//! - So the host stops first when `d + S(1 + ρ) + t + K < D(1 - ρ) - I`.
//!   With the defaults (and `t < I`): `d + 2001 + 500 + 200 < 3998 - 500`,
//!   that is for any `d` under 797 ms, the margin the argument leaves for
//!   the network. A node's configuration is refused ([`check_timings`])
//!   unless it leaves at least [`MARGIN_MS_MIN`] (500 ms) there.
//!
//! `d` is a premise, not enforced: a record that a gossip relay delivers
//! late (membership takes records up to `dead_after` plus the clock skew
//! allowed old) counts as heard when it arrives, and a host may then count
//! a voter alive past the margin.
//!
//! What the argument does not cover, and what covers it instead: a cut
//! that is one-way or a link that loses only some messages (the leader
//! may miss the host's records while the host still hears the majority),
//! and an operator's or data-driven move of an agent whose host was cut
//! off at that moment. There the old host may still hold its agent as
//! active for a while, but it can answer nothing: every task is claimed
//! through Raft (a minority cannot commit) and copied to replicas that the
//! new host sealed (`checkpoint`), so no task runs twice and no state
//! written under the stale epoch is kept. The simulator checks both: the
//! `single-activation` invariant (never two nodes with the agent active
//! for longer than a move takes, where the premise holds: no one-way cut,
//! no lossy links; `leader-isolation` is a one-way cut where the overlap
//! happens and is traced as tolerated) and, in every run, `tasks-once`,
//! `single-lease` and `counter-exact`. Closing the one-way gap needs
//! evidence that the majority hears this node (a round trip, or the Raft
//! leader's quorum acknowledgements), not only that this node hears it.

/// How often a node runs its keep round (`Host::keep_agents`), in ms.
pub const KEEP_INTERVAL_MS: u64 = 200;

/// The bound on the drift rate between two nodes' clocks the timings are
/// argued for, in parts per million (ordinary quartz is within 100; the
/// simulator's `clock-drift-at-the-bound` scenario drifts clocks by this).
pub const DRIFT_PPM_MAX: u64 = 500;

/// The least margin the timings must leave for the delivery delay `d`.
pub const MARGIN_MS_MIN: u64 = 500;

/// Whether this node (`me`) is in contact with its region's majority:
/// the group's voters (`voters`) that are `me` or `alive` in its view
/// must be more than half. An error says what it sees.
pub fn contact(me: &str, voters: &[String], alive: impl Fn(&str) -> bool) -> Result<(), String> {
    if voters.is_empty() {
        // Not bootstrapped: no lease to keep.
        return Ok(());
    }
    let seen = voters.iter().filter(|v| *v == me || alive(v)).count();
    if seen * 2 > voters.len() {
        Ok(())
    } else {
        Err(format!(
            "this node sees {seen} of its region's {} voters alive (itself included), not a majority",
            voters.len()
        ))
    }
}

/// Checks that membership timings let a host stop before the majority
/// places its agents elsewhere (see the module doc), with room for a
/// delivery delay of [`MARGIN_MS_MIN`]; the error says what to change.
pub fn check_timings(
    announce_interval_ms: u64,
    suspect_after_ms: u64,
    dead_after_ms: u64,
) -> Result<(), String> {
    // The membership tick is below the announce interval (node config).
    let host_stops = suspect_after_ms
        .saturating_add(suspect_after_ms.saturating_mul(DRIFT_PPM_MAX) / 1_000_000 + 1)
        .saturating_add(announce_interval_ms)
        .saturating_add(KEEP_INTERVAL_MS);
    let majority_moves = dead_after_ms
        .saturating_sub(dead_after_ms.saturating_mul(DRIFT_PPM_MAX) / 1_000_000 + 1)
        .saturating_sub(announce_interval_ms);
    let margin = majority_moves.saturating_sub(host_stops);
    if majority_moves > host_stops && margin >= MARGIN_MS_MIN {
        Ok(())
    } else {
        Err(format!(
            "membership timings leave {margin} ms between a cut-off host stopping its agents (suspect_after_ms {suspect_after_ms} + a membership tick + {KEEP_INTERVAL_MS} ms) and the majority moving them (dead_after_ms {dead_after_ms} - announce_interval_ms {announce_interval_ms}), at {DRIFT_PPM_MAX} ppm of clock drift; at least {MARGIN_MS_MIN} ms are needed: raise dead_after_ms or lower suspect_after_ms"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_majority_of_voters_itself_included_is_contact() {
        let voters = v(&["a", "b", "c"]);
        assert!(contact("a", &voters, |p| p == "b").is_ok());
        let e = contact("a", &voters, |_| false).unwrap_err();
        assert!(e.contains("1 of its region's 3 voters"), "{e}");
        // A learner counts only the voters it sees.
        assert!(contact("l", &voters, |p| p == "b").is_err());
        assert!(contact("l", &voters, |p| p != "c").is_ok());
        // Half is not a majority.
        assert!(contact("a", &v(&["a", "b"]), |_| false).is_err());
        assert!(contact("a", &v(&["a"]), |_| false).is_ok());
        assert!(contact("a", &[], |_| false).is_ok());
    }

    #[test]
    fn the_defaults_and_the_tests_timings_leave_the_margin_and_tight_ones_are_refused() {
        let d = mesh_membership::Config::default();
        check_timings(d.announce_interval_ms, d.suspect_after_ms, d.dead_after_ms).unwrap();
        check_timings(250, 1500, 3000).unwrap();
        let e = check_timings(500, 2000, 2600).unwrap_err();
        assert!(e.contains("raise dead_after_ms"), "{e}");
        assert!(check_timings(500, 3000, 3200).is_err());
    }
}
