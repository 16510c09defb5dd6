//! The simulated world: nodes, links, clients, faults and observers, all on
//! one tokio thread whose clock is paused, so time advances only when every
//! task waits, straight to the next timer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use consensus::rpc::{serve, Transport};
use consensus::{GroupError, RaftSettings, RegionGroup, TypeConfig};
use mesh_membership::{Command, Event, Membership};
use mesh_store::{Column, MemStore, Store};
use mesh_types::policy::Policy;
use mesh_types::{Load, MemberState, NodeId, NodeRecord, Region};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::check::{linearizable, AppliedLogs, Elections, Op, OpKind};
use crate::report::{Invariant, Report};
use crate::scenario::{Fault, Scenario};
use crate::SimConfig;

/// Membership clock of every node at the start (2026-01-01), plus simulated time.
const EPOCH_MS: u64 = 1_767_225_600_000;
/// How often the membership engines tick and announce.
const GOSSIP_TICK: Duration = Duration::from_millis(250);
/// A message that never arrives fails the call after this.
const LOST_AFTER: Duration = Duration::from_millis(1000);
/// Policy clients per region.
const CLIENTS_PER_REGION: usize = 3;
/// After the last fault heals: each region must commit a write within this.
const LIVENESS_BOUND: Duration = Duration::from_secs(30);
/// After the last fault heals: every view must show every live node alive within this.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(15);

/// Link conditions, changed by faults.
#[derive(Debug)]
struct Links {
    /// Directed pairs (from, to) whose messages are lost.
    blocked: BTreeSet<(String, String)>,
    loss: f64,
    duplicate: f64,
    min_delay_us: u64,
    jitter_us: u64,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            blocked: BTreeSet::new(),
            loss: 0.0,
            duplicate: 0.0,
            min_delay_us: 200,
            jitter_us: 300,
        }
    }
}

struct Node {
    peer: String,
    region: usize,
    store: Arc<dyn Store>,
    group: Option<RegionGroup>,
    membership: Option<Membership>,
    generation: u64,
    applied_checked: u64,
}

/// Everything the tasks share. Never held across an await.
struct State {
    rng: StdRng,
    links: Links,
    nodes: Vec<Node>,
    regions: Vec<Region>,
    history: Vec<Op>,
    trace: Vec<String>,
    elections: Elections,
    applied: AppliedLogs,
    violations: BTreeMap<&'static str, Vec<String>>,
    checks: BTreeMap<&'static str, u64>,
    faults: u64,
    messages: u64,
    start: Instant,
}

impl State {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn log(&mut self, line: String) {
        let t = self.now_us();
        self.trace.push(format!("{:>10.3} {line}", t as f64 / 1e6));
    }

    fn violate(&mut self, invariant: &'static str, what: String) {
        self.log(format!("VIOLATION {invariant}: {what}"));
        self.violations.entry(invariant).or_default().push(what);
    }

    fn check(&mut self, invariant: &'static str) {
        *self.checks.entry(invariant).or_default() += 1;
    }

    /// Samples one message from `from` to `to`: its delay, or `None` if lost.
    fn send(&mut self, from: &str, to: &str) -> Option<(Duration, bool)> {
        self.messages += 1;
        let up = self.nodes.iter().any(|n| n.peer == to && n.group.is_some());
        if !up || self.links.blocked.contains(&(from.to_owned(), to.to_owned())) {
            return None;
        }
        if self.links.loss > 0.0 && self.rng.gen_bool(self.links.loss) {
            return None;
        }
        let jitter = if self.links.jitter_us > 0 {
            self.rng.gen_range(0..=self.links.jitter_us)
        } else {
            0
        };
        let duplicate = self.links.duplicate > 0.0 && self.rng.gen_bool(self.links.duplicate);
        Some((
            Duration::from_micros(self.links.min_delay_us + jitter),
            duplicate,
        ))
    }

    fn group_of(&self, peer: &str) -> Option<RegionGroup> {
        self.nodes
            .iter()
            .find(|n| n.peer == peer)
            .and_then(|n| n.group.clone())
    }

    fn leader_of(&self, region: usize) -> Option<(usize, RegionGroup)> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            let g = n.group.as_ref()?;
            (n.region == region && g.is_leader()).then(|| (i, g.clone()))
        })
    }
}

#[derive(Clone)]
struct World(Arc<Mutex<State>>);

