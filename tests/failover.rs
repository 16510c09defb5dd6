//! Failover with real processes (issue 14): a `counter` agent under a
//! steady load of tasks; its host is killed with SIGKILL; the agent is
//! active on another node of the region with its state, every task the
//! clients were answered is counted once, and every answered task has
//! exactly one audit record that counts (a run that was never answered,
//! cut off by the kill, is named by the record of the run that replaced it).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, start, wait_until, Node, NodeSpec};
use serde_json::Value;

const CONFIG: &str = r#"
[membership]
announce_interval_ms = 250
suspect_after_ms = 1500
dead_after_ms = 3000
"#;
const WITHIN: Duration = Duration::from_secs(30);
/// A task is retried (same id) until it is answered, at most this long.
const TASK_WITHIN: Duration = Duration::from_secs(60);

const POLICY: &str = "[rate_limits.per_agent]\nper_second = 1000\nburst = 1000\n\n[rate_limits.per_client]\nper_second = 1000\nburst = 1000\n";

fn run(args: &[&str]) -> Result<Value, String> {
    let out = cli(args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("no JSON ({e})"))
}

/// An answered task: its id, the counter value it returned, its host, and
/// the hash of the audit record it was answered with.
#[derive(Debug, Clone)]
struct Answered {
    id: String,
    value: i64,
    node: String,
    record: String,
    at: Instant,
}

