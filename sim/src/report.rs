//! The report of a run: a table for people, JSON for tools.

use serde::{Deserialize, Serialize};

/// One invariant: how often it was checked, and every violation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invariant {
    /// Its name.
    pub name: String,
    /// Checks made.
    pub checks: u64,
    /// What went wrong, in order.
    pub violations: Vec<String>,
}

/// A fault as it was injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    /// Simulated seconds after the start.
    pub at_s: f64,
    /// The fault.
    pub fault: crate::Fault,
    /// The node it hit, or why it could not be injected.
    pub hit: String,
}

/// What a run did and found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Regions.
    pub regions: usize,
    /// Simulated seconds, including the final heal and liveness checks.
    pub simulated_s: f64,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// Simulated seconds per wall second.
    pub speedup: f64,
    /// Faults applied (heals included).
    pub faults_injected: u64,
    /// Every fault, with the simulated time it was injected at.
    pub faults: Vec<InjectedFault>,
    /// New (term, leader) pairs seen.
    pub leader_changes: u64,
    /// Messages sent between nodes (Raft RPCs and answers, gossip).
    pub messages: u64,
    /// Policy writes acknowledged to their client.
    pub writes_acknowledged: u64,
    /// Policy writes whose outcome the client never learned (timeouts).
    pub writes_unknown: u64,
    /// Acknowledged writes that are not durable on a majority of their
    /// region's final voters (must be 0).
    pub writes_lost: u64,
    /// Raft log entries written but not yet synced that power losses (and
    /// failed fsyncs) dropped: a leader's own entries, which it sends
    /// before its fsync. Other unsynced writes (state machine, committed
    /// id) are not counted.
    pub unsynced_writes_lost_at_crash: u64,
    /// Linearizable reads answered.
    pub reads: u64,
    /// Tasks (issue 13): submitted (new task ids), answered, of which
    /// answered from a stored result, refused before running, and whose
    /// outcome the client never learned.
    #[serde(default)]
    pub tasks: TaskCounts,
    /// Every invariant.
    pub invariants: Vec<Invariant>,
    /// sha256 of the event trace: equal for two runs of the same configuration.
    pub trace_hash: String,
}

/// What became of the simulated clients' tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// New task ids submitted.
    pub submitted: u64,
    /// Answers with a result (first runs and replays).
    pub answered: u64,
    /// Of those, stored results of earlier submissions.
    pub replayed: u64,
    /// Refused before anything ran (residency, not placed, stale epoch, ...).
    pub refused: u64,
    /// Submissions whose answer never came back.
    pub unknown: u64,
    /// Records in the audit logs at the end (every node's).
    pub executed: u64,
}

impl Report {
    /// True when no invariant was violated.
    pub fn passed(&self) -> bool {
        self.invariants.iter().all(|i| i.violations.is_empty())
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<28} {v}\n"));
        row("scenario", self.scenario.clone());
        row("seed", self.seed.to_string());
        row(
            "nodes / regions",
            format!("{} / {}", self.nodes, self.regions),
        );
        row("simulated time", format!("{:.1} s", self.simulated_s));
        row("wall time", format!("{:.2} s", self.wall_s));
        row("speed-up", format!("{:.0}× real time", self.speedup));
        row("faults injected", self.faults_injected.to_string());
        for f in &self.faults {
            row(
                "",
                format!("{:>8.3} s  {}  {}", f.at_s, f.fault.kind(), f.hit),
            );
        }
        row("leader changes", self.leader_changes.to_string());
        row("messages", self.messages.to_string());
        row(
            "policy writes",
            format!(
                "{} acknowledged, {} unknown (timed out), {} lost",
                self.writes_acknowledged, self.writes_unknown, self.writes_lost
            ),
        );
        row("policy reads", self.reads.to_string());
        let t = &self.tasks;
        row(
            "tasks",
            format!(
                "{} submitted, {} answered ({} replayed), {} refused, {} unknown, {} executed",
                t.submitted, t.answered, t.replayed, t.refused, t.unknown, t.executed
            ),
        );
        row(
            "unsynced log entries dropped",
            self.unsynced_writes_lost_at_crash.to_string(),
        );
        row("trace hash", self.trace_hash.clone());
        out.push_str("\n  invariant                     checks   violations\n");
        for i in &self.invariants {
            out.push_str(&format!(
                "  {:<28} {:>7}   {}\n",
                i.name,
                i.checks,
                if i.violations.is_empty() {
                    "none".to_owned()
                } else {
                    i.violations.len().to_string()
                }
            ));
            for v in &i.violations {
                out.push_str(&format!("      ✗ {v}\n"));
            }
        }
        out.push_str(if self.passed() {
            "\n  PASSED\n"
        } else {
            "\n  FAILED\n"
        });
        out
    }
}