impl World {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock ends the simulation anyway.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Raft RPCs between simulated nodes: delayed, lost, duplicated and
/// reordered by [`Links`], answered by the real `consensus::rpc::serve`.
#[derive(Clone)]
struct SimTransport {
    me: String,
    world: World,
}

impl Transport for SimTransport {
    async fn call(&self, peer_id: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let there = self.world.lock().send(&self.me, peer_id);
        let Some((delay, duplicate)) = there else {
            tokio::time::sleep(LOST_AFTER).await;
            return Err(format!("{peer_id} did not answer"));
        };
        tokio::time::sleep(delay).await;
        let Some(group) = self.world.lock().group_of(peer_id) else {
            return Err(format!("{peer_id} is down"));
        };
        let answer = serve(group.raft(), &request).await;
        if duplicate {
            let _ = serve(group.raft(), &request).await;
        }
        let back = self.world.lock().send(peer_id, &self.me);
        match back {
            Some((delay, _)) => {
                tokio::time::sleep(delay).await;
                Ok(answer)
            }
            None => {
                tokio::time::sleep(LOST_AFTER).await;
                Err(format!("no answer from {peer_id}"))
            }
        }
    }
}

fn settings() -> RaftSettings {
    RaftSettings::default()
}

fn record(peer: &str, region: &Region, generation: u64, now_ms: u64) -> NodeRecord {
    NodeRecord {
        node_id: NodeId(peer.to_owned()),
        region: region.clone(),
        addrs: vec![format!("/sim/{peer}")],
        version: mesh_types::AGENTMESH_VERSION.to_owned(),
        started_at_ms: now_ms,
        seq: generation << 32,
        sent_at_ms: now_ms,
        leaving: false,
        models: Vec::new(),
        datasets: Vec::new(),
        load: Load::default(),
        api: None,
        raft: None,
    }
}

async fn open_group(world: &World, peer: &str, store: Arc<dyn Store>) -> RegionGroup {
    let transport = SimTransport {
        me: peer.to_owned(),
        world: world.clone(),
    };
    match RegionGroup::open(&settings(), store, peer, transport).await {
        Ok(g) => g,
        // The in-memory store cannot fail to open; a failure is a bug worth a loud stop.
        Err(e) => panic!("cannot open the region group of {peer}: {e}"),
    }
}

fn now_ms(world: &World) -> u64 {
    EPOCH_MS + world.lock().start.elapsed().as_millis() as u64
}

/// Starts node `i` (again) on its store.
async fn start_node(world: &World, i: usize) {
    let (peer, store, region, generation) = {
        let mut s = world.lock();
        let n = &mut s.nodes[i];
        n.generation += 1;
        (
            n.peer.clone(),
            n.store.clone(),
            n.region,
            n.generation,
        )
    };
    let group = open_group(world, &peer, store).await;
    let now = now_ms(world);
    let mut s = world.lock();
    let region_name = s.regions[region].clone();
    let membership = Membership::new(
        mesh_membership::Config::default(),
        record(&peer, &region_name, generation, now),
        now,
    );
    let n = &mut s.nodes[i];
    n.group = Some(group);
    n.membership = Some(membership);
    s.log(format!("start {peer} (generation {generation})"));
}

async fn stop_node(world: &World, i: usize) {
    let group = {
        let mut s = world.lock();
        let peer = s.nodes[i].peer.clone();
        s.log(format!("crash {peer}"));
        s.nodes[i].membership = None;
        s.nodes[i].group.take()
    };
    if let Some(g) = group {
        g.shutdown().await;
    }
}

/// Every GOSSIP_TICK: each live engine ticks; its announcements reach the
/// other live engines through the links.
async fn gossip(world: World, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(GOSSIP_TICK).await;
        let now = now_ms(&world);
        let mut s = world.lock();
        let mut announced = Vec::new();
        for n in s.nodes.iter_mut() {
            if let Some(m) = n.membership.as_mut() {
                for c in m.handle(Event::Tick, now) {
                    if let Command::Announce(r) = c {
                        announced.push((n.peer.clone(), r));
                    }
                }
            }
        }
        for (from, record) in announced {
            let peers: Vec<String> = s.nodes.iter().map(|n| n.peer.clone()).collect();
            for to in peers.iter().filter(|p| **p != from) {
                if s.send(&from, to).is_none() {
                    continue;
                }
                if let Some(m) = s
                    .nodes
                    .iter_mut()
                    .find(|n| &n.peer == to)
                    .and_then(|n| n.membership.as_mut())
                {
                    let _ = m.handle(Event::Record(record.clone()), now);
                }
            }
        }
    }
}

