//! Tasks with real processes (issue 13, first part): a task submitted to a
//! node of another region runs where the agent lives and comes back with
//! its provenance; residency refuses a `pii-eu` result bound for us-east
//! before anything runs and allows it in eu-west; a task id runs once
//! however often it is submitted; an edited audit record is detected.
//! Datasets and the model-backed kinds come next.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    bootstrap_when_alive, cli, cli_json, start, wait_until, write_policy, Node, NodeSpec,
};
use serde_json::Value;

const CONFIG: &str = r#"
[membership]
announce_interval_ms = 250
suspect_after_ms = 1500
dead_after_ms = 3000
"#;
const WITHIN: Duration = Duration::from_secs(30);

fn spec<'a>(
    dir: &'a Path,
    name: &'a str,
    region: &'a str,
    bootstrap: Option<&Node>,
) -> NodeSpec<'a> {
    NodeSpec {
        bootstrap: bootstrap
            .map(|b| vec![b.listen[0].clone()])
            .unwrap_or_default(),
        ..NodeSpec::new(name, dir, region)
    }
}

fn submit(node: &Node, input: &str, extra: &[&str]) -> Result<Value, String> {
    let mut args = vec![
        "task", "submit", "--agent", "echo", "--input", input, "--json", "--api", &node.api,
    ];
    args.extend_from_slice(extra);
    cli_json(&args)
}

