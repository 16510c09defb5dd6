//! The host side of a task: the checks, the claim, the run, the record.
//!
//! ```text
//!   run(task, epoch) ─ lease is (this node, epoch)? else stale_epoch (where it is now)
//!                    ─ residency of every tag (processing here, result to the entry region)
//!                    ─ models allowed by the policy
//!                    ─ lock the task id; the agent active here at this epoch? else
//!                      restore its state from its replicas first (tasks wait)
//!                    ─ a stored result? replay it, run nothing
//!                    ─ rate limit of the agent
//!                    ─ claim the task id through Raft (fenced by the lease's epoch;
//!                      once per task id in the region, wherever the agent moves)
//!                    ─ the kind runs
//!                    ─ audit record + state writes: one synced batch, then the
//!                      in-memory chain moves
//!                    ─ the state writes and the result to every replica (see
//!                      `checkpoint`); then the result is kept and answered
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use consensus::{RegionCommand, RegionResponse, RegionState};
use mesh_agent::audit::{self, AuditRecord, Chain, SealedRecord};
use mesh_store::{Column, Durability, Store, WriteOp};
use mesh_types::agent::Manifest;
use mesh_types::policy::{Policy, RateLimits};
use tokio::time::Instant;

use crate::checkpoint::{
    self, Push, PushAnswer, ReplicaStore, Replicas, Sealed, StoredResult, Version,
};
use crate::kinds::{self, Context, Models, Turns};
use crate::{TaskAnswer, TaskError, TaskRun};

/// Turns of a conversation kept per session.
pub const SESSION_TURNS_MAX: usize = 8;

/// Commits a task's claim through the region's Raft group (on a follower:
/// through its leader).
#[async_trait]
pub trait Claimer: Send + Sync {
    /// Proposes `command` (a [`RegionCommand::ClaimTask`]) and returns what
    /// applying it answered; an error when its outcome is not known.
    async fn claim(&self, command: RegionCommand) -> Result<RegionResponse, TaskError>;
}

/// Where synced writes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// On tokio's blocking pool (a node: an fsync never stalls the runtime).
    Blocking,
    /// In place (the simulator's disk is memory, and its runtime one thread).
    Inline,
}

/// What a host needs besides its own state.
pub struct Env<'a> {
    /// This node's peer id.
    pub node: &'a str,
    /// This node's region.
    pub region: &'a str,
    /// This node's models.
    pub models: &'a dyn Models,
    /// How claims reach the leader.
    pub claimer: &'a dyn Claimer,
    /// The agent's rate limit (per agent, under this region's policy): `Ok`
    /// or the error to answer (429 with its retry).
    pub admit: &'a (dyn Fn(&Manifest, &RateLimits) -> Result<(), TaskError> + Send + Sync),
    /// For a streamed task: where generated pieces go as they come.
    pub tokens: Option<&'a crate::kinds::TokenSink>,
    /// How the agent's state reaches its replicas.
    pub replicas: &'a dyn Replicas,
    /// How many replicas an agent's state is copied to (fewer when the
    /// region has fewer other live nodes).
    pub replica_count: usize,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("node", &self.node)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The task results and the audit chain of one node.
pub struct Host {
    store: Arc<dyn Store>,
    chain: tokio::sync::Mutex<Chain>,
    /// A lock per task id being run, so a task id runs once however many
    /// submissions of it arrive at once.
    running: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    io: Io,
    now_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Set when a synced write failed: what the store shows may not be on
    /// the disk (a failed fsync drops the dirty pages, yet the process
    /// still reads them), so this process answers no task and no stored
    /// result any more; a restart reads what is durable.
    failed: std::sync::atomic::AtomicBool,
    /// The copies of other hosts' agents this node keeps.
    replica: ReplicaStore,
    /// The agents active on this node, one lock each (a task of an agent
    /// being activated waits for it).
    activations: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Activation>>>>,
    /// Activations since the last [`Host::keep_agents`] round (by that
    /// round or by a task's), for the node's log; at most
    /// [`ACTIVATED_KEPT`].
    activated: std::sync::Mutex<std::collections::VecDeque<(String, u64, u64)>>,
    /// Why this node's agents are stopped and none is activated here, while
    /// it is out of contact with its region (see [`Host::keep_agents`]).
    stepped_down: std::sync::Mutex<Option<String>>,
    /// The agents active here and their epochs, as the activations say,
    /// readable without waiting for an activation's lock (a task may hold
    /// one for seconds).
    live: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// The log index of the replica set this node last named for each
    /// agent: a restore from a region state older than that would read
    /// copies this node has since replaced.
    named_at: std::sync::Mutex<HashMap<String, u64>>,
}

/// Most activations kept for the next [`Host::keep_agents`] round to report.
const ACTIVATED_KEPT: usize = 256;

/// An agent active on this node: its epoch, the version of its state its
/// replicas hold, and the results they hold.
#[derive(Debug, Default)]
struct Activation {
    active: bool,
    epoch: u64,
    version: Version,
    replicas: Vec<String>,
}

/// What one round of [`Host::keep_agents`] did, for the node's log.
#[derive(Debug)]
pub enum Kept {
    /// The agent was stopped here: its lease moved (`to`: where, at which
    /// epoch) or it is no longer placed.
    Stopped {
        /// The agent.
        agent: String,
        /// Its epoch here.
        epoch: u64,
        /// Its lease now, if placed.
        to: Option<(String, u64)>,
    },
    /// The agent was activated here, its state restored.
    Activated {
        /// The agent.
        agent: String,
        /// Its epoch.
        epoch: u64,
        /// How long the activation took.
        ms: u64,
    },
    /// The agent could not be activated here yet (tried again next round).
    Failed {
        /// The agent.
        agent: String,
        /// Its epoch.
        epoch: u64,
        /// Why.
        error: TaskError,
    },
    /// This node is out of contact with its region's majority: `agent`
    /// (empty: none was active) was stopped here, and none is activated
    /// until it is back in contact.
    SteppedDown {
        /// The agent, or empty.
        agent: String,
        /// Its epoch here.
        epoch: u64,
        /// What this node sees.
        why: String,
    },
    /// Back in contact with its region's majority after it stepped down.
    BackInContact {
        /// Why it had stepped down.
        was: String,
    },
    /// The agent was stopped to be activated again, because `replica`, a
    /// node its state is copied to, is draining.
    Recopy {
        /// The agent.
        agent: String,
        /// Its epoch.
        epoch: u64,
        /// The draining replica.
        replica: String,
    },
}

/// Where a host lists the results it keeps with an agent's state (for
/// the whole copies it sends): `ckpt\0l\0AGENT\0`, the result's time in
/// ms (big-endian) and its task id; the answer is under its task id.
fn kept_prefix(agent: &str) -> Vec<u8> {
    format!("ckpt\0l\0{agent}\0").into_bytes()
}

fn kept_key(agent: &str, at_ms: u64, task_id: &str) -> Vec<u8> {
    let mut k = kept_prefix(agent);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(task_id.as_bytes());
    k
}

/// Where this node counts its activations (see [`Version::incarnation`]).
const INCARNATION_KEY: &[u8] = b"ckpt\0incarnation";

fn not_copied(agent: &str, task_id: &str, why: String) -> TaskError {
    TaskError::new(
        503,
        "not_copied",
        format!("task {task_id} of agent {agent} was not acknowledged: {why}; retry with the same task id (it runs once)"),
    )
}

/// A node out of contact with its region's majority activates nothing.
fn stepped_down(agent: &str, why: &str) -> TaskError {
    TaskError::new(
        503,
        "unavailable",
        format!("agent {agent} is stopped on this node: {why}; retry through a node of the region's majority"),
    )
}