/// Every 50 ms: who leads which term, and what each node applied.
async fn observe(world: World, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        observe_once(&world);
    }
}

fn observe_once(world: &World) {
    let mut s = world.lock();
    let mut found = Vec::new();
    for (i, n) in s.nodes.iter().enumerate() {
        let Some(g) = n.group.as_ref() else { continue };
        let m = g.raft().metrics().borrow().clone();
        if m.state == ServerState::Leader {
            found.push(("leader", i, m.current_term, 0));
        }
        if let Some(applied) = m.last_applied {
            found.push(("applied", i, 0, applied.index));
        }
    }
    for (what, i, term, applied) in found {
        let (peer, region) = (s.nodes[i].peer.clone(), s.nodes[i].region);
        if what == "leader" {
            s.check("election-safety");
            let before = s.elections.changes;
            if let Err(e) = s.elections.observe(region, term, &peer) {
                s.violate("election-safety", e);
            } else if s.elections.changes > before {
                s.log(format!("leader r{region} term {term} {peer}"));
            }
            continue;
        }
        // Compare every newly applied entry's term with the other nodes'.
        let from = s.nodes[i].applied_checked + 1;
        if applied < from {
            continue;
        }
        let entries = s.nodes[i]
            .store
            .range(
                Column::RaftLog,
                &from.to_be_bytes(),
                Some(&(applied + 1).to_be_bytes()),
            )
            .unwrap_or_default();
        for (_, bytes) in entries {
            let Ok(entry) = consensus::codec::decode::<openraft::Entry<TypeConfig>>(&bytes) else {
                s.violate("log-matching", format!("{peer}: an undecodable log entry"));
                continue;
            };
            s.check("log-matching");
            let id = entry.log_id;
            if let Err(e) = s
                .applied
                .observe(region, id.index, id.leader_id.term, &peer)
            {
                s.violate("log-matching", e);
            }
        }
        s.nodes[i].applied_checked = applied;
    }
}

fn policy(value: u32) -> Policy {
    let mut p = Policy::default();
    p.rate_limits.per_agent.burst = value;
    p
}

/// The group to send a client request to: a random live node of the region.
fn pick(world: &World, region: usize) -> Option<RegionGroup> {
    let mut s = world.lock();
    let live: Vec<RegionGroup> = s
        .nodes
        .iter()
        .filter(|n| n.region == region)
        .filter_map(|n| n.group.clone())
        .collect();
    if live.is_empty() {
        return None;
    }
    let i = s.rng.gen_range(0..live.len());
    Some(live[i].clone())
}

/// Like the HTTP API: a node that is not the leader forwards once to the one it names.
fn redirect(world: &World, e: &GroupError) -> Option<RegionGroup> {
    match e {
        GroupError::NotLeader {
            leader: Some(leader),
        } => world.lock().group_of(leader),
        _ => None,
    }
}

enum Outcome {
    Done,
    Unknown,
    NotApplied,
}

async fn write(world: &World, region: usize, value: u32) -> Outcome {
    let Some(mut group) = pick(world, region) else {
        return Outcome::NotApplied;
    };
    for _ in 0..2 {
        match group.set_policy(policy(value)).await {
            Ok(_) => return Outcome::Done,
            Err(e) => match redirect(world, &e) {
                Some(g) => group = g,
                None => {
                    return match e {
                        GroupError::NotLeader { .. } | GroupError::Busy(_) => Outcome::NotApplied,
                        _ => Outcome::Unknown,
                    }
                }
            },
        }
    }
    Outcome::NotApplied
}

async fn read(world: &World, region: usize) -> Option<Option<u32>> {
    let mut group = pick(world, region)?;
    for _ in 0..2 {
        match group.consistent_state().await {
            Ok(state) => return Some(state.policy.map(|p| p.rate_limits.per_agent.burst)),
            Err(e) => group = redirect(world, &e)?,
        }
    }
    None
}

