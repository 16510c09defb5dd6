//! Agents with real processes (issue 13, first part): a manifest is checked
//! and deployed through any node, placed by the region's leader on a node
//! with a lease (epoch 1), shown by `agent list` and `agent get`, placed
//! again on a survivor with the next epoch when its host dies, and removed.
//! Tasks, datasets and the audit log come next.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{cli, start_in, wait_until, Node};
use serde_json::Value;

const CONFIG: &str = r#"
[membership]
announce_interval_ms = 250
suspect_after_ms = 1500
dead_after_ms = 3000

[raft]
replace_dead_voter_after_ms = 1000
"#;
/// Elections, joins and placements on a loaded 2-core machine.
const WITHIN: Duration = Duration::from_secs(30);

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents")
}

fn ok_json(args: &[&str]) -> Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn agents(node: &Node) -> Vec<Value> {
    let out = cli(&["agent", "list", "--json", "--api", &node.api]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_default()
}

fn active(node: &Node, name: &str) -> Option<(String, u64)> {
    agents(node)
        .into_iter()
        .find(|a| a["name"] == name && a["status"] == "active")
        .and_then(|a| Some((a["node"].as_str()?.to_owned(), a["epoch"].as_u64()?)))
}

#[test]
fn an_agent_is_deployed_placed_moved_off_a_dead_node_and_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("node.toml"), CONFIG).expect("config");
    let mut nodes = vec![start_in(tmp.path(), "a", "eu-west", None)];
    for name in ["b", "c"] {
        let node = start_in(tmp.path(), name, "eu-west", Some(&nodes[0]));
        nodes.push(node);
    }
    let us = start_in(tmp.path(), "u", "us-east", Some(&nodes[0]));
    wait_until("a sees everyone alive", WITHIN, || {
        nodes[1..]
            .iter()
            .chain([&us])
            .all(|n| nodes[0].state_of(&n.peer_id).as_deref() == Some("alive"))
    });
    let out = cli(&[
        "region",
        "bootstrap",
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

    // A bad manifest: every problem at once, nothing deployed.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"Bad Name\"\nversion = \"1\"\nkind = \"search\"\nregions = [\"eu-west\"]\nlatency_budget_ms = 0\n",
    )
    .expect("write");
    let out = cli(&[
        "agent",
        "deploy",
        "-f",
        bad.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--api",
        &nodes[1].api,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "Bad Name",
        "latency_budget_ms is 0",
        "needs an embedding model",
        "needs a dataset",
    ] {
        assert!(stderr.contains(needle), "{needle} in {stderr}");
    }
    let out = cli(&[
        "agent",
        "deploy",
        "-f",
        "/nonexistent.toml",
        "--api",
        &nodes[1].api,
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the manifest"));

    // Through a node of another region: refused (writes only from the
    // region's voters until admission control), saying where to send it.
    let echo = examples().join("echo.toml");
    let out = cli(&[
        "agent",
        "deploy",
        "-f",
        echo.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--api",
        &us.api,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only from the voters"));
    // Through a follower of eu-west: forwarded to the leader.
    let deployed = ok_json(&[
        "agent",
        "deploy",
        "-f",
        echo.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--json",
        "--api",
        &nodes[1].api,
    ]);
    assert_eq!(deployed[0]["name"], "echo", "{deployed}");
    // us-east has no group: that deploy fails, and says so.
    let out = cli(&[
        "agent",
        "deploy",
        "-f",
        echo.to_str().expect("utf-8"),
        "--api",
        &nodes[0].api,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("region us-east"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    wait_until("the leader places echo", WITHIN, || {
        active(&nodes[2], "echo").is_some()
    });
    let (host, epoch) = active(&nodes[2], "echo").expect("active");
    assert_eq!(epoch, 1);
    let got = ok_json(&[
        "agent", "get", "echo", "--region", "eu-west", "--json", "--api", &us.api,
    ]);
    assert_eq!(got["manifest"]["kind"], "echo", "{got}");
    assert_eq!(got["node"], host.as_str());

    // The host dies: the agent is placed on a survivor with the next epoch.
    let i = nodes
        .iter()
        .position(|n| n.peer_id == host)
        .expect("host is a node");
    nodes[i].kill();
    let survivor = &nodes[(i + 1) % 3];
    // Right after the crash the lease still names the dead host (it is
    // declared dead after 3 s): the entry node holds the task through the
    // failover (FAILOVER_WAIT) and it runs on the new host, once.
    let out = cli(&[
        "task",
        "submit",
        "--agent",
        "echo",
        "--input",
        "after the crash",
        "--task-id",
        "t-crash",
        "--json",
        "--api",
        &survivor.api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_ne!(answer["provenance"]["record"]["node"], host.as_str());
    assert_eq!(answer["provenance"]["record"]["epoch"], 2);
    let (_, epoch) = active(survivor, "echo").expect("active");
    assert_eq!(epoch, 2, "one new lease, one epoch");

    // Removed: gone from the list; removing again is a clear 404.
    let out = cli(&["agent", "remove", "echo", "--api", &survivor.api]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("echo is gone", WITHIN, || agents(survivor).is_empty());
    let out = cli(&["agent", "remove", "echo", "--api", &survivor.api]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent \"echo\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
