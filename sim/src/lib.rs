//! The deterministic simulator: N nodes in R regions in one process, on the
//! real membership engine, the real openraft region groups with the real
//! region state machine and the real policy path (batching included). Only
//! the links, the clock, randomness and the disk are simulated; see
//! `sim/README.md` for where the seam sits and why.
//!
//! ```text
//!   run(config) ── tokio current-thread runtime, clock paused (time jumps to the next timer)
//!     ├─ nodes: Membership engine + RegionGroup(MemStore, SimTransport)   × N
//!     ├─ gossip task: engines tick, announcements cross the links
//!     ├─ clients: policy writes and linearizable reads → history
//!     ├─ scenario: faults at their times (partitions, crashes, loss, delay)
//!     ├─ observer: leaders per term, applied entries per index
//!     └─ end: heal, liveness and convergence bounds, linearizability per region
//! ```
//!
//! Same seed, same run: the trace hash in the report says so, and
//! `--check-determinism` compares two runs.

pub mod check;
pub mod disk;
pub mod report;
pub mod scenario;
mod world;

use std::time::Duration;

use sha2::{Digest, Sha256};

pub use check::{Op, OpKind};
pub use report::{InjectedFault, Invariant, Report, TaskCounts};
pub use scenario::{Fault, Scenario, Step, Who, BUILT_IN};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed of every random choice.
    pub seed: u64,
    /// Nodes in the mesh.
    pub nodes: usize,
    /// Regions; node i is in region i mod regions.
    pub regions: usize,
    /// Simulated time before the final heal.
    pub duration: Duration,
    /// Whether agents are deployed and tasks submitted (the task workload
    /// and its invariants); without it, only policy writes and reads.
    pub tasks: bool,
}

/// Why a simulation could not run (not: what it found).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration makes no sense.
    #[error("{0}")]
    Config(String),
    /// The runtime could not start.
    #[error("cannot start the simulation runtime: {0}")]
    Runtime(std::io::Error),
}

/// A finished run: the report, the client history and the event trace.
#[derive(Debug)]
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// Every client operation.
    pub history: Vec<Op>,
    /// Every event, one line each, with its simulated time.
    pub trace: Vec<String>,
}

impl SimConfig {
    fn check(&self, scenario: &Scenario) -> Result<(), SimError> {
        if self.regions == 0 {
            return Err(SimError::Config("--regions must be at least 1".into()));
        }
        if self.nodes < self.regions {
            return Err(SimError::Config(format!(
                "--nodes {} is fewer than --regions {}: every region needs a node",
                self.nodes, self.regions
            )));
        }
        if self.duration < Duration::from_secs(1) {
            return Err(SimError::Config("--duration must be at least 1s".into()));
        }
        scenario
            .check(self.regions, self.duration.as_secs_f64())
            .map_err(SimError::Config)
    }
}

/// Runs `scenario` once; `progress` gets the fraction of simulated time done.
pub fn run(
    config: &SimConfig,
    scenario: &Scenario,
    progress: &mut dyn FnMut(f64),
) -> Result<Outcome, SimError> {
    config.check(scenario)?;
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().start_paused(true);
    // tokio's own RNG (which branch an unbiased `select!` polls first, as
    // openraft's replication back-off does) is seeded from the run's seed,
    // so a trace is a function of the seed alone. Needs `--cfg
    // tokio_unstable`, which .cargo/config.toml sets for the workspace.
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(
        &config.seed.to_le_bytes(),
    ));
    // Without it (RUSTFLAGS set in the environment replaces the config's),
    // runs still work; only that RNG is then seeded per process.
    let runtime = builder.build().map_err(SimError::Runtime)?;
    let wall = std::time::Instant::now();
    let (mut report, history, trace) =
        runtime.block_on(world::simulate(config, scenario, progress));
    drop(runtime);
    report.wall_s = wall.elapsed().as_secs_f64();
    report.speedup = report.simulated_s / report.wall_s.max(1e-9);
    let mut hash = Sha256::new();
    for line in &trace {
        hash.update(line.as_bytes());
        hash.update(b"\n");
    }
    report.trace_hash = hash
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..16]
        .to_owned();
    Ok(Outcome {
        report,
        history,
        trace,
    })
}