#[test]
fn tasks_run_where_the_agent_lives_under_residency_once_per_id_with_a_verifiable_audit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let dirs: Vec<_> = ["a", "b", "c", "u"]
        .iter()
        .map(|n| tmp.path().join(n))
        .collect();
    let mut eu = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let mut s = spec(&dirs[i], name, "eu-west", eu.first());
        s.config = Some(&config);
        eu.push(start(&s));
    }
    let mut us_spec = spec(&dirs[3], "u", "us-east", eu.first());
    us_spec.config = Some(&config);
    let us = start(&us_spec);
    bootstrap_when_alive(&eu[0], eu[1..].iter().chain([&us]), "eu-west", WITHIN);
    let policy = write_policy(tmp.path(), 50);
    let out = cli(&[
        "policy",
        "apply",
        "-f",
        policy.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--api",
        &eu[0].api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Before any agent: a clear 404.
    let e = submit(&us, "hi", &[]).expect_err("no agent yet");
    assert!(e.contains("no region deploys agent \"echo\""), "{e}");

    let echo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents/echo.toml");
    cli_json(&[
        "agent",
        "deploy",
        "-f",
        echo.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--json",
        "--api",
        &eu[0].api,
    ])
    .expect("deploy");
    wait_until("echo is placed", WITHIN, || {
        submit(&eu[1], "ping", &[]).is_ok()
    });

    // Entered in us-east, run in eu-west, answered with its provenance.
    let answer = submit(&us, "hello from us-east", &[]).expect("a public task from us-east");
    assert_eq!(answer["output"], "hello from us-east");
    let record = &answer["provenance"]["record"];
    assert_eq!(record["region"], "eu-west");
    assert_eq!(record["entry_node"], us.peer_id.as_str());
    assert_eq!(record["epoch"], 1);
    assert!(
        record["policy_version"].as_u64().unwrap_or(0) > 0,
        "{record}"
    );
    let host = record["node"].as_str().expect("host").to_owned();
    assert!(eu.iter().any(|n| n.peer_id == host));

    // Many requests forwarded at once over one libp2p connection all arrive
    // (libp2p-stream drops an inbound stream its acceptor has not taken
    // yet: the forwarder retries a stream that ends before it is answered).
    let readers: Vec<_> = (0..48)
        .map(|_| {
            let api = us.api.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect(&api).expect("connect");
                write!(
                    stream,
                    "GET /v1/regions/eu-west/agents HTTP/1.0\r\nHost: {api}\r\n\r\n"
                )
                .expect("send");
                let mut response = String::new();
                stream.read_to_string(&mut response).expect("read");
                response
            })
        })
        .collect();
    let failed: Vec<String> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .filter(|r| !r.starts_with("HTTP/1.0 200"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 48 failed, the first: {}",
        failed.len(),
        failed[0]
    );

    // The counter kind: its state (a number per key) changes once per task,
    // wherever the task enters; a replay changes nothing.
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
        &eu[0].api,
    ])
    .expect("deploy counter");
    let count = |node: &Node, input: &str, id: &str| {
        cli_json(&[
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
            &node.api,
        ])
    };
    wait_until("the counter is placed", WITHIN, || {
        count(&eu[1], "orders", "c-1").is_ok()
    });
    count(&us, "orders", "c-2").expect("second");
    count(&us, "orders", "c-2").expect("the same task again");
    let last = count(&eu[2], "orders +5", "c-3").expect("third");
    assert_eq!(
        last["output"]["value"], 7,
        "1 + 1 + 5, the replay not counted: {last}"
    );

    // Residency: a pii-eu result may not go to us-east; refused before it runs.
    let e = submit(&us, "secret", &["--tag", "pii-eu"]).expect_err("residency");
    assert!(
        e.contains("403") && e.contains("pii-eu") && e.contains("eu-west"),
        "{e}"
    );
    let ok = submit(&eu[2], "secret", &["--tag", "pii-eu"]).expect("allowed in eu-west");
    assert_eq!(ok["output"], "secret");

    // Result regions: pii-eu is still processed in eu-west only, but its
    // results may now go to us-east too; the task entered there is answered.
    let wider = tmp.path().join("wider.toml");
    std::fs::write(
        &wider,
        "[[residency]]\ntag = \"pii-eu\"\nregions = [\"eu-west\"]\nresults = [\"eu-west\", \"us-east\"]\n\n[rate_limits.per_agent]\nper_second = 10\nburst = 50\n\n[rate_limits.per_client]\nper_second = 5\nburst = 5\n",
    )
    .expect("policy");
    let apply = |file: &Path| {
        let out = cli(&[
            "policy",
            "apply",
            "-f",
            file.to_str().expect("utf-8"),
            "--region",
            "eu-west",
            "--api",
            &eu[0].api,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply(&wider);
    let mut n = 0;
    wait_until("a pii-eu result may go to us-east", WITHIN, || {
        n += 1;
        submit(&us, &format!("secret {n}"), &["--tag", "pii-eu"]).is_ok()
    });
    apply(&policy);
    let e = submit(&us, "secret again", &["--tag", "pii-eu"]);
    let e = match e {
        // The host may not have applied the narrower policy yet.
        Ok(_) => {
            let mut refused = String::new();
            wait_until("the narrower policy holds again", WITHIN, || {
                n += 1;
                match submit(&us, &format!("secret {n}"), &["--tag", "pii-eu"]) {
                    Err(e) if e.contains("403") => {
                        refused = e;
                        true
                    }
                    _ => false,
                }
            });
            refused
        }
        Err(e) => e,
    };
    assert!(e.contains("may only go to eu-west"), "{e}");

    // One task id, three submissions through three nodes: it runs once.
    let first = submit(&us, "once", &["--task-id", "t-42"]).expect("first");
    let again = submit(&eu[0], "once", &["--task-id", "t-42"]).expect("again");
    let third = submit(&us, "once", &["--task-id", "t-42"]).expect("third");
    assert_eq!(first["provenance"], again["provenance"]);
    assert_eq!(again["replayed"], true);
    assert_eq!(third["replayed"], true);
    let runs: usize = eu
        .iter()
        .chain([&us])
        .map(|n| {
            cli_json(&["audit", "--json", "--api", &n.api])
                .expect("audit")
                .as_array()
                .expect("records")
                .iter()
                .filter(|r| r["record"]["task_id"] == "t-42")
                .count()
        })
        .sum();
    assert_eq!(runs, 1, "one audit record over all nodes");
    // A task id names one task: the same id with another input is refused,
    // never answered with the first task's result (at the host, and at the
    // entry node that keeps a copy).
    for node in [&us, &eu[0]] {
        let e = submit(node, "another input", &["--task-id", "t-42"]).expect_err("reused id");
        assert!(
            e.contains("409") && e.contains("a task id names one task"),
            "{e}"
        );
    }
    let got = cli_json(&["task", "get", "t-42", "--json", "--api", &us.api])
        .expect("task get at the entry node");
    assert_eq!(got["output"], "once");

    // Bad input: clear errors.
    let big = "x".repeat(40 * 1024);
    let e = submit(&us, &big, &[]).expect_err("too large");
    assert!(e.contains("413") && e.contains("limit"), "{e}");
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&us.api).expect("connect");
        let body = "{\"agent\": \"echo\", \"input\": ";
        write!(
            stream,
            "POST /v1/tasks HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            us.api,
            body.len()
        )
        .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.0 400"), "{response}");
        assert!(
            response.contains("line 1 column"),
            "malformed JSON names the position: {response}"
        );
    }
    let e = submit(&us, "x", &["--task-id", "bad id!"]).expect_err("bad id");
    assert!(e.contains("task id"), "{e}");
    // A claim is a host's, over libp2p: one sent over HTTP, even for the
    // real host, is refused and claims nothing.
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&eu[0].api).expect("connect");
        let body = format!(
            "{{\"ClaimTask\": {{\"agent\": \"echo\", \"task_id\": \"t-forged\", \"node\": \"{host}\", \"epoch\": 1, \"at_ms\": 0}}}}"
        );
        write!(
            stream,
            "POST /v1/regions/eu-west/claims HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            eu[0].api,
            body.len()
        )
        .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.0 403"), "{response}");
        assert!(response.contains("over libp2p"), "{response}");
        let forged = submit(&us, "forged", &["--task-id", "t-forged"]).expect("runs");
        assert_eq!(
            forged["replayed"], false,
            "the forged claim claimed nothing"
        );
    }

    // The host's chain holds; an edited record is detected.
    let i = eu.iter().position(|n| n.peer_id == host).expect("host");
    cli_json(&["audit", "verify", "--json", "--api", &eu[i].api]).expect("the chain holds");
    // Every node's chain, read through a node of another region; no task twice.
    let all =
        cli_json(&["audit", "verify", "--all", "--json", "--api", &us.api]).expect("--all holds");
    assert_eq!(all["nodes"].as_array().map(Vec::len), Some(4), "{all}");
    eu[i].terminate(Duration::from_secs(10));
    {
        let store =
            mesh_store::RocksStore::open(&dirs[i].join("raft")).expect("open the host's store");
        use mesh_store::Store as _;
        let (key, value) = store
            .range(mesh_store::Column::Audit, &[], None)
            .expect("records")
            .into_iter()
            .nth(1)
            .expect("a second record");
        let mut sealed: Value = serde_json::from_slice(&value).expect("json");
        sealed["record"]["output_sha256"] = Value::String("0".repeat(64));
        let op = mesh_store::WriteOp::Put {
            column: mesh_store::Column::Audit,
            key,
            value: serde_json::to_vec(&sealed).expect("json"),
        };
        store
            .write(vec![op], mesh_store::Durability::Sync)
            .expect("edit");
    }
    let mut again_spec = spec(
        &dirs[i],
        ["a", "b", "c"][i],
        "eu-west",
        Some(&eu[(i + 1) % 3]),
    );
    again_spec.config = Some(&config);
    eu[i] = start(&again_spec);
    let out = cli(&["audit", "verify", "--api", &eu[i].api]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("audit record 1 was changed"), "{e}");
    let restarted = eu[i].peer_id.clone();
    // Both ways: a node serves forwarded requests only from members it
    // sees alive, and the restarted host learns of us-east by gossip too.
    wait_until(
        "us-east and the restarted host see each other alive",
        WITHIN,
        || {
            us.state_of(&restarted).as_deref() == Some("alive")
                && eu[i].state_of(&us.peer_id).as_deref() == Some("alive")
        },
    );
    let out = cli(&["audit", "verify", "--all", "--api", &us.api]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(&eu[i].peer_id) && e.contains("was changed"),
        "{e}"
    );

    // Rate limits: a policy allowing a client one task a second in bursts of
    // two; twelve submitted at once from one address, most are answered 429.
    let strict = tmp.path().join("strict.toml");
    std::fs::write(
        &strict,
        "[rate_limits.per_agent]\nper_second = 100\nburst = 100\n\n[rate_limits.per_client]\nper_second = 1\nburst = 2\n",
    )
    .expect("policy");
    // (The restarted host may have set off an election: retried until applied.)
    wait_until("the strict policy is applied", WITHIN, || {
        cli(&[
            "policy",
            "apply",
            "-f",
            strict.to_str().expect("utf-8"),
            "--region",
            "eu-west",
            "--api",
            &eu[0].api,
        ])
        .status
        .success()
    });
    let entry = eu[(i + 1) % 3].api.clone();
    wait_until("the entry node has the strict policy", WITHIN, || {
        cli_json(&[
            "policy", "get", "--region", "eu-west", "--json", "--api", &entry,
        ])
        .is_ok_and(|p| p["policy"]["rate_limits"]["per_client"]["burst"] == 2)
    });
    let children: Vec<_> = (0..12)
        .map(|n| {
            std::process::Command::new(common::bin())
                .args([
                    "task",
                    "submit",
                    "--agent",
                    "echo",
                    "--input",
                    &format!("burst {n}"),
                    "--api",
                    &entry,
                ])
                .output()
        })
        .collect();
    let limited = children
        .into_iter()
        .map(|o| o.expect("run"))
        .filter(|o| {
            let e = String::from_utf8_lossy(&o.stderr);
            !o.status.success() && e.contains("429") && e.contains("retry in")
        })
        .count();
    assert!(limited >= 1, "no task of the burst was rate limited");
}

