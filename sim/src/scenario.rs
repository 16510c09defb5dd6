//! Scenarios: faults at points in simulated time, built in or from a TOML file.
//!
//! ```toml
//! # my-scenario.toml: run with `agentmesh sim --scenario my-scenario.toml --seed 7`
//! name = "my-scenario"
//! description = "cut region r0 from r1 for 20 s, with 5 % loss everywhere"
//! duration_s = 60          # optional; --duration wins
//!
//! [[step]]
//! at_s = 5
//! fault = { kind = "loss", percent = 5 }
//!
//! [[step]]
//! at_s = 10
//! fault = { kind = "partition-regions", a = 0, b = 1 }
//!
//! [[step]]
//! at_s = 30
//! fault = { kind = "heal" }
//! ```
//!
//! Targets are resolved when the step runs: `leader` is region `region`'s
//! leader at that moment, so a scenario reads like the story it tells. A
//! fault aimed at one node takes `who` (default `follower`): `leader`,
//! `voter` (a voter that is not the leader), `learner`, `follower` (any
//! member but the leader) or `any`; among several, the seed picks.
//!
//! Every step must fall inside the run (`at_s` before `--duration`): a run
//! that would skip a fault is refused, with every problem of the scenario
//! listed at once.

use serde::{Deserialize, Serialize};

/// Which node of a region a fault hits; among several that fit, the seed picks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Who {
    /// Any member but the leader (voter or learner).
    #[default]
    Follower,
    /// A voter that is not the leader.
    Voter,
    /// A learner.
    Learner,
    /// The leader.
    Leader,
    /// Any node of the region, the leader included.
    Any,
    /// The node hosting the region's counter agent (`counter-rR`), leader
    /// or not (issue 14's failover scenarios).
    Host,
}

/// One fault, applied at a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// Every message between regions `a` and `b` is lost, both ways.
    PartitionRegions {
        /// Region index.
        a: usize,
        /// Region index.
        b: usize,
    },
    /// One node of `region` (`who`, default a follower) is cut off from everyone, both ways.
    IsolateFollower {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
    },
    /// The leader of `region` can no longer send to anyone (it still receives).
    IsolateLeaderOneWay {
        /// Region index.
        region: usize,
    },
    /// The leader of `region` stops (its disk is kept).
    CrashLeader {
        /// Region index.
        region: usize,
    },
    /// A node of `region` (`who`, default a follower) stops (its disk is kept).
    CrashFollower {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
    },
    /// Region `region`'s leader loses power: its unsynced writes are gone.
    PowerLossLeader {
        /// Region index.
        region: usize,
    },
    /// A node of `region` (`who`, default a follower) loses its disk; it rejoins under a new id.
    WipeFollower {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
    },
    /// A node of `region` (`who`, default a follower) loses power: its unsynced writes are gone.
    PowerLoss {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
    },
    /// Every node of `region` loses power at once (a site-wide outage).
    PowerLossRegion {
        /// Region index.
        region: usize,
    },
    /// Every stopped node starts again, and each dies (a process crash, or
    /// a power loss) at its `after_writes`-th write to its disk: inside
    /// whatever batch of Raft commands it is running at that moment, not
    /// between two of them.
    RestartAndCrash {
        /// The write that kills it (1: its first).
        after_writes: u64,
        /// Unsynced writes are lost too.
        #[serde(default)]
        power_loss: bool,
    },
    /// The next time `region`'s leader starts a membership change, it crashes.
    CrashLeaderOnMembershipChange {
        /// Region index.
        region: usize,
    },
    /// Every fsync of a node of `region` (`who`, default a follower)
    /// fails, and the writes it should have made durable are dropped (as
    /// Linux drops the dirty pages of a failed fsync): until the heal (then
    /// it restarts), or for `for_ms` only, after which fsyncs work again
    /// without a restart.
    FailFsync {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
        /// Fsyncs recover by themselves after this long.
        #[serde(default)]
        for_ms: Option<u64>,
    },
    /// Every node's wall clock is off by up to ±`max_skew_ms` and drifts by
    /// up to ±`max_drift_ppm` (membership timestamps; Raft's timers use
    /// the monotonic clock).
    ClockSkew {
        /// Largest offset.
        max_skew_ms: u64,
        /// Largest drift, parts per million.
        max_drift_ppm: u64,
    },
    /// Every message to or from one node of `region` (`who`, default a follower) takes `extra_ms` longer.
    SlowNode {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
        /// Added one-way delay.
        extra_ms: u64,
    },
    /// Region `region` is bootstrapped twice at once, as two entry nodes
    /// with different gossip views would: once with its three smallest
    /// peer ids, once with the three after the smallest (two voters in
    /// both). Only at `at_s = 0`: it replaces the region's bootstrap.
    SplitBootstrap {
        /// Region index.
        region: usize,
    },
    /// Every stopped node starts again on its disk.
    RestartAll,
    /// Stops and restarts every node of `region`, one after the other, `gap_s` apart.
    RollingRestart {
        /// Region index.
        region: usize,
        /// Seconds between two restarts.
        gap_s: u64,
    },
    /// Each message is lost with this probability.
    Loss {
        /// 0 to 100.
        percent: u32,
    },
    /// Each delivered message is delivered twice with this probability.
    Duplicate {
        /// 0 to 100.
        percent: u32,
    },
    /// One-way delay of every message: `min_ms` plus up to `jitter_ms` (reorders messages).
    Delay {
        /// Base delay.
        min_ms: u64,
        /// Uniform extra delay.
        jitter_ms: u64,
    },
    /// Region `region`'s counter agent is moved off its host to another
    /// node of the region, drawn by the seed (as `agentmesh agent move`
    /// does), under load; with `crash`, the move's source or its target
    /// crashes (its disk kept) at a time drawn within `within_ms` of the
    /// move's commit: mid-migration.
    Migrate {
        /// Region index.
        region: usize,
        /// Which end crashes, if one does.
        #[serde(default)]
        crash: Option<Side>,
        /// The crash comes within this long after the move.
        #[serde(default = "default_within_ms")]
        within_ms: u64,
    },
    /// A node of `region` (`who`, default a follower) is drained (as
    /// `agentmesh node drain`): marked draining, its agents and the copies
    /// it keeps move to other nodes; once it holds none it stops (its disk
    /// kept). A drain not done within 10 s is a liveness violation.
    Drain {
        /// Region index.
        region: usize,
        /// Which node.
        #[serde(default)]
        who: Who,
    },
    /// Removes every partition, loss, duplication, extra delay and failing
    /// disk; restarts stopped nodes. Clock skew stays.
    Heal,
}

