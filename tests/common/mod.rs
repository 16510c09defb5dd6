//! Helpers for tests that start real `agentmesh` processes on loopback.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test, built by cargo for this test target.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentmesh")
}

/// A running node; SIGKILLed when dropped so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct Node {
    pub child: Option<Child>,
    pub name: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub api: String,
    pub peer_id: String,
    pub listen: Vec<String>,
    /// The network namespace the node runs in, if any.
    pub netns: Option<String>,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub data_dir: &'a Path,
    pub region: &'a str,
    pub bootstrap: Vec<String>,
    pub config: Option<&'a Path>,
    /// Listen multiaddr; TCP on a free loopback port unless set.
    pub listen: &'a str,
    /// HTTP API address; a free loopback port unless set.
    pub api: &'a str,
    /// Run the node inside this network namespace (`ip netns exec`).
    pub netns: Option<&'a str>,
    pub extra: Vec<String>,
}

impl<'a> NodeSpec<'a> {
    pub fn new(name: &'a str, data_dir: &'a Path, region: &'a str) -> Self {
        Self {
            name,
            data_dir,
            region,
            bootstrap: Vec::new(),
            config: None,
            listen: "/ip4/127.0.0.1/tcp/0",
            api: "127.0.0.1:0",
            netns: None,
            extra: Vec::new(),
        }
    }
}

/// How long a node may take to print its ready line (a cold binary on a busy 2-core CI machine).
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// Starts a node on 127.0.0.1 with free ports and waits for its ready line.
pub fn start(spec: &NodeSpec<'_>) -> Node {
    let log = spec.data_dir.with_extension("log");
    let mut command = in_netns(spec.netns);
    command
        .args([
            "--log-format",
            "json",
            "node",
            "start",
            "--region",
            spec.region,
        ])
        .arg("--data-dir")
        .arg(spec.data_dir)
        .args(["--listen", spec.listen, "--api", spec.api])
        .env("RUST_LOG", "info,libp2p=warn");
    for b in &spec.bootstrap {
        command.args(["--bootstrap", b]);
    }
    if let Some(config) = spec.config {
        command.arg("--config").arg(config);
    }
    command.args(&spec.extra);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open log file");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("spawn agentmesh");
    let line = read_ready_line(&mut child, READY_WITHIN).unwrap_or_else(|e| {
        panic!(
            "node {} not ready: {e}\n--- log ---\n{}",
            spec.name,
            read(&log)
        )
    });
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("ready line lacks {key}: {line}"))
    };
    Node {
        child: Some(child),
        name: spec.name.to_owned(),
        data_dir: spec.data_dir.to_owned(),
        log,
        api: field("api"),
        peer_id: field("peer_id"),
        listen: field("listen").split(',').map(str::to_owned).collect(),
        netns: spec.netns.map(str::to_owned),
    }
}

/// Starts node `name` of `region` with data in `tmp/name` and the config
/// file `tmp/node.toml`, joining through `bootstrap` if given.
pub fn start_in(tmp: &Path, name: &str, region: &str, bootstrap: Option<&Node>) -> Node {
    let dir = tmp.join(name);
    let config = tmp.join("node.toml");
    start(&NodeSpec {
        config: Some(&config),
        bootstrap: bootstrap
            .map(|b| vec![b.listen[0].clone()])
            .unwrap_or_default(),
        ..NodeSpec::new(name, &dir, region)
    })
}

/// A command running the binary under test, inside `netns` if given.
pub fn in_netns(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin()]);
            c
        }
        None => Command::new(bin()),
    }
}

