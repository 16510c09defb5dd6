//! The simulated world: nodes, links, clients, faults and observers, all on
//! one tokio thread whose clock is paused, so time advances only when every
//! task waits, straight to the next timer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use consensus::housekeeping::{Action, Housekeeper};
use consensus::rpc::{serve, Transport};
use consensus::{
    GroupError, LogSync, RaftSettings, RegionCommand, RegionGroup, RegionResponse, TypeConfig,
};
use mesh_membership::{Command, Event, Membership};
use mesh_store::{Column, Store};
use mesh_types::policy::Policy;
use mesh_types::{Load, MemberState, NodeId, NodeRecord, Region};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::check::{linearizable, AppliedLogs, AppliedStates, Elections, EntryDigest, Op, OpKind};
use crate::disk::{SimDisk, SimStore};
use crate::report::{InjectedFault, Invariant, Report, TaskCounts};
use crate::scenario::{Fault, Scenario, Side, Who};
use crate::SimConfig;

mod tasks;

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
/// A leader syncs its own log appends in a task after this much simulated
/// time, while it replicates them (as a node does on its sync thread): a
/// crash in between loses entries the followers already hold. Followers
/// sync before they answer, at no simulated cost.
const LEADER_LOG_SYNC: LogSync = LogSync::Task {
    latency: Duration::from_millis(1),
};

/// Link conditions, changed by faults.
#[derive(Debug)]
struct Links {
    /// Directed pairs (from, to) of node slots whose messages are lost.
    blocked: BTreeSet<(usize, usize)>,
    loss: f64,
    duplicate: f64,
    min_delay_us: u64,
    jitter_us: u64,
    /// Extra delay of every message to or from a slow node.
    slow_us: BTreeMap<usize, u64>,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            blocked: BTreeSet::new(),
            loss: 0.0,
            duplicate: 0.0,
            min_delay_us: 200,
            jitter_us: 300,
            slow_us: BTreeMap::new(),
        }
    }
}

struct Node {
    /// Its peer id; a node whose disk is wiped comes back under a new one.
    peer: String,
    region: usize,
    disk: Arc<SimDisk>,
    /// The running process's store (None while down).
    store: Option<Arc<SimStore>>,
    group: Option<RegionGroup>,
    /// The running process's task host (None while down).
    host: Option<Arc<mesh_task::Host>>,
    membership: Option<Membership>,
    /// When its process started (simulated ms): its member view is settled
    /// `dead_after` later (placement, see `mesh_task::placement::round`).
    started_ms: u64,
    keeper: Housekeeper,
    generation: u64,
    /// The next log index whose applied entry the observer compares (0: the first).
    next_check: u64,
    wipes: u32,
    /// Membership clock error: offset and drift (parts per million).
    skew_ms: i64,
    drift_ppm: i64,
}

impl Node {
    /// True while its process runs: started, and not died at a write
    /// (`RestartAndCrash`) since.
    fn up(&self) -> bool {
        self.group.is_some() && self.store.as_ref().is_some_and(|s| !s.dead())
    }
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
    /// Peer id to node slot, old ids of wiped nodes included.
    slots: BTreeMap<String, usize>,
    /// Regions whose leader crashes as soon as it starts a membership change.
    crash_on_change: BTreeSet<usize>,
    /// Writes that were acknowledged: (region, value) -> the log index it was applied at.
    acknowledged: BTreeMap<(usize, u32), u64>,
    /// Values seen applied: (region, log index, value).
    applied_values: BTreeSet<(usize, u64, u32)>,
    unsynced_lost: u64,
    /// Every fault injected, with its time and target.
    injected: Vec<InjectedFault>,
    /// The state each node's state machine held at each index it was seen at.
    states: AppliedStates,
    /// Tasks answered, by task id.
    acked: BTreeMap<String, tasks::Acked>,
    /// Every audit record seen on any node, by (node, seq).
    audit: BTreeMap<(String, u64), mesh_agent::SealedRecord>,
    /// The node of every lease seen: (region, agent, epoch) -> node.
    leases: BTreeMap<(usize, String, u64), String>,
    /// Each region's counter: the value each answered task returned (by
    /// task id), and how many tasks its clients left unanswered at the end.
    counted: BTreeMap<usize, (BTreeMap<String, i64>, Vec<String>)>,
    /// Agents active on two nodes at once: since when (simulated us), and
    /// whether it was reported (single-activation).
    overlaps: BTreeMap<String, (u64, bool)>,
    tasks: TaskCounts,
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

    /// Notes an injected fault, with the simulated time and what it hit.
    fn record_fault(&mut self, fault: &Fault, hit: String) {
        let at_s = self.now_us() as f64 / 1e6;
        let json = serde_json::to_string(fault).unwrap_or_default();
        self.log(format!("fault {json} {hit}"));
        self.injected.push(InjectedFault {
            at_s,
            fault: fault.clone(),
            hit,
        });
    }

    fn check(&mut self, invariant: &'static str) {
        *self.checks.entry(invariant).or_default() += 1;
    }

    /// The node slot of a peer id (a wiped node's new id maps to its old slot).
    fn slot(&self, peer: &str) -> Option<usize> {
        self.slots.get(peer).copied()
    }

    /// Samples one message between two peers: its delay, or `None` if lost.
    fn send(&mut self, from: &str, to: &str) -> Option<(Duration, bool)> {
        let (Some(f), Some(t)) = (self.slot(from), self.slot(to)) else {
            self.messages += 1;
            return None;
        };
        self.send_slot(f, t)
    }

