//! `agentmesh sim`: run a scenario in the deterministic simulator.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentmesh_sim::{Outcome, Scenario, SimConfig, BUILT_IN};
use anyhow::{anyhow, bail, Context};
use clap::Args;

/// Arguments of `agentmesh sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// A built-in scenario (see the list below) or a scenario TOML file.
    #[arg(long, long_help = format!("A built-in scenario or a TOML file (see sim/README.md).\nBuilt in: {}", BUILT_IN.join(", ")))]
    pub scenario: String,
    /// The seed of every random choice; default: drawn, and printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Nodes in the mesh (node i is in region i mod --regions).
    #[arg(long, default_value_t = 9)]
    pub nodes: usize,
    /// Regions.
    #[arg(long, default_value_t = 3)]
    pub regions: usize,
    /// Simulated time before the final heal: 90s, 10m, 1h (default: the scenario's, else 60s).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Leave out the task workload (agents, datasets, tasks and their
    /// invariants): policy writes and reads only.
    #[arg(long)]
    pub no_tasks: bool,
    /// Run twice and compare the trace hashes.
    #[arg(long)]
    pub check_determinism: bool,
    /// Write the client history and the event trace here as JSON lines
    /// (a failing run writes them anyway, next to the current directory).
    #[arg(long)]
    pub history: Option<PathBuf>,
}

/// `90s`, `10m`, `1h`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write 90s, 10m, 1h or 500ms"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "unknown unit {unit:?} in {text:?}: use ms, s, m or h"
        )),
    }
}

fn load_scenario(name: &str, seed: u64, regions: usize) -> anyhow::Result<Scenario> {
    if let Some(s) = Scenario::built_in(name, seed, regions) {
        return Ok(s);
    }
    let path = Path::new(name);
    if path.exists() {
        return Scenario::from_file(path).map_err(|e| anyhow!(e));
    }
    bail!(
        "no built-in scenario {name:?} and no such file; built in: {}",
        BUILT_IN.join(", ")
    )
}

fn progress_printer() -> impl FnMut(f64) {
    let terminal = std::io::stderr().is_terminal();
    let mut last_quarter = 0;
    move |done: f64| {
        let done = done.clamp(0.0, 1.0);
        if terminal {
            let filled = (done * 30.0) as usize;
            eprint!(
                "\r  [{}{}] {:>3.0}%",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                done * 100.0
            );
            if done >= 1.0 {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else {
            let quarter = (done * 4.0) as usize;
            if quarter > last_quarter {
                last_quarter = quarter;
                eprintln!("  simulated {:.0}%", done * 100.0);
            }
        }
    }
}

fn write_history(path: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    );
    for op in &outcome.history {
        writeln!(out, "{}", serde_json::json!({ "op": op }))?;
    }
    for line in &outcome.trace {
        writeln!(out, "{}", serde_json::json!({ "event": line.trim_start() }))?;
    }
    out.flush()?;
    Ok(())
}

/// Runs the simulation and prints its report; an error if an invariant broke.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            % 1_000_000
    });
    let scenario = load_scenario(&args.scenario, seed, args.regions)?;
    let duration = args
        .duration
        .or(scenario.duration_s.map(Duration::from_secs))
        .unwrap_or(Duration::from_secs(60));
    let config = SimConfig {
        seed,
        nodes: args.nodes,
        regions: args.regions,
        duration,
        tasks: !args.no_tasks,
    };
    let reproduce = format!(
        "agentmesh sim --scenario {} --seed {} --nodes {} --regions {} --duration {}s{}",
        args.scenario,
        seed,
        args.nodes,
        args.regions,
        duration.as_secs(),
        if args.no_tasks { " --no-tasks" } else { "" }
    );
    eprintln!(
        "simulating {:?} ({}): seed {seed}, {} nodes in {} regions, {}s simulated",
        scenario.name,
        scenario.description,
        args.nodes,
        args.regions,
        duration.as_secs()
    );
    for step in &scenario.steps {
        eprintln!(
            "  at {:>6.1} s  {}",
            step.at_s,
            serde_json::to_string(&step.fault)?
        );
    }
    eprintln!(
        "  then: heal everything, check liveness and convergence; reproduce with: {reproduce}"
    );
    let outcome = agentmesh_sim::run(&config, &scenario, &mut progress_printer())?;
    let mut report = outcome.report.clone();
    let mut deterministic = None;
    if args.check_determinism {
        eprintln!("running it again to compare the traces");
        let again = agentmesh_sim::run(&config, &scenario, &mut progress_printer())?;
        deterministic = Some(again.report.trace_hash == report.trace_hash);
        report.wall_s += again.report.wall_s;
    }
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["passed"] = serde_json::Value::Bool(report.passed());
        if let Some(d) = deterministic {
            value["deterministic"] = serde_json::Value::Bool(d);
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", report.table());
        if let Some(d) = deterministic {
            println!(
                "  determinism                  {}",
                if d {
                    "same trace hash twice"
                } else {
                    "DIFFERENT trace hashes"
                }
            );
        }
    }
    let failed = !report.passed() || deterministic == Some(false);
    let history = args.history.clone().or_else(|| {
        failed.then(|| PathBuf::from(format!("agentmesh-sim-{}-{seed}.jsonl", scenario.name)))
    });
    if let Some(path) = &history {
        write_history(path, &outcome)?;
        eprintln!("history and trace written to {}", path.display());
    }
    if deterministic == Some(false) {
        bail!("the same seed gave two different runs; reproduce with: {reproduce} --check-determinism");
    }
    if !report.passed() {
        bail!("invariants violated; reproduce with: {reproduce}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10d").is_err());
        assert!(parse_duration("m").is_err());
    }
}