/// Reads the first stdout line; keeps draining stdout in the background.
pub fn read_ready_line(child: &mut Child, within: Duration) -> Result<String, String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        for _ in lines {}
    });
    match rx.recv_timeout(within) {
        Ok(Some(Ok(line))) if line.starts_with("ready ") => Ok(line),
        Ok(Some(Ok(line))) => Err(format!("unexpected first line {line:?}")),
        Ok(_) => Err(format!("stdout closed; exit status {:?}", child.try_wait())),
        Err(_) => Err(format!("no ready line within {within:?}")),
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Node {
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit, at most `within`.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("node is running");
        sigterm(&child);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "node {} did not stop within {within:?} of SIGTERM\n{}",
                    self.name,
                    read(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's membership view through `agentmesh members --json`.
    pub fn members(&self) -> Vec<Value> {
        let out = self
            .cli()
            .args(["members", "--json", "--api", &self.api])
            .output()
            .expect("run agentmesh members");
        assert!(
            out.status.success(),
            "members --api {} failed: {}",
            self.api,
            String::from_utf8_lossy(&out.stderr)
        );
        let value: Value = serde_json::from_slice(&out.stdout).expect("members --json is JSON");
        value.as_array().expect("a JSON array").clone()
    }

    /// The binary, run where this node runs (its namespace, if any).
    pub fn cli(&self) -> Command {
        in_netns(self.netns.as_deref())
    }

    /// A gauge or counter from `GET /metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = http_get(&self.api, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not in /metrics of {}:\n{text}", self.name))
    }

    /// The state this node sees `peer_id` in, if listed.
    pub fn state_of(&self, peer_id: &str) -> Option<String> {
        self.members()
            .iter()
            .find(|m| m["peer_id"] == peer_id)
            .map(|m| m["state"].as_str().unwrap_or_default().to_owned())
    }
}

/// A plain HTTP/1.0 GET; returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGTERM through kill(1), which keeps the tests free of `unsafe`
/// (the workspace forbids it). SIGKILL is `Child::kill`.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

/// Polls `check` every 100 ms until it returns true or `within` passes;
/// returns the time it took.
pub fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the binary under test with `args` and returns what it did.
pub fn cli(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run agentmesh")
}

/// Runs the binary under test with `args` (which ask for `--json`): its
/// JSON answer, or its stderr when it failed.
pub fn cli_json(args: &[&str]) -> Result<Value, String> {
    cli_json_in(None, args)
}

/// As [`cli_json`], inside network namespace `netns` if given.
pub fn cli_json_in(netns: Option<&str>, args: &[&str]) -> Result<Value, String> {
    let out = in_netns(netns).args(args).output().expect("run agentmesh");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("no JSON ({e})"))
}

/// Waits until `first` sees every one of `others` alive, then bootstraps
/// `region`'s group through `first`.
pub fn bootstrap_when_alive<'a>(
    first: &Node,
    others: impl IntoIterator<Item = &'a Node> + Clone,
    region: &str,
    within: Duration,
) {
    wait_until(
        &format!("{} sees everyone alive", first.name),
        within,
        || {
            others
                .clone()
                .into_iter()
                .all(|n| first.state_of(&n.peer_id).as_deref() == Some("alive"))
        },
    );
    cli_json(&[
        "region",
        "bootstrap",
        "--region",
        region,
        "--json",
        "--api",
        &first.api,
    ])
    .expect("bootstrap");
}

/// A valid eu-west policy file in `dir` whose per-agent burst is `burst`
/// (each value makes a distinguishable write).
pub fn write_policy(dir: &Path, burst: u32) -> PathBuf {
    let path = dir.join(format!("policy-{burst}.toml"));
    std::fs::write(
        &path,
        format!(
            "[[residency]]\ntag = \"pii-eu\"\nregions = [\"eu-west\"]\n\n[rate_limits.per_agent]\nper_second = 10\nburst = {burst}\n\n[rate_limits.per_client]\nper_second = 5\nburst = 5\n"
        ),
    )
    .expect("write policy");
    path
}

/// An answered `counter` task: its id, the value it returned, its host,
/// the hash of the audit record it was answered with, and when.
#[derive(Debug, Clone)]
pub struct Answered {
    pub id: String,
    pub value: i64,
    pub node: String,
    pub record: String,
    pub at: Instant,
}

/// Submits `input` as task `id` of the `counter` agent to `api` (inside
/// `netns`, if given) until it is answered, at most `within`.
pub fn submit_counter(
    netns: Option<&str>,
    api: &str,
    input: &str,
    id: &str,
    within: Duration,
) -> Answered {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match cli_json_in(
            netns,
            &[
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
            ],
        ) {
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
    panic!("task {id} was not answered within {within:?}; last error: {last}");
}