    /// Samples one message from slot `from` to slot `to`.
    fn send_slot(&mut self, from: usize, to: usize) -> Option<(Duration, bool)> {
        self.messages += 1;
        if !self.nodes[to].up() || self.links.blocked.contains(&(from, to)) {
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
        let slow = self.links.slow_us.get(&from).copied().unwrap_or(0)
            + self.links.slow_us.get(&to).copied().unwrap_or(0);
        Some((
            Duration::from_micros(self.links.min_delay_us + jitter + slow),
            duplicate,
        ))
    }

    fn group_of(&self, peer: &str) -> Option<RegionGroup> {
        let n = &self.nodes[self.slot(peer)?];
        // A wiped node's old id no longer answers, nor does a dead process.
        if n.peer != peer || !n.up() {
            return None;
        }
        n.group.clone()
    }

    fn leader_of(&self, region: usize) -> Option<(usize, RegionGroup)> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            let g = n.group.as_ref().filter(|_| n.up())?;
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
        let answer = serve(&group, &self.me, &request).await;
        if duplicate {
            let _ = serve(&group, &self.me, &request).await;
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

/// The node's defaults, except: dead voters are replaced after 10 s (not
/// 60), gone learners removed after 15 s (not 10 min), and snapshots come
/// every 300 entries (not 5000), so all happen within a short run.
fn settings() -> RaftSettings {
    RaftSettings {
        replace_dead_voter_after_ms: 10_000,
        remove_gone_learner_after_ms: 15_000,
        snapshot_after_entries: 300,
        logs_kept_after_snapshot: 50,
        ..RaftSettings::default()
    }
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
    match RegionGroup::open(&settings(), store, LEADER_LOG_SYNC, peer, transport).await {
        Ok(g) => g,
        // The in-memory store cannot fail to open; a failure is a bug worth a loud stop.
        Err(e) => panic!("cannot open the region group of {peer}: {e}"),
    }
}

fn now_ms(world: &World) -> u64 {
    EPOCH_MS + world.lock().start.elapsed().as_millis() as u64
}

/// What node `n`'s wall clock says when the true time is `true_ms`.
fn clock_of(n: &Node, true_ms: u64) -> u64 {
    let elapsed = true_ms.saturating_sub(EPOCH_MS) as i64;
    (true_ms as i64 + n.skew_ms + elapsed * n.drift_ppm / 1_000_000).max(0) as u64
}

/// Starts node `i` (again) on its store.
async fn start_node(world: &World, i: usize) {
    let (peer, store, region, generation) = {
        let mut s = world.lock();
        let n = &mut s.nodes[i];
        n.generation += 1;
        (n.peer.clone(), n.disk.open(), n.region, n.generation)
    };
    let group = open_group(world, &peer, store.clone()).await;
    let host = tasks::open_host(world, store.clone());
    let now = now_ms(world);
    let mut s = world.lock();
    let region_name = s.regions[region].clone();
    let n = &mut s.nodes[i];
    let local = clock_of(n, now);
    let membership = Membership::new(
        mesh_membership::Config::default(),
        record(&peer, &region_name, generation, local),
        local,
    );
    n.group = Some(group);
    n.host = Some(host);
    n.store = Some(store);
    n.membership = Some(membership);
    n.started_ms = now;
    s.log(format!("start {peer} (generation {generation})"));
}

/// Stops node `i`; with `power_loss` its unsynced writes are gone. The disk
/// dies first, so the process stops wherever it is, inside a batch of Raft
/// commands as well as between two: nothing it does after this point
/// reaches the disk. Then its tasks are stopped.
async fn stop_node(world: &World, i: usize, power_loss: bool) {
    let group = kill_process(&mut world.lock(), i, power_loss);
    if let Some(g) = group {
        g.shutdown().await;
    }
}

/// Node `i`'s disk dies (a power loss or a process crash) and the process
/// is gone from the world; returns its group, for the caller to stop.
fn kill_process(s: &mut State, i: usize, power_loss: bool) -> Option<RegionGroup> {
    let peer = s.nodes[i].peer.clone();
    s.log(format!(
        "crash {peer}{}",
        if power_loss { " (power loss)" } else { "" }
    ));
    let lost = s.nodes[i].disk.crash(power_loss);
    s.unsynced_lost += lost;
    if lost > 0 {
        s.log(format!("{peer} lost {lost} unsynced Raft log entries"));
    }
    s.nodes[i].membership = None;
    s.nodes[i].store = None;
    s.nodes[i].host = None;
    s.nodes[i].group.take()
}

/// A process that died at a write (`RestartAndCrash`): its tasks stop, as
/// the OS would end them. A process whose Raft stopped (a storage error)
/// exits, as a node does (`agentmesh node start` exits non-zero when its
/// Raft core is gone); a restart brings it back.
async fn reap(world: &World) {
    let dead: Vec<(usize, RegionGroup)> = {
        let mut s = world.lock();
        for i in 0..s.nodes.len() {
            let stopped = s.nodes[i].up()
                && s.nodes[i]
                    .group
                    .as_ref()
                    .is_some_and(|g| g.raft().metrics().borrow().running_state.is_err());
            if stopped {
                let peer = s.nodes[i].peer.clone();
                let lost = s.nodes[i].disk.crash(false);
                s.unsynced_lost += lost;
                s.log(format!("{peer} exits: its Raft stopped on a storage error"));
            }
        }
        let mut dead = Vec::new();
        for i in 0..s.nodes.len() {
            let n = &mut s.nodes[i];
            if n.group.is_some() && !n.up() {
                n.membership = None;
                n.store = None;
                n.host = None;
                if let Some(g) = n.group.take() {
                    dead.push((i, g));
                }
            }
        }
        for (i, _) in &dead {
            let peer = s.nodes[*i].peer.clone();
            let (lost, write) = s.nodes[*i].disk.lost_at_crash_write();
            s.unsynced_lost += lost;
            if !write.is_empty() {
                s.log(format!(
                    "{peer} died at a write ({write}), inside its Raft commands ({lost} unsynced Raft log entries lost)"
                ));
            }
        }
        dead
    };
    for (_, g) in dead {
        g.shutdown().await;
    }
}

/// Node `i` loses its disk and comes back as a new member under a new id.
async fn wipe_node(world: &World, i: usize) {
    stop_node(world, i, true).await;
    {
        let mut s = world.lock();
        let n = &mut s.nodes[i];
        n.wipes += 1;
        let base = n.peer.split('.').next().unwrap_or_default().to_owned();
        let old = std::mem::replace(&mut n.peer, format!("{base}.{}", n.wipes));
        n.disk = SimDisk::new();
        n.generation = 0;
        n.next_check = 0;
        let new = n.peer.clone();
        s.slots.insert(new.clone(), i);
        s.log(format!("{old} lost its disk; it rejoins as {new}"));
    }
    start_node(world, i).await;
}

/// Every GOSSIP_TICK: each live engine ticks; its announcements reach the
/// other live engines through the links.
async fn gossip(world: World, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(GOSSIP_TICK).await;
        let now = now_ms(&world);
        let mut s = world.lock();
        let mut announced = Vec::new();
        for (i, n) in s.nodes.iter_mut().enumerate() {
            let local = clock_of(n, now);
            if let Some(m) = n.membership.as_mut() {
                for c in m.handle(Event::Tick, local) {
                    if let Command::Announce(r) = c {
                        announced.push((i, r));
                    }
                }
            }
        }
        for (from, record) in announced {
            for to in 0..s.nodes.len() {
                if to == from || s.send_slot(from, to).is_none() {
                    continue;
                }
                let n = &mut s.nodes[to];
                let local = clock_of(n, now);
                if let Some(m) = n.membership.as_mut() {
                    let _ = m.handle(Event::Record(record.clone()), local);
                }
            }
        }
    }
}

/// Every 50 ms: who leads which term, and what each node applied.
async fn observe(world: World, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reap(&world).await;
        observe_once(&world);
    }
}

fn observe_once(world: &World) {
    let mut s = world.lock();
    tasks::observe_leases(&mut s);
    let mut found = Vec::new();
    let mut states = Vec::new();
    for (i, n) in s.nodes.iter().enumerate() {
        let Some(g) = n.group.as_ref().filter(|_| n.up()) else {
            continue;
        };
        let m = g.raft().metrics().borrow().clone();
        if m.state == ServerState::Leader {
            found.push(("leader", i, m.current_term, n.generation));
        }
        if let Some(applied) = m.last_applied {
            found.push(("applied", i, 0, applied.index));
        }
        // State machine safety: every node whose state machine is at index
        // i holds the same state there.
        let state = g.local_state();
        if let Some(at) = state.last_applied {
            states.push((
                i,
                at.index,
                state.policy_version,
                state.policy.map(|p| p.rate_limits.per_agent.burst),
            ));
        }
    }
    for (i, at, version, value) in states {
        let (peer, region) = (s.nodes[i].peer.clone(), s.nodes[i].region);
        s.check("state-machine-safety");
        if let Err(e) = s.states.observe(region, at, (version, value), &peer) {
            s.violate("state-machine-safety", e);
        }
    }
    for (what, i, term, applied) in found {
        let (peer, region) = (s.nodes[i].peer.clone(), s.nodes[i].region);
        if what == "leader" {
            s.check("election-safety");
            let before = s.elections.changes;
            // `applied` carries the process life for a leader.
            if let Err(e) = s.elections.observe(region, term, &peer, applied) {
                s.violate("election-safety", e);
            } else if s.elections.changes > before {
                s.log(format!("leader r{region} term {term} {peer}"));
            }
            continue;
        }
        // Compare every newly applied entry's term with the other nodes'.
        let from = s.nodes[i].next_check;
        if applied < from {
            continue;
        }
        let entries = s.nodes[i]
            .store
            .as_ref()
            .and_then(|store| {
                store
                    .range(
                        Column::RaftLog,
                        &from.to_be_bytes(),
                        Some(&(applied + 1).to_be_bytes()),
                    )
                    .ok()
            })
            .unwrap_or_default();
        for (_, bytes) in entries {
            let Ok(entry) = consensus::codec::decode::<openraft::Entry<TypeConfig>>(&bytes) else {
                s.violate("log-matching", format!("{peer}: an undecodable log entry"));
                continue;
            };
            s.check("log-matching");
            let index = entry.log_id.index;
            for value in values_of(&entry) {
                s.applied_values.insert((region, index, value));
            }
            if let Err(e) = s
                .applied
                .observe(region, index, EntryDigest::of(&entry), &peer)
            {
                s.violate("log-matching", e);
            }
        }
        s.nodes[i].next_check = applied + 1;
    }
}

/// The client values (policy bursts) written by a log entry.
fn values_of(entry: &openraft::Entry<TypeConfig>) -> Vec<u32> {
    match &entry.payload {
        openraft::EntryPayload::Normal(consensus::RegionCommand::SetPolicy(p)) => {
            vec![p.rate_limits.per_agent.burst]
        }
        openraft::EntryPayload::Normal(consensus::RegionCommand::SetPolicies(ps)) => {
            ps.iter().map(|p| p.rate_limits.per_agent.burst).collect()
        }
        _ => Vec::new(),
    }
}

/// The policy a client writes: its value in a rate limit (the register
/// the linearizability check reads), and the residency rules of the task
/// workload, the same in every write.
fn policy(value: u32, regions: &[Region]) -> Policy {
    let mut p = Policy::default();
    p.rate_limits.per_agent.burst = value;
    p.residency = tasks::residency(regions);
    p
}

/// The group to send a client request to: a random live node of the region.
fn pick(world: &World, region: usize) -> Option<RegionGroup> {
    let mut s = world.lock();
    let live: Vec<RegionGroup> = s
        .nodes
        .iter()
        .filter(|n| n.region == region && n.up())
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
    /// Applied at this log index.
    Done(u64),
    Unknown,
    NotApplied,
}

async fn write(world: &World, region: usize, value: u32) -> Outcome {
    let Some(mut group) = pick(world, region) else {
        return Outcome::NotApplied;
    };
    for _ in 0..2 {
        let regions = world.lock().regions.clone();
        match group.set_policy(policy(value, &regions)).await {
            Ok(applied) => return Outcome::Done(applied.version),
            Err(e) => match redirect(world, &e) {
                Some(g) => group = g,
                None => {
                    return match e {
                        // Refused before it was proposed, or truncated
                        // (openraft answers NotLeader for a write whose
                        // entry a new leader replaced): never applied.
                        GroupError::NotLeader { .. }
                        | GroupError::Busy(_)
                        | GroupError::Timeout(_) => Outcome::NotApplied,
                        // Proposed, and may still commit at any later time.
                        _ => Outcome::Unknown,
                    };
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
                Outcome::Done(version) => {
                    s.acknowledged.insert((region, value), version);
                    ("ok", Some(return_us))
                }
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

/// The node of `region` that a fault aimed at `who` hits, drawn by the seed
/// among those that fit; `None` when none does (yet).
fn target(s: &mut State, region: usize, who: Who) -> Option<usize> {
    let leader = s.leader_of(region).map(|(i, _)| i);
    let host = leader.and_then(|l| {
        let state = s.nodes[l].group.as_ref()?.local_state();
        state
            .agents
            .get(&tasks::counter_agent(region))?
            .lease
            .clone()
    });
    let candidates: Vec<usize> = (0..s.nodes.len())
        .filter(|&i| {
            let n = &s.nodes[i];
            let Some(g) = n.group.as_ref().filter(|_| n.up()) else {
                return false;
            };
            if n.region != region {
                return false;
            }
            let (voters, learners) = g.members();
            let follower = Some(i) != leader;
            match who {
                Who::Leader => !follower,
                Who::Voter => follower && voters.contains(&n.peer),
                Who::Learner => follower && learners.contains(&n.peer),
                Who::Follower => follower,
                Who::Any => true,
                Who::Host => host.as_ref().is_some_and(|l| l.node == n.peer),
            }
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let pick = s.rng.gen_range(0..candidates.len());
    Some(candidates[pick])
}

/// The region and the node a fault is aimed at, if it is aimed at one.
fn aim(fault: &Fault) -> Option<(usize, Who)> {
    match fault {
        Fault::IsolateFollower { region, who }
        | Fault::CrashFollower { region, who }
        | Fault::WipeFollower { region, who }
        | Fault::PowerLoss { region, who }
        | Fault::FailFsync { region, who, .. }
        | Fault::Drain { region, who }
        | Fault::SlowNode { region, who, .. } => Some((*region, *who)),
        Fault::IsolateLeaderOneWay { region }
        | Fault::CrashLeader { region }
        | Fault::PowerLossLeader { region } => Some((*region, Who::Leader)),
        _ => None,
    }
}

/// A power loss waits this long at most for its leader to hold unsynced log entries.
const UNSYNCED_WAIT: Duration = Duration::from_secs(1);

/// A fault aimed at a node waits this long at most for one to fit (a
/// leader to be elected, a node to come back); then the run fails.
const TARGET_WAIT: Duration = Duration::from_secs(5);

enum Then {
    Nothing,
    Stop(Vec<usize>, bool),
    Wipe(usize),
    Restart(Vec<usize>),
    Rolling(Vec<usize>, Duration),
    RecoverFsync(usize, Duration),
    Migrate(usize, Option<Side>, Duration),
    Drain(usize),
}

/// A drain must be done within this long (its agents and copies moved off).
const DRAIN_WITHIN: Duration = Duration::from_secs(10);

/// Proposes `command` on `region`'s leader until it is applied (a leader
/// may be being elected), within [`TARGET_WAIT`]; what applying it answered.
async fn on_leader(world: &World, region: usize, command: RegionCommand) -> Option<RegionResponse> {
    let at = Instant::now();
    while at.elapsed() < TARGET_WAIT {
        let leader = world.lock().leader_of(region).map(|(_, g)| g);
        if let Some(g) = leader {
            if let Ok(r) = g.propose(command.clone()).await {
                return Some(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Moves region `region`'s counter agent off its host to another up node of
/// its group (not draining), drawn by the seed; the source and the target.
async fn migrate(world: &World, region: usize) -> Option<(usize, usize)> {
    let agent = tasks::counter_agent(region);
    let at = Instant::now();
    while at.elapsed() < TARGET_WAIT {
        let plan = {
            let mut s = world.lock();
            s.leader_of(region).and_then(|(_, g)| {
                let state = g.local_state();
                let entry = state.agents.get(&agent)?;
                let lease = entry.lease.clone()?;
                let source = s.slot(&lease.node)?;
                let (voters, learners) = g.members();
                let targets: Vec<usize> = (0..s.nodes.len())
                    .filter(|&i| {
                        let n = &s.nodes[i];
                        n.region == region
                            && n.up()
                            && n.peer != lease.node
                            && !state.draining.contains(&n.peer)
                            && (voters.contains(&n.peer) || learners.contains(&n.peer))
                    })
                    .collect();
                if targets.is_empty() {
                    return None;
                }
                let target = targets[s.rng.gen_range(0..targets.len())];
                Some((source, target, s.nodes[target].peer.clone(), entry.epoch))
            })
        };
        if let Some((source, target, to, after_epoch)) = plan {
            let command = RegionCommand::MoveAgent {
                agent: agent.clone(),
                to,
                after_epoch,
                reason: consensus::MoveReason::Operator,
            };
            if let Some(RegionResponse::LeaseGranted { epoch }) =
                on_leader(world, region, command).await
            {
                let mut s = world.lock();
                let (from, to) = (s.nodes[source].peer.clone(), s.nodes[target].peer.clone());
                s.log(format!(
                    "moved {agent} from {from} to {to} (epoch {epoch}, operator)"
                ));
                return Some((source, target));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn apply_fault(world: &World, fault: &Fault) {
    // Resolve the target first: a fault is never dropped silently.
    let at = Instant::now();
    let aimed = match aim(fault) {
        None => None,
        Some((region, who)) => loop {
            if let Some(i) = target(&mut world.lock(), region, who) {
                break Some(i);
            }
            if at.elapsed() >= TARGET_WAIT {
                let mut s = world.lock();
                s.faults += 1;
                let what = format!(
                    "{} found no {who:?} node in region {region} within {TARGET_WAIT:?}: not injected",
                    fault.kind()
                );
                s.record_fault(fault, what.clone());
                s.violate("faults-injected", what);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        },
    };
    // A power loss lands, if it can, while the leader it hits (or its
    // region's leader) holds log entries it has sent but not synced: the
    // window the leader's own fsync leaves open (LEADER_LOG_SYNC).
    // (Followers sync every write before they answer: only a leader has
    // such a window.)
    let power_loss_in = match fault {
        Fault::PowerLossLeader { .. } | Fault::PowerLoss { .. } => aimed.filter(|i| {
            world.lock().nodes[*i]
                .group
                .as_ref()
                .is_some_and(|g| g.is_leader())
        }),
        Fault::PowerLossRegion { region } => world.lock().leader_of(*region).map(|(i, _)| i),
        _ => None,
    };
    if let Some(i) = power_loss_in {
        let waiting = Instant::now();
        while waiting.elapsed() < UNSYNCED_WAIT
            && world.lock().nodes[i].disk.unsynced_log_entries() == 0
        {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }
    let then = {
        let mut s = world.lock();
        s.faults += 1;
        s.check("faults-injected");
        let all = s.nodes.len();
        let down = |s: &State| -> Vec<usize> {
            (0..s.nodes.len())
                .filter(|i| s.nodes[*i].group.is_none())
                .collect()
        };
        let hit = aimed.map(|i| s.nodes[i].peer.clone());
        s.record_fault(
            fault,
            hit.clone().map(|p| format!("hit {p}")).unwrap_or_default(),
        );
        match (fault, aimed) {
            (Fault::PartitionRegions { a, b }, _) => {
                let of = |r: usize| -> Vec<usize> {
                    (0..s.nodes.len())
                        .filter(|i| s.nodes[*i].region == r)
                        .collect()
                };
                let (xs, ys) = (of(*a), of(*b));
                for x in &xs {
                    for y in &ys {
                        s.links.blocked.insert((*x, *y));
                        s.links.blocked.insert((*y, *x));
                    }
                }
                Then::Nothing
            }
            (Fault::IsolateFollower { .. }, Some(f)) => {
                for p in (0..all).filter(|p| *p != f) {
                    s.links.blocked.insert((f, p));
                    s.links.blocked.insert((p, f));
                }
                Then::Nothing
            }
            (Fault::IsolateLeaderOneWay { .. }, Some(l)) => {
                for p in (0..all).filter(|p| *p != l) {
                    s.links.blocked.insert((l, p));
                }
                Then::Nothing
            }
            (Fault::CrashLeader { .. } | Fault::CrashFollower { .. }, Some(i)) => {
                Then::Stop(vec![i], false)
            }
            (Fault::PowerLossLeader { .. } | Fault::PowerLoss { .. }, Some(i)) => {
                Then::Stop(vec![i], true)
            }
            (Fault::PowerLossRegion { region }, _) => Then::Stop(
                (0..s.nodes.len())
                    .filter(|i| s.nodes[*i].region == *region && s.nodes[*i].group.is_some())
                    .collect(),
                true,
            ),
            (Fault::WipeFollower { .. }, Some(i)) => Then::Wipe(i),
            (Fault::CrashLeaderOnMembershipChange { region }, _) => {
                s.crash_on_change.insert(*region);
                Then::Nothing
            }
            (Fault::FailFsync { for_ms, .. }, Some(i)) => {
                s.nodes[i].disk.fail_syncs(true);
                match for_ms {
                    Some(ms) => Then::RecoverFsync(i, Duration::from_millis(*ms)),
                    None => Then::Nothing,
                }
            }
            (
                Fault::ClockSkew {
                    max_skew_ms,
                    max_drift_ppm,
                },
                _,
            ) => {
                let (skew, drift) = (*max_skew_ms as i64, *max_drift_ppm as i64);
                for i in 0..s.nodes.len() {
                    let k = s.rng.gen_range(-skew..=skew);
                    let d = s.rng.gen_range(-drift..=drift);
                    s.nodes[i].skew_ms = k;
                    s.nodes[i].drift_ppm = d;
                }
                Then::Nothing
            }
            (
                Fault::Migrate {
                    region,
                    crash,
                    within_ms,
                },
                _,
            ) => Then::Migrate(*region, *crash, Duration::from_millis(*within_ms)),
            (Fault::Drain { .. }, Some(i)) => Then::Drain(i),
            (Fault::SlowNode { extra_ms, .. }, Some(i)) => {
                s.links.slow_us.insert(i, extra_ms.saturating_mul(1000));
                Then::Nothing
            }
            (Fault::RestartAll, _) => Then::Restart(down(&s)),
            (
                Fault::RestartAndCrash {
                    after_writes,
                    power_loss,
                },
                _,
            ) => {
                let stopped = down(&s);
                if stopped.is_empty() {
                    let what = "restart-and-crash found no stopped node: not injected".to_owned();
                    s.violate("faults-injected", what);
                }
                for i in &stopped {
                    s.nodes[*i].disk.crash_at_write(*after_writes, *power_loss);
                }
                Then::Restart(stopped)
            }
            (Fault::RollingRestart { region, gap_s }, _) => Then::Rolling(
                (0..s.nodes.len())
                    .filter(|i| s.nodes[*i].region == *region)
                    .collect(),
                Duration::from_secs(*gap_s),
            ),
            (Fault::Loss { percent }, _) => {
                s.links.loss = f64::from(*percent) / 100.0;
                Then::Nothing
            }
            (Fault::Duplicate { percent }, _) => {
                s.links.duplicate = f64::from(*percent) / 100.0;
                Then::Nothing
            }
            (Fault::Delay { min_ms, jitter_ms }, _) => {
                s.links.min_delay_us = min_ms.saturating_mul(1000);
                s.links.jitter_us = jitter_ms.saturating_mul(1000);
                Then::Nothing
            }
            (Fault::Heal, _) => {
                s.links = Links::default();
                s.crash_on_change.clear();
                // A crash armed for a write that never came is off, and
                // the run says so: the fault was not injected.
                let unfired: Vec<String> = s
                    .nodes
                    .iter()
                    .filter(|n| n.disk.disarm())
                    .map(|n| n.peer.clone())
                    .collect();
                for peer in unfired {
                    s.violate(
                        "faults-injected",
                        format!(
                            "restart-and-crash: {peer} never reached the write that was to kill it"
                        ),
                    );
                }
                let mut restart = down(&s);
                for i in 0..s.nodes.len() {
                    if s.nodes[i].disk.failing() {
                        s.nodes[i].disk.fail_syncs(false);
                        // A storage error stops its Raft for good: restart the process.
                        if !restart.contains(&i) {
                            restart.push(i);
                        }
                    }
                }
                Then::Restart(restart)
            }
            // A fault aimed at a node has one here (resolved above); a
            // split bootstrap ran with the bootstrap.
            _ => Then::Nothing,
        }
    };
    match then {
        Then::Nothing => {}
        Then::Stop(nodes, power_loss) => {
            // Every disk dies at the same instant (a region-wide outage is
            // one moment), then the processes are stopped.
            let groups: Vec<RegionGroup> = {
                let mut s = world.lock();
                nodes
                    .iter()
                    .filter_map(|&i| kill_process(&mut s, i, power_loss))
                    .collect()
            };
            for g in groups {
                g.shutdown().await;
            }
        }
        Then::Wipe(i) => wipe_node(world, i).await,
        Then::Restart(nodes) => {
            for i in nodes {
                if world.lock().nodes[i].group.is_some() {
                    stop_node(world, i, false).await;
                }
                start_node(world, i).await;
            }
        }
        Then::Rolling(members, gap) => {
            let world = world.clone();
            tokio::spawn(async move {
                for i in members {
                    stop_node(&world, i, false).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    start_node(&world, i).await;
                    tokio::time::sleep(gap).await;
                }
            });
        }
        Then::Migrate(region, crash, within) => {
            let Some((source, target)) = migrate(world, region).await else {
                let what = format!("migrate found no move of region {region}'s counter agent to make within {TARGET_WAIT:?}: not injected");
                world.lock().violate("faults-injected", what);
                return;
            };
            if let Some(side) = crash {
                let wait = {
                    let mut s = world.lock();
                    let max = u64::try_from(within.as_micros()).unwrap_or(u64::MAX).max(1);
                    Duration::from_micros(s.rng.gen_range(0..max))
                };
                tokio::time::sleep(wait).await;
                let i = match side {
                    Side::Source => source,
                    Side::Target => target,
                };
                world.lock().log(format!(
                    "mid-migration: the {side:?} crashes {} ms after the move",
                    wait.as_millis()
                ));
                stop_node(world, i, false).await;
            }
        }
        Then::Drain(i) => {
            let (peer, region) = {
                let s = world.lock();
                (s.nodes[i].peer.clone(), s.nodes[i].region)
            };
            let command = RegionCommand::SetDraining {
                node: peer.clone(),
                draining: true,
            };
            if !matches!(
                on_leader(world, region, command).await,
                Some(RegionResponse::DrainingSet { .. })
            ) {
                let what = format!("drain: {peer} could not be marked draining within {TARGET_WAIT:?}: not injected");
                world.lock().violate("faults-injected", what);
                return;
            }
            let world = world.clone();
            tokio::spawn(async move {
                let at = Instant::now();
                loop {
                    let done = world.lock().leader_of(region).is_some_and(|(_, g)| {
                        let state = g.local_state();
                        !state
                            .agents
                            .values()
                            .any(|e| e.lease.as_ref().is_some_and(|l| l.node == peer))
                            && !state.replicas.values().any(|r| r.nodes.contains(&peer))
                    });
                    if done {
                        world.lock().check("liveness");
                        world.lock().log(format!(
                            "drained {peer} in {} ms; it stops",
                            at.elapsed().as_millis()
                        ));
                        stop_node(&world, i, false).await;
                        return;
                    }
                    if at.elapsed() >= DRAIN_WITHIN {
                        let mut s = world.lock();
                        s.check("liveness");
                        s.violate(
                            "liveness",
                            format!("drain: {peer} still hosts agents or keeps copies {DRAIN_WITHIN:?} after its drain began"),
                        );
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Then::RecoverFsync(i, after) => {
            let world = world.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let mut s = world.lock();
                s.nodes[i].disk.fail_syncs(false);
                let peer = s.nodes[i].peer.clone();
                s.log(format!("{peer}: fsyncs work again (no restart)"));
            });
        }
    }
}

/// Every second, on every leader: the node's own housekeeping rules
/// (`consensus::housekeeping`) on its own membership view.
async fn housekeeping(world: World, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tasks::scan_audit(&mut world.lock());
        tasks::place(&world).await;
        let count = world.lock().nodes.len();
        for i in 0..count {
            let plan = {
                let now = now_ms(&world);
                let mut s = world.lock();
                let region_name = s.regions[s.nodes[i].region].clone();
                let n = &mut s.nodes[i];
                let (Some(group), Some(membership)) = (n.group.clone(), n.membership.as_ref())
                else {
                    continue;
                };
                let view: Vec<(String, MemberState)> = membership
                    .view(clock_of(n, now))
                    .into_iter()
                    .filter(|m| m.region == region_name)
                    .map(|m| (m.peer_id.0, m.state))
                    .collect();
                let (voters, learners) = group.members();
                let plan = n.keeper.plan(
                    &n.peer,
                    group.is_leader(),
                    &voters,
                    &learners,
                    &view,
                    Instant::now(),
                );
                plan.map(|p| (p, group, n.region))
            };
            let Some((action, group, region)) = plan else {
                continue;
            };
            let change = {
                let mut s = world.lock();
                s.log(format!("housekeeping r{region}: {action:?}"));
                s.crash_on_change.remove(&region)
            };
            let world2 = world.clone();
            if change {
                // Crash the leader while its change is in flight.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    stop_node(&world2, i, false).await;
                });
            }
            match action {
                Action::AddLearner(peer) => {
                    let _ = group.add_learner(&peer).await;
                }
                Action::ReplaceVoter { dead, learner } => {
                    if group.replace_voter(&dead, &learner).await.is_ok() {
                        if let Some(n) = world.lock().nodes.get_mut(i) {
                            n.keeper.replaced(&dead);
                        }
                    }
                }
                Action::NoReplacement(_) => {}
                Action::RemoveLearner(peer) => {
                    let _ = group.remove_learner(&peer).await;
                }
            }
        }
    }
}

/// Bootstraps every region as `region bootstrap` does: the (up to) three
/// live nodes with the smallest peer ids vote; housekeeping adds the others
/// as learners. A region in `split` is bootstrapped twice at once, with two
/// overlapping voter sets, as two entry nodes with different views would.
async fn bootstrap(world: &World, split: &BTreeSet<usize>) {
    let regions = world.lock().regions.len();
    let mut calls = Vec::new();
    for r in 0..regions {
        let peers: Vec<(String, RegionGroup)> = {
            let s = world.lock();
            let mut peers: Vec<(String, RegionGroup)> = s
                .nodes
                .iter()
                .filter(|n| n.region == r)
                .filter_map(|n| Some((n.peer.clone(), n.group.clone()?)))
                .collect();
            peers.sort_by(|a, b| a.0.cmp(&b.0));
            peers
        };
        let mut sets = vec![peers.iter().take(3).cloned().collect::<Vec<_>>()];
        if split.contains(&r) {
            let mut s = world.lock();
            if peers.len() >= 2 {
                sets.push(peers.iter().skip(1).take(3).cloned().collect());
                s.faults += 1;
                s.check("faults-injected");
                s.record_fault(
                    &Fault::SplitBootstrap { region: r },
                    format!("two bootstraps of r{r} at once"),
                );
            } else {
                let what = format!("split-bootstrap needs two nodes in region {r}: not injected");
                s.record_fault(&Fault::SplitBootstrap { region: r }, what.clone());
                s.violate("faults-injected", what);
            }
        }
        for set in sets {
            let voters: Vec<String> = set.iter().map(|p| p.0.clone()).collect();
            let first = set[0].1.clone();
            world.lock().check("bootstrap");
            let world = world.clone();
            let is_split = split.contains(&r);
            calls.push(tokio::spawn(async move {
                let result = first.initialize(&voters).await;
                let mut s = world.lock();
                match result {
                    Ok(()) => s.log(format!("bootstrapped r{r}: voters {voters:?}")),
                    // The one refusal a split bootstrap may get.
                    Err(GroupError::BootstrapConflict(e)) if is_split => {
                        s.log(format!("bootstrap of r{r} with {voters:?} refused: {e}"))
                    }
                    Err(e) => s.violate("bootstrap", format!("region {r}: {e}")),
                }
            }));
        }
    }
    for call in calls {
        let _ = call.await;
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
            if let Outcome::Done(_) = write(world, r, 999_999_000 + r as u32).await {
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
    // Every running member of a region catches up with what its leader has
    // committed: a node whose Raft stopped (a storage error, a log it
    // cannot read) while its process runs on is caught here.
    world.lock().check("replicas-catch-up");
    let started = Instant::now();
    loop {
        let behind = {
            let s = world.lock();
            let mut behind = Vec::new();
            for r in 0..regions {
                let Some((_, leader)) = s.leader_of(r) else {
                    continue;
                };
                let committed = leader
                    .raft()
                    .metrics()
                    .borrow()
                    .last_applied
                    .map(|l| l.index);
                let members: BTreeSet<String> = {
                    let (v, l) = leader.members();
                    v.into_iter().chain(l).collect()
                };
                for n in s.nodes.iter().filter(|n| n.region == r) {
                    // After the heal every node runs: one that is down
                    // again exited on its own (its Raft stopped).
                    if !n.up() {
                        behind.push(format!("{} (not running)", n.peer));
                        continue;
                    }
                    if !members.contains(&n.peer) {
                        continue;
                    }
                    let Some(g) = n.group.as_ref() else { continue };
                    let m = g.raft().metrics().borrow().clone();
                    if m.last_applied.map(|l| l.index) < committed || m.running_state.is_err() {
                        behind.push(format!(
                            "{} (applied {:?} of {:?}{})",
                            n.peer,
                            m.last_applied.map(|l| l.index),
                            committed,
                            match &m.running_state {
                                Err(e) => format!("; its Raft stopped: {e}"),
                                Ok(()) => String::new(),
                            }
                        ));
                    }
                }
            }
            behind
        };
        if behind.is_empty() {
            break;
        }
        if started.elapsed() > CONVERGENCE_BOUND {
            world.lock().violate(
                "replicas-catch-up",
                format!("after {CONVERGENCE_BOUND:?}, these members are behind their leader: {behind:?}"),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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

/// Acknowledged writes are durable: every acknowledged write is, at the log
/// index it was acknowledged at, in the durable log (what a power loss at the
/// end would leave) of a majority of its region's final voters. A voter whose
/// log was compacted past that index holds it in its durable snapshot; it
/// counts when the entry some node applied there carried the value (log
/// matching checks that every node applied the same entry). Returns how many
/// acknowledged writes fail this.
fn durable_on_a_majority(s: &mut State, final_voters: &[Vec<String>]) -> u64 {
    let mut lost = 0;
    let acknowledged: Vec<((usize, u32), u64)> =
        s.acknowledged.iter().map(|(k, v)| (*k, *v)).collect();
    for ((region, value), index) in acknowledged {
        s.check("acknowledged-writes-durable");
        let voters = &final_voters[region];
        let mut holding = Vec::new();
        for voter in voters {
            let Some(slot) = s.slot(voter) else { continue };
            let node = &s.nodes[slot];
            // A wiped node's old id: its disk is gone.
            if node.peer != *voter {
                continue;
            }
            let durable = node.disk.durable();
            let entry = durable
                .get(Column::RaftLog, &index.to_be_bytes())
                .ok()
                .flatten()
                .and_then(|b| consensus::codec::decode::<openraft::Entry<TypeConfig>>(&b).ok());
            let held = match entry {
                Some(entry) => values_of(&entry).contains(&value),
                None => {
                    let purged = durable
                        .get(Column::RaftMeta, b"last_purged")
                        .ok()
                        .flatten()
                        .and_then(|b| consensus::codec::decode::<openraft::LogId<u64>>(&b).ok());
                    purged.is_some_and(|p| p.index >= index)
                        && s.applied_values.contains(&(region, index, value))
                }
            };
            if held {
                holding.push(voter.clone());
            }
        }
        if holding.len() * 2 <= voters.len() {
            lost += 1;
            s.violate(
                "acknowledged-writes-durable",
                format!(
                    "region {region}: write {value}, acknowledged at index {index}, is durable on {} of the {} final voters {voters:?} (on {holding:?})",
                    holding.len(),
                    voters.len()
                ),
            );
        }
    }
    lost
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
            disk: SimDisk::new(),
            store: None,
            group: None,
            host: None,
            membership: None,
            started_ms: 0,
            keeper: Housekeeper::new(
                Duration::from_millis(settings().replace_dead_voter_after_ms),
                Duration::from_millis(settings().remove_gone_learner_after_ms),
            ),
            generation: 0,
            next_check: 0,
            wipes: 0,
            skew_ms: 0,
            drift_ppm: 0,
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
        slots: (0..config.nodes).map(|i| (format!("n{i:03}"), i)).collect(),
        crash_on_change: BTreeSet::new(),
        acknowledged: BTreeMap::new(),
        applied_values: BTreeSet::new(),
        unsynced_lost: 0,
        injected: Vec::new(),
        states: AppliedStates::default(),
        acked: BTreeMap::new(),
        audit: BTreeMap::new(),
        leases: BTreeMap::new(),
        counted: BTreeMap::new(),
        overlaps: BTreeMap::new(),
        tasks: TaskCounts::default(),
    })));
    let start = Instant::now();
    for i in 0..config.nodes {
        start_node(&world, i).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![
        tokio::spawn(gossip(world.clone(), stop.clone())),
        tokio::spawn(observe(world.clone(), stop.clone())),
        tokio::spawn(housekeeping(world.clone(), stop.clone())),
        tokio::spawn(tasks::keep_agents(world.clone(), stop.clone())),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let split: BTreeSet<usize> = scenario
        .steps
        .iter()
        .filter_map(|s| match s.fault {
            Fault::SplitBootstrap { region } => Some(region),
            _ => None,
        })
        .collect();
    bootstrap(&world, &split).await;

    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    if config.tasks {
        clients.push(tokio::spawn(tasks::deploy(world.clone())));
    }
    let task_clients = if config.tasks {
        config.regions * tasks::TASK_CLIENTS_PER_REGION
    } else {
        0
    };
    for c in 0..task_clients {
        clients.push(tokio::spawn(tasks::client(
            world.clone(),
            c,
            stop_clients.clone(),
        )));
    }
    if config.tasks {
        for r in 0..config.regions {
            for c in 0..tasks::COUNTER_CLIENTS {
                clients.push(tokio::spawn(tasks::counter_client(
                    world.clone(),
                    r,
                    c,
                    stop_clients.clone(),
                )));
            }
        }
    }
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
    // A split bootstrap happened with the bootstrap, above.
    steps.retain(|s| !matches!(s.fault, Fault::SplitBootstrap { .. }));
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
    if config.tasks {
        tasks::finish_counters(&world).await;
    }
    observe_once(&world);
    // The voters of each region at the end, while the groups still run.
    let final_voters: Vec<Vec<String>> = {
        let s = world.lock();
        (0..config.regions)
            .map(|r| {
                s.leader_of(r)
                    .map(|(_, g)| g.latest_voters())
                    .or_else(|| {
                        s.nodes
                            .iter()
                            .filter(|n| n.region == r)
                            .find_map(|n| n.group.as_ref().map(|g| g.latest_voters()))
                    })
                    .unwrap_or_default()
            })
            .collect()
    };
    // The task invariants read the groups' final states: before they stop.
    tasks::check_end(&mut world.lock());
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
        let ops: Vec<Op> = s
            .history
            .iter()
            .filter(|o| o.region == r)
            .cloned()
            .collect();
        s.check("linearizability");
        // An inconclusive search is a failed run: a check that gives up proves nothing.
        if let Err(e) = linearizable(&ops) {
            s.violate("linearizability", format!("region {r}: {e}"));
        }
    }
    let lost = durable_on_a_majority(&mut s, &final_voters);
    let writes = s
        .history
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Write(_)));
    let acknowledged = writes.clone().filter(|o| o.return_us.is_some()).count() as u64;
    let unknown = writes.filter(|o| o.return_us.is_none()).count() as u64;
    let reads = s.history.len() as u64 - acknowledged - unknown;
    let task_invariants = [
        "tasks-acknowledged-durable",
        "tasks-once",
        "counter-exact",
        "residency",
        "single-lease",
        "single-activation",
        "audit-chains",
    ];
    let invariants = [
        "election-safety",
        "log-matching",
        "state-machine-safety",
        "linearizability",
        "acknowledged-writes-durable",
        "liveness",
        "membership-convergence",
        "replicas-catch-up",
        "bootstrap",
        "faults-injected",
    ]
    .iter()
    .chain(task_invariants.iter().filter(|_| config.tasks))
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
        faults: s.injected.clone(),
        leader_changes: s.elections.changes,
        messages: s.messages,
        writes_acknowledged: acknowledged,
        writes_unknown: unknown,
        writes_lost: lost,
        unsynced_writes_lost_at_crash: s.unsynced_lost,
        reads,
        tasks: s.tasks.clone(),
        invariants,
        trace_hash: String::new(),
    };
    (report, s.history.clone(), s.trace.clone())
}