fn moved(agent: &str, epoch: u64, known: u64) -> TaskError {
    TaskError::new(
        409,
        "stale_epoch",
        format!("agent {agent} was activated elsewhere (epoch {known}; this node's epoch {epoch} is stale); retry through any node"),
    )
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

fn session_key(agent: &str, session: &str) -> Vec<u8> {
    format!("session\0{agent}\0{session}").into_bytes()
}

fn decode_sealed(bytes: &[u8]) -> Result<SealedRecord, TaskError> {
    serde_json::from_slice(bytes)
        .map_err(|e| TaskError::storage(format!("an audit record is unreadable: {e}")))
}

/// A task id used again for another task.
fn reused(task_id: &str, agent: &str) -> TaskError {
    TaskError::new(
        409,
        "task_id_reused",
        format!("task id {task_id} is a task of agent {agent} with another input; a task id names one task: choose another id"),
    )
}

fn forbidden(name: &'static str, detail: String) -> TaskError {
    TaskError::new(403, name, detail)
}

/// Residency and models: may a task of `manifest` with `tags` run in
/// `region` under `policy`, and its result go back to `entry_region`?
pub fn check_policy(
    policy: Option<&Policy>,
    manifest: &Manifest,
    tags: &[String],
    region: &str,
    entry_region: &str,
) -> Result<(), TaskError> {
    let Some(policy) = policy else {
        return Ok(());
    };
    #[cfg(feature = "planted-bugs")]
    let skip_residency = planted::on(&planted::SKIP_RESIDENCY);
    #[cfg(not(feature = "planted-bugs"))]
    let skip_residency = false;
    for tag in tags.iter().filter(|_| !skip_residency) {
        if let Some(rule) = policy.residency.iter().find(|r| &r.tag == tag) {
            let allowed: Vec<&str> = rule.regions.iter().map(|r| r.as_str()).collect();
            if !allowed.contains(&region) {
                return Err(forbidden(
                    "residency",
                    format!(
                        "data tagged {tag} may only be processed in {}; agent {} runs in {region}",
                        allowed.join(", "),
                        manifest.name,
                    ),
                ));
            }
            let results: Vec<&str> = rule.result_regions().iter().map(|r| r.as_str()).collect();
            if !results.contains(&entry_region) {
                return Err(forbidden(
                    "residency",
                    format!("a result from data tagged {tag} may only go to {} (the rule for {tag}); this task entered in {entry_region}: submit it to a node of an allowed region", results.join(", ")),
                ));
            }
        }
    }
    if !policy.models.is_empty() {
        for model in &manifest.models {
            let allowed = policy
                .models
                .iter()
                .any(|m| m.name == model.name && m.sha256 == model.sha256);
            if !allowed {
                return Err(forbidden(
                    "model_not_allowed",
                    format!(
                        "model {} ({}) is not allowed by region {region}'s policy",
                        model.name, model.sha256
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Host {
    /// The host over the node's store, its audit chain resumed; `now_ms`
    /// is the wall clock its records are stamped with.
    pub fn open(
        store: Arc<dyn Store>,
        io: Io,
        now_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Result<Self, TaskError> {
        let last = match store
            .last(Column::Audit)
            .map_err(|e| TaskError::storage(format!("reading the audit log: {e}")))?
        {
            Some((_, bytes)) => Some(decode_sealed(&bytes)?),
            None => None,
        };
        #[cfg(feature = "planted-bugs")]
        let last = last.filter(|_| !planted::on(&planted::FORGET_CHAIN));
        let replica_store = store.clone();
        Ok(Self {
            chain: tokio::sync::Mutex::new(Chain::after(last.as_ref())),
            store,
            running: std::sync::Mutex::new(HashMap::new()),
            io,
            now_ms,
            failed: std::sync::atomic::AtomicBool::new(false),
            replica: ReplicaStore::new(Arc::clone(&replica_store)),
            activations: std::sync::Mutex::new(HashMap::new()),
            activated: std::sync::Mutex::new(std::collections::VecDeque::new()),
            stepped_down: std::sync::Mutex::new(None),
            live: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            named_at: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The copies of other hosts' agents this node keeps (a node's API
    /// answers its peers' pushes and seals with it).
    pub fn replica(&self) -> &ReplicaStore {
        &self.replica
    }

    /// The agents active on this node, with their epochs, in name order.
    pub fn active_agents(&self) -> Vec<(String, u64)> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(a, e)| (a.clone(), *e))
            .collect()
    }

    fn set_live(&self, agent: &str, epoch: Option<u64>) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match epoch {
            Some(e) => live.insert(agent.to_owned(), e),
            None => live.remove(agent),
        };
    }

    fn activation(&self, agent: &str) -> Arc<tokio::sync::Mutex<Activation>> {
        let mut activations = self
            .activations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        activations.entry(agent.to_owned()).or_default().clone()
    }

    /// Stops `agent` here (its lease moved, or its state could not be
    /// copied): the next task activates it again from its replicas.
    pub async fn deactivate(&self, agent: &str) {
        self.set_live(agent, None);
        let lock = self.activation(agent);
        lock.lock().await.active = false;
    }

    /// Tells the host whether this node is in contact with its region's
    /// majority ([`crate::lease::contact`]), every keep interval, without
    /// waiting on anything: out of contact, it steps down at once (every
    /// agent stopped; a task holding an agent's lock finds it stepped
    /// down before it records or answers; none is activated) until it is
    /// back in contact. `crate::lease` says why that comes before the
    /// majority can place its agents elsewhere.
    pub fn set_contact(&self, contact: Result<(), String>) -> Vec<Kept> {
        #[cfg(feature = "planted-bugs")]
        let contact = match planted::on(&planted::NO_STEP_DOWN) {
            true => Ok(()),
            false => contact,
        };
        let mut kept = Vec::new();
        let mut down = self
            .stepped_down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match contact {
            Err(why) => {
                let first = down.is_none();
                *down = Some(why.clone());
                drop(down);
                let live = std::mem::take(
                    &mut *self
                        .live
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                for (agent, epoch) in live {
                    if let Ok(mut act) = self.activation(&agent).try_lock() {
                        act.active = false;
                    }
                    kept.push(Kept::SteppedDown {
                        agent,
                        epoch,
                        why: why.clone(),
                    });
                }
                if first && kept.is_empty() {
                    kept.push(Kept::SteppedDown {
                        agent: String::new(),
                        epoch: 0,
                        why,
                    });
                }
            }
            Ok(()) => {
                if let Some(was) = down.take() {
                    kept.push(Kept::BackInContact { was });
                }
            }
        }
        kept
    }

    /// One round of keeping this node's agents in line with its applied
    /// region `state` (a node runs it every 200 ms, the simulator too):
    /// stops the agents whose lease moved away, activates the ones granted
    /// here (their state restored before a task comes), and activates
    /// again an agent one of whose replicas is draining, when another node
    /// can take its copy (see `agentmesh node drain`).
    /// While this node is stepped down ([`Host::set_contact`]) it
    /// activates nothing.
    pub async fn keep_agents(&self, env: &Env<'_>, state: &RegionState) -> Vec<Kept> {
        let mut kept = Vec::new();
        if self.stepped_down().is_some() {
            return kept;
        }
        let active = self.active_agents();
        for (agent, epoch) in &active {
            let lease = state.agents.get(agent).and_then(|e| e.lease.clone());
            if !lease
                .as_ref()
                .is_some_and(|l| l.node == env.node && l.epoch == *epoch)
            {
                self.deactivate(agent).await;
                kept.push(Kept::Stopped {
                    agent: agent.clone(),
                    epoch: *epoch,
                    to: lease.map(|l| (l.node, l.epoch)),
                });
                continue;
            }
            let draining = state
                .replicas
                .get(agent)
                .and_then(|r| r.nodes.iter().find(|n| state.draining.contains(*n)));
            if let Some(replica) = draining {
                let members = env.replicas.members().await;
                if !checkpoint::choose(agent, env.node, &members, env.replica_count).is_empty() {
                    self.deactivate(agent).await;
                    kept.push(Kept::Recopy {
                        agent: agent.clone(),
                        epoch: *epoch,
                        replica: replica.clone(),
                    });
                }
                continue;
            }
            // Activated with no other node to copy to (a region of one):
            // once one is there, activated again, with its copies.
            let uncopied = self
                .activation(agent)
                .try_lock()
                .is_ok_and(|a| a.active && a.epoch == *epoch && a.replicas.is_empty());
            if uncopied && env.replica_count > 0 {
                let members = env.replicas.members().await;
                if !checkpoint::choose(agent, env.node, &members, env.replica_count).is_empty() {
                    self.deactivate(agent).await;
                    kept.push(Kept::Recopy {
                        agent: agent.clone(),
                        epoch: *epoch,
                        replica: "none (it had no replicas)".into(),
                    });
                }
            }
        }
        let active = self.active_agents();
        for (agent, entry) in &state.agents {
            let Some(lease) = &entry.lease else { continue };
            if lease.node != env.node || active.contains(&(agent.clone(), lease.epoch)) {
                continue;
            }
            if let Err(error) = self.activate(env, state, agent, lease.epoch).await {
                kept.push(Kept::Failed {
                    agent: agent.clone(),
                    epoch: lease.epoch,
                    error,
                });
            }
        }
        // Every activation since the last round, this round's and tasks'.
        let activated: Vec<_> = self
            .activated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        for (agent, epoch, ms) in activated {
            kept.push(Kept::Activated { agent, epoch, ms });
        }
        kept
    }

    /// Activates `agent` here under the lease of `epoch` now (the node does
    /// when the region state grants it the lease), not at its first task.
    pub async fn activate(
        &self,
        env: &Env<'_>,
        state: &RegionState,
        agent: &str,
        epoch: u64,
    ) -> Result<(), TaskError> {
        self.check_disk()?;
        self.ensure_active(env, state, agent, epoch).await
    }

    /// Makes `agent` active on this node under the lease of `epoch`, with
    /// the newest copy of its state (see `checkpoint`); `state` is this
    /// node's applied region state.
    async fn ensure_active(
        &self,
        env: &Env<'_>,
        state: &RegionState,
        agent: &str,
        epoch: u64,
    ) -> Result<(), TaskError> {
        let lock = self.activation(agent);
        let mut act = lock.lock().await;
        if let Some(why) = self.stepped_down() {
            act.active = false;
            self.set_live(agent, None);
            return Err(stepped_down(agent, &why));
        }
        if act.active && act.epoch == epoch {
            // (A step-down that found this lock held left it active.)
            self.set_live(agent, Some(epoch));
            return Ok(());
        }
        act.active = false;
        self.set_live(agent, None);
        let started = Instant::now();
        let restored_version = self.restore(env, state, agent, epoch).await?;
        let incarnation = self.next_incarnation().await?;
        let version = Version {
            epoch,
            incarnation,
            seq: 0,
        };
        let members = env.replicas.members().await;
        let replicas = checkpoint::choose(agent, env.node, &members, env.replica_count);
        if replicas.is_empty() && env.replica_count > 0 && members.len() > 1 {
            return Err(TaskError::new(
                503,
                "unavailable",
                format!("agent {agent} cannot be activated: no other node of region {} is alive to hold a copy of its state; retry when one is", env.region),
            ));
        }
        let copy = self.copy_of(agent)?;
        let answers = futures::future::join_all(
            replicas
                .iter()
                .map(|r| self.send_copy(env, r, agent, version, &copy)),
        )
        .await;
        for (r, answer) in replicas.iter().zip(answers) {
            match answer {
                Ok(()) => {}
                Err(e) if e.name == "stale_epoch" => return Err(e),
                Err(e) => {
                    return Err(TaskError::new(
                        503,
                        "unavailable",
                        format!("agent {agent} cannot be activated: its state could not be copied to replica {r} ({e}); retry"),
                    ))
                }
            }
        }
        let named = env
            .claimer
            .claim(RegionCommand::SetReplicas {
                agent: agent.to_owned(),
                node: env.node.to_owned(),
                epoch,
                replicas: replicas.clone(),
            })
            .await?;
        match named {
            RegionResponse::ReplicasSet { index } => {
                self.named_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(agent.to_owned(), index);
            }
            RegionResponse::ClaimRefused { lease } => {
                return Err(moved(agent, epoch, lease.map(|l| l.epoch).unwrap_or(0)))
            }
            other => {
                return Err(TaskError::storage(format!(
                    "naming agent {agent}'s replicas was answered {other:?}"
                )))
            }
        }
        self.record_move(env, state, agent, epoch, restored_version, &replicas)
            .await?;
        if let Some(why) = self.stepped_down() {
            return Err(stepped_down(agent, &why));
        }
        *act = Activation {
            active: true,
            epoch,
            version,
            replicas,
        };
        self.set_live(agent, Some(epoch));
        let mut activated = self
            .activated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if activated.len() >= ACTIVATED_KEPT {
            activated.pop_front();
        }
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        activated.push_back((agent.to_owned(), epoch, ms));
        Ok(())
    }

    /// Why this node stepped down, if it did (see [`Host::keep_agents`]).
    pub fn stepped_down(&self) -> Option<String> {
        self.stepped_down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Appends the audit record of `agent`'s activation under `epoch`,
    /// once, when the region state says its lease moved here (see
    /// `AuditRecord::moved`): which state version it restored, and where
    /// its copies go now.
    async fn record_move(
        &self,
        env: &Env<'_>,
        state: &RegionState,
        agent: &str,
        epoch: u64,
        restored: Option<Version>,
        replicas: &[String],
    ) -> Result<(), TaskError> {
        let Some(moved) = state
            .moves
            .get(agent)
            .and_then(|m| m.iter().rev().find(|m| m.epoch == epoch))
            .filter(|m| m.to == env.node)
        else {
            return Ok(());
        };
        let Some(entry) = state.agents.get(agent) else {
            return Ok(());
        };
        let mut marker = format!("ckpt\0moved\0{agent}\0").into_bytes();
        marker.extend_from_slice(&epoch.to_be_bytes());
        let storage =
            |e: String| TaskError::storage(format!("recording agent {agent}'s move: {e}"));
        if self
            .store
            .get(Column::Tasks, &marker)
            .map_err(|e| storage(e.to_string()))?
            .is_some()
        {
            return Ok(());
        }
        let manifest = &entry.manifest;
        let now = (self.now_ms)();
        let restored = restored
            .map(|v| v.to_string())
            .unwrap_or_else(|| "none".into());
        let record = AuditRecord {
            task_id: format!("move/{agent}/{epoch}"),
            agent: agent.to_owned(),
            agent_version: manifest.version.clone(),
            epoch,
            models: manifest.models.iter().map(|m| m.sha256.clone()).collect(),
            node: env.node.to_owned(),
            region: env.region.to_owned(),
            policy_version: state.policy_version,
            dataset: manifest.dataset.clone(),
            tags: Vec::new(),
            input_sha256: audit::sha256_hex(restored.as_bytes()),
            output_sha256: audit::sha256_hex(replicas.join(",").as_bytes()),
            entry_node: env.node.to_owned(),
            hops: 0,
            started_at_ms: now,
            finished_at_ms: now,
            trace_id: String::new(),
            reclaims: None,
            moved: Some(match &moved.from {
                Some(from) => format!(
                    "{} from {from}@{}",
                    moved.reason.as_str(),
                    epoch.saturating_sub(1)
                ),
                None => moved.reason.as_str().to_owned(),
            }),
        };
        let mut chain = self.chain.lock().await;
        let mut next = chain.clone();
        let sealed = next.append(record);
        let ops = vec![
            WriteOp::Put {
                column: Column::Audit,
                key: sealed.seq.to_be_bytes().to_vec(),
                value: serde_json::to_vec(&sealed).map_err(|e| storage(e.to_string()))?,
            },
            WriteOp::Put {
                column: Column::Tasks,
                key: marker,
                value: Vec::new(),
            },
        ];
        self.write_synced(ops).await.map_err(|e| {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            storage(e)
        })?;
        *chain = next;
        Ok(())
    }

    /// Seals the replicas the region state names for `agent` and installs
    /// the newest copy among those that answer; returns its results and
    /// its version.
    async fn restore(
        &self,
        env: &Env<'_>,
        state: &RegionState,
        agent: &str,
        epoch: u64,
    ) -> Result<Option<Version>, TaskError> {
        #[cfg(feature = "planted-bugs")]
        if planted::on(&planted::SKIP_RESTORE) {
            return Ok(None);
        }
        let named_at = self
            .named_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(agent)
            .copied();
        if let Some(named_at) = named_at {
            let seen = state.replicas.get(agent).map(|r| r.set_at).unwrap_or(0);
            if seen < named_at {
                return Err(TaskError::new(
                    503,
                    "unavailable",
                    format!("agent {agent} cannot be activated from this region state: it names the replicas set at index {seen}, and this node named newer ones at {named_at} since; retry"),
                ));
            }
        }
        let Some(set) = state.replicas.get(agent) else {
            // Never copied (a new agent, or no other node to copy to): its
            // state is what this node holds.
            return Ok(None);
        };
        if set.nodes.is_empty() {
            if set.host != env.node {
                return Err(TaskError::new(
                    503,
                    "unavailable",
                    format!("agent {agent}'s state was on {} alone (no other node was alive to copy it to); it is unavailable until that node is back", set.host),
                ));
            }
            return Ok(None);
        }
        let seal = |n: &str, after: Option<Vec<u8>>| {
            let n = n.to_owned();
            async move {
                if n == env.node {
                    self.replica.seal(agent, epoch, after.as_deref()).await
                } else {
                    env.replicas.seal(&n, agent, epoch, after).await
                }
            }
        };
        let answers = futures::future::join_all(set.nodes.iter().map(|n| seal(n, None))).await;
        let mut errors = Vec::new();
        let mut newest: Option<(&String, Sealed)> = None;
        for (n, answer) in set.nodes.iter().zip(answers) {
            match answer {
                Ok(sealed) => {
                    if newest
                        .as_ref()
                        .is_none_or(|(_, b)| sealed.version > b.version)
                    {
                        newest = Some((n, sealed));
                    }
                }
                Err(e) => errors.push(format!("{n}: {e}")),
            }
        }
        // A replica that holds no copy (it lost its disk) wins only when
        // every named replica answered so: the others may hold the state.
        if newest.as_ref().is_some_and(|(_, n)| n.version.is_none()) && !errors.is_empty() {
            return Err(TaskError::new(
                503,
                "unavailable",
                format!(
                    "agent {agent}'s replicas that answered hold no copy of its state, and the others did not answer ({}); it is activated when one does: retry",
                    errors.join("; ")
                ),
            ));
        }
        let Some((from, mut newest)) = newest else {
            return Err(TaskError::new(
                503,
                "unavailable",
                format!(
                    "agent {agent}'s state is copied on {}, and none of them answered ({}); it is activated when one does: retry",
                    set.nodes.join(", "),
                    errors.join("; ")
                ),
            ));
        };
        // The rest of the newest copy, page by page, from the same replica.
        let mut size = 0usize;
        let mut next = newest.next.take();
        while let Some(after) = next {
            let page = seal(from, Some(after)).await.map_err(|e| {
                TaskError::new(
                    503,
                    "unavailable",
                    format!("agent {agent}'s copy on {from} could not be read whole ({e}); retry"),
                )
            })?;
            if page.version != newest.version {
                return Err(TaskError::new(
                    503,
                    "unavailable",
                    format!("agent {agent}'s copy on {from} changed while it was read; retry"),
                ));
            }
            size = size.saturating_add(checkpoint::SEAL_PAGE_BYTES);
            if size > checkpoint::STATE_BYTES_MAX {
                return Err(checkpoint::too_large(agent));
            }
            newest.state.extend(page.state);
            newest.results.extend(page.results);
            next = page.next;
        }
        // The results kept with the state it replaces go with it: a result
        // of a task the restored copy does not hold was never answered (an
        // answered task is on every replica), and answering it now would
        // acknowledge a task whose state change the restored copy lacks.
        let mut ops: Vec<WriteOp> = self
            .kept_results(agent)?
            .into_iter()
            .map(|(_, task_id)| WriteOp::Delete {
                column: Column::Tasks,
                key: task_id.into_bytes(),
            })
            .collect();
        for prefix in checkpoint::state_prefixes(agent)
            .into_iter()
            .chain([kept_prefix(agent)])
        {
            ops.push(WriteOp::DeleteRange {
                column: Column::Tasks,
                to: checkpoint::prefix_end(&prefix),
                from: prefix,
            });
        }
        for (key, value) in &newest.state {
            if checkpoint::is_state_key(agent, key) {
                ops.push(WriteOp::Put {
                    column: Column::Tasks,
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        // A result is stored under its task id: only a task id of this
        // agent's answer, never another key (a replica is not trusted
        // with the store's other keys).
        //
        // Nor a result for a task id the region's claims give to another
        // agent, nor over a result this node holds for another agent.
        let others = |id: &str| -> Result<bool, TaskError> {
            if state.claims.get(id).is_some_and(|c| c.agent != agent) {
                return Ok(true);
            }
            Ok(self
                .store
                .get(Column::Tasks, id.as_bytes())
                .map_err(|e| TaskError::storage(format!("reading task {id}: {e}")))?
                .and_then(|b| serde_json::from_slice::<TaskAnswer>(&b).ok())
                .is_some_and(|a| a.agent != agent))
        };
        let mut installable = Vec::new();
        for r in &newest.results {
            let own = crate::is_task_id(&r.task_id)
                && serde_json::from_slice::<TaskAnswer>(&r.answer)
                    .is_ok_and(|a| a.task_id == r.task_id && a.agent == agent);
            if own && !others(&r.task_id)? {
                installable.push(r);
            }
        }
        for result in installable {
            ops.push(WriteOp::Put {
                column: Column::Tasks,
                key: result.task_id.as_bytes().to_vec(),
                value: result.answer.clone(),
            });
            ops.push(WriteOp::Put {
                column: Column::Tasks,
                key: kept_key(agent, result.at_ms, &result.task_id),
                value: Vec::new(),
            });
        }
        self.write_synced(ops).await.map_err(|e| {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            TaskError::storage(format!(
                "cannot install agent {agent}'s restored state: {e}"
            ))
        })?;
        Ok(newest.version)
    }

    async fn next_incarnation(&self) -> Result<u64, TaskError> {
        let read = self
            .store
            .get(Column::Tasks, INCARNATION_KEY)
            .map_err(|e| TaskError::storage(e.to_string()))?;
        let last = read
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let next = last.saturating_add(1);
        self.write_synced(vec![WriteOp::Put {
            column: Column::Tasks,
            key: INCARNATION_KEY.to_vec(),
            value: next.to_be_bytes().to_vec(),
        }])
        .await
        .map_err(TaskError::storage)?;
        Ok(next)
    }

    /// The results this node keeps with `agent`'s state: (time, task id).
    fn kept_results(&self, agent: &str) -> Result<Vec<(u64, String)>, TaskError> {
        let prefix = kept_prefix(agent);
        let mut kept = Vec::new();
        self.store
            .scan(
                Column::Tasks,
                &prefix,
                Some(&checkpoint::prefix_end(&prefix)),
                &mut |k, _| {
                    if let Some(time) = k.get(prefix.len()..prefix.len() + 8) {
                        let at_ms = u64::from_be_bytes(time.try_into().unwrap_or([0; 8]));
                        let id = String::from_utf8_lossy(&k[prefix.len() + 8..]).into_owned();
                        kept.push((at_ms, id));
                    }
                    true
                },
            )
            .map_err(|e| TaskError::storage(format!("reading agent {agent}'s results: {e}")))?;
        Ok(kept)
    }

    /// This node's state of `agent` and the results it keeps with it, for
    /// a whole copy.
    fn copy_of(&self, agent: &str) -> Result<Sealed, TaskError> {
        let mut copy = Sealed::default();
        let mut size = 0usize;
        let read = |e: mesh_store::StoreError| {
            TaskError::storage(format!("reading agent {agent}'s state: {e}"))
        };
        for prefix in checkpoint::state_prefixes(agent) {
            self.store
                .scan(
                    Column::Tasks,
                    &prefix,
                    Some(&checkpoint::prefix_end(&prefix)),
                    &mut |k, v| {
                        size = size.saturating_add(k.len() + v.len());
                        copy.state.push((k.to_vec(), v.to_vec()));
                        size <= checkpoint::STATE_BYTES_MAX
                    },
                )
                .map_err(read)?;
        }
        for (at_ms, task_id) in self.kept_results(agent)? {
            if let Some(answer) = self
                .store
                .get(Column::Tasks, task_id.as_bytes())
                .map_err(read)?
            {
                size = size.saturating_add(task_id.len() + answer.len());
                copy.results.push(StoredResult {
                    task_id,
                    at_ms,
                    answer,
                });
            }
        }
        if size > checkpoint::STATE_BYTES_MAX {
            return Err(checkpoint::too_large(agent));
        }
        Ok(copy)
    }

    /// Sends a whole copy to replica `peer`, page by page.
    async fn send_copy(
        &self,
        env: &Env<'_>,
        peer: &str,
        agent: &str,
        version: Version,
        copy: &Sealed,
    ) -> Result<(), TaskError> {
        for page in checkpoint::pages(agent, version, copy) {
            match env.replicas.push(peer, &Push::Page(page)).await? {
                PushAnswer::Stored => {}
                PushAnswer::Fenced { epoch } => return Err(moved(agent, version.epoch, epoch)),
                PushAnswer::Behind { holds } => {
                    return Err(TaskError::new(
                        503,
                        "not_copied",
                        format!("replica {peer} took a page of agent {agent}'s copy {version} out of order (it holds {})", holds.map(|v| v.to_string()).unwrap_or_else(|| "nothing".into())),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Copies one task's changes to every replica of the activation; a
    /// replica that is behind gets a whole copy.
    async fn replicate(
        &self,
        env: &Env<'_>,
        act: &mut Activation,
        agent: &str,
        delta: checkpoint::Delta,
    ) -> Result<(), TaskError> {
        let version = delta.version;
        let push = Push::Delta(delta);
        let answers = futures::future::join_all(act.replicas.iter().map(|r| {
            let push = &push;
            async move { (r, env.replicas.push(r, push).await) }
        }))
        .await;
        let mut behind = Vec::new();
        for (r, answer) in answers {
            match answer? {
                PushAnswer::Stored => {}
                PushAnswer::Fenced { epoch } => return Err(moved(agent, act.epoch, epoch)),
                PushAnswer::Behind { holds } if holds.is_some_and(|h| h > version) => {
                    return Err(moved(agent, act.epoch, holds.map(|h| h.epoch).unwrap_or(0)))
                }
                PushAnswer::Behind { .. } => behind.push(r.clone()),
            }
        }
        if !behind.is_empty() {
            // The task's own result is kept once it is copied: add it.
            let mut copy = self.copy_of(agent)?;
            if let Push::Delta(d) = &push {
                copy.results.extend(d.result.iter().cloned());
            }
            for r in behind {
                self.send_copy(env, &r, agent, version, &copy).await?;
            }
        }
        Ok(())
    }

    /// The node's store (tasks, audit log, documents).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The remembered turns of a conversation.
    pub fn session(&self, agent: &str, session: &str) -> Result<Turns, TaskError> {
        match self
            .store
            .get(Column::Tasks, &session_key(agent, session))
            .map_err(|e| TaskError::storage(format!("reading session {session}: {e}")))?
        {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| TaskError::storage(format!("session {session} is unreadable: {e}"))),
        }
    }

    fn check_disk(&self) -> Result<(), TaskError> {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TaskError::new(
                503,
                "disk_failed",
                "a synced write of this node failed: it runs no task and answers no stored result until it restarts".into(),
            ));
        }
        Ok(())
    }

    /// The stored result of `task_id`, if this node has one.
    pub fn stored(&self, task_id: &str) -> Result<Option<TaskAnswer>, TaskError> {
        self.answer_at(task_id, task_id.as_bytes())
    }

    /// The answer of `task_id` kept under `key`, if any.
    fn answer_at(&self, task_id: &str, key: &[u8]) -> Result<Option<TaskAnswer>, TaskError> {
        self.check_disk()?;
        let bytes = self
            .store
            .get(Column::Tasks, key)
            .map_err(|e| TaskError::storage(format!("reading task {task_id}: {e}")))?;
        bytes
            .map(|b| {
                serde_json::from_slice::<TaskAnswer>(&b).map_err(|e| {
                    TaskError::storage(format!("stored task {task_id} is unreadable: {e}"))
                })
            })
            .transpose()
    }

    /// The result of `task_id` for a resubmission of `agent` with `input`:
    /// this node's own (as its host), else its copy (as its entry node).
    /// A task id is one task: the same id for another agent or another
    /// input is refused (409), never answered with another task's result.
    pub fn replay(
        &self,
        task_id: &str,
        agent: &str,
        input: &str,
    ) -> Result<Option<TaskAnswer>, TaskError> {
        let found = match self.stored(task_id)? {
            Some(a) => Some(a),
            None => self.copy(task_id)?,
        };
        let Some(mut answer) = found else {
            return Ok(None);
        };
        if answer.agent != agent
            || answer.provenance.record.input_sha256 != audit::sha256_hex(input.as_bytes())
        {
            return Err(reused(task_id, &answer.agent));
        }
        answer.replayed = true;
        Ok(Some(answer))
    }

    fn copy_key(task_id: &str) -> Vec<u8> {
        format!("copy\0{task_id}").into_bytes()
    }

    /// The copy of `task_id`'s result this node keeps as its entry node.
    pub fn copy(&self, task_id: &str) -> Result<Option<TaskAnswer>, TaskError> {
        self.answer_at(task_id, &Self::copy_key(task_id))
    }

    /// Keeps a copy of a result at the entry node (buffered: the host holds
    /// the durable one), apart from the results this node ran as a host: a
    /// copy is what another node answered, and a host never replays one.
    /// Best effort: an error is returned to be logged.
    pub fn remember(&self, answer: &TaskAnswer) -> Result<(), TaskError> {
        let bytes = serde_json::to_vec(answer).map_err(|e| TaskError::storage(e.to_string()))?;
        let op = WriteOp::Put {
            column: Column::Tasks,
            key: Self::copy_key(&answer.task_id),
            value: bytes,
        };
        self.store
            .write(vec![op], Durability::Buffered)
            .map_err(|e| TaskError::storage(e.to_string()))
    }

    fn lock_for(&self, task_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.retain(|_, l| Arc::strong_count(l) > 1);
        running.entry(task_id.to_owned()).or_default().clone()
    }

    /// Visits this node's audit records in order, from sequence number
    /// `from`, until `visit` returns false.
    pub fn visit_audit(
        &self,
        from: u64,
        visit: &mut dyn FnMut(SealedRecord) -> bool,
    ) -> Result<(), TaskError> {
        let mut failed = None;
        self.store
            .scan(
                Column::Audit,
                &from.to_be_bytes(),
                None,
                &mut |_, v| match decode_sealed(v) {
                    Ok(r) => visit(r),
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                },
            )
            .map_err(|e| TaskError::storage(format!("reading the audit log: {e}")))?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every audit record of this node, in order.
    pub fn audit_records(&self) -> Result<Vec<SealedRecord>, TaskError> {
        let mut records = Vec::new();
        self.visit_audit(0, &mut |r| {
            records.push(r);
            true
        })?;
        Ok(records)
    }

    /// Runs `run` on this node, its host under the lease of `epoch`, once
    /// per task id; `state` is this node's applied region state.
    pub async fn execute(
        &self,
        env: &Env<'_>,
        state: &RegionState,
        run: &TaskRun,
        epoch: u64,
        hops: u8,
    ) -> Result<TaskAnswer, TaskError> {
        self.check_disk()?;
        let request = &run.request;
        let entry = state
            .agents
            .get(&request.agent)
            .filter(|e| {
                e.lease
                    .as_ref()
                    .is_some_and(|l| l.node == env.node && l.epoch == epoch)
            })
            .ok_or_else(|| {
                TaskError::new(
                    409,
                    "stale_epoch",
                    format!(
                        "agent {} moved off this node (epoch {epoch} is stale); retry through any node",
                        request.agent
                    ),
                )
            })?;
        let manifest = &entry.manifest;
        // Residency: every tag's rule must allow this region to process it
        // and the entry node's region to receive the result.
        let dataset = manifest
            .dataset
            .as_ref()
            .and_then(|d| state.datasets.get(d));
        let mut tags = request.tags.clone();
        if let Some(d) = dataset {
            tags.extend(d.tags.iter().cloned());
        }
        tags.sort();
        tags.dedup();
        check_policy(
            state.policy.as_ref(),
            manifest,
            &tags,
            env.region,
            &run.entry_region,
        )?;
        let task_id = request
            .task_id
            .clone()
            .ok_or_else(|| TaskError::new(400, "invalid_task", "a task needs its id".into()))?;
        let lock = self.lock_for(&task_id);
        let _running = lock.lock().await;
        // Active here first: a result the agent's old host answered is
        // restored with its state, and found below.
        self.ensure_active(env, state, &request.agent, epoch)
            .await?;
        #[cfg(feature = "planted-bugs")]
        let stored = match planted::on(&planted::IGNORE_STORED) {
            true => None,
            false => self.stored(&task_id)?,
        };
        #[cfg(not(feature = "planted-bugs"))]
        let stored = self.stored(&task_id)?;
        if let Some(mut answer) = stored {
            if answer.agent != request.agent
                || answer.provenance.record.input_sha256
                    != audit::sha256_hex(request.input.as_bytes())
            {
                return Err(reused(&task_id, &answer.agent));
            }
            answer.replayed = true;
            return Ok(answer);
        }
        // Per agent, under this (the host) node's region policy; a stored
        // result above cost nothing.
        let limits = state
            .policy
            .as_ref()
            .map(|p| p.rate_limits.clone())
            .unwrap_or_default();
        (env.admit)(manifest, &limits)?;
        let started = Instant::now();
        let started_at_ms = (self.now_ms)();
        let reclaims = self.claim(env, &request.agent, &task_id, epoch).await?;
        let claimed = started.elapsed().as_secs_f64() * 1000.0;
        // Agent state is read, changed and written under one lock per
        // state (a counter agent's numbers, a session's turns), so two tasks
        // at once never both read the same value and lose one change.
        let state_lock = match (manifest.kind, &request.session) {
            (mesh_types::agent::AgentKind::Counter, _) => {
                Some(self.lock_for(&format!("state\0{}", manifest.name)))
            }
            (_, Some(session)) => {
                Some(self.lock_for(&format!("state\0{}\0{session}", manifest.name)))
            }
            _ => None,
        };
        let _state = match &state_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        // The activation this task reads the agent's state under. The task
        // is recorded and copied only under that same activation (checked
        // again with its lock held, before anything is written): a task
        // never writes or copies state it read while the agent was stopped
        // or replaced here, when the local state may hold an unanswered
        // task's writes or be restored over.
        let act_lock = self.activation(&manifest.name);
        let incarnation = {
            let act = act_lock.lock().await;
            if !(act.active && act.epoch == epoch) || self.stepped_down().is_some() {
                return Err(not_copied(
                    &manifest.name,
                    &task_id,
                    "the agent was stopped on this node before the task ran".into(),
                ));
            }
            act.version.incarnation
        };
        let history = match &request.session {
            Some(session) => self.session(&manifest.name, session)?,
            None => Vec::new(),
        };
        let mut cx = Context {
            manifest,
            input: &request.input,
            dataset,
            node: env.node,
            region: env.region,
            store: &*self.store,
            models: env.models,
            history: &history,
            remember: None,
            stages_ms: Default::default(),
            tokens: env.tokens,
            epoch,
            state_writes: Vec::new(),
        };
        cx.stages_ms.insert("claim".into(), claimed);
        let output = kinds::builtin(manifest.kind).run(&mut cx).await?;
        let (remember, mut stages_ms) = (cx.remember.take(), std::mem::take(&mut cx.stages_ms));
        let state_writes = std::mem::take(&mut cx.state_writes);
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let output_bytes = serde_json::to_vec(&output).unwrap_or_default();
        let record = AuditRecord {
            task_id: task_id.clone(),
            agent: manifest.name.clone(),
            agent_version: manifest.version.clone(),
            epoch,
            models: manifest.models.iter().map(|m| m.sha256.clone()).collect(),
            node: env.node.to_owned(),
            region: env.region.to_owned(),
            policy_version: state.policy_version,
            dataset: manifest.dataset.clone(),
            tags,
            input_sha256: audit::sha256_hex(request.input.as_bytes()),
            output_sha256: audit::sha256_hex(&output_bytes),
            entry_node: run.entry_node.clone(),
            hops,
            started_at_ms,
            finished_at_ms: (self.now_ms)(),
            trace_id: run.trace_id.clone(),
            reclaims,
            moved: None,
        };
        // The record and the result in one synced batch, appended in chain
        // order, under the activation the state was read under.
        let recording = Instant::now();
        let mut act = act_lock.lock().await;
        if !(act.active && act.epoch == epoch && act.version.incarnation == incarnation)
            || self.stepped_down().is_some()
        {
            return Err(not_copied(
                &manifest.name,
                &task_id,
                "the agent was stopped or activated again on this node while the task ran".into(),
            ));
        }
        let copied = !act.replicas.is_empty();
        let mut chain = self.chain.lock().await;
        let mut next = chain.clone();
        let sealed = next.append(record);
        stages_ms.insert("record".into(), recording.elapsed().as_secs_f64() * 1000.0);
        let answer = TaskAnswer {
            task_id: task_id.clone(),
            agent: manifest.name.clone(),
            output,
            met_budget: millis <= manifest.latency_budget_ms,
            millis,
            stages_ms,
            replayed: false,
            provenance: sealed.clone(),
        };
        let encode = |e: serde_json::Error| TaskError::storage(e.to_string());
        let answer_bytes = serde_json::to_vec(&answer).map_err(encode)?;
        let mut writes = state_writes;
        // The conversation, as agent state: a turn is remembered exactly
        // when its task is recorded.
        if let (Some(session), Some(text)) = (&request.session, remember) {
            let mut history = history;
            history.push((request.input.clone(), text));
            let keep = history.len().saturating_sub(SESSION_TURNS_MAX);
            history.drain(..keep);
            writes.push((
                session_key(&manifest.name, session),
                serde_json::to_vec(&history).map_err(encode)?,
            ));
        }
        // A task's changes travel to each replica in one request: one too
        // large to travel is refused here, before anything is written, not
        // left to fail the copy (and stop the agent) on every try.
        let delta_bytes = writes
            .iter()
            .map(|(k, v)| k.len().saturating_add(v.len()))
            .fold(answer_bytes.len(), usize::saturating_add);
        if copied && delta_bytes > checkpoint::PAGE_BYTES_MAX {
            return Err(TaskError::new(
                507,
                "checkpoint_too_large",
                format!(
                    "task {task_id}'s state changes and result are {delta_bytes} bytes, more than the {} one copy to a replica carries; send a shorter input, or use a new session",
                    checkpoint::PAGE_BYTES_MAX
                ),
            ));
        }
        let mut ops = vec![WriteOp::Put {
            column: Column::Audit,
            key: sealed.seq.to_be_bytes().to_vec(),
            value: serde_json::to_vec(&sealed).map_err(encode)?,
        }];
        // The kind's state, in the same batch: a change is kept exactly
        // when its task is recorded.
        for (key, value) in &writes {
            ops.push(WriteOp::Put {
                column: Column::Tasks,
                key: key.clone(),
                value: value.clone(),
            });
        }
        // The result, listed with the agent's kept results (whose claims
        // the region forgot go, a few at a time).
        let finished_at_ms = answer.provenance.record.finished_at_ms;
        let mut result_ops = vec![
            WriteOp::Put {
                column: Column::Tasks,
                key: task_id.as_bytes().to_vec(),
                value: answer_bytes.clone(),
            },
            WriteOp::Put {
                column: Column::Tasks,
                key: kept_key(&manifest.name, finished_at_ms, &task_id),
                value: Vec::new(),
            },
        ];
        result_ops.extend(checkpoint::prune(
            &*self.store,
            &kept_prefix(&manifest.name),
            &checkpoint::claimed(state, &manifest.name),
            finished_at_ms.saturating_sub(checkpoint::RESULTS_KEPT_MS),
        )?);
        if !copied {
            // No replica to wait for: the result is kept at once.
            ops.append(&mut result_ops);
        }
        self.write_synced(ops).await.map_err(|e| {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            TaskError::storage(format!(
                "cannot write the audit record: {e}; the task's result is not returned"
            ))
        })?;
        *chain = next;
        drop(chain);
        // Every replica stores the task's changes before it is answered.
        let copying = Instant::now();
        let result = StoredResult {
            task_id: task_id.clone(),
            at_ms: finished_at_ms,
            answer: answer_bytes,
        };
        if !act.replicas.is_empty() {
            let version = Version {
                seq: act.version.seq.saturating_add(1),
                ..act.version
            };
            let delta = checkpoint::Delta {
                agent: manifest.name.clone(),
                version,
                writes,
                result: Some(result),
            };
            #[cfg(feature = "planted-bugs")]
            let skip_copy = planted::on(&planted::ANSWER_BEFORE_COPY);
            #[cfg(not(feature = "planted-bugs"))]
            let skip_copy = false;
            let copied = if skip_copy {
                Ok(())
            } else {
                self.replicate(env, &mut act, &manifest.name, delta).await
            };
            if let Err(e) = copied {
                act.active = false;
                self.set_live(&manifest.name, None);
                return Err(if e.name == "stale_epoch" {
                    e
                } else {
                    not_copied(
                        &manifest.name,
                        &task_id,
                        format!("its state could not be copied to every replica ({e})"),
                    )
                });
            }
            act.version = version;
            self.store
                .write(result_ops, Durability::Buffered)
                .map_err(|e| {
                    // Its replicas hold it: a retry must find it, not run it.
                    self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    TaskError::storage(format!("cannot keep the result of task {task_id}: {e}"))
                })?;
        }
        drop(act);
        if let Some(why) = self.stepped_down() {
            // Kept here and on the replicas: a retry is answered with it.
            return Err(not_copied(
                &manifest.name,
                &task_id,
                format!("this node stepped down before it answered ({why})"),
            ));
        }
        let mut answer = answer;
        answer
            .stages_ms
            .insert("copy".into(), copying.elapsed().as_secs_f64() * 1000.0);
        Ok(answer)
    }

    /// Claims `task_id` for this node under the lease of `epoch`; names the
    /// claim it took over, if it did (see `AuditRecord::reclaims`).
    async fn claim(
        &self,
        env: &Env<'_>,
        agent: &str,
        task_id: &str,
        epoch: u64,
    ) -> Result<Option<String>, TaskError> {
        #[cfg(feature = "planted-bugs")]
        if planted::on(&planted::SKIP_CLAIM) {
            return Ok(None);
        }
        let command = RegionCommand::ClaimTask {
            agent: agent.to_owned(),
            task_id: task_id.to_owned(),
            node: env.node.to_owned(),
            epoch,
            at_ms: (self.now_ms)(),
        };
        match env.claimer.claim(command).await? {
            RegionResponse::TaskClaimed { .. } => Ok(None),
            // The old epoch's claim: its run (if any) was not acknowledged.
            RegionResponse::TaskTakenOver { node, epoch, .. } => Ok(Some(format!("{node}@{epoch}"))),
            RegionResponse::TaskAlreadyClaimed { agent: owner, .. } if owner != agent => {
                Err(reused(task_id, &owner))
            }
            // Our own earlier claim whose answer was lost: its run left no
            // record (the result would have been found above), so run it.
            RegionResponse::TaskAlreadyClaimed { node, epoch: e, .. }
                if node == env.node && e == epoch =>
            {
                Ok(Some(format!("{node}@{e}")))
            }
            RegionResponse::TaskAlreadyClaimed { node, epoch, .. } => Err(TaskError::new(
                409,
                "claimed_elsewhere",
                format!(
                    "task {task_id} was started on node {node} (epoch {epoch}) before agent {agent} moved; it is not run twice: its result, if it finished, is on {node} (GET /v1/tasks/{task_id} there)"
                ),
            )),
            RegionResponse::ClaimRefused { lease } => Err(TaskError::new(
                409,
                "stale_epoch",
                match lease {
                    Some(l) => format!(
                        "agent {agent} moved to node {} (epoch {}); retry through any node",
                        l.node, l.epoch
                    ),
                    None => format!("agent {agent} is not placed now; retry in a few seconds"),
                },
            )),
            other => Err(TaskError::storage(format!(
                "the claim of task {task_id} was answered {other:?}"
            ))),
        }
    }

    async fn write_synced(&self, ops: Vec<WriteOp>) -> Result<(), String> {
        #[cfg(feature = "planted-bugs")]
        if planted::on(&planted::UNSYNCED_RESULTS) {
            return self
                .store
                .write(ops, Durability::Buffered)
                .map_err(|e| e.to_string());
        }
        match self.io {
            Io::Inline => self
                .store
                .write(ops, Durability::Sync)
                .map_err(|e| e.to_string()),
            Io::Blocking => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.write(ops, Durability::Sync))
                    .await
                    .map_err(|e| format!("the write did not finish: {e}"))?
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Bugs planted on purpose (feature `planted-bugs`): the simulator's test
/// switches each on and shows that a task checker catches it.
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The host runs a task without claiming it (no fence, no once-per-id
    /// across moves).
    pub static SKIP_CLAIM: AtomicBool = AtomicBool::new(false);
    /// The residency rules are not checked.
    pub static SKIP_RESIDENCY: AtomicBool = AtomicBool::new(false);
    /// A task's record and result are written without a sync.
    pub static UNSYNCED_RESULTS: AtomicBool = AtomicBool::new(false);
    /// A restarted host starts a new chain instead of resuming its own.
    pub static FORGET_CHAIN: AtomicBool = AtomicBool::new(false);
    /// A new host serves with the agent state it holds itself, without
    /// sealing and restoring from the agent's replicas.
    pub static SKIP_RESTORE: AtomicBool = AtomicBool::new(false);
    /// A host answers a task without copying its changes to the replicas.
    pub static ANSWER_BEFORE_COPY: AtomicBool = AtomicBool::new(false);
    /// A host runs a task again instead of answering its stored result.
    pub static IGNORE_STORED: AtomicBool = AtomicBool::new(false);
    /// A host out of contact with its region's majority keeps its agents.
    pub static NO_STEP_DOWN: AtomicBool = AtomicBool::new(false);

    /// Whether `bug` is on.
    pub fn on(bug: &AtomicBool) -> bool {
        bug.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use mesh_types::agent::AgentKind;
    use mesh_types::policy::ResidencyRule;
    use mesh_types::Region;

    use super::*;

    fn region(name: &str) -> Region {
        Region::parse(name).expect("region")
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "docs".into(),
            version: "1".into(),
            kind: AgentKind::Search,
            models: vec![],
            dataset: None,
            regions: vec![region("eu-west")],
            concurrency: 1,
            latency_budget_ms: 100,
        }
    }

    #[test]
    fn residency_names_where_data_is_processed_and_where_results_go() {
        let policy = Policy {
            residency: vec![ResidencyRule {
                tag: "pii-eu".into(),
                regions: vec![region("eu-west")],
                results: vec![region("eu-west"), region("eu-central")],
            }],
            ..Policy::default()
        };
        let tags = vec!["pii-eu".to_owned()];
        let check = |here: &str, entry: &str| {
            check_policy(Some(&policy), &manifest(), &tags, here, entry).map_err(|e| e.detail)
        };
        assert_eq!(check("eu-west", "eu-west"), Ok(()));
        assert_eq!(check("eu-west", "eu-central"), Ok(()), "a result region");
        let e = check("eu-west", "us-east").expect_err("not a result region");
        assert!(
            e.contains("may only go to eu-west, eu-central") && e.contains("us-east"),
            "{e}"
        );
        let e = check("eu-central", "eu-central").expect_err("not a processing region");
        assert!(e.contains("may only be processed in eu-west"), "{e}");
        // Without result regions, the processing regions are the result regions.
        let mut same = policy.clone();
        same.residency[0].results.clear();
        let e = check_policy(Some(&same), &manifest(), &tags, "eu-west", "eu-central")
            .expect_err("refused");
        assert!(e.detail.contains("may only go to eu-west "), "{}", e.detail);
        assert_eq!(e.status, 403);
    }

    #[test]
    fn a_model_the_policy_does_not_list_is_refused() {
        let policy = Policy {
            models: vec![mesh_types::policy::AllowedModel {
                name: "all-minilm-l6-v2".into(),
                sha256: "a".repeat(64),
            }],
            ..Policy::default()
        };
        let mut m = manifest();
        m.models = vec![mesh_types::agent::ModelRef {
            name: "smollm2-135m-instruct".into(),
            sha256: "b".repeat(64),
        }];
        let e = check_policy(Some(&policy), &m, &[], "eu-west", "eu-west").expect_err("refused");
        assert_eq!((e.status, e.name), (403, "model_not_allowed"));
        assert!(e.detail.contains("smollm2-135m-instruct"), "{}", e.detail);
    }

    /// Claims every task (a region group that always answers yes).
    struct YesClaimer;

    #[async_trait]
    impl Claimer for YesClaimer {
        async fn claim(&self, command: RegionCommand) -> Result<RegionResponse, TaskError> {
            Ok(match command {
                RegionCommand::SetReplicas { .. } => RegionResponse::ReplicasSet { index: 1 },
                _ => RegionResponse::TaskClaimed { index: 1 },
            })
        }
    }

    /// A single node: nobody to copy to.
    struct Alone;

    #[async_trait]
    impl Replicas for Alone {
        async fn members(&self) -> Vec<(String, bool)> {
            vec![("n1".into(), true)]
        }
        async fn push(&self, peer: &str, _: &Push) -> Result<PushAnswer, TaskError> {
            panic!("no replica to push to, yet pushed to {peer}")
        }
        async fn seal(
            &self,
            peer: &str,
            _: &str,
            _: u64,
            _: Option<Vec<u8>>,
        ) -> Result<Sealed, TaskError> {
            panic!("no replica to seal, yet sealed {peer}")
        }
    }

    /// No models (the counter needs none).
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

    fn run(input: &str, id: &str) -> TaskRun {
        TaskRun {
            request: crate::TaskRequest {
                agent: "count".into(),
                input: input.into(),
                tags: vec![],
                session: None,
                task_id: Some(id.into()),
                stream: false,
            },
            entry_node: "n1".into(),
            entry_region: "eu-west".into(),
            trace_id: "t".into(),
        }
    }

    /// The counter kind: its state changes exactly once per task, even for
    /// tasks that run at once (its state is read and written under a lock).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_counter_counts_every_task_once_even_at_once() {
        let store: Arc<dyn Store> = Arc::new(mesh_store::MemStore::default());
        let host = Arc::new(Host::open(store, Io::Blocking, Arc::new(|| 1)).expect("opens"));
        let mut state = RegionState::default();
        let mut m = manifest();
        m.name = "count".into();
        m.kind = AgentKind::Counter;
        state.agents.insert(
            "count".into(),
            consensus::AgentEntry {
                manifest: m,
                deployed_at: 1,
                lease: Some(consensus::Lease {
                    node: "n1".into(),
                    epoch: 1,
                    granted_at: 2,
                }),
                epoch: 1,
            },
        );
        let state = Arc::new(state);
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (host, state) = (host.clone(), state.clone());
                tokio::spawn(async move {
                    let admit = |_: &Manifest, _: &RateLimits| Ok(());
                    let env = Env {
                        node: "n1",
                        region: "eu-west",
                        models: &NoModels,
                        claimer: &YesClaimer,
                        admit: &admit,
                        tokens: None,
                        replicas: &Alone,
                        replica_count: 2,
                    };
                    host.execute(&env, &state, &run("k", &format!("t{i}")), 1, 0)
                        .await
                        .expect("runs")
                        .output["value"]
                        .as_i64()
                        .expect("a value")
                })
            })
            .collect();
        let mut values = Vec::new();
        for t in tasks {
            values.push(t.await.expect("task"));
        }
        values.sort_unstable();
        assert_eq!(
            values,
            (1..=20).collect::<Vec<i64>>(),
            "each task saw its own count"
        );
        let admit = |_: &Manifest, _: &RateLimits| Ok(());
        let env = Env {
            node: "n1",
            region: "eu-west",
            models: &NoModels,
            claimer: &YesClaimer,
            admit: &admit,
            tokens: None,
            replicas: &Alone,
            replica_count: 2,
        };
        let plus = host
            .execute(&env, &state, &run("k +5", "t-plus"), 1, 0)
            .await
            .expect("runs");
        assert_eq!(plus.output["value"], 25);
        let minus = host
            .execute(&env, &state, &run("k -30", "t-minus"), 1, 0)
            .await
            .expect("runs");
        assert_eq!(minus.output["value"], -5);
        // A replay changes nothing.
        let again = host
            .execute(&env, &state, &run("k +5", "t-plus"), 1, 0)
            .await
            .expect("replay");
        assert!(again.replayed);
        assert_eq!(again.output["value"], 25);
        let e = host
            .execute(&env, &state, &run("k two", "t-bad"), 1, 0)
            .await
            .expect_err("bad input");
        assert_eq!((e.status, e.name), (400, "invalid_input"));
        assert_eq!(
            host.audit_records().expect("records").len(),
            22,
            "one record a task run"
        );
    }
}
