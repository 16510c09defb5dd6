//! Three hosts of one region over one region state: a counter agent's
//! state follows it to a new host with every acknowledged task, once; an
//! old host is fenced off; a task that was not copied is not answered.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use consensus::{RegionCommand, RegionResponse, RegionState};
use mesh_store::Store;
use mesh_types::agent::{AgentKind, Manifest};
use mesh_types::policy::RateLimits;

use crate::checkpoint::{Push, PushAnswer, Replicas, Sealed};
use crate::{Claimer, Env, Host, Io, Models, TaskError, TaskRequest, TaskRun};

const NODES: [&str; 3] = ["n1", "n2", "n3"];

#[derive(Default)]
struct Region {
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    stores: Mutex<HashMap<String, Arc<dyn Store>>>,
    down: Mutex<BTreeSet<String>>,
    state: Mutex<RegionState>,
    index: Mutex<u64>,
}

impl Region {
    fn new() -> Arc<Self> {
        let region = Arc::new(Region::default());
        for n in NODES {
            region.start(n);
        }
        let manifest = Manifest {
            name: "count".into(),
            version: "1".into(),
            kind: AgentKind::Counter,
            models: vec![],
            dataset: None,
            regions: vec![mesh_types::Region::parse("eu-west").expect("region")],
            concurrency: 1,
            latency_budget_ms: 1000,
        };
        region.apply(RegionCommand::DeployAgent(manifest));
        region
    }

    /// Starts (or restarts, over its store) node `n`.
    fn start(&self, n: &str) {
        let store = self
            .stores
            .lock()
            .unwrap()
            .entry(n.to_owned())
            .or_insert_with(|| Arc::new(mesh_store::MemStore::default()))
            .clone();
        let host = Host::open(store, Io::Inline, Arc::new(|| 1_000)).expect("opens");
        self.hosts
            .lock()
            .unwrap()
            .insert(n.to_owned(), Arc::new(host));
        self.down.lock().unwrap().remove(n);
    }

    fn stop(&self, n: &str) {
        self.down.lock().unwrap().insert(n.to_owned());
    }

    fn apply(&self, command: RegionCommand) -> RegionResponse {
        let mut index = self.index.lock().unwrap();
        *index += 1;
        self.state.lock().unwrap().apply(*index, command)
    }

    fn place(&self, node: &str) -> u64 {
        let epoch = self.state.lock().unwrap().agents["count"].epoch;
        match self.apply(RegionCommand::GrantLease {
            agent: "count".into(),
            node: node.into(),
            after_epoch: epoch,
        }) {
            RegionResponse::LeaseGranted { epoch } => epoch,
            other => panic!("{other:?}"),
        }
    }

    fn host(&self, n: &str) -> Arc<Host> {
        self.hosts.lock().unwrap()[n].clone()
    }

    fn is_down(&self, n: &str) -> bool {
        self.down.lock().unwrap().contains(n)
    }

    /// Runs task `id` (`key +1`) on `node` as the host under `epoch`.
    async fn run(self: &Arc<Self>, node: &str, epoch: u64, id: &str) -> Result<i64, TaskError> {
        let state = self.state.lock().unwrap().clone();
        self.run_under(&state, node, epoch, id).await
    }

    /// Runs task `id` on `node`, whose applied region state is `state`.
    async fn run_under(
        self: &Arc<Self>,
        state: &RegionState,
        node: &str,
        epoch: u64,
        id: &str,
    ) -> Result<i64, TaskError> {
        let net = Net {
            me: node.to_owned(),
            region: self.clone(),
        };
        let admit = |_: &Manifest, _: &RateLimits| Ok(());
        let env = Env {
            node,
            region: "eu-west",
            models: &NoModels,
            claimer: &net,
            admit: &admit,
            tokens: None,
            replicas: &net,
            replica_count: 2,
        };
        let run = TaskRun {
            request: TaskRequest {
                agent: "count".into(),
                input: "k +1".into(),
                tags: vec![],
                session: None,
                task_id: Some(id.into()),
                stream: false,
            },
            entry_node: "n1".into(),
            entry_region: "eu-west".into(),
            trace_id: "t".into(),
        };
        let answer = self.host(node).execute(&env, state, &run, epoch, 0).await?;
        Ok(answer.output["value"].as_i64().expect("a value"))
    }
}

struct Net {
    me: String,
    region: Arc<Region>,
}

#[async_trait]
impl Claimer for Net {
    async fn claim(&self, command: RegionCommand) -> Result<RegionResponse, TaskError> {
        Ok(self.region.apply(command))
    }
}

#[async_trait]
impl Replicas for Net {
    async fn members(&self) -> Vec<(String, bool)> {
        NODES
            .iter()
            .map(|n| (n.to_string(), !self.region.is_down(n)))
            .collect()
    }

    async fn push(&self, peer: &str, push: &Push) -> Result<PushAnswer, TaskError> {
        if self.region.is_down(peer) || self.region.is_down(&self.me) {
            return Err(TaskError::new(
                504,
                "unreachable",
                format!("{peer} is down"),
            ));
        }
        let state = self.region.state.lock().unwrap().clone();
        let epoch = state.agents[push.agent()].epoch;
        let claimed = crate::checkpoint::claimed(&state, push.agent());
        self.region
            .host(peer)
            .replica()
            .receive(push, epoch, &claimed)
            .await
    }