/// An end of a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The node the agent leaves.
    Source,
    /// The node the agent goes to.
    Target,
}

fn default_within_ms() -> u64 {
    300
}

/// A fault at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Simulated seconds after the start.
    pub at_s: f64,
    /// What happens.
    pub fault: Fault,
}

/// A named list of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, as `--scenario` takes it.
    pub name: String,
    /// One line on what it tests.
    pub description: String,
    /// Default simulated run time.
    #[serde(default)]
    pub duration_s: Option<u64>,
    /// The faults, in time order.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
}

fn step(at_s: f64, fault: Fault) -> Step {
    Step { at_s, fault }
}

fn scenario(name: &str, description: &str, steps: Vec<Step>) -> Scenario {
    Scenario {
        name: name.into(),
        description: description.into(),
        duration_s: None,
        steps,
    }
}

/// The names of the built-in scenarios.
pub const BUILT_IN: &[&str] = &[
    "cold-start",
    "region-partition",
    "minority-partition",
    "leader-isolation",
    "leader-crash",
    "leader-crash-during-membership-change",
    "amnesia-voter",
    "unsynced-writes-at-crash",
    "fsync-failure",
    "leader-fsync-failure",
    "leader-power-loss-quick-restart",
    "region-power-loss",
    "snapshot-install-crash",
    "split-bootstrap",
    "lagging-learner-snapshot",
    "rolling-restart",
    "lossy-links",
    "clock-skew",
    "slow-node",
    "host-crash-under-load",
    "host-partitioned-then-healed",
    "clock-drift-at-the-bound",
    "crash-mid-migration",
    "drain-under-load",
    "random",
];

