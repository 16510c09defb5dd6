//! The task workload (issue 13): agents deployed in every region, a
//! dataset put on a node of each region after its agent was placed (so it
//! moves to its data), tasks submitted to random nodes throughout the run,
//! routed as the node routes them, and run on their host by the real
//! `mesh_task::Host` (checks, claim through Raft, kinds, audit record),
//! with a fast deterministic model runner.
//!
//! Invariants:
//! - tasks-acknowledged-durable: every answered task's audit record is on
//!   its host's disk (what a power loss leaves), and its result, under that
//!   record, on the disk of its host or of a node holding a copy of its
//!   agent's state (a replica, or the agent's next host);
//! - tasks-once: a task id runs once across every node: at most one run
//!   that took over no claim; an answered task's run is never taken over,
//!   and no run of it comes at a later epoch (a run cut off before it was
//!   answered may be replaced by one that names its claim, `reclaims`);
//! - counter-exact (issue 14): each region's two counter clients send `k`
//!   tasks at once, each client one after another, each task retried with
//!   its id until it is answered: the answered tasks return distinct values
//!   (a lost answered task shows as a value seen twice) and every value up
//!   to the largest is answered but for the tasks still unanswered at the
//!   end (a task counted twice shows as a value skipped), through host
//!   crashes, partitions and moves;
//! - residency: no record of data tagged `pii-rX` processed outside `rX`
//!   or entered from outside it (the simulated policy keeps each region's
//!   tag in it), and no such task answered;
//! - single-lease: an agent's epoch names one node in every node's state
//!   at every moment, and every executed task ran under the lease its
//!   claim was committed with;
//! - audit-chains: every node's audit chain verifies.

use async_trait::async_trait;
use consensus::{RegionCommand, RegionResponse};
use mesh_agent::audit::{self, SealedRecord};
use mesh_task::documents::{self, StoredDocument};
use mesh_task::{Host, Io, TaskAnswer, TaskError, TaskRequest, TaskRun};
use mesh_types::agent::{AgentKind, Manifest};
use mesh_types::policy::ResidencyRule;
use sha2::{Digest, Sha256};

use super::*;

/// Task clients per region.
pub(super) const TASK_CLIENTS_PER_REGION: usize = 2;
/// Documents of each region's dataset.
const DOCUMENTS: usize = 8;
/// When the datasets are put, after the agents are deployed.
const DATA_AFTER: Duration = Duration::from_secs(4);

/// The data tag that region `r`'s policy keeps in `r`.
fn pii(r: usize) -> String {
    format!("pii-r{r}")
}

/// The residency rules of every region's policy: `pii-rX` is processed in,
/// and returned to, `rX` only.
pub(super) fn residency(regions: &[Region]) -> Vec<ResidencyRule> {
    regions
        .iter()
        .enumerate()
        .map(|(r, region)| ResidencyRule {
            tag: pii(r),
            regions: vec![region.clone()],
            results: vec![region.clone()],
        })
        .collect()
}

fn manifest(name: String, kind: AgentKind, region: &Region, dataset: Option<String>) -> Manifest {
    Manifest {
        name,
        version: "1".into(),
        kind,
        models: vec![],
        dataset,
        regions: vec![region.clone()],
        concurrency: 4,
        latency_budget_ms: 50,
    }
}

/// Region `r`'s counter agent.
pub(super) fn counter_agent(r: usize) -> String {
    format!("counter-r{r}")
}

/// The agents of region `r`: an echo, a chat (generate, with sessions), a
/// search over the region's dataset, and a counter.
fn agents(r: usize, region: &Region) -> Vec<Manifest> {
    vec![
        manifest(format!("echo-r{r}"), AgentKind::Echo, region, None),
        manifest(format!("chat-r{r}"), AgentKind::Generate, region, None),
        manifest(
            format!("search-r{r}"),
            AgentKind::Search,
            region,
            Some(format!("docs-r{r}")),
        ),
        manifest(counter_agent(r), AgentKind::Counter, region, None),
    ]
}

/// A fast, deterministic model runner: vectors and answers are hashes of
/// their input; a generation takes 2 ms of simulated time.
struct SimModels;

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

#[async_trait]
impl mesh_task::Models for SimModels {
    async fn embed(&self, text: &str) -> Result<Vec<f32>, TaskError> {
        Ok(digest(text)[..8]
            .iter()
            .map(|b| f32::from(*b) - 127.5)
            .collect())
    }

    async fn generate(
        &self,
        prompt: String,
        tokens: Option<&mesh_task::kinds::TokenSink>,
    ) -> Result<String, TaskError> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let d = digest(&prompt);
        let text = format!("answer {:02x}{:02x}{:02x}", d[0], d[1], d[2]);
        if let Some(sink) = tokens {
            sink(&text);
        }
        Ok(text)
    }
}

/// Opens node `peer`'s task host on its store (at start and restart).
pub(super) fn open_host(world: &World, store: Arc<dyn Store>) -> Arc<Host> {
    let start = world.lock().start;
    let clock = Arc::new(move || EPOCH_MS + start.elapsed().as_millis() as u64);
    match Host::open(store, Io::Inline, clock) {
        Ok(h) => Arc::new(h),
        // The simulated disk holds only what this code wrote.
        Err(e) => panic!("cannot open a task host: {e}"),
    }
}

/// One hop of a message: its delay, or `None` when it is lost (the caller
/// has waited as long as a lost message takes to be given up on).
async fn hop(world: &World, from: &str, to: &str) -> Option<()> {
    let sent = world.lock().send(from, to);
    match sent {
        Some((delay, _)) => {
            tokio::time::sleep(delay).await;
            Some(())
        }
        None => {
            tokio::time::sleep(LOST_AFTER).await;
            None
        }
    }
}

