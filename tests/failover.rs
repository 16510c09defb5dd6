//! Failover with real processes (issue 14): a `counter` agent under a
//! steady load of tasks; its host is killed with SIGKILL; the agent is
//! active on another node of the region with its state, every task the
//! clients were answered is counted once, and every answered task has
//! exactly one audit record that counts (a run that was never answered,
//! cut off by the kill, is named by the record of the run that replaced it).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    bootstrap_when_alive, cli, cli_json, start, submit_counter, wait_until, Answered, Node,
    NodeSpec,
};
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

/// Submits `input` as task `id` to `api` until it is answered.
fn submit_until_answered(api: &str, input: &str, id: &str) -> Answered {
    submit_counter(None, api, input, id, TASK_WITHIN)
}

/// Clients that submit counter tasks (`k`, ids `{prefix}{c}-{i}`), one
/// after another, each through one of `entries`, about 10 a second each.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<Answered>>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(entries: &[String], prefix: &str, first: Answered) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(vec![first]));
        let clients = entries
            .iter()
            .enumerate()
            .map(|(c, api)| {
                let (api, stop, answered) = (api.clone(), stop.clone(), answered.clone());
                let prefix = prefix.to_owned();
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let a = submit_until_answered(&api, "k", &format!("{prefix}{c}-{i}"));
                        answered.lock().expect("lock").push(a);
                        i += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        Self {
            stop,
            answered,
            clients,
        }
    }

    fn answered(&self) -> Vec<Answered> {
        self.answered.lock().expect("lock").clone()
    }

    fn stop(self) -> Vec<Answered> {
        self.stop.store(true, Ordering::SeqCst);
        let answered = self.answered.clone();
        for c in self.clients {
            c.join().expect("client");
        }
        let all = answered.lock().expect("lock").clone();
        all
    }
}

/// Every answered task counted once: the values are 1..=n, each once, and
/// the counter holds n (asked through `api`).
fn assert_counted_once(answered: &[Answered], api: &str) {
    let mut values: Vec<i64> = answered.iter().map(|a| a.value).collect();
    values.sort_unstable();
    let n = answered.len() as i64;
    assert_eq!(
        values,
        (1..=n).collect::<Vec<_>>(),
        "each answered task saw its own count"
    );
    let now = submit_until_answered(api, "k +0", "final");
    assert_eq!(now.value, n, "the counter equals the answered tasks");
}

fn lease(api: &str) -> Option<(String, u64)> {
    let v = cli_json(&[
        "agent", "get", "counter", "--region", "eu-west", "--json", "--api", api,
    ])
    .ok()?;
    Some((v["node"].as_str()?.to_owned(), v["epoch"].as_u64()?))
}

/// Three eu-west nodes under `tmp` (data dirs a, b, c) with the policy
/// and the counter agent deployed and placed; their data dirs and config.
fn counter_mesh(tmp: &Path) -> (Vec<Node>, Vec<PathBuf>, PathBuf) {
    let config = tmp.join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let names = ["a", "b", "c"];
    let dirs: Vec<_> = names.iter().map(|n| tmp.join(n)).collect();
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
    bootstrap_when_alive(&nodes[0], &nodes[1..], "eu-west", WITHIN);
    let policy = tmp.join("policy.toml");
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
    cli_json(&[
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
    (nodes, dirs, config)
}

#[test]
fn a_killed_hosts_counter_goes_on_elsewhere_with_every_answered_task_counted_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut nodes, dirs, config) = counter_mesh(tmp.path());
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
    let load = Load::start(&entries, "c", first);
    std::thread::sleep(Duration::from_secs(3));
    let before = load.answered().len();
    assert!(before > 5, "the load runs: {before} tasks answered in 3 s");
    let killed_at = Instant::now();
    nodes[host_i].kill();
    let survivor = &entries[0];
    wait_until("the counter is placed on a survivor", WITHIN, || {
        lease(survivor).is_some_and(|(node, e)| node != host && e > epoch)
    });
    let moved = wait_until("a task is answered by the new host", WITHIN, || {
        load.answered()
            .iter()
            .any(|a| a.node != host && a.at > killed_at)
    });
    std::thread::sleep(Duration::from_secs(3));
    let answered = load.stop();
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

    assert_counted_once(&answered, survivor);

    // The killed host comes back, learns its lease moved, and serves its
    // audit log; every answered task has exactly one record that counts.
    let mut s = NodeSpec::new("a-again", &dirs[host_i], "eu-west");
    s.config = Some(&config);
    s.bootstrap = vec![nodes[(host_i + 1) % 3].listen[0].clone()];
    nodes[host_i] = start(&s);
    let mut records: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for node in &nodes {
        let all = cli_json(&["audit", "--agent", "counter", "--json", "--api", &node.api])
            .expect("audit");
        for r in all.as_array().expect("records") {
            let id = r["record"]["task_id"].as_str().expect("id").to_owned();
            records.entry(id).or_default().push(r.clone());
        }
    }
    // The move is in the new host's audit chain and in the agent's moves.
    let moved_from = format!("host-down from {host}@{epoch}");
    assert!(
        records
            .values()
            .flatten()
            .any(|r| r["record"]["moved"].as_str() == Some(moved_from.as_str())),
        "no audit record of the move ({moved_from})"
    );
    let got = cli_json(&[
        "agent", "get", "counter", "--region", "eu-west", "--json", "--api", survivor,
    ])
    .expect("agent get");
    let last = got["moves"].as_array().and_then(|m| m.last()).cloned();
    assert_eq!(
        last.as_ref()
            .map(|m| (m["reason"].as_str(), m["from"].as_str())),
        Some((Some("host-down"), Some(host.as_str()))),
        "{got}"
    );
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
    let verified = cli_json(&["audit", "verify", "--all", "--json", "--api", &nodes[0].api])
        .expect("every node's audit chain verifies");
    eprintln!("audit verify --all: {verified}");
}