impl Scenario {
    /// A built-in scenario; `random` draws its faults from `seed`.
    pub fn built_in(name: &str, seed: u64, regions: usize) -> Option<Self> {
        use Fault::*;
        let other = if regions > 1 { 1 } else { 0 };
        Some(match name {
            "cold-start" => scenario(name, "every node starts at once; no faults", vec![]),
            "region-partition" => scenario(
                name,
                "regions 0 and 1 cannot reach each other for 20 s, then heal",
                vec![step(8.0, PartitionRegions { a: 0, b: other }), step(28.0, Heal)],
            ),
            "minority-partition" => scenario(
                name,
                "a voter of region 0 is cut off for 15 s; the majority keeps committing",
                vec![
                    step(8.0, IsolateFollower { region: 0, who: Who::Voter }),
                    step(23.0, Heal),
                ],
            ),
            "leader-isolation" => scenario(
                name,
                "region 0's leader can receive but not send for 15 s",
                vec![step(8.0, IsolateLeaderOneWay { region: 0 }), step(23.0, Heal)],
            ),
            "leader-crash" => scenario(
                name,
                "region 0's leader crashes; restarts 10 s later on its disk",
                vec![step(8.0, CrashLeader { region: 0 }), step(18.0, RestartAll)],
            ),
            "leader-crash-during-membership-change" => scenario(
                name,
                "a follower of region 0 loses its disk; the leader crashes as it starts the membership change that follows",
                vec![
                    step(6.0, CrashLeaderOnMembershipChange { region: 0 }),
                    step(8.0, WipeFollower { region: 0, who: Who::Follower }),
                    step(30.0, RestartAll),
                ],
            ),
            "amnesia-voter" => scenario(
                name,
                "a voter of region 0 loses its disk and rejoins as a new member; the dead id is replaced",
                vec![step(8.0, WipeFollower { region: 0, who: Who::Voter })],
            ),
            "unsynced-writes-at-crash" => scenario(
                name,
                "region 0's leader loses power (unsynced writes lost) under load; restarts 5 s later",
                vec![step(8.0, PowerLossLeader { region: 0 }), step(13.0, RestartAll)],
            ),
            "fsync-failure" => scenario(
                name,
                "a voter of region 0 gets failing fsyncs for 10 s, then restarts",
                vec![
                    step(8.0, FailFsync { region: 0, who: Who::Voter, for_ms: None }),
                    step(18.0, Heal),
                ],
            ),
            "leader-fsync-failure" => scenario(
                name,
                "region 0's leader gets failing fsyncs for 300 ms (dirty pages dropped), which then work again without a restart; later the leader loses power",
                vec![
                    step(8.0, FailFsync { region: 0, who: Who::Leader, for_ms: Some(300) }),
                    step(12.0, PowerLoss { region: 0, who: Who::Any }),
                    step(14.0, RestartAll),
                ],
            ),
            "leader-power-loss-quick-restart" => scenario(
                name,
                "region 0's leader loses power under load and is back 150 ms later, before anyone's election timeout",
                vec![
                    step(8.0, PowerLossLeader { region: 0 }),
                    step(8.15, RestartAll),
                    step(16.0, PowerLossLeader { region: 0 }),
                    step(16.15, RestartAll),
                ],
            ),
            "region-power-loss" => scenario(
                name,
                "every node of region 0 loses power at once under load, and all come back 200 ms later; twice",
                vec![
                    step(8.0, PowerLossRegion { region: 0 }),
                    step(8.2, RestartAll),
                    step(16.0, PowerLossRegion { region: 0 }),
                    step(16.2, RestartAll),
                ],
            ),
            "split-bootstrap" => scenario(
                name,
                "region 0 is bootstrapped twice at once with two overlapping voter sets; one group must come out",
                vec![step(0.0, SplitBootstrap { region: 0 })],
            ),
            "snapshot-install-crash" => scenario(
                name,
                "a voter of region 0 is down past log compaction; it restarts, and dies at a write drawn from the seed while it installs the snapshot; then it restarts",
                vec![
                    step(6.0, CrashFollower { region: 0, who: Who::Voter }),
                    step(
                        26.0,
                        RestartAndCrash {
                            after_writes: 1 + seed % 12,
                            power_loss: seed % 2 == 0,
                        },
                    ),
                    step(28.0, RestartAll),
                ],
            ),
            "lagging-learner-snapshot" => scenario(
                name,
                "a follower of region 0 is down for 20 s under load, past log compaction: it catches up from a snapshot",
                vec![
                    step(6.0, CrashFollower { region: 0, who: Who::Follower }),
                    step(26.0, RestartAll),
                ],
            ),
            "clock-skew" => scenario(
                name,
                "every node's clock is off by up to ±500 ms and drifts by up to ±200 ppm",
                vec![step(
                    0.0,
                    ClockSkew {
                        max_skew_ms: 500,
                        max_drift_ppm: 200,
                    },
                )],
            ),
            "slow-node" => scenario(
                name,
                "messages to and from a voter of region 0 take 150 ms longer for 20 s",
                vec![
                    step(8.0, SlowNode { region: 0, who: Who::Voter, extra_ms: 150 }),
                    step(28.0, Heal),
                ],
            ),
            "rolling-restart" => scenario(
                name,
                "every node of region 0 restarts in turn under the write load",
                vec![step(8.0, RollingRestart { region: 0, gap_s: 4 })],
            ),
            "lossy-links" => scenario(
                name,
                "10 % loss, 5 % duplication, 1–21 ms delay (reordering) for 20 s",
                vec![
                    step(5.0, Loss { percent: 10 }),
                    step(5.0, Duplicate { percent: 5 }),
                    step(5.0, Delay { min_ms: 1, jitter_ms: 20 }),
                    step(25.0, Heal),
                ],
            ),
            "host-crash-under-load" => scenario(
                name,
                "the node hosting region 0's counter agent crashes under load (its tasks in flight); it restarts 15 s later on its disk",
                vec![
                    step(10.0, CrashFollower { region: 0, who: Who::Host }),
                    step(25.0, RestartAll),
                ],
            ),
            "host-partitioned-then-healed" => scenario(
                name,
                "the node hosting region 0's counter agent is cut off from everyone for 15 s under load, then the cut heals: it must step down, never serve beside its successor",
                vec![
                    step(10.0, IsolateFollower { region: 0, who: Who::Host }),
                    step(25.0, Heal),
                ],
            ),
            "clock-drift-at-the-bound" => scenario(
                name,
                "every clock is off by up to ±1 s and drifts by up to ±500 ppm (the bound mesh_task::checkpoint states); the counter's host is cut off, healed, then crashes",
                vec![
                    step(
                        0.0,
                        ClockSkew {
                            max_skew_ms: 1_000,
                            max_drift_ppm: 500,
                        },
                    ),
                    step(8.0, IsolateFollower { region: 0, who: Who::Host }),
                    step(18.0, Heal),
                    step(24.0, CrashFollower { region: 0, who: Who::Host }),
                    step(32.0, RestartAll),
                ],
            ),
            "crash-mid-migration" => scenario(
                name,
                "region 0's counter agent is moved under load and the move's source crashes mid-migration; restarted, the agent is moved again and the target crashes mid-migration",
                vec![
                    step(
                        8.0,
                        Migrate {
                            region: 0,
                            crash: Some(Side::Source),
                            within_ms: 300,
                        },
                    ),
                    step(16.0, RestartAll),
                    step(
                        21.0,
                        Migrate {
                            region: 0,
                            crash: Some(Side::Target),
                            within_ms: 300,
                        },
                    ),
                    step(29.0, RestartAll),
                ],
            ),
            "drain-under-load" => scenario(
                name,
                "the node hosting region 0's counter agent is drained under load: the agent and every copy it keeps move off, then it stops; later it restarts",
                vec![
                    step(8.0, Drain { region: 0, who: Who::Host }),
                    step(26.0, RestartAll),
                ],
            ),
            "random" => random(seed, regions),
            _ => return None,
        })
    }

