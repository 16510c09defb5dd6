//! Proof that the checkers bite: with a real bug planted, the simulator
//! reports the invariant that protects against it, and the same seed
//! reproduces the run exactly.
//!
//! Runs only with `--features planted-bugs` (scripts/test.sh does). The
//! planted bugs are process-wide switches: the tests take a lock so that
//! only one is on at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use agentmesh_sim::{run, Report, Scenario, SimConfig};
use consensus::group::planted;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn violations(r: &Report, name: &str) -> Vec<String> {
    r.invariants
        .iter()
        .find(|i| i.name == name)
        .map(|i| i.violations.clone())
        .unwrap_or_default()
}

/// Runs `scenario` on `seed` twice with `bug` switched on; returns the first report.
fn with_bug(bug: &AtomicBool, scenario: &str, seed: u64, nodes: usize) -> Report {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    bug.store(true, Ordering::SeqCst);
    let config = SimConfig {
        seed,
        nodes,
        regions: 2,
        duration: Duration::from_secs(30),
    };
    let scenario = Scenario::built_in(scenario, seed, 2).expect("built in");
    let first = run(&config, &scenario, &mut |_| {});
    let again = run(&config, &scenario, &mut |_| {});
    bug.store(false, Ordering::SeqCst);
    let (first, again) = (first.expect("runs"), again.expect("runs"));
    println!("{}", first.report.table());
    assert_eq!(
        first.report.trace_hash, again.report.trace_hash,
        "the seed reproduces the run"
    );
    assert_eq!(first.report.invariants, again.report.invariants);
    first.report
}

#[test]
fn stale_reads_are_caught_by_linearizability() {
    let report = with_bug(&planted::STALE_READS, "minority-partition", 1, 6);
    assert!(
        !violations(&report, "linearizability").is_empty(),
        "the stale reads of the isolated follower break linearizability"
    );
}

/// Issue 11, bug 1, planted back: a restarted leader resumes leadership of
/// its term and reuses log ids it had sent before the power loss.
#[test]
fn a_leader_resumed_from_disk_is_caught_by_five_checkers() {
    let report = with_bug(
        &planted::RESUME_LEADERSHIP,
        "leader-power-loss-quick-restart",
        2,
        8,
    );
    for invariant in [
        "election-safety",
        "log-matching",
        "state-machine-safety",
        "linearizability",
        "acknowledged-writes-durable",
    ] {
        assert!(
            !violations(&report, invariant).is_empty(),
            "{invariant} catches a leader id reused after a restart"
        );
    }
}

#[test]
fn a_node_whose_raft_stops_is_caught_by_replicas_catch_up() {
    let report = with_bug(&planted::INSTALL_FAILS, "lagging-learner-snapshot", 1, 8);
    assert!(
        !violations(&report, "replicas-catch-up").is_empty(),
        "the node that cannot install the snapshot never catches up"
    );
}

/// Issue 11, bug 2, planted back: a bootstrap that does not ask its voters
/// to promise the voter set; two at once make two groups in one region.
#[test]
fn a_split_bootstrap_is_caught_by_log_matching() {
    let report = with_bug(
        &planted::BOOTSTRAP_WITHOUT_PROMISES,
        "split-bootstrap",
        1,
        8,
    );
    assert!(
        !violations(&report, "log-matching").is_empty(),
        "two groups apply different first entries"
    );
}