/// An audit log larger than one forwarded answer (4 MiB) is read page by
/// page: `audit verify --all`, sent to another node, checks all of it.
#[test]
fn an_audit_log_over_four_mebibytes_is_verified_through_another_node() {
    const RECORDS: u64 = 9_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a_spec = spec(&da, "a", "eu-west", None);
    a_spec.config = Some(&config);
    let mut a = start(&a_spec);
    let a_id = a.peer_id.clone();
    a.terminate(Duration::from_secs(10));
    {
        use mesh_store::Store as _;
        let store = mesh_store::RocksStore::open(&da.join("raft")).expect("open a's store");
        let mut chain = mesh_agent::Chain::default();
        let mut ops = Vec::new();
        let mut bytes = 0;
        for i in 0..RECORDS {
            let sealed = chain.append(mesh_agent::AuditRecord {
                reclaims: None,
                moved: None,
                task_id: format!("t-{i}"),
                agent: "echo".into(),
                agent_version: "1".into(),
                epoch: 1,
                models: vec![],
                node: a_id.clone(),
                region: "eu-west".into(),
                policy_version: 3,
                dataset: None,
                tags: vec![],
                input_sha256: "a".repeat(64),
                output_sha256: "b".repeat(64),
                entry_node: a_id.clone(),
                hops: 0,
                started_at_ms: 1,
                finished_at_ms: 2,
                trace_id: format!("trace-{i}"),
            });
            let value = serde_json::to_vec(&sealed).expect("json");
            bytes += value.len();
            ops.push(mesh_store::WriteOp::Put {
                column: mesh_store::Column::Audit,
                key: sealed.seq.to_be_bytes().to_vec(),
                value,
            });
        }
        assert!(
            bytes > 4 * 1024 * 1024,
            "the log is past one answer: {bytes} bytes"
        );
        store
            .write(ops, mesh_store::Durability::Sync)
            .expect("write the log");
    }
    let a = start(&a_spec);
    let mut b_spec = spec(&db, "b", "eu-west", Some(&a));
    b_spec.config = Some(&config);
    let b = start(&b_spec);
    wait_until("b sees a alive", WITHIN, || {
        b.state_of(&a.peer_id).as_deref() == Some("alive")
    });
    let all = cli_json(&["audit", "verify", "--all", "--json", "--api", &b.api]).expect("holds");
    let of_a = all["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == a.peer_id.as_str())
        .cloned()
        .expect("a's log was read");
    assert_eq!(of_a["records"], RECORDS, "{all}");
}