/// A client: writes (70 %) and linearizable reads (30 %) with pauses, until `stop`.
async fn client(world: World, region: usize, id: usize, stop: Arc<AtomicBool>) {
    let mut next = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let (is_write, pause) = {
            let mut s = world.lock();
            (s.rng.gen_bool(0.7), s.rng.gen_range(20..200))
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let invoke_us = world.lock().now_us();
        if is_write {
            next += 1;
            let value = (id as u32 + 1) * 1_000_000 + next;
            let outcome = write(&world, region, value).await;
            let mut s = world.lock();
            let return_us = s.now_us();
            let (verdict, return_us) = match outcome {
                Outcome::Done => ("ok", Some(return_us)),
                // It may still commit, at any later time.
                Outcome::Unknown => ("unknown", None),
                // Refused before it was proposed: it has no effect to check.
                Outcome::NotApplied => {
                    s.log(format!("r{region} c{id} write {value} refused"));
                    continue;
                }
            };
            s.log(format!("r{region} c{id} write {value} {verdict}"));
            s.history.push(Op {
                region,
                client: id,
                kind: OpKind::Write(value),
                invoke_us,
                return_us,
            });
        } else if let Some(value) = read(&world, region).await {
            let mut s = world.lock();
            let return_us = s.now_us();
            s.log(format!("r{region} c{id} read {value:?}"));
            s.history.push(Op {
                region,
                client: id,
                kind: OpKind::Read(value),
                invoke_us,
                return_us: Some(return_us),
            });
        }
    }
}

async fn apply_fault(world: &World, fault: &Fault) {
    let mut restart = Vec::new();
    let mut crash = None;
    {
        let mut s = world.lock();
        s.faults += 1;
        s.log(format!("fault {}", serde_json::to_string(fault).unwrap_or_default()));
        let peers_of = |s: &State, r: usize| -> Vec<String> {
            s.nodes
                .iter()
                .filter(|n| n.region == r)
                .map(|n| n.peer.clone())
                .collect()
        };
        let all: Vec<String> = s.nodes.iter().map(|n| n.peer.clone()).collect();
        match fault {
            Fault::PartitionRegions { a, b } => {
                let (pa, pb) = (peers_of(&s, *a), peers_of(&s, *b));
                for x in &pa {
                    for y in &pb {
                        s.links.blocked.insert((x.clone(), y.clone()));
                        s.links.blocked.insert((y.clone(), x.clone()));
                    }
                }
            }
            Fault::IsolateFollower { region } => {
                let follower = s.nodes.iter().find(|n| {
                    n.region == *region && n.group.as_ref().is_some_and(|g| !g.is_leader())
                });
                match follower.map(|n| n.peer.clone()) {
                    Some(f) => {
                        for p in all.iter().filter(|p| **p != f) {
                            s.links.blocked.insert((f.clone(), p.clone()));
                            s.links.blocked.insert((p.clone(), f.clone()));
                        }
                        s.log(format!("isolated {f}"));
                    }
                    None => s.log("no follower to isolate".into()),
                }
            }
            Fault::IsolateLeaderOneWay { region } => match s.leader_of(*region) {
                Some((i, _)) => {
                    let l = s.nodes[i].peer.clone();
                    for p in all.iter().filter(|p| **p != l) {
                        s.links.blocked.insert((l.clone(), p.clone()));
                    }
                    s.log(format!("{l} can no longer send"));
                }
                None => s.log(format!("region {region} has no leader to isolate")),
            },
            Fault::CrashLeader { region } => match s.leader_of(*region) {
                Some((i, _)) => crash = Some(i),
                None => s.log(format!("region {region} has no leader to crash")),
            },
            Fault::CrashFollower { region } => {
                crash = s.nodes.iter().position(|n| {
                    n.region == *region && n.group.as_ref().is_some_and(|g| !g.is_leader())
                });
            }
            Fault::RestartAll => {
                restart = (0..s.nodes.len())
                    .filter(|i| s.nodes[*i].group.is_none())
                    .collect();
            }
            Fault::RollingRestart { .. } => {}
            Fault::Loss { percent } => s.links.loss = f64::from(*percent) / 100.0,
            Fault::Duplicate { percent } => s.links.duplicate = f64::from(*percent) / 100.0,
            Fault::Delay { min_ms, jitter_ms } => {
                s.links.min_delay_us = min_ms * 1000;
                s.links.jitter_us = jitter_ms * 1000;
            }
            Fault::Heal => {
                s.links = Links::default();
                restart = (0..s.nodes.len())
                    .filter(|i| s.nodes[*i].group.is_none())
                    .collect();
            }
        }
    }
    if let Some(i) = crash {
        stop_node(world, i).await;
    }
    for i in restart {
        start_node(world, i).await;
    }
    if let Fault::RollingRestart { region, gap_s } = fault {
        let members: Vec<usize> = {
            let s = world.lock();
            (0..s.nodes.len())
                .filter(|i| s.nodes[*i].region == *region)
                .collect()
        };
        let (world, gap) = (world.clone(), Duration::from_secs(*gap_s));
        tokio::spawn(async move {
            for i in members {
                stop_node(&world, i).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                start_node(&world, i).await;
                tokio::time::sleep(gap).await;
            }
        });
    }
}

