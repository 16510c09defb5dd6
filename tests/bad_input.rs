//! Bad input through the real binary: one clear message, a non-zero exit,
//! never a panic. An unreachable bootstrap peer is not fatal.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{bin, read, read_ready_line, wait_until};

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run agentmesh")
}

/// Asserts a failed run whose stderr names the problem.
fn assert_refused(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
    assert!(out.stdout.is_empty(), "nothing on stdout when refused");
}

fn start_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "node",
        "start",
        "--data-dir",
        dir,
        "--region",
        "eu-west",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn malformed_multiaddrs_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let dir = dir.to_str().expect("utf-8");
    let out = run(&start_args(dir, &["--bootstrap", "127.0.0.1:4001"]));
    assert_refused(
        &out,
        &["malformed multiaddr", "--bootstrap", "127.0.0.1:4001"],
    );
    let out = run(&[
        "node",
        "start",
        "--data-dir",
        dir,
        "--region",
        "eu-west",
        "--listen",
        "/ip4/999.0.0.1/tcp/1",
    ]);
    assert_refused(&out, &["malformed multiaddr", "--listen"]);
    assert!(
        !tmp.path().join("d").exists(),
        "nothing may be created before the config is valid"
    );
}

#[test]
fn a_listen_address_no_transport_supports_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let out = run(&[
        "node",
        "start",
        "--data-dir",
        dir.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--api",
        "127.0.0.1:0",
        "--listen",
        "/dns4/example.invalid/tcp/1",
    ]);
    assert_refused(&out, &["cannot listen on /dns4/example.invalid/tcp/1"]);
}

#[test]
fn bad_region_names_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    for region in ["EU_West", "", "-eu", "eu west"] {
        let flag = format!("--region={region}");
        let out = run(&[
            "node",
            "start",
            "--data-dir",
            dir.to_str().expect("utf-8"),
            &flag,
        ]);
        assert_refused(&out, &["invalid region name", "lowercase letters"]);
    }
}

#[test]
fn missing_required_settings_are_listed_together() {
    let out = run(&["node", "start"]);
    assert_refused(&out, &["no data dir", "no region"]);
}

#[test]
fn a_missing_models_dir_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let nowhere = tmp.path().join("nowhere");
    let out = run(&start_args(
        dir.to_str().expect("utf-8"),
        &["--models-dir", nowhere.to_str().expect("utf-8")],
    ));
    assert_refused(&out, &["nowhere", "not a directory", "scripts/models.sh"]);
}

#[test]
fn a_data_dir_that_cannot_be_written_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let out = run(&start_args(file.to_str().expect("utf-8"), &[]));
    assert_refused(&out, &["is not a directory", "--data-dir"]);
    let below_file = file.join("sub");
    let out = run(&start_args(below_file.to_str().expect("utf-8"), &[]));
    assert_refused(&out, &["cannot create data dir", "--data-dir"]);
}

#[test]
fn an_api_port_in_use_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tmp.path().join("d");
    let mut args = start_args(dir.to_str().expect("utf-8"), &[]);
    args.truncate(args.len() - 2);
    args.extend(["--api", &addr]);
    let out = run(&args);
    assert_refused(&out, &["cannot listen for the HTTP API", &addr, "--api"]);
}

#[test]
fn a_listen_port_in_use_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let dir = tmp.path().join("d");
    let out = run(&[
        "node",
        "start",
        "--data-dir",
        dir.to_str().expect("utf-8"),
        "--region",
        "eu-west",
        "--api",
        "127.0.0.1:0",
        "--listen",
        &listen,
    ]);
    assert_refused(&out, &["cannot listen on", &listen]);
}

#[test]
fn a_corrupt_identity_file_is_refused_and_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("identity.key"), b"not a key at all").expect("write");
    let out = run(&start_args(dir.to_str().expect("utf-8"), &[]));
    assert_refused(&out, &["identity.key", "is corrupt", "delete it"]);
    assert_eq!(
        std::fs::read(dir.join("identity.key")).expect("read"),
        b"not a key at all",
        "never overwritten"
    );
}

#[test]
fn unreadable_or_invalid_config_files_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let dir = dir.to_str().expect("utf-8");
    let missing = tmp.path().join("missing.toml");
    let out = run(&start_args(
        dir,
        &["--config", missing.to_str().expect("utf-8")],
    ));
    assert_refused(&out, &["cannot read config file", "missing.toml"]);

    let cases = [
        ("syntax.toml", "region = ", "invalid config file"),
        ("unknown.toml", "regoin = \"eu-west\"", "regoin"),
        (
            "type.toml",
            "[membership]\ndead_after_ms = \"soon\"",
            "dead_after_ms",
        ),
        (
            "timing.toml",
            "[membership]\nsuspect_after_ms = 100\nannounce_interval_ms = 500",
            "suspect_after_ms",
        ),
        ("gossip.toml", "[gossip]\nmesh_n_low = 50", "gossip"),
    ];
    for (name, text, needle) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write");
        let out = run(&start_args(
            dir,
            &["--config", path.to_str().expect("utf-8")],
        ));
        assert_refused(&out, &[needle]);
    }
}

#[test]
fn members_without_a_node_says_so() {
    let free = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr").to_string();
    drop(free);
    let out = run(&["members", "--api", &addr]);
    assert_refused(&out, &["cannot reach the agentmesh API", &addr, "--api"]);
}

#[test]
fn unknown_flags_exit_non_zero_with_usage() {
    let out = run(&["node", "start", "--no-such-flag"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}

#[test]
fn an_unreachable_bootstrap_peer_is_retried_not_fatal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{port}");
    let dir = tmp.path().join("d");
    let log = tmp.path().join("d.log");
    let mut child = Command::new(bin())
        .args(start_args(
            dir.to_str().expect("utf-8"),
            &["--bootstrap", &bootstrap],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let ready = read_ready_line(&mut child, common::READY_WITHIN);
    assert!(
        ready.is_ok(),
        "the node must start although its bootstrap peer is down: {ready:?}"
    );
    wait_until(
        "the node logs that it retries the bootstrap peer",
        Duration::from_secs(10),
        || read(&log).contains("dialing bootstrap peer again"),
    );
    assert!(child.try_wait().expect("wait").is_none(), "still running");
    common::sigterm(&child);
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "clean stop after SIGTERM: {status}\n{}",
        read(&log)
    );
}