    async fn seal(
        &self,
        peer: &str,
        agent: &str,
        epoch: u64,
        after: Option<Vec<u8>>,
    ) -> Result<Sealed, TaskError> {
        if self.region.is_down(peer) {
            return Err(TaskError::new(
                504,
                "unreachable",
                format!("{peer} is down"),
            ));
        }
        self.region
            .host(peer)
            .replica()
            .seal(agent, epoch, after.as_deref())
            .await
    }
}

struct NoModels;

#[async_trait]
impl Models for NoModels {
    async fn embed(&self, _: &str) -> Result<Vec<f32>, TaskError> {
        Err(TaskError::new(409, "no_model", "none".into()))
    }
    async fn generate(
        &self,
        _: String,
        _: Option<&crate::kinds::TokenSink>,
    ) -> Result<String, TaskError> {
        Err(TaskError::new(409, "no_model", "none".into()))
    }
}

fn replicas_of(region: &Region) -> Vec<String> {
    region.state.lock().unwrap().replicas["count"].nodes.clone()
}

#[tokio::test]
async fn a_new_host_serves_every_acknowledged_task_once_and_the_old_one_is_fenced() {
    let region = Region::new();
    let e1 = region.place("n1");
    for i in 1..=5 {
        assert_eq!(region.run("n1", e1, &format!("t{i}")).await, Ok(i));
    }
    let mut named = replicas_of(&region);
    named.sort();
    assert_eq!(named, vec!["n2".to_owned(), "n3".to_owned()]);
    // n1 dies; the leader places the agent on n2 with the next epoch.
    region.stop("n1");
    let before = region.state.lock().unwrap().clone();
    let e2 = region.place("n2");
    // A retry of an acknowledged task is answered with its result, not run.
    assert_eq!(region.run("n2", e2, "t5").await, Ok(5));
    assert_eq!(region.run("n2", e2, "t6").await, Ok(6));
    // n1 comes back, its region state not yet caught up: it still
    // believes in its lease, and its claim is refused.
    region.down.lock().unwrap().remove("n1");
    let stale = region.run_under(&before, "n1", e1, "t7").await;
    assert!(
        matches!(&stale, Err(e) if e.name == "stale_epoch"),
        "{stale:?}"
    );
    assert_eq!(region.run("n2", e2, "t7").await, Ok(7));
}

#[tokio::test]
async fn a_task_not_copied_is_not_answered_and_runs_once_on_the_next_host() {
    let region = Region::new();
    let e1 = region.place("n1");
    assert_eq!(region.run("n1", e1, "t1").await, Ok(1));
    let replicas = replicas_of(&region);
    // One replica goes: the task runs on n1, but is not acknowledged.
    region.stop(&replicas[0]);
    let e = region.run("n1", e1, "t2").await.expect_err("not copied");
    assert_eq!(e.name, "not_copied", "{e:?}");
    // The replica is back, n1 dies; the other replica's node takes over
    // and restores the newest copy.
    region.down.lock().unwrap().remove(&replicas[0]);
    region.stop("n1");
    let survivor = &replicas[1];
    let e2 = region.place(survivor);
    // The client's retry of t2 runs it once on the survivor: 2, not 3.
    assert_eq!(region.run(survivor, e2, "t2").await, Ok(2));
    assert_eq!(region.run(survivor, e2, "t3").await, Ok(3));
}

#[tokio::test]
async fn a_restarted_host_restores_its_own_copy_and_goes_on() {
    let region = Region::new();
    let e1 = region.place("n1");
    for i in 1..=3 {
        assert_eq!(region.run("n1", e1, &format!("t{i}")).await, Ok(i));
    }
    // A restart keeps the store but not the process's activation.
    region.start("n1");
    assert_eq!(region.run("n1", e1, "t3").await, Ok(3), "replayed");
    assert_eq!(region.run("n1", e1, "t4").await, Ok(4));
}

#[tokio::test]
async fn with_every_replica_gone_the_agent_is_unavailable_with_the_reason() {
    let region = Region::new();
    let e1 = region.place("n1");
    assert_eq!(region.run("n1", e1, "t1").await, Ok(1));
    for r in replicas_of(&region) {
        region.stop(&r);
    }
    region.stop("n1");
    region.start("n1");
    let e = region.run("n1", e1, "t2").await.expect_err("unavailable");
    assert_eq!(e.name, "unavailable", "{e:?}");
    assert!(e.detail.contains("none of them answered"), "{}", e.detail);
}

/// Review finding (issue 14): an activation read from a region state older
/// than the replica set this host has named since would restore copies it
/// has replaced (and lose what it answered under the newer set): refused.
#[tokio::test]
async fn a_restore_from_a_state_older_than_the_hosts_own_replica_set_is_refused() {
    let region = Region::new();
    let e1 = region.place("n1");
    assert_eq!(region.run("n1", e1, "t1").await, Ok(1));
    let old = region.state.lock().unwrap().clone();
    // A replica misses a task: the agent stops, and is activated again
    // (naming its replicas again) by the retry.
    let replicas = replicas_of(&region);
    region.stop(&replicas[0]);
    assert!(region.run("n1", e1, "t2").await.is_err());
    region.down.lock().unwrap().remove(&replicas[0]);
    assert_eq!(region.run("n1", e1, "t2").await, Ok(2));
    // Stopped again; an activation with the old state is refused.
    region.host("n1").deactivate("count").await;
    let e = region
        .run_under(&old, "n1", e1, "t3")
        .await
        .expect_err("refused");
    assert_eq!(e.name, "unavailable", "{e:?}");
    assert!(e.detail.contains("named newer ones"), "{}", e.detail);
    // With the state as it is now, it goes on from 2.
    assert_eq!(region.run("n1", e1, "t3").await, Ok(3));
}
