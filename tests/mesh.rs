//! Five real `agentmesh` processes on loopback: discovery, failure detection,
//! restart with the same identity, and a clean leave.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{start, wait_until, Node, NodeSpec};

/// Fast timings so the test is short; passed through the config file, which
/// this test thereby covers too.
const CONFIG: &str = r#"
[membership]
announce_interval_ms = 250
suspect_after_ms = 1500
dead_after_ms = 3000
"#;
const DEAD_AFTER: Duration = Duration::from_millis(3000);
/// Gossip hops, the 100 ms tick and the 100 ms polling of this test, with
/// room for a loaded 2-core CI machine.
const DETECTION_SLACK: Duration = Duration::from_secs(3);
/// Bound on a 5-node mesh converging from one bootstrap peer.
const CONVERGE_WITHIN: Duration = Duration::from_secs(20);

fn all_see(nodes: &[&Node], peers: &[&str], state: &str) -> bool {
    nodes.iter().all(|n| {
        let view = n.members();
        peers.iter().all(|p| {
            view.iter()
                .any(|m| m["peer_id"] == *p && m["state"] == state)
        })
    })
}

fn spec<'a>(name: &'a str, dir: &'a Path, config: &'a Path, bootstrap: &Node) -> NodeSpec<'a> {
    NodeSpec {
        bootstrap: vec![bootstrap.listen[0].clone()],
        config: Some(config),
        ..NodeSpec::new(
            name,
            dir,
            if name.ends_with(['0', '2', '4']) {
                "eu-west"
            } else {
                "us-east"
            },
        )
    }
}

#[test]
fn five_nodes_discover_detect_death_restart_and_leave() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let dirs: Vec<_> = (0..6).map(|i| tmp.path().join(format!("n{i}"))).collect();

    let first = start(&NodeSpec {
        config: Some(&config),
        ..NodeSpec::new("n0", &dirs[0], "eu-west")
    });
    let mut nodes = vec![first];
    for (i, dir) in dirs.iter().enumerate().take(5).skip(1) {
        let name = format!("n{i}");
        let node = start(&spec(&name, dir, &config, &nodes[0]));
        nodes.push(node);
    }

    // 1. Everyone sees all five alive.
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.clone()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let took = wait_until("every node sees all 5 alive", CONVERGE_WITHIN, || {
        all_see(&nodes.iter().collect::<Vec<_>>(), &id_refs, "alive")
    });
    eprintln!("converged in {took:?}");
    // Every node knew only n0, yet each ends up connected to all four others
    // (identify + kademlia + dialing known members), so losing n0 cuts nobody off.
    wait_until(
        "every node is connected to all 4 others",
        CONVERGE_WITHIN,
        || {
            nodes
                .iter()
                .all(|n| n.metric("agentmesh_peers_connected") == 4)
        },
    );

    // 2. SIGKILL one (not the bootstrap node): every survivor marks it dead in time.
    let victim = 3;
    let victim_id = nodes[victim].peer_id.clone();
    nodes[victim].kill();
    let survivors: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n)
        .collect();
    let took = wait_until(
        "every survivor marks the killed node dead",
        DEAD_AFTER + DETECTION_SLACK,
        || all_see(&survivors, &[&victim_id], "dead"),
    );
    eprintln!("death detected by all survivors in {took:?}");
    let others: Vec<&str> = id_refs
        .iter()
        .copied()
        .filter(|p| *p != victim_id)
        .collect();
    assert!(
        all_see(&survivors, &others, "alive"),
        "a survivor was marked down: {:#?}",
        survivors
            .iter()
            .map(|n| (n.name.clone(), n.members()))
            .collect::<Vec<_>>()
    );

    // 3. Restart it on the same data dir: same peer id, alive everywhere.
    let restarted = start(&spec("n3", &dirs[victim], &config, &nodes[0]));
    assert_eq!(
        restarted.peer_id, victim_id,
        "a restart must keep the peer id"
    );
    nodes[victim] = restarted;
    let took = wait_until(
        "every node sees the restarted node alive",
        CONVERGE_WITHIN,
        || all_see(&nodes.iter().collect::<Vec<_>>(), &id_refs, "alive"),
    );
    eprintln!("restart seen in {took:?}");

    // 4. A sixth node joins, then stops with SIGTERM: `left` everywhere, never `dead`.
    let mut sixth = start(&spec("n5", &dirs[5], &config, &nodes[0]));
    let sixth_id = sixth.peer_id.clone();
    wait_until(
        "every node sees the sixth node alive",
        CONVERGE_WITHIN,
        || all_see(&nodes.iter().collect::<Vec<_>>(), &[&sixth_id], "alive"),
    );
    let status = sixth.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "SIGTERM must stop the node cleanly, got {status}"
    );
    wait_until("every node marks the sixth node left", DEAD_AFTER, || {
        all_see(&nodes.iter().collect::<Vec<_>>(), &[&sixth_id], "left")
    });
    // Still `left` after the death timeout has passed: leave is not death.
    std::thread::sleep(DEAD_AFTER);
    assert!(all_see(
        &nodes.iter().collect::<Vec<_>>(),
        &[&sixth_id],
        "left"
    ));
    assert!(all_see(
        &nodes.iter().collect::<Vec<_>>(),
        &id_refs,
        "alive"
    ));

    // The ready line's facts are in node.json too.
    let node_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(nodes[0].data_dir.join("node.json")).expect("node.json"),
    )
    .expect("node.json is JSON");
    assert_eq!(node_json["peer_id"], nodes[0].peer_id);
    assert_eq!(node_json["api"], nodes[0].api);
}