    /// Reads a scenario file. Its steps are checked by [`Scenario::check`]
    /// before a run, every problem at once.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read scenario {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("scenario {} is not valid: {e}", path.display()))
    }

    /// Every problem with this scenario for a mesh of `regions` regions and
    /// a run of `duration_s` simulated seconds, one per line; a step that
    /// would fall after the end of the run is one (it would never be
    /// injected).
    pub fn check(&self, regions: usize, duration_s: f64) -> Result<(), String> {
        let mut problems = Vec::new();
        for s in &self.steps {
            if !(s.at_s >= 0.0 && s.at_s.is_finite()) {
                problems.push(format!("step at_s = {} must be a time ≥ 0", s.at_s));
                continue;
            }
            if s.at_s >= duration_s {
                problems.push(format!(
                    "step at {} s ({}) falls after the end of the run at {duration_s} s: lengthen --duration to more than {} s, or move the step",
                    s.at_s,
                    s.fault.kind(),
                    s.at_s
                ));
            }
            let region = match &s.fault {
                Fault::PartitionRegions { a, b } => Some((*a).max(*b)),
                Fault::IsolateFollower { region, .. }
                | Fault::IsolateLeaderOneWay { region }
                | Fault::CrashLeader { region }
                | Fault::CrashFollower { region, .. }
                | Fault::PowerLossLeader { region }
                | Fault::PowerLoss { region, .. }
                | Fault::PowerLossRegion { region }
                | Fault::WipeFollower { region, .. }
                | Fault::CrashLeaderOnMembershipChange { region }
                | Fault::FailFsync { region, .. }
                | Fault::SlowNode { region, .. }
                | Fault::Migrate { region, .. }
                | Fault::Drain { region, .. }
                | Fault::RollingRestart { region, .. } => Some(*region),
                Fault::SplitBootstrap { region } => {
                    if s.at_s != 0.0 {
                        problems.push(format!(
                            "step at {} s: split-bootstrap replaces the bootstrap, so it must be at_s = 0",
                            s.at_s
                        ));
                    }
                    Some(*region)
                }
                Fault::Loss { percent } | Fault::Duplicate { percent } if *percent > 100 => {
                    problems.push(format!("step at {} s: a percentage above 100", s.at_s));
                    None
                }
                Fault::RestartAndCrash {
                    after_writes: 0, ..
                } => {
                    problems.push(format!(
                        "step at {} s: after_writes must be at least 1",
                        s.at_s
                    ));
                    None
                }
                _ => None,
            };
            if let Some(r) = region.filter(|r| *r >= regions) {
                problems.push(format!(
                    "step at {} s names region {r}, but the mesh has {regions} (0 to {})",
                    s.at_s,
                    regions - 1
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "scenario {} cannot run as asked ({} problem{}):\n  {}",
                self.name,
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("\n  ")
            ))
        }
    }
}

