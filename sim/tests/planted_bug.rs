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
use mesh_task::host::planted as task_bugs;

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
    with_bug_in(bug, scenario, seed, nodes, true)
}

/// [`with_bug`], with or without the task workload.
fn with_bug_in(bug: &AtomicBool, scenario: &str, seed: u64, nodes: usize, tasks: bool) -> Report {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    bug.store(true, Ordering::SeqCst);
    let config = SimConfig {
        seed,
        nodes,
        regions: 2,
        duration: Duration::from_secs(30),
        tasks,
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
/// its term and reuses log ids it had sent before the power loss. Without
/// the task workload (the run of issue 11), five checkers see it; with
/// tasks, the two leaders' conflicting leases are seen too.
#[test]
fn a_leader_resumed_from_disk_is_caught_by_five_checkers() {
    let report = with_bug_in(
        &planted::RESUME_LEADERSHIP,
        "leader-power-loss-quick-restart",
        2,
        8,
        false,
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
    let report = with_bug(
        &planted::RESUME_LEADERSHIP,
        // A seed where the resumed leader's duplicate entries reach a
        // lease (seeds 1-14 all trip the Raft checkers; 4 also single-lease).
        "leader-power-loss-quick-restart",
        4,
        8,
    );
    for invariant in [
        "election-safety",
        "log-matching",
        "state-machine-safety",
        "single-lease",
    ] {
        assert!(
            !violations(&report, invariant).is_empty(),
            "{invariant} catches a leader id reused after a restart, with tasks"
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

/// Issue 13: a host that runs tasks without claiming them: nothing fences
/// a host whose agent moved. (Since issue 14 a new host also restores the
/// results its agent answered, so a task id does not run again there even
/// without the claim; tasks-once is shown to bite below.)
#[test]
fn a_host_that_skips_the_claim_is_caught_by_single_lease() {
    let report = with_bug(&task_bugs::SKIP_CLAIM, "leader-crash", 1, 9);
    assert!(
        !violations(&report, "single-lease").is_empty(),
        "single-lease catches tasks run without their claim"
    );
}

/// A host that runs an answered task again when its client resubmits it,
/// instead of answering the stored result.
#[test]
fn a_host_that_ignores_stored_results_is_caught_by_tasks_once() {
    let report = with_bug(&task_bugs::IGNORE_STORED, "cold-start", 1, 6);
    assert!(
        !violations(&report, "tasks-once").is_empty(),
        "resubmitted tasks run again"
    );
}

/// Issue 13: residency not checked on the host.
#[test]
fn a_host_that_skips_residency_is_caught_by_residency() {
    let report = with_bug(&task_bugs::SKIP_RESIDENCY, "cold-start", 1, 6);
    assert!(
        !violations(&report, "residency").is_empty(),
        "pii tasks entered from another region run and are answered"
    );
}

/// Issue 13: a task's record and result written without a sync; a power
/// loss of the host takes answered results with it.
#[test]
fn unsynced_results_are_caught_by_tasks_acknowledged_durable() {
    let report = with_bug(&task_bugs::UNSYNCED_RESULTS, "region-power-loss", 1, 6);
    assert!(
        !violations(&report, "tasks-acknowledged-durable").is_empty(),
        "answered tasks are gone after the power loss"
    );
}

/// Issue 13: a restarted host that starts a new audit chain over its old
/// records.
#[test]
fn a_host_that_forgets_its_chain_is_caught_by_audit_chains() {
    let report = with_bug(&task_bugs::FORGET_CHAIN, "rolling-restart", 1, 8);
    assert!(
        !violations(&report, "audit-chains").is_empty(),
        "the restarted host's records overwrite its old ones"
    );
}

/// Issue 14: a new host that serves with the state it holds itself, not the
/// newest copy from the agent's replicas: the counter goes back.
#[test]
fn a_host_that_skips_the_restore_is_caught_by_counter_exact() {
    let report = with_bug(&task_bugs::SKIP_RESTORE, "host-crash-under-load", 1, 9);
    assert!(
        !violations(&report, "counter-exact").is_empty(),
        "the counter's new host starts from a stale count"
    );
}

/// Issue 14: a host that answers before its replicas hold the task: after
/// the host crashes, its successor restores a copy without the answered
/// tasks.
#[test]
fn a_host_that_answers_before_the_copy_is_caught_by_counter_exact() {
    let report = with_bug(
        &task_bugs::ANSWER_BEFORE_COPY,
        "host-crash-under-load",
        1,
        9,
    );
    assert!(
        !violations(&report, "counter-exact").is_empty(),
        "answered tasks are missing from the restored counter"
    );
}

/// Issue 14: a host cut off from its region's majority that keeps its
/// agents active: the majority's new host starts beside it.
#[test]
fn a_host_that_does_not_step_down_is_caught_by_single_activation() {
    let report = with_bug(
        &task_bugs::NO_STEP_DOWN,
        "host-partitioned-then-healed",
        1,
        8,
    );
    assert!(
        !violations(&report, "single-activation").is_empty(),
        "the cut-off host and its successor are active at once"
    );
}