/// The `move` records of the counter in every node's audit log.
fn move_records(nodes: &[&Node]) -> Vec<String> {
    let mut moves = Vec::new();
    for node in nodes {
        let all = cli_json(&["audit", "--agent", "counter", "--json", "--api", &node.api])
            .expect("audit");
        for r in all.as_array().expect("records") {
            if let Some(m) = r["record"]["moved"].as_str() {
                moves.push(m.to_owned());
            }
        }
    }
    moves
}

/// `agent move` and `node drain` under load: the counter moves with its
/// state to the node named, then off that node when it drains (with the
/// copies it keeps), after which it stops; every answered task is counted
/// once, and each move is in `agent get`, in the new host's audit records
/// and in the nodes' logs.
#[test]
fn an_agent_moves_on_request_and_off_a_draining_node_with_its_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut nodes, _, _) = counter_mesh(tmp.path());
    let (host, epoch) = lease(&nodes[0].api).expect("placed");
    let host_i = nodes.iter().position(|n| n.peer_id == host).expect("host");
    let target_i = (host_i + 1) % 3;
    let entry_i = (host_i + 2) % 3;
    let target = nodes[target_i].peer_id.clone();
    let first = submit_until_answered(&nodes[entry_i].api, "k", "warm-up");
    let load = Load::start(&[nodes[entry_i].api.clone()], "m", first);
    std::thread::sleep(Duration::from_secs(1));

    // A node that is not in the region: refused, with the region's nodes.
    let e = cli_json(&[
        "agent",
        "move",
        "counter",
        "--to",
        "12D3KooWnothere",
        "--json",
        "--api",
        &nodes[entry_i].api,
    ])
    .expect_err("no such node");
    assert!(e.contains("no node of region eu-west has peer id"), "{e}");
    // Moved, to a node named by a prefix of its peer id.
    let moved = cli_json(&[
        "agent",
        "move",
        "counter",
        "--to",
        &target[..24],
        "--json",
        "--api",
        &nodes[entry_i].api,
    ])
    .expect("moved");
    assert_eq!(moved["to"], target.as_str(), "{moved}");
    assert_eq!(moved["epoch"], epoch + 1, "{moved}");
    let moved_at = Instant::now();
    wait_until("a task is answered by the new host", WITHIN, || {
        load.answered()
            .iter()
            .any(|a| a.node == target && a.at > moved_at)
    });

    // The new host drains: the counter moves off it, and so does every
    // copy of agent state it keeps; then it may stop.
    let out = cli(&["node", "drain", "--api", &nodes[target_i].api]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("drained in"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (now_on, now_epoch) = lease(&nodes[entry_i].api).expect("placed");
    assert!(
        now_on != target && now_epoch == epoch + 2,
        "{now_on} {now_epoch}"
    );
    let got = cli_json(&[
        "agent",
        "get",
        "counter",
        "--json",
        "--api",
        &nodes[entry_i].api,
    ])
    .expect("agent get");
    assert!(
        !got["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .any(|r| r == target.as_str()),
        "{got}"
    );
    let reasons: Vec<&str> = got["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .filter_map(|m| m["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["placed", "operator", "drain"], "{got}");
    // The operator's move is in the audit chain of the node it moved to.
    let from_host = format!("operator from {host}@{epoch}");
    let moves = move_records(&[&nodes[target_i]]);
    assert!(
        moves.contains(&from_host),
        "no record of the move ({from_host}) in {moves:?}"
    );
    let drained_at = Instant::now();
    nodes[target_i].terminate(WITHIN);
    wait_until(
        "a task is answered after the drained node stopped",
        WITHIN,
        || {
            load.answered()
                .iter()
                .any(|a| a.node == now_on && a.at > drained_at)
        },
    );
    let answered = load.stop();
    eprintln!(
        "{} tasks answered through a move and a drain",
        answered.len()
    );
    assert_counted_once(&answered, &nodes[entry_i].api);

    // The drain's move too; and each move is logged.
    let live: Vec<&Node> = [host_i, entry_i].iter().map(|&i| &nodes[i]).collect();
    let moves = move_records(&live);
    let from_target = format!("drain from {target}@{}", epoch + 1);
    assert!(
        moves.contains(&from_target),
        "no record of the drain ({from_target}) in {moves:?}"
    );
    let logs: String = nodes.iter().map(|n| common::read(&n.log)).collect();
    for line in [
        "moved an agent",
        "agent stopped here: its lease moved",
        "agent active here",
        "set a node's draining mark",
    ] {
        assert!(logs.contains(line), "no log line {line:?}");
    }
    assert!(logs.contains("drain") && logs.contains("operator"));
}