/// A proposal through the region's leader, as the API forwards one.
async fn propose(world: &World, region: usize, command: RegionCommand) -> Option<RegionResponse> {
    let mut group = pick(world, region)?;
    for _ in 0..2 {
        match group.propose(command.clone()).await {
            Ok(r) => return Some(r),
            Err(e) => group = redirect(world, &e)?,
        }
    }
    None
}

/// Claims go to the leader: proposed on the host's group, or forwarded
/// once to the leader it names (over the links).
struct SimClaimer {
    world: World,
    me: String,
}

#[async_trait]
impl mesh_task::Claimer for SimClaimer {
    async fn claim(&self, command: RegionCommand) -> Result<RegionResponse, TaskError> {
        let unknown = |why: String| TaskError::new(503, "claim_unknown", why);
        let group = self
            .world
            .lock()
            .group_of(&self.me)
            .ok_or_else(|| unknown("the host is down".into()))?;
        match group.propose(command.clone()).await {
            Ok(r) => Ok(r),
            Err(GroupError::NotLeader {
                leader: Some(leader),
            }) => {
                hop(&self.world, &self.me, &leader)
                    .await
                    .ok_or_else(|| unknown(format!("{leader} did not answer")))?;
                let leader_group = self
                    .world
                    .lock()
                    .group_of(&leader)
                    .ok_or_else(|| unknown(format!("{leader} is down")))?;
                let answer = leader_group
                    .propose(command)
                    .await
                    .map_err(|e| unknown(e.to_string()))?;
                hop(&self.world, &leader, &self.me)
                    .await
                    .ok_or_else(|| unknown(format!("no answer from {leader}")))?;
                Ok(answer)
            }
            Err(e) => Err(unknown(e.to_string())),
        }
    }
}

/// Copies of agent state go to the replicas over the links, to their
/// real replica stores, through the node's own sender check.
struct SimReplicas {
    world: World,
    me: String,
}

impl SimReplicas {
    /// The host and group of `peer`, if it is up.
    fn node(&self, peer: &str) -> Option<(Arc<Host>, RegionGroup)> {
        let s = self.world.lock();
        let i = s.slot(peer)?;
        let n = &s.nodes[i];
        if n.peer != peer || !n.up() {
            return None;
        }
        Some((n.host.clone()?, n.group.clone()?))
    }

    async fn reach(&self, peer: &str) -> Result<(Arc<Host>, RegionGroup), TaskError> {
        let unreachable = |why: String| TaskError::new(503, "replica_unreachable", why);
        hop(&self.world, &self.me, peer)
            .await
            .ok_or_else(|| unreachable(format!("{peer} did not answer")))?;
        self.node(peer)
            .ok_or_else(|| unreachable(format!("{peer} is down")))
    }

    async fn back(&self, peer: &str) -> Result<(), TaskError> {
        hop(&self.world, peer, &self.me).await.ok_or_else(|| {
            TaskError::new(503, "replica_unreachable", format!("no answer from {peer}"))
        })
    }
}

#[async_trait]
impl mesh_task::Replicas for SimReplicas {
    async fn members(&self) -> Vec<(String, bool)> {
        let now = now_ms(&self.world);
        let s = self.world.lock();
        let Some(n) = s.slot(&self.me).map(|i| &s.nodes[i]) else {
            return Vec::new();
        };
        let Some(group) = n.group.clone() else {
            return Vec::new();
        };
        let (voters, learners) = group.members();
        let view = n
            .membership
            .as_ref()
            .map(|m| m.view(clock_of(n, now)))
            .unwrap_or_default();
        mesh_task::checkpoint::copy_targets(&group.local_state(), &self.me, voters, learners, |m| {
            view.iter()
                .any(|v| v.peer_id.0 == m && v.state == MemberState::Alive)
        })
    }

    async fn push(
        &self,
        peer: &str,
        push: &mesh_task::checkpoint::Push,
    ) -> Result<mesh_task::checkpoint::PushAnswer, TaskError> {
        let (host, group) = self.reach(peer).await?;
        let version = push.version();
        let state = group.local_state();
        let answer = match mesh_task::checkpoint::check_sender(
            &state,
            &self.me,
            push.agent(),
            version.epoch,
        )? {
            Some(known) => mesh_task::checkpoint::PushAnswer::Fenced { epoch: known },
            None => {
                let claimed = mesh_task::checkpoint::claimed(&state, push.agent());
                host.replica()
                    .receive(push, version.epoch, &claimed)
                    .await?
            }
        };
        self.back(peer).await?;
        Ok(answer)
    }

    async fn seal(
        &self,
        peer: &str,
        agent: &str,
        epoch: u64,
        after: Option<Vec<u8>>,
    ) -> Result<mesh_task::checkpoint::Sealed, TaskError> {
        let (host, group) = self.reach(peer).await?;
        let state = group.local_state();
        if let Some(known) = mesh_task::checkpoint::check_sender(&state, &self.me, agent, epoch)? {
            return Err(TaskError::new(
                409,
                "stale_epoch",
                format!("agent {agent} is at epoch {known} on {peer}"),
            ));
        }
        let sealed = host.replica().seal(agent, epoch, after.as_deref()).await?;
        self.back(peer).await?;
        Ok(sealed)
    }
}