/// Bootstraps every region: the three nodes with the smallest peer ids
/// vote (as `region bootstrap` picks them), the others join as learners.
async fn bootstrap(world: &World) {
    let regions = world.lock().regions.len();
    for r in 0..regions {
        let (voters, learners, first) = {
            let s = world.lock();
            let mut peers: Vec<(String, RegionGroup)> = s
                .nodes
                .iter()
                .filter(|n| n.region == r)
                .filter_map(|n| Some((n.peer.clone(), n.group.clone()?)))
                .collect();
            peers.sort_by(|a, b| a.0.cmp(&b.0));
            let n = peers.len().min(3);
            let voters: Vec<String> = peers[..n].iter().map(|p| p.0.clone()).collect();
            let learners: Vec<String> = peers[n..].iter().map(|p| p.0.clone()).collect();
            (voters, learners, peers[0].1.clone())
        };
        if let Err(e) = first.initialize(&voters).await {
            world
                .lock()
                .violate("bootstrap", format!("region {r}: {e}"));
        }
        for learner in learners {
            for _ in 0..100 {
                let leader = world.lock().leader_of(r).map(|(_, g)| g);
                match leader {
                    Some(l) if l.add_learner(&learner).await.is_ok() => break,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        world.lock().log(format!("bootstrapped r{r}: voters {voters:?}"));
    }
}

/// After the last fault: every region commits a write, and every view shows
/// every live node alive, within their bounds.
async fn liveness(world: &World) {
    let regions = world.lock().regions.len();
    for r in 0..regions {
        world.lock().check("liveness");
        let started = Instant::now();
        let mut done = false;
        while started.elapsed() < LIVENESS_BOUND {
            if let Outcome::Done = write(world, r, 999_999_000 + r as u32).await {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut s = world.lock();
        if done {
            s.log(format!("r{r} commits again after {:?}", started.elapsed()));
        } else {
            s.violate(
                "liveness",
                format!("region {r} committed no write within {LIVENESS_BOUND:?} of the heal"),
            );
        }
    }
    world.lock().check("membership-convergence");
    let started = Instant::now();
    loop {
        let now = now_ms(world);
        let lagging = {
            let s = world.lock();
            let live: BTreeSet<&str> = s
                .nodes
                .iter()
                .filter(|n| n.membership.is_some())
                .map(|n| n.peer.as_str())
                .collect();
            s.nodes
                .iter()
                .filter_map(|n| {
                    let view = n.membership.as_ref()?.view(now);
                    let alive: BTreeSet<&str> = view
                        .iter()
                        .filter(|m| m.state == MemberState::Alive)
                        .map(|m| m.peer_id.0.as_str())
                        .collect();
                    (!live.iter().all(|p| alive.contains(p))).then(|| n.peer.clone())
                })
                .collect::<Vec<_>>()
        };
        if lagging.is_empty() {
            break;
        }
        if started.elapsed() > CONVERGENCE_BOUND {
            world.lock().violate(
                "membership-convergence",
                format!("after {CONVERGENCE_BOUND:?}, these nodes still miss a live member: {lagging:?}"),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs one simulation on the current (paused, single-threaded) runtime.
pub(crate) async fn simulate(
    config: &SimConfig,
    scenario: &Scenario,
    progress: &mut dyn FnMut(f64),
) -> (Report, Vec<Op>, Vec<String>) {
    consensus::runtime::seed_thread_rng(config.seed);
    let regions: Vec<Region> = (0..config.regions)
        .map(|r| Region::parse(&format!("r{r}")).unwrap_or_else(|e| panic!("region name: {e}")))
        .collect();
    let nodes = (0..config.nodes)
        .map(|i| Node {
            peer: format!("n{i:03}"),
            region: i % config.regions,
            store: Arc::new(MemStore::new()),
            group: None,
            membership: None,
            generation: 0,
            applied_checked: 0,
        })
        .collect();
    let world = World(Arc::new(Mutex::new(State {
        rng: StdRng::seed_from_u64(config.seed),
        links: Links::default(),
        nodes,
        regions,
        history: Vec::new(),
        trace: Vec::new(),
        elections: Elections::default(),
        applied: AppliedLogs::default(),
        violations: BTreeMap::new(),
        checks: BTreeMap::new(),
        faults: 0,
        messages: 0,
        start: Instant::now(),
    })));
    let start = Instant::now();
    for i in 0..config.nodes {
        start_node(&world, i).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![
        tokio::spawn(gossip(world.clone(), stop.clone())),
        tokio::spawn(observe(world.clone(), stop.clone())),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    bootstrap(&world).await;

    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for r in 0..config.regions {
        for c in 0..CLIENTS_PER_REGION {
            clients.push(tokio::spawn(client(
                world.clone(),
                r,
                r * CLIENTS_PER_REGION + c,
                stop_clients.clone(),
            )));
        }
    }

    let mut steps = scenario.steps.clone();
    steps.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let end = start + config.duration;
    let mut next_progress = start;
    let mut steps = steps.into_iter().peekable();
    while Instant::now() < end {
        let due = steps
            .peek()
            .map(|s| start + Duration::from_secs_f64(s.at_s))
            .filter(|t| *t < end);
        let tick = (next_progress + Duration::from_secs(1)).min(end);
        match due {
            Some(t) if t <= tick => {
                tokio::time::sleep_until(t).await;
                if let Some(step) = steps.next() {
                    apply_fault(&world, &step.fault).await;
                }
            }
            _ => {
                tokio::time::sleep_until(tick).await;
                next_progress = tick;
                progress(start.elapsed().as_secs_f64() / config.duration.as_secs_f64());
            }
        }
    }
    stop_clients.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    apply_fault(&world, &Fault::Heal).await;
    liveness(&world).await;
    observe_once(&world);
    stop.store(true, Ordering::SeqCst);
    for t in tasks.drain(..) {
        let _ = t.await;
    }
    let groups: Vec<RegionGroup> = world
        .lock()
        .nodes
        .iter_mut()
        .filter_map(|n| n.group.take())
        .collect();
    for g in groups {
        g.shutdown().await;
    }

    let simulated = start.elapsed();
    let mut s = world.lock();
    for r in 0..config.regions {
        let ops: Vec<Op> = s.history.iter().filter(|o| o.region == r).cloned().collect();
        s.check("linearizability");
        if let Err(e) = linearizable(&ops) {
            s.violate("linearizability", format!("region {r}: {e}"));
        }
    }
    let writes = s.history.iter().filter(|o| matches!(o.kind, OpKind::Write(_)));
    let acknowledged = writes.clone().filter(|o| o.return_us.is_some()).count() as u64;
    let unknown = writes.filter(|o| o.return_us.is_none()).count() as u64;
    let reads = s.history.len() as u64 - acknowledged - unknown;
    let invariants = [
        "election-safety",
        "log-matching",
        "linearizability",
        "liveness",
        "membership-convergence",
        "bootstrap",
    ]
    .iter()
    .map(|name| Invariant {
        name: (*name).to_owned(),
        checks: s.checks.get(name).copied().unwrap_or(0),
        violations: s.violations.get(name).cloned().unwrap_or_default(),
    })
    .collect();
    let report = Report {
        scenario: scenario.name.clone(),
        seed: config.seed,
        nodes: config.nodes,
        regions: config.regions,
        simulated_s: simulated.as_secs_f64(),
        wall_s: 0.0,
        speedup: 0.0,
        faults_injected: s.faults,
        leader_changes: s.elections.changes,
        messages: s.messages,
        writes_acknowledged: acknowledged,
        writes_unknown: unknown,
        reads,
        invariants,
        trace_hash: String::new(),
    };
    (report, s.history.clone(), s.trace.clone())
}
