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
//! leader at that moment, so a scenario reads like the story it tells.

use serde::{Deserialize, Serialize};

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
    /// One voter of `region` (not the leader) is cut off from the rest of its region, both ways.
    IsolateFollower {
        /// Region index.
        region: usize,
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
    /// A follower of `region` stops (its disk is kept).
    CrashFollower {
        /// Region index.
        region: usize,
    },
    /// Region `region`'s leader loses power: its unsynced writes are gone.
    PowerLossLeader {
        /// Region index.
        region: usize,
    },
    /// A follower of `region` loses its disk; it rejoins under a new id.
    WipeFollower {
        /// Region index.
        region: usize,
    },
    /// The next time `region`'s leader starts a membership change, it crashes.
    CrashLeaderOnMembershipChange {
        /// Region index.
        region: usize,
    },
    /// Every fsync of a follower of `region` fails until the heal (then it restarts).
    FailFsync {
        /// Region index.
        region: usize,
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
    /// Every message to or from one follower of `region` takes `extra_ms` longer.
    SlowNode {
        /// Region index.
        region: usize,
        /// Added one-way delay.
        extra_ms: u64,
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
    /// Removes every partition, loss, duplication, extra delay and failing
    /// disk; restarts stopped nodes. Clock skew stays.
    Heal,
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
    "lagging-learner-snapshot",
    "rolling-restart",
    "lossy-links",
    "clock-skew",
    "slow-node",
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
                "a follower of region 0 is cut off for 15 s; the majority keeps committing",
                vec![step(8.0, IsolateFollower { region: 0 }), step(23.0, Heal)],
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
                    step(8.0, WipeFollower { region: 0 }),
                    step(30.0, RestartAll),
                ],
            ),
            "amnesia-voter" => scenario(
                name,
                "a voter of region 0 loses its disk and rejoins as a new member; the dead id is replaced",
                vec![step(8.0, WipeFollower { region: 0 })],
            ),
            "unsynced-writes-at-crash" => scenario(
                name,
                "region 0's leader loses power (unsynced writes lost) under load; restarts 5 s later",
                vec![step(8.0, PowerLossLeader { region: 0 }), step(13.0, RestartAll)],
            ),
            "fsync-failure" => scenario(
                name,
                "a follower of region 0 gets failing fsyncs for 10 s, then restarts",
                vec![step(8.0, FailFsync { region: 0 }), step(18.0, Heal)],
            ),
            "lagging-learner-snapshot" => scenario(
                name,
                "a follower of region 0 is down for 20 s under load, past log compaction: it catches up from a snapshot",
                vec![step(6.0, CrashFollower { region: 0 }), step(26.0, RestartAll)],
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
                "messages to and from a follower of region 0 take 150 ms longer for 20 s",
                vec![
                    step(8.0, SlowNode { region: 0, extra_ms: 150 }),
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
            "random" => random(seed, regions),
            _ => return None,
        })
    }

    /// Reads a scenario file; every problem names the file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read scenario {}: {e}", path.display()))?;
        let scenario: Scenario = toml::from_str(&text)
            .map_err(|e| format!("scenario {} is not valid: {e}", path.display()))?;
        for s in &scenario.steps {
            if !(s.at_s >= 0.0 && s.at_s.is_finite()) {
                return Err(format!(
                    "scenario {}: step at_s = {} must be a time ≥ 0",
                    path.display(),
                    s.at_s
                ));
            }
        }
        Ok(scenario)
    }

    /// Problems with this scenario for a mesh of `regions` regions.
    pub fn check(&self, regions: usize) -> Result<(), String> {
        for s in &self.steps {
            let region = match &s.fault {
                Fault::PartitionRegions { a, b } => Some((*a).max(*b)),
                Fault::IsolateFollower { region }
                | Fault::IsolateLeaderOneWay { region }
                | Fault::CrashLeader { region }
                | Fault::CrashFollower { region }
                | Fault::PowerLossLeader { region }
                | Fault::WipeFollower { region }
                | Fault::CrashLeaderOnMembershipChange { region }
                | Fault::FailFsync { region }
                | Fault::SlowNode { region, .. }
                | Fault::RollingRestart { region, .. } => Some(*region),
                Fault::Loss { percent } | Fault::Duplicate { percent } if *percent > 100 => {
                    return Err(format!("step at {} s: a percentage above 100", s.at_s))
                }
                _ => None,
            };
            if let Some(r) = region.filter(|r| *r >= regions) {
                return Err(format!(
                    "step at {} s names region {r}, but the mesh has {regions} (0 to {})",
                    s.at_s,
                    regions - 1
                ));
            }
        }
        Ok(())
    }
}

/// Faults drawn from the seed: a few of every kind, each healed later.
fn random(seed: u64, regions: usize) -> Scenario {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5ce7_a410);
    let mut steps = Vec::new();
    let mut t = 5.0;
    for _ in 0..4 {
        let region = rng.gen_range(0..regions);
        let fault = match rng.gen_range(0..11) {
            0 => Fault::PartitionRegions {
                a: 0,
                b: if regions > 1 {
                    rng.gen_range(1..regions)
                } else {
                    0
                },
            },
            1 => Fault::IsolateFollower { region },
            2 => Fault::IsolateLeaderOneWay { region },
            3 => Fault::CrashLeader { region },
            4 => Fault::CrashFollower { region },
            5 => Fault::Loss {
                percent: rng.gen_range(1..20),
            },
            6 => Fault::PowerLossLeader { region },
            7 => Fault::WipeFollower { region },
            8 => Fault::FailFsync { region },
            9 => Fault::SlowNode {
                region,
                extra_ms: rng.gen_range(20..300),
            },
            _ => Fault::Delay {
                min_ms: rng.gen_range(1..5),
                jitter_ms: rng.gen_range(0..30),
            },
        };
        steps.push(step(t, fault));
        t += rng.gen_range(3.0..10.0);
        steps.push(step(t, Fault::Heal));
        t += rng.gen_range(2.0..6.0);
    }
    Scenario {
        name: "random".into(),
        description: format!("four faults drawn from seed {seed}, each healed"),
        duration_s: None,
        steps,
    }
}