/// Submits `input` as task `id` to `api` until it is answered.
fn submit_until_answered(api: &str, input: &str, id: &str) -> Answered {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < TASK_WITHIN {
        match run(&[
            "task",
            "submit",
            "--agent",
            "counter",
            "--input",
            input,
            "--task-id",
            id,
            "--json",
            "--api",
            api,
        ]) {
            Ok(v) => {
                return Answered {
                    id: id.to_owned(),
                    value: v["output"]["value"].as_i64().expect("a counter value"),
                    node: v["provenance"]["record"]["node"]
                        .as_str()
                        .expect("a host")
                        .to_owned(),
                    record: v["provenance"]["hash"].as_str().expect("a hash").to_owned(),
                    at: Instant::now(),
                }
            }
            Err(e) => {
                last = e;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    panic!("task {id} was not answered within {TASK_WITHIN:?}; last error: {last}");
}

fn lease(api: &str) -> Option<(String, u64)> {
    let v = run(&[
        "agent", "get", "counter", "--region", "eu-west", "--json", "--api", api,
    ])
    .ok()?;
    Some((v["node"].as_str()?.to_owned(), v["epoch"].as_u64()?))
}

#[test]
fn a_killed_hosts_counter_goes_on_elsewhere_with_every_answered_task_counted_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let names = ["a", "b", "c"];
    let dirs: Vec<_> = names.iter().map(|n| tmp.path().join(n)).collect();
    let mut nodes: Vec<Node> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut s = NodeSpec::new(name, &dirs[i], "eu-west");
        s.config = Some(&config);
        s.bootstrap = nodes
            .first()
            .map(|b| vec![b.listen[0].clone()])
            .unwrap_or_default();
        nodes.push(start(&s));
    }
    wait_until("a sees everyone alive", WITHIN, || {
        nodes[1..]
            .iter()
            .all(|n| nodes[0].state_of(&n.peer_id).as_deref() == Some("alive"))
    });
    run(&[
        "region",
        "bootstrap",
        "--region",
        "eu-west",
        "--json",
        "--api",
        &nodes[0].api,
    ])
    .expect("bootstrap");
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let out = cli(&[
        "policy",
        "apply",
        "-f",
        policy.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--api",
        &nodes[0].api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counter = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents/counter.toml");
    run(&[
        "agent",
        "deploy",
        "-f",
        counter.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--json",
        "--api",
        &nodes[0].api,
    ])
    .expect("deploy");
    wait_until("the counter is placed", WITHIN, || {
        lease(&nodes[0].api).is_some()
    });
    let (host, epoch) = lease(&nodes[0].api).expect("placed");
    let host_i = nodes
        .iter()
        .position(|n| n.peer_id == host)
        .expect("a node hosts it");
    let entries: Vec<String> = nodes
        .iter()
        .filter(|n| n.peer_id != host)
        .map(|n| n.api.clone())
        .collect();
    let first = submit_until_answered(&entries[0], "k", "warm-up");
    assert_eq!((first.value, first.node.as_str()), (1, host.as_str()));

    // Two clients, about 10 tasks a second each, through the two other nodes.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(vec![first]));
    let clients: Vec<_> = entries
        .iter()
        .enumerate()
        .map(|(c, api)| {
            let (api, stop, answered) = (api.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let a = submit_until_answered(&api, "k", &format!("c{c}-{i}"));
                    answered.lock().expect("lock").push(a);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let before = answered.lock().expect("lock").len();
    assert!(before > 5, "the load runs: {before} tasks answered in 3 s");
    let killed_at = Instant::now();
    nodes[host_i].kill();
    let survivor = &entries[0];
    wait_until("the counter is placed on a survivor", WITHIN, || {
        lease(survivor).is_some_and(|(node, e)| node != host && e > epoch)
    });
    let moved = wait_until("a task is answered by the new host", WITHIN, || {
        answered
            .lock()
            .expect("lock")
            .iter()
            .any(|a| a.node != host && a.at > killed_at)
    });
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client");
    }
    let answered = answered.lock().expect("lock").clone();
    let first_elsewhere = answered
        .iter()
        .filter(|a| a.node != host && a.at > killed_at)
        .map(|a| a.at.duration_since(killed_at))
        .min()
        .expect("some");
    eprintln!(
        "{} tasks answered; SIGKILL to the first task answered by the new host: {:?} (seen after {moved:?})",
        answered.len(),
        first_elsewhere
    );

    // Every answered task counted once: the values are 1..=n, each once,
    // and the counter holds n.
    let mut values: Vec<i64> = answered.iter().map(|a| a.value).collect();
    values.sort_unstable();
    let n = answered.len() as i64;
    assert_eq!(
        values,
        (1..=n).collect::<Vec<_>>(),
        "each answered task saw its own count"
    );
    let now = submit_until_answered(survivor, "k +0", "final");
    assert_eq!(now.value, n, "the counter equals the answered tasks");

    // The killed host comes back, learns its lease moved, and serves its
    // audit log; every answered task has exactly one record that counts.
    let mut s = NodeSpec::new("a-again", &dirs[host_i], "eu-west");
    s.config = Some(&config);
    s.bootstrap = vec![nodes[(host_i + 1) % 3].listen[0].clone()];
    nodes[host_i] = start(&s);
    let mut records: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for node in &nodes {
        let all =
            run(&["audit", "--agent", "counter", "--json", "--api", &node.api]).expect("audit");
        for r in all.as_array().expect("records") {
            let id = r["record"]["task_id"].as_str().expect("id").to_owned();
            records.entry(id).or_default().push(r.clone());
        }
    }
    let mut reruns = 0;
    for a in &answered {
        let runs = records.get(&a.id).cloned().unwrap_or_default();
        let counted: Vec<&Value> = runs
            .iter()
            .filter(|r| r["hash"].as_str() == Some(a.record.as_str()))
            .collect();
        assert_eq!(
            counted.len(),
            1,
            "task {} has its answered record once: {runs:?}",
            a.id
        );
        // Any other run was replaced: a later run names its claim.
        for other in runs
            .iter()
            .filter(|r| r["hash"].as_str() != Some(a.record.as_str()))
        {
            reruns += 1;
            let claim = format!(
                "{}@{}",
                other["record"]["node"].as_str().unwrap_or_default(),
                other["record"]["epoch"]
            );
            assert!(
                runs.iter()
                    .any(|r| r["record"]["reclaims"].as_str() == Some(claim.as_str())),
                "task {}'s run {other} was not answered, yet no run took over its claim {claim}",
                a.id
            );
        }
    }
    eprintln!("{reruns} runs cut off by the kill and replaced");
    // Exits non-zero when a chain does not hold.
    let verified = run(&["audit", "verify", "--all", "--json", "--api", &nodes[0].api])
        .expect("every node's audit chain verifies");
    eprintln!("audit verify --all: {verified}");
}
