//! Proof that the checkers bite: with a real bug planted (reads served from
//! the local replica without confirming leadership), the simulator reports a
//! linearizability violation, and the same seed reproduces it exactly.
//!
//! Runs only with `--features planted-bugs` (scripts/test.sh does).

use std::sync::atomic::Ordering;
use std::time::Duration;

use agentmesh_sim::{run, Scenario, SimConfig};

#[test]
fn stale_reads_are_caught_and_the_seed_reproduces_them() {
    consensus::group::planted::STALE_READS.store(true, Ordering::SeqCst);
    let config = SimConfig {
        seed: 1,
        nodes: 6,
        regions: 2,
        duration: Duration::from_secs(30),
    };
    let scenario = Scenario::built_in("minority-partition", 1, 2).expect("built in");
    let first = run(&config, &scenario, &mut |_| {}).expect("runs");
    let again = run(&config, &scenario, &mut |_| {}).expect("runs");
    consensus::group::planted::STALE_READS.store(false, Ordering::SeqCst);

    let violations = |r: &agentmesh_sim::Report| {
        r.invariants
            .iter()
            .find(|i| i.name == "linearizability")
            .map(|i| i.violations.clone())
            .unwrap_or_default()
    };
    println!("{}", first.report.table());
    assert!(!first.report.passed());
    assert!(
        !violations(&first.report).is_empty(),
        "the stale reads of the isolated follower break linearizability"
    );
    assert_eq!(first.report.trace_hash, again.report.trace_hash);
    assert_eq!(violations(&first.report), violations(&again.report));
}