impl Fault {
    /// The fault's kind, as scenario files name it.
    pub fn kind(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    }
}

/// Faults drawn from the seed: a few of every kind, each healed later.
fn random(seed: u64, regions: usize) -> Scenario {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5ce7_a410);
    let mut steps = Vec::new();
    // Every step within 35 s, so a run of 40 s or more injects them all.
    let mut t = 3.0;
    for _ in 0..4 {
        let region = rng.gen_range(0..regions);
        // Not `Learner`: a region of three nodes has none, and the fault
        // would find no target (a follower is a learner where there are some).
        let who = if rng.gen_bool(0.4) {
            Who::Voter
        } else {
            Who::Follower
        };
        let fault = match rng.gen_range(0..13) {
            0 => Fault::PartitionRegions {
                a: 0,
                b: if regions > 1 {
                    rng.gen_range(1..regions)
                } else {
                    0
                },
            },
            1 => Fault::IsolateFollower { region, who },
            2 => Fault::IsolateLeaderOneWay { region },
            3 => Fault::CrashLeader { region },
            4 => Fault::CrashFollower { region, who },
            5 => Fault::Loss {
                percent: rng.gen_range(1..20),
            },
            6 => Fault::PowerLossLeader { region },
            7 => Fault::WipeFollower { region, who },
            8 => Fault::FailFsync {
                region,
                who: if rng.gen_bool(0.3) { Who::Leader } else { who },
                for_ms: rng.gen_bool(0.5).then(|| rng.gen_range(50..2000)),
            },
            9 => Fault::SlowNode {
                region,
                who,
                extra_ms: rng.gen_range(20..300),
            },
            11 => Fault::PowerLoss {
                region,
                who: Who::Any,
            },
            12 => Fault::PowerLossRegion { region },
            _ => Fault::Delay {
                min_ms: rng.gen_range(1..5),
                jitter_ms: rng.gen_range(0..30),
            },
        };
        steps.push(step(t, fault));
        t += rng.gen_range(2.0..5.0);
        steps.push(step(t, Fault::Heal));
        t += rng.gen_range(1.0..3.0);
    }
    Scenario {
        name: "random".into(),
        description: format!("four faults drawn from seed {seed}, each healed"),
        duration_s: None,
        steps,
    }
}