#[test]
fn two_nodes_find_each_other_over_quic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let quic = "/ip4/127.0.0.1/udp/0/quic-v1";
    let a = start(&NodeSpec {
        listen: quic,
        ..NodeSpec::new("a", &a_dir, "eu-west")
    });
    assert!(a.listen[0].ends_with("/quic-v1"), "{:?}", a.listen);
    let b = start(&NodeSpec {
        listen: quic,
        bootstrap: vec![a.listen[0].clone()],
        ..NodeSpec::new("b", &b_dir, "us-east")
    });
    // The API answers health and gives JSON errors for unknown routes.
    let health: serde_json::Value =
        serde_json::from_str(&common::http_get(&a.api, "/v1/health")).expect("health is JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["peer_id"], a.peer_id);
    let missing: serde_json::Value =
        serde_json::from_str(&common::http_get(&a.api, "/v1/nope")).expect("error is JSON");
    assert_eq!(missing["error"], "not_found");
    assert!(missing["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("/v1/members"));

    wait_until(
        "both see each other alive over QUIC",
        CONVERGE_WITHIN,
        || {
            a.state_of(&b.peer_id).as_deref() == Some("alive")
                && b.state_of(&a.peer_id).as_deref() == Some("alive")
        },
    );
}

/// With announcements 20 s apart, a joining node can only learn the members
/// it is not connected to from the push-pull sync with its bootstrap peer.
#[test]
fn a_joining_node_learns_the_whole_view_by_sync_not_by_waiting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("slow.toml");
    std::fs::write(
        &config,
        "[membership]\nannounce_interval_ms = 20000\nsuspect_after_ms = 60000\ndead_after_ms = 120000\n",
    )
    .expect("write config");
    let dirs: Vec<_> = (0..4).map(|i| tmp.path().join(format!("s{i}"))).collect();
    let seed = start(&NodeSpec {
        config: Some(&config),
        ..NodeSpec::new("s0", &dirs[0], "eu-west")
    });
    let mut nodes = vec![];
    for (i, dir) in dirs.iter().enumerate().skip(1).take(2) {
        nodes.push(start(&spec(&format!("s{i}"), dir, &config, &seed)));
    }
    wait_until(
        "the seed knows the first two joiners",
        CONVERGE_WITHIN,
        || {
            nodes
                .iter()
                .all(|n| seed.state_of(&n.peer_id).as_deref() == Some("alive"))
        },
    );
    let late = start(&spec("s3", &dirs[3], &config, &seed));
    // Far less than the 20 s until anyone announces again.
    let took = wait_until(
        "the late node sees everyone alive",
        Duration::from_secs(5),
        || {
            let view = late.members();
            nodes.iter().chain([&seed]).all(|n| {
                view.iter()
                    .any(|m| m["peer_id"] == n.peer_id && m["state"] == "alive")
            })
        },
    );
    eprintln!("late joiner learned the view in {took:?}");
}
