//! A minority cannot commit, with links cut for real: three nodes, each in
//! its own network namespace, joined by a bridge in a fourth. The subnet
//! 10.231.77.0/24 exists only inside these namespaces. Needs root and
//! `ip netns`; without them the test prints why it skipped.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{start, wait_until, Node, NodeSpec};
use serde_json::Value;

const CONFIG: &str = r#"
[membership]
announce_interval_ms = 250
suspect_after_ms = 1500
dead_after_ms = 3000
"#;
const WITHIN: Duration = Duration::from_secs(30);

/// The namespaces of one test run; deleted (with their veths and bridge) on drop, also on failure.
struct Namespaces {
    hub: String,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Namespaces {
    fn create(count: usize) -> Result<Self, String> {
        let tag = std::process::id();
        let made = Self {
            hub: format!("amhub-{tag}"),
            nodes: (1..=count).map(|i| format!("am{i}-{tag}")).collect(),
        };
        ip(&["netns", "add", &made.hub])?;
        ip(&["-n", &made.hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &made.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &made.hub, "link", "set", "br0", "up"])?;
        for (i, ns) in made.nodes.iter().enumerate() {
            let n = i + 1;
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let (hub_end, node_end) = (format!("vh{n}"), format!("vn{n}"));
            ip(&[
                "-n", &made.hub, "link", "add", &hub_end, "type", "veth", "peer", "name",
                &node_end, "netns", ns,
            ])?;
            ip(&[
                "-n", &made.hub, "link", "set", &hub_end, "master", "br0", "up",
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.231.77.{n}/24"),
                "dev",
                &node_end,
            ])?;
            ip(&["-n", ns, "link", "set", &node_end, "up"])?;
        }
        Ok(made)
    }

    /// Takes node `n`'s (1-based) only link down or up.
    fn link(&self, n: usize, up: bool) {
        ip(&[
            "-n",
            &self.nodes[n - 1],
            "link",
            "set",
            &format!("vn{n}"),
            if up { "up" } else { "down" },
        ])
        .expect("set link");
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The tests of this file make namespaces of the same names (and probe
/// with one): they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Why namespaces cannot be made here, if they cannot.
fn unavailable() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("not root (network namespaces need root)".into());
    }
    let probe = format!("amprobe-{}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!("`ip netns add` does not work here: {e}")),
    }
}

fn cli(node: &Node, args: &[&str]) -> Output {
    node.cli()
        .args(args)
        .args(["--api", &node.api])
        .output()
        .expect("run agentmesh")
}

fn json(node: &Node, args: &[&str]) -> Option<Value> {
    let out = cli(node, args);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn policy_version(node: &Node) -> Option<u64> {
    json(node, &["policy", "get", "--region", "eu-west", "--json"])?["version"].as_u64()
}

/// Three eu-west nodes, one in each of `namespaces`' node namespaces, data
/// under `dir`, all seen alive by the first.
fn start_region(
    namespaces: &Namespaces,
    dir: &std::path::Path,
    config: &std::path::Path,
) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for n in 1..=3 {
        let data = dir.join(format!("n{n}"));
        let listen = format!("/ip4/10.231.77.{n}/tcp/4001");
        let api = format!("10.231.77.{n}:7070");
        let bootstrap = if n == 1 {
            vec![]
        } else {
            vec!["/ip4/10.231.77.1/tcp/4001".to_owned()]
        };
        nodes.push(start(&NodeSpec {
            config: Some(config),
            listen: &listen,
            api: &api,
            netns: Some(&namespaces.nodes[n - 1]),
            bootstrap,
            ..NodeSpec::new(&format!("n{n}"), &data, "eu-west")
        }));
    }
    wait_until("n1 sees n2 and n3 alive", WITHIN, || {
        nodes[1..]
            .iter()
            .all(|n| nodes[0].state_of(&n.peer_id).as_deref() == Some("alive"))
    });
    nodes
}

#[test]
fn a_voter_cut_off_in_its_namespace_cannot_commit_and_catches_up_after_the_heal() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = unavailable() {
        println!("SKIPPED: netns::a_voter_cut_off_in_its_namespace_cannot_commit_and_catches_up_after_the_heal: {why}");
        return;
    }
    let namespaces = Namespaces::create(3).expect("create namespaces");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[residency]]\ntag = \"pii-eu\"\nregions = [\"eu-west\"]\n",
    )
    .expect("policy");

    let nodes = start_region(&namespaces, tmp.path(), &config);
    let out = cli(&nodes[0], &["region", "bootstrap", "--region", "eu-west"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = {
        let mut found = None;
        wait_until("every node knows the leader", WITHIN, || {
            let leaders: Vec<Option<String>> = nodes
                .iter()
                .map(|n| {
                    json(n, &["region", "status", "--region", "eu-west", "--json"])
                        .and_then(|s| s["leader"].as_str().map(str::to_owned))
                })
                .collect();
            found = leaders[0].clone();
            found.is_some() && leaders.iter().all(|l| *l == found)
        });
        found.expect("leader")
    };
    let out = cli(
        &nodes[0],
        &[
            "policy",
            "apply",
            "-f",
            policy.to_str().expect("utf-8"),
            "--region",
            "eu-west",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v1 = policy_version(&nodes[0]).expect("version");
    wait_until("all three serve the first policy", WITHIN, || {
        nodes.iter().all(|n| policy_version(n) == Some(v1))
    });

    // Cut a follower off: its only link goes down.
    let cut = (1..=3)
        .find(|n| nodes[n - 1].peer_id != leader)
        .expect("a follower");
    let majority: Vec<usize> = (1..=3).filter(|n| *n != cut).collect();
    namespaces.link(cut, false);

    // The minority cannot commit: a write sent to it fails, retryably, in bounded time.
    let started = std::time::Instant::now();
    let out = cli(
        &nodes[cut - 1],
        &[
            "policy",
            "apply",
            "-f",
            policy.to_str().expect("utf-8"),
            "--region",
            "eu-west",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the cut-off node must not commit");
    assert!(
        stderr.contains("retry"),
        "the error must say to retry: {stderr}"
    );
    eprintln!(
        "the cut-off node refused the write after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "bounded: {:?}",
        started.elapsed()
    );
    // ...nor serve a linearizable read.
    assert!(json(
        &nodes[cut - 1],
        &[
            "policy",
            "get",
            "--region",
            "eu-west",
            "--consistent",
            "--json"
        ]
    )
    .is_none());

    // The majority still commits.
    let out = cli(
        &nodes[majority[0] - 1],
        &[
            "policy",
            "apply",
            "-f",
            policy.to_str().expect("utf-8"),
            "--region",
            "eu-west",
        ],
    );
    assert!(
        out.status.success(),
        "the majority must commit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = policy_version(&nodes[majority[0] - 1]).expect("version");
    assert!(v2 > v1);
    assert_eq!(
        policy_version(&nodes[cut - 1]),
        Some(v1),
        "the cut-off replica cannot have the new write"
    );

    eprintln!("majority committed; healing");
    // Heal: the node catches up.
    namespaces.link(cut, true);
    // The write sent to the cut-off node was answered "outcome unknown"
    // (504): forwarded over a connection that was dead but not yet known
    // to be, it may still be applied when the partition heals (a request
    // is dropped only once past its sender's deadline plus the clock skew
    // allowed). Either way the healed node must serve what the majority
    // serves, at v2 or later.
    wait_until(
        "the healed node serves the majority's policy",
        WITHIN,
        || {
            let majority_now = policy_version(&nodes[majority[0] - 1]);
            majority_now.is_some_and(|v| v >= v2) && policy_version(&nodes[cut - 1]) == majority_now
        },
    );
}

/// The first line of a node's JSON log whose message starts with
/// `message` and whose fields have the values `fields`: its timestamp
/// (RFC 3339, UTC, fixed width: compares as text) and the line.
fn first_line(log: &str, message: &str, fields: &[(&str, Value)]) -> Option<(String, String)> {
    log.lines().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        let matches = v["message"].as_str()?.starts_with(message)
            && fields.iter().all(|(k, want)| &v[*k] == want);
        matches.then(|| {
            (
                v["timestamp"].as_str().unwrap_or("").to_owned(),
                l.to_owned(),
            )
        })
    })
}

/// Issue 14, fencing: the host of a `counter` agent under load is cut off
/// (its only link down). It steps down (stops the agent) before the
/// majority's new host activates it; tasks go on through the majority;
/// healed, the old host learns the new lease and does not serve again;
/// every answered task is counted once.
#[test]
fn a_cut_off_host_steps_down_before_its_successor_starts_and_nothing_is_counted_twice() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const NAME: &str =
        "netns::a_cut_off_host_steps_down_before_its_successor_starts_and_nothing_is_counted_twice";
    if let Some(why) = unavailable() {
        println!("SKIPPED: {NAME}: {why}");
        return;
    }
    let namespaces = Namespaces::create(3).expect("create namespaces");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let nodes = start_region(&namespaces, tmp.path(), &config);
    let out = cli(&nodes[0], &["region", "bootstrap", "--region", "eu-west"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[rate_limits.per_agent]\nper_second = 1000\nburst = 1000\n\n[rate_limits.per_client]\nper_second = 1000\nburst = 1000\n",
    )
    .expect("policy");
    let applied = |n: &Node| {
        cli(
            n,
            &[
                "policy",
                "apply",
                "-f",
                policy.to_str().expect("utf-8"),
                "--region",
                "eu-west",
            ],
        )
        .status
        .success()
    };
    wait_until("the policy is applied", WITHIN, || applied(&nodes[0]));
    let counter =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents/counter.toml");
    let counter = counter.to_str().expect("utf-8");
    wait_until("the counter is deployed", WITHIN, || {
        json(
            &nodes[0],
            &[
                "agent", "deploy", "-f", counter, "--region", "eu-west", "--json",
            ],
        )
        .is_some()
    });
    let lease = |n: &Node| -> Option<(String, u64)> {
        let v = json(
            n,
            &["agent", "get", "counter", "--region", "eu-west", "--json"],
        )?;
        Some((v["node"].as_str()?.to_owned(), v["epoch"].as_u64()?))
    };
    let mut placed = None;
    wait_until("the counter is placed", WITHIN, || {
        placed = lease(&nodes[0]);
        placed.is_some()
    });
    let (host, epoch) = placed.expect("placed");
    let cut = nodes
        .iter()
        .position(|n| n.peer_id == host)
        .expect("the host is a node")
        + 1;
    let entry = (1..=3).find(|n| *n != cut).expect("a majority node");
    let (entry_ns, entry_api) = (
        namespaces.nodes[entry - 1].clone(),
        nodes[entry - 1].api.clone(),
    );
    let submit = |input: &str, id: &str| {
        common::submit_counter(
            Some(&entry_ns),
            &entry_api,
            input,
            id,
            Duration::from_secs(60),
        )
    };
    let first = submit("k", "warm-up");
    assert_eq!((first.value, first.node.as_str()), (1, host.as_str()));

    // About 10 tasks a second through a node of the majority.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, ns, api) = (stop.clone(), entry_ns.clone(), entry_api.clone());
        std::thread::spawn(move || {
            let mut answered = vec![first];
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("p-{i}");
                answered.push(common::submit_counter(
                    Some(&ns),
                    &api,
                    "k",
                    &id,
                    Duration::from_secs(60),
                ));
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            answered
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    namespaces.link(cut, false);
    let cut_at = std::time::Instant::now();
    let mut successor = None;
    wait_until(
        "the majority moves the counter off the cut-off host",
        WITHIN,
        || {
            successor = lease(&nodes[entry - 1]).filter(|(n, e)| *n != host && *e > epoch);
            successor.is_some()
        },
    );
    let (new_host, new_epoch) = successor.expect("moved");
    eprintln!(
        "moved to {new_host} at epoch {new_epoch} {:?} after the cut",
        cut_at.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    namespaces.link(cut, true);
    wait_until("the healed host learns the new lease", WITHIN, || {
        lease(&nodes[cut - 1]).is_some_and(|(n, e)| n == new_host && e == new_epoch)
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answered = load.join().expect("load");

    // Every answered task counted once: 1..=n, and the counter holds n.
    let mut values: Vec<i64> = answered.iter().map(|a| a.value).collect();
    values.sort_unstable();
    let n = answered.len() as i64;
    assert_eq!(
        values,
        (1..=n).collect::<Vec<_>>(),
        "each answered task saw its own count"
    );
    assert!(
        answered.iter().any(|a| a.node == new_host),
        "the successor served"
    );
    assert_eq!(
        submit("k +0", "final").value,
        n,
        "the counter equals the answered tasks"
    );
    eprintln!("{n} tasks answered through the cut and the heal");

    // The old host stepped down before its successor started, and never
    // served after the cut.
    let old_log = common::read(&nodes[cut - 1].log);
    let new_log = common::read(
        &nodes
            .iter()
            .find(|n| n.peer_id == new_host)
            .expect("node")
            .log,
    );
    let (stopped_at, stopped) = first_line(
        &old_log,
        "agent stopped here: stepped down",
        &[("agent", "counter".into()), ("epoch", epoch.into())],
    )
    .unwrap_or_else(|| panic!("the cut-off host never stepped down:\n{old_log}"));
    let (started_at, started) = first_line(
        &new_log,
        "agent active here",
        &[("agent", "counter".into()), ("epoch", new_epoch.into())],
    )
    .unwrap_or_else(|| panic!("the successor never logged its activation:\n{new_log}"));
    eprintln!("old host: {stopped}\nnew host: {started}");
    assert!(
        stopped_at < started_at,
        "the old host stopped at {stopped_at}, after its successor started at {started_at}"
    );
    assert!(
        answered
            .iter()
            .filter(|a| a.node == host)
            .all(|a| a.at < cut_at + Duration::from_secs(1)),
        "the cut-off host answered a task after the cut"
    );
    assert!(
        old_log.contains("back in contact with the region's majority"),
        "{old_log}"
    );
}