/// Deploys every region's agents (through its leader; retried until they
/// are in), then, [`DATA_AFTER`] later, puts each region's dataset on its
/// last node and registers it: the search agent, placed by then, moves to
/// its data with the next epoch.
pub(super) async fn deploy(world: World) {
    let regions = world.lock().regions.clone();
    for (r, region) in regions.iter().enumerate() {
        for m in agents(r, region) {
            for _ in 0..20 {
                let deployed = propose(&world, r, RegionCommand::DeployAgent(m.clone())).await;
                if matches!(deployed, Some(RegionResponse::AgentDeployed { .. })) {
                    world.lock().log(format!("deployed {} in {region}", m.name));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    tokio::time::sleep(DATA_AFTER).await;
    for (r, region) in regions.iter().enumerate() {
        let name = format!("docs-r{r}");
        for _ in 0..40 {
            let holder = {
                let s = world.lock();
                s.nodes
                    .iter()
                    .rposition(|n| n.region == r)
                    .and_then(|i| Some((s.nodes[i].peer.clone(), s.nodes[i].store.clone()?)))
            };
            let Some((peer, store)) = holder else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let mut ops = Vec::new();
            for d in 0..DOCUMENTS {
                let text = format!("document {d} of region {region}");
                let doc = StoredDocument {
                    id: format!("doc-{d}"),
                    vector: SimModels.embed_now(&text),
                    text,
                    metadata: serde_json::Value::Null,
                };
                if let Ok(op) = documents::put(&name, &doc) {
                    ops.push(op);
                }
            }
            if store.write(ops, mesh_store::Durability::Sync).is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let dataset = consensus::Dataset {
                name: name.clone(),
                node: peer.clone(),
                tags: vec![pii(r)],
                documents: DOCUMENTS as u64,
                embed_model_sha256: "0".repeat(64),
            };
            let registered = propose(&world, r, RegionCommand::RegisterDataset(dataset)).await;
            if matches!(registered, Some(RegionResponse::DatasetRegistered { .. })) {
                world.lock().log(format!("dataset {name} put on {peer}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl SimModels {
    fn embed_now(&self, text: &str) -> Vec<f32> {
        digest(text)[..8]
            .iter()
            .map(|b| f32::from(*b) - 127.5)
            .collect()
    }
}

/// The leader's placement round on every leader (as a node's housekeeping
/// runs it), with the leader's own member view.
pub(super) async fn place(world: &World) {
    let now = now_ms(world);
    let rounds: Vec<(usize, RegionGroup, Vec<RegionCommand>)> = {
        let s = world.lock();
        s.nodes
            .iter()
            .filter(|n| n.up())
            .filter_map(|n| {
                let group = n.group.clone().filter(|g| g.is_leader())?;
                let view = n.membership.as_ref()?.view(clock_of(n, now));
                let region = &s.regions[n.region];
                let settled = now.saturating_sub(n.started_ms)
                    >= mesh_membership::Config::default().dead_after_ms;
                let grants =
                    mesh_task::placement::round(&group.local_state(), &view, region, settled);
                Some((n.region, group, grants))
            })
            .collect()
    };
    for (region, group, grants) in rounds {
        for grant in grants {
            if let Ok(RegionResponse::LeaseGranted { epoch }) = group.propose(grant.clone()).await {
                if let RegionCommand::MoveAgent {
                    agent, to, reason, ..
                } = grant
                {
                    world.lock().log(format!(
                        "r{region} placed {agent} on {to} (epoch {epoch}, {})",
                        reason.as_str()
                    ));
                }
            }
        }
    }
}

/// How a submission ended, as its client sees it.
enum Submitted {
    Answer(Box<TaskAnswer>),
    Refused(TaskError),
    /// No answer came back: it may or may not have run.
    Unknown(String),
}

/// Routes a task as a node does: the entry node reads the lease in its own
/// state when the agent is of its region, else asks a node of the agent's
/// region; the task goes to the host, which runs it; the answer comes back
/// the same way. Every hop crosses the links.
async fn submit(world: &World, entry: usize, agent_region: usize, run: TaskRun) -> Submitted {
    let (entry_peer, router) = {
        let mut s = world.lock();
        if !s.nodes[entry].up() {
            return Submitted::Refused(TaskError::new(503, "entry_down", "entry node down".into()));
        }
        let entry_peer = s.nodes[entry].peer.clone();
        let router = if s.nodes[entry].region == agent_region {
            Some(entry)
        } else {
            let live: Vec<usize> = (0..s.nodes.len())
                .filter(|&i| s.nodes[i].region == agent_region && s.nodes[i].up())
                .collect();
            (!live.is_empty()).then(|| live[s.rng.gen_range(0..live.len())])
        };
        let Some(router) = router else {
            return Submitted::Refused(TaskError::new(503, "region_down", "no node up".into()));
        };
        (entry_peer, (router, s.nodes[router].peer.clone()))
    };
    let (router, router_peer) = router;
    let mut hops = 0u8;
    if router != entry {
        if hop(world, &entry_peer, &router_peer).await.is_none() {
            return Submitted::Unknown(format!("{router_peer} did not answer"));
        }
        hops += 1;
    }
    let lease = {
        let s = world.lock();
        let Some(group) = s.group_of(&router_peer) else {
            return Submitted::Unknown(format!("{router_peer} went down"));
        };
        match group.local_state().agents.get(&run.request.agent) {
            None => {
                return Submitted::Refused(TaskError::new(
                    404,
                    "unknown_agent",
                    "not deployed".into(),
                ))
            }
            Some(entry) => entry.lease.clone(),
        }
    };
    let Some(lease) = lease else {
        return Submitted::Refused(TaskError::new(503, "not_placed", "not placed yet".into()));
    };
    let answer = if lease.node == router_peer {
        run_on(world, &router_peer, &run, lease.epoch, hops).await
    } else {
        if hop(world, &router_peer, &lease.node).await.is_none() {
            return Submitted::Unknown(format!("host {} did not answer", lease.node));
        }
        let answer = run_on(world, &lease.node, &run, lease.epoch, hops + 1).await;
        if hop(world, &lease.node, &router_peer).await.is_none() {
            return Submitted::Unknown(format!("no answer from host {}", lease.node));
        }
        answer
    };
    if router != entry && hop(world, &router_peer, &entry_peer).await.is_none() {
        return Submitted::Unknown(format!("no answer from {router_peer}"));
    }
    answer
}

/// A node's host, group and region name, if it is up.
fn host_of(world: &World, peer: &str) -> Option<(Arc<Host>, RegionGroup, String)> {
    let s = world.lock();
    let i = s.slot(peer)?;
    let n = &s.nodes[i];
    if n.peer != peer || !n.up() {
        return None;
    }
    Some((
        n.host.clone()?,
        n.group.clone()?,
        s.regions[n.region].to_string(),
    ))
}

/// No rate limits in the simulator.
fn admit_all(_: &Manifest, _: &mesh_types::policy::RateLimits) -> Result<(), TaskError> {
    Ok(())
}

/// What a node's host reaches the region through: its claims and copies.
struct Reach {
    claimer: SimClaimer,
    replicas: SimReplicas,
}

impl Reach {
    fn of(world: &World, peer: &str) -> Self {
        Self {
            claimer: SimClaimer {
                world: world.clone(),
                me: peer.to_owned(),
            },
            replicas: SimReplicas {
                world: world.clone(),
                me: peer.to_owned(),
            },
        }
    }

    fn env<'a>(&'a self, peer: &'a str, region: &'a str) -> mesh_task::Env<'a> {
        mesh_task::Env {
            node: peer,
            region,
            models: &SimModels,
            claimer: &self.claimer,
            admit: &admit_all,
            tokens: None,
            replicas: &self.replicas,
            replica_count: mesh_task::checkpoint::REPLICAS_DEFAULT,
        }
    }
}

/// Every 200 ms on every node that is up, as a node's two keep loops: its
/// contact with its region's majority is judged (it steps down at once
/// when out of contact), and, unless its previous round is still running,
/// a keep round starts: its agents follow its applied region state
/// (activated when granted, stopped when moved, their copies moved off
/// draining nodes). One slow node's round never holds up another's, nor
/// the single-activation check.
pub(super) async fn keep_agents(world: World, stop: Arc<AtomicBool>) {
    let running: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let peers: Vec<String> = world
            .lock()
            .nodes
            .iter()
            .filter(|n| n.up())
            .map(|n| n.peer.clone())
            .collect();
        for peer in peers {
            let Some((host, group, region)) = host_of(&world, &peer) else {
                continue;
            };
            let contact = contact_of(&world, &peer, &group);
            let kept = host.set_contact(contact);
            {
                let mut s = world.lock();
                for k in kept {
                    s.log(format!("{peer} keeps agents: {k:?}"));
                }
            }
            if !running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer.clone())
            {
                continue;
            }
            let (world, running) = (world.clone(), running.clone());
            tokio::spawn(async move {
                let reach = Reach::of(&world, &peer);
                let kept = host
                    .keep_agents(&reach.env(&peer, &region), &group.local_state())
                    .await;
                {
                    let mut s = world.lock();
                    for k in kept {
                        s.log(format!("{peer} keeps agents: {k:?}"));
                    }
                }
                running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&peer);
            });
        }
        check_single_activation(&mut world.lock());
    }
}

/// Whether `peer` is in contact with its region's majority, by its own
/// member view (as a node judges it: `mesh_task::lease::contact`).
fn contact_of(world: &World, peer: &str, group: &RegionGroup) -> Result<(), String> {
    let now = now_ms(world);
    let s = world.lock();
    let Some(n) = s.slot(peer).map(|i| &s.nodes[i]) else {
        return Err("down".into());
    };
    let view = n
        .membership
        .as_ref()
        .map(|m| m.view(clock_of(n, now)))
        .unwrap_or_default();
    let (voters, _) = group.members();
    mesh_task::lease::contact(peer, &voters, |m| {
        view.iter()
            .any(|v| v.peer_id.0 == m && v.state == MemberState::Alive)
    })
}

/// Two nodes may both hold an agent active only while a move is under way
/// (the old host stops at its next keep round after it applies the new
/// lease); longer than this is a single-activation violation.
const OVERLAP_MAX: Duration = Duration::from_secs(1);

/// single-activation: never two up nodes with one agent active for longer
/// than [`OVERLAP_MAX`]; in particular a host cut off from its region's
/// majority steps down before its successor starts (`mesh_task::lease`).
///
/// The step-down argument assumes cuts that are two-way and links that do
/// not lose messages (`mesh_task::lease` says why, and what fences the rest:
/// seals and claims, which tasks-once, counter-exact and single-lease check
/// in every run). So an overlap involving a node with a one-way cut, or
/// while links lose messages, is traced as tolerated, not a violation.
fn check_single_activation(s: &mut State) {
    let now = s.now_us();
    let mut active: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut outside_premise: BTreeSet<String> = BTreeSet::new();
    for (i, n) in s.nodes.iter().enumerate().filter(|(_, n)| n.up()) {
        if let Some(host) = &n.host {
            let one_way = s
                .links
                .blocked
                .iter()
                .any(|&(a, b)| (a == i || b == i) && !s.links.blocked.contains(&(b, a)));
            for (agent, epoch) in host.active_agents() {
                if one_way || s.links.loss > 0.0 {
                    outside_premise.insert(agent.clone());
                }
                active
                    .entry(agent)
                    .or_default()
                    .push(format!("{}@{epoch}", n.peer));
            }
        }
    }
    s.check("single-activation");
    let mut overlaps = std::mem::take(&mut s.overlaps);
    overlaps.retain(|agent, _| active.get(agent).is_some_and(|on| on.len() > 1));
    for (agent, on) in active.into_iter().filter(|(_, on)| on.len() > 1) {
        let since = *overlaps.entry(agent.clone()).or_insert((now, false));
        let (started, said) = since;
        if !said && now.saturating_sub(started) > OVERLAP_MAX.as_micros() as u64 {
            let what = format!(
                "{agent} is active on {} at once, for more than {OVERLAP_MAX:?}",
                on.join(" and ")
            );
            if outside_premise.contains(&agent) {
                s.log(format!(
                    "tolerated (a one-way cut or lossy links: fenced by seals and claims): {what}"
                ));
            } else {
                s.violate("single-activation", what);
            }
            overlaps.insert(agent, (started, true));
        }
    }
    s.overlaps = overlaps;
}

/// Runs `run` on node `peer` with the real task host.
async fn run_on(world: &World, peer: &str, run: &TaskRun, epoch: u64, hops: u8) -> Submitted {
    let Some((host, group, region)) = host_of(world, peer) else {
        return Submitted::Unknown(format!("{peer} is down"));
    };
    let reach = Reach::of(world, peer);
    let env = reach.env(peer, &region);
    let state = group.local_state();
    match host.execute(&env, &state, run, epoch, hops).await {
        Ok(answer) => Submitted::Answer(Box::new(answer)),
        // Not known to have run, nor not to: the claim or the write.
        Err(e)
            if e.name == "claim_unknown"
                || e.name == "storage"
                || e.name == "not_copied"
                || e.name == "claimed_elsewhere" =>
        {
            Submitted::Unknown(e.to_string())
        }
        Err(e) => Submitted::Refused(e),
    }
}

/// What the world remembers of an answered task.
#[derive(Debug, Clone)]
pub(super) struct Acked {
    /// The host.
    node: String,
    /// The hash of the audit record it was answered with.
    record: String,
}

/// Whether a task of `agent_region`'s agent with `tags` (its input's and
/// its dataset's), entered in `entry_region`, may run at all.
fn allowed(tags: &[String], agent_region: usize, entry_region: usize) -> bool {
    tags.iter().all(|t| {
        let Some(r) = t
            .strip_prefix("pii-r")
            .and_then(|r| r.parse::<usize>().ok())
        else {
            return true;
        };
        r == agent_region && r == entry_region
    })
}

/// A task client: new tasks (85 %) to random agents through random entry
/// nodes, and resubmissions of answered task ids (15 %), which must get
/// the same result; a task whose answer is lost is retried with its id.
pub(super) async fn client(world: World, id: usize, stop: Arc<AtomicBool>) {
    let mut next = 0u64;
    let mut answered: Vec<(TaskRun, usize)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let (pause, resubmit, entry, pick_agent, tag) = {
            let mut s = world.lock();
            let regions = s.regions.len();
            let nodes = s.nodes.len();
            (
                s.rng.gen_range(50..250),
                !answered.is_empty() && s.rng.gen_bool(0.15),
                s.rng.gen_range(0..nodes),
                (s.rng.gen_range(0..regions), s.rng.gen_range(0..3)),
                s.rng.gen_bool(0.2).then(|| s.rng.gen_range(0..regions)),
            )
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (run, agent_region) = if resubmit {
            let i = world.lock().rng.gen_range(0..answered.len());
            answered[i].clone()
        } else {
            next += 1;
            let (r, kind) = pick_agent;
            let agent = ["echo", "chat", "search"][kind];
            let entry_region = world.lock().nodes[entry].region;
            let request = TaskRequest {
                agent: format!("{agent}-r{r}"),
                input: format!("question {next} of client {id}"),
                tags: tag.map(pii).into_iter().collect(),
                session: (agent == "chat").then(|| format!("s{id}")),
                task_id: Some(format!("c{id}-{next}")),
                stream: false,
            };
            world.lock().tasks.submitted += 1;
            let run = TaskRun {
                request,
                entry_node: String::new(),
                entry_region: world.lock().regions[entry_region].to_string(),
                trace_id: format!("trace-c{id}-{next}"),
            };
            (run, r)
        };
        for attempt in 0..3 {
            let entry = if attempt == 0 {
                entry
            } else {
                let mut s = world.lock();
                let n = s.nodes.len();
                s.rng.gen_range(0..n)
            };
            let mut run = run.clone();
            {
                let s = world.lock();
                run.entry_node = s.nodes[entry].peer.clone();
                run.entry_region = s.regions[s.nodes[entry].region].to_string();
            }
            let entry_region = world.lock().nodes[entry].region;
            let outcome = submit(&world, entry, agent_region, run.clone()).await;
            let task_id = run.request.task_id.clone().unwrap_or_default();
            let mut s = world.lock();
            match outcome {
                Submitted::Answer(answer) => {
                    s.tasks.answered += 1;
                    if answer.replayed {
                        s.tasks.replayed += 1;
                    }
                    let tags = answer.provenance.record.tags.clone();
                    let in_force = answer.provenance.record.policy_version > 0;
                    s.check("residency");
                    if in_force && !allowed(&tags, agent_region, entry_region) {
                        s.violate(
                            "residency",
                            format!("task {task_id} with tags {tags:?} of an agent of r{agent_region} was answered to r{entry_region}"),
                        );
                    }
                    if note_answered(&mut s, &task_id, &answer) {
                        answered.push((run.clone(), agent_region));
                    }
                    break;
                }
                Submitted::Refused(e) => {
                    s.tasks.refused += 1;
                    s.log(format!("task {task_id} refused: {}", e.name));
                    break;
                }
                Submitted::Unknown(why) => {
                    s.tasks.unknown += 1;
                    s.log(format!("task {task_id} unknown: {why}"));
                }
            }
        }
    }
}

/// Notes an answer to `task_id` (tasks-once: one record per answered task
/// id); true the first time.
fn note_answered(s: &mut State, task_id: &str, answer: &TaskAnswer) -> bool {
    let record = answer.provenance.hash.clone();
    s.log(format!(
        "task {task_id} answered by {} (epoch {}){}",
        answer.provenance.record.node,
        answer.provenance.record.epoch,
        if answer.replayed { ", replayed" } else { "" }
    ));
    s.check("tasks-once");
    match s.acked.get(task_id) {
        Some(earlier) if earlier.record != record => {
            let what = format!(
                "task {task_id} was answered twice with different records ({} on {}, then {record} on {})",
                earlier.record, earlier.node, answer.provenance.record.node
            );
            s.violate("tasks-once", what);
            false
        }
        Some(_) => false,
        None => {
            s.acked.insert(
                task_id.to_owned(),
                Acked {
                    node: answer.provenance.record.node.clone(),
                    record,
                },
            );
            true
        }
    }
}

/// Region `r`'s counter client: tasks `k`, one after the other, each
/// retried with its id through random entry nodes until it is answered;
/// the k-th answered task must return k (counter-exact).
pub(super) async fn counter_client(world: World, r: usize, c: usize, stop: Arc<AtomicBool>) {
    let agent = counter_agent(r);
    let mut i = 0u64;
    'tasks: while !stop.load(Ordering::SeqCst) {
        i += 1;
        let task_id = format!("k{r}-{c}-{i}");
        let request = TaskRequest {
            agent: agent.clone(),
            input: "k".into(),
            tags: vec![],
            session: None,
            task_id: Some(task_id.clone()),
            stream: false,
        };
        world.lock().tasks.submitted += 1;
        while !stop.load(Ordering::SeqCst) {
            let (pause, entry) = {
                let mut s = world.lock();
                let nodes = s.nodes.len();
                (s.rng.gen_range(50..150), s.rng.gen_range(0..nodes))
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let run = {
                let s = world.lock();
                TaskRun {
                    request: request.clone(),
                    entry_node: s.nodes[entry].peer.clone(),
                    entry_region: s.regions[s.nodes[entry].region].to_string(),
                    trace_id: format!("trace-{task_id}"),
                }
            };
            let outcome = submit(&world, entry, r, run).await;
            let mut s = world.lock();
            match outcome {
                Submitted::Answer(answer) => {
                    s.tasks.answered += 1;
                    if answer.replayed {
                        s.tasks.replayed += 1;
                    }
                    note_answered(&mut s, &task_id, &answer);
                    let value = answer.output["value"].as_i64().unwrap_or(-1);
                    let first = s
                        .counted
                        .entry(r)
                        .or_default()
                        .0
                        .insert(task_id.clone(), value);
                    if let Some(first) = first.filter(|f| *f != value) {
                        s.check("counter-exact");
                        s.violate(
                            "counter-exact",
                            format!("counter-r{r}: task {task_id} was answered {first}, then {value} when submitted again"),
                        );
                    }
                    // Now and then the same id again: it must be answered
                    // with the same value (replayed), wherever it runs now.
                    if s.rng.gen_bool(0.15) {
                        s.counted
                            .entry(r)
                            .or_default()
                            .0
                            .insert(task_id.clone(), value);
                        drop(s);
                        continue;
                    }
                    continue 'tasks;
                }
                Submitted::Refused(e) => {
                    s.tasks.refused += 1;
                    s.log(format!("task {task_id} refused: {}; retried", e.name));
                }
                Submitted::Unknown(why) => {
                    s.tasks.unknown += 1;
                    s.log(format!("task {task_id} unknown: {why}"));
                }
            }
        }
        // Stopped before it was answered: finished after the final heal.
        world.lock().counted.entry(r).or_default().1.push(task_id);
    }
}

/// After the final heal: every counter task its client left unanswered is
/// submitted again, by id, until it is answered (at most 20 s each), so
/// counter-exact has no task whose outcome it must guess.
pub(super) async fn finish_counters(world: &World) {
    let pending: Vec<(usize, String)> = {
        let s = world.lock();
        s.counted
            .iter()
            .flat_map(|(r, (_, ids))| ids.iter().map(move |id| (*r, id.clone())))
            .collect()
    };
    for (r, task_id) in pending {
        let at = Instant::now();
        while at.elapsed() < Duration::from_secs(20) {
            let (entry, run) = {
                let mut s = world.lock();
                let nodes = s.nodes.len();
                let entry = s.rng.gen_range(0..nodes);
                let run = TaskRun {
                    request: TaskRequest {
                        agent: counter_agent(r),
                        input: "k".into(),
                        tags: vec![],
                        session: None,
                        task_id: Some(task_id.clone()),
                        stream: false,
                    },
                    entry_node: s.nodes[entry].peer.clone(),
                    entry_region: s.regions[s.nodes[entry].region].to_string(),
                    trace_id: format!("trace-{task_id}"),
                };
                (entry, run)
            };
            if let Submitted::Answer(answer) = submit(world, entry, r, run).await {
                let mut s = world.lock();
                note_answered(&mut s, &task_id, &answer);
                let value = answer.output["value"].as_i64().unwrap_or(-1);
                let counted = s.counted.entry(r).or_default();
                counted.0.insert(task_id.clone(), value);
                counted.1.retain(|id| *id != task_id);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Counter clients per region, at once.
pub(super) const COUNTER_CLIENTS: usize = 2;

/// counter-exact, at the end: distinct values, and no value skipped but
/// for the tasks left unanswered.
pub(super) fn check_counters(s: &mut State) {
    let counted = std::mem::take(&mut s.counted);
    for (r, (values, unanswered)) in &counted {
        s.check("counter-exact");
        let mut by_value: BTreeMap<i64, Vec<&String>> = BTreeMap::new();
        for (task, v) in values {
            by_value.entry(*v).or_default().push(task);
        }
        for (v, tasks) in by_value.iter().filter(|(_, t)| t.len() > 1) {
            s.violate(
                "counter-exact",
                format!("counter-r{r}: tasks {tasks:?} were all answered {v}: an answered task was lost"),
            );
        }
        let max = by_value.keys().next_back().copied().unwrap_or(0);
        let skipped: Vec<i64> = (1..=max).filter(|v| !by_value.contains_key(v)).collect();
        if skipped.len() > unanswered.len() {
            s.violate(
                "counter-exact",
                format!(
                    "counter-r{r}: values {skipped:?} were answered to no task, with {} task(s) unanswered at the end ({unanswered:?}): a task was counted twice", unanswered.len()
                ),
            );
        }
    }
    s.counted = counted;
}

/// Reads every node's audit log (the running process's store, else the
/// disk) into the world's record of what ran; a record that changed under
/// its (node, seq) is a broken chain.
pub(super) fn scan_audit(s: &mut State) {
    let mut seen = Vec::new();
    for n in &s.nodes {
        let store: &dyn Store = match &n.store {
            Some(st) if !st.dead() => &**st,
            _ => n.disk.durable(),
        };
        let _ = store.scan(Column::Audit, &[], None, &mut |_, v| {
            if let Ok(r) = serde_json::from_slice::<SealedRecord>(v) {
                seen.push(r);
            }
            true
        });
    }
    for r in seen {
        let key = (r.record.node.clone(), r.seq);
        s.audit.entry(key).or_insert(r);
    }
}

/// The lease of every agent at every epoch, as each node's state holds it:
/// one node per epoch (single-lease, every 50 ms).
pub(super) fn observe_leases(s: &mut State) {
    let mut found = Vec::new();
    for n in s.nodes.iter().filter(|n| n.up()) {
        if let Some(g) = &n.group {
            for (agent, entry) in g.local_state().agents {
                if let Some(lease) = entry.lease {
                    found.push((n.region, agent, lease.epoch, lease.node, n.peer.clone()));
                }
            }
        }
    }
    for (region, agent, epoch, node, seen_by) in found {
        s.check("single-lease");
        let known = s
            .leases
            .entry((region, agent.clone(), epoch))
            .or_insert_with(|| node.clone())
            .clone();
        if known != node {
            s.violate(
                "single-lease",
                format!("{agent} of r{region} at epoch {epoch} is on {known} and, as {seen_by} sees it, on {node}"),
            );
        }
    }
}

/// The end: every answered task durable on its host, no task id run twice,
/// residency kept, every run fenced by its lease's claim, every chain whole.
pub(super) fn check_end(s: &mut State) {
    scan_audit(s);
    check_counters(s);
    s.tasks.executed = s.audit.values().filter(|r| r.record.is_task()).count() as u64;
    // tasks-acknowledged-durable: what each node's disk holds after a power
    // loss: its audit records, and task results (its own, and those in the
    // copies of agent state it keeps).
    let mut records_on_disk: BTreeSet<(String, String)> = BTreeSet::new();
    let mut results_on_disk: BTreeSet<(String, String)> = BTreeSet::new();
    for n in &s.nodes {
        let disk = n.disk.durable();
        let _ = disk.scan(Column::Audit, &[], None, &mut |_, v| {
            if let Ok(r) = serde_json::from_slice::<SealedRecord>(v) {
                records_on_disk.insert((n.peer.clone(), r.hash));
            }
            true
        });
        let _ = disk.scan(Column::Tasks, &[], None, &mut |k, v| {
            let answer = if k.starts_with(b"ckpt\0d\0") {
                serde_json::from_slice::<mesh_task::checkpoint::StoredResult>(v)
                    .ok()
                    .and_then(|r| serde_json::from_slice::<TaskAnswer>(&r.answer).ok())
            } else if !k.contains(&0) {
                serde_json::from_slice::<TaskAnswer>(v).ok()
            } else {
                None
            };
            if let Some(a) = answer {
                results_on_disk.insert((a.task_id, a.provenance.hash));
            }
            true
        });
    }
    let acked: Vec<(String, Acked)> = s
        .acked
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (task_id, ack) in &acked {
        s.check("tasks-acknowledged-durable");
        let Some(i) = s.slot(&ack.node) else { continue };
        if s.nodes[i].peer != ack.node {
            // The host's disk was destroyed (a wipe): its audit log with it.
            s.log(format!("task {task_id}'s host {} lost its disk", ack.node));
            continue;
        }
        if !records_on_disk.contains(&(ack.node.clone(), ack.record.clone())) {
            s.violate(
                "tasks-acknowledged-durable",
                format!(
                    "task {task_id}, answered by {}, has no audit record {} on its disk",
                    ack.node, ack.record
                ),
            );
        }
        if !results_on_disk.contains(&(task_id.clone(), ack.record.clone())) {
            s.violate(
                "tasks-acknowledged-durable",
                format!(
                    "task {task_id}'s result (record {}) is on no disk: not its host's {}, nor a copy's",
                    ack.record, ack.node
                ),
            );
        }
    }
    // tasks-once
    let mut runs: BTreeMap<String, Vec<SealedRecord>> = BTreeMap::new();
    for r in s.audit.values().filter(|r| r.record.is_task()) {
        runs.entry(r.record.task_id.clone())
            .or_default()
            .push(r.clone());
    }
    let claim_of = |r: &SealedRecord| format!("{}@{}", r.record.node, r.record.epoch);
    // Runs whose claim a later run took over: cut off before an answer.
    let mut replaced: BTreeSet<(String, String)> = BTreeSet::new();
    for (task_id, records) in &runs {
        s.check("tasks-once");
        for r in records {
            if let Some(c) = &r.record.reclaims {
                replaced.insert((task_id.clone(), c.clone()));
            }
        }
        let first_runs = records
            .iter()
            .filter(|r| r.record.reclaims.is_none())
            .count();
        if first_runs > 1 {
            let at: Vec<String> = records.iter().map(claim_of).collect();
            s.violate(
                "tasks-once",
                format!(
                    "task {task_id} ran {first_runs} times without taking over a claim: {at:?}"
                ),
            );
        }
        let Some(ack) = s.acked.get(task_id).cloned() else {
            continue;
        };
        let Some(answered) = records.iter().find(|r| r.hash == ack.record) else {
            continue;
        };
        for r in records.iter().filter(|r| r.hash != ack.record) {
            if r.record.epoch > answered.record.epoch
                || r.record.reclaims.as_deref() == Some(claim_of(answered).as_str())
            {
                s.violate(
                    "tasks-once",
                    format!(
                        "task {task_id} was answered by its run at {}, and ran again at {}",
                        claim_of(answered),
                        claim_of(r)
                    ),
                );
            }
        }
    }
    // residency, and single-lease's fence: the lease at the record's epoch,
    // and the region's claim of the task id.
    let records: Vec<SealedRecord> = s.audit.values().cloned().collect();
    let claims: Vec<consensus::Claims> = (0..s.regions.len())
        .map(|r| {
            s.nodes
                .iter()
                .filter(|n| n.region == r && n.up())
                .filter_map(|n| n.group.as_ref().map(|g| g.local_state()))
                .max_by_key(|st| st.last_applied.map(|l| l.index))
                .map(|st| st.claims)
                .unwrap_or_default()
        })
        .collect();
    for r in records {
        let rec = &r.record;
        let region = s.regions.iter().position(|g| g.as_str() == rec.region);
        let entry_region = s.slot(&rec.entry_node).map(|i| s.nodes[i].region);
        s.check("residency");
        // The rules are those of the policy in force; before the first
        // policy write there are none.
        for tag in rec.tags.iter().filter(|_| rec.policy_version > 0) {
            let Some(home) = tag
                .strip_prefix("pii-r")
                .and_then(|t| t.parse::<usize>().ok())
            else {
                continue;
            };
            if region != Some(home) || entry_region != Some(home) {
                s.violate(
                    "residency",
                    format!(
                        "task {} with data tagged {tag} ran in {} for an entry node in {:?}",
                        rec.task_id,
                        rec.region,
                        entry_region.map(|e| s.regions[e].to_string())
                    ),
                );
            }
        }
        s.check("single-lease");
        let Some(region) = region else { continue };
        match s.leases.get(&(region, rec.agent.clone(), rec.epoch)) {
            Some(node) if *node == rec.node => {}
            other => {
                let what = format!(
                    "task {} ran on {} at epoch {} of {}, whose lease was {other:?}",
                    rec.task_id, rec.node, rec.epoch, rec.agent
                );
                s.violate("single-lease", what);
            }
        }
        if !rec.is_task() {
            // An agent's activation after a move: no claim to check.
            continue;
        }
        let was_replaced =
            replaced.contains(&(rec.task_id.clone(), format!("{}@{}", rec.node, rec.epoch)));
        match claims[region].get(&rec.task_id) {
            Some(c) if c.node == rec.node && c.epoch == rec.epoch => {}
            // Its claim was taken over by the agent's next host.
            Some(c) if was_replaced && c.agent == rec.agent && c.epoch > rec.epoch => {}
            other => {
                let what = format!(
                    "task {} ran on {} at epoch {} without its claim (the region holds {other:?})",
                    rec.task_id, rec.node, rec.epoch
                );
                s.violate("single-lease", what);
            }
        }
    }
    // audit-chains
    for i in 0..s.nodes.len() {
        let mut records = Vec::new();
        let _ = s.nodes[i]
            .disk
            .durable()
            .scan(Column::Audit, &[], None, &mut |_, v| {
                if let Ok(r) = serde_json::from_slice::<SealedRecord>(v) {
                    records.push(r);
                }
                true
            });
        s.check("audit-chains");
        if let Err(e) = audit::verify(&records) {
            let peer = s.nodes[i].peer.clone();
            s.violate("audit-chains", format!("{peer}'s audit chain: {e}"));
        }
    }
}
