//! Agent state checkpoints (issue 14): an agent's state lives in rocksdb on
//! its host and is copied, after every task, to `k` other nodes of its
//! region (its replicas); a new host restores the newest copy.
//!
//! ```text
//!   host, epoch E:  task ─ claim ─ run ─ local synced batch (audit + state)
//!                        ─ Delta(E, inc, seq) to each of its k replicas ─ all stored?
//!                        ─ result kept ─ answer          (else: not answered; retry)
//!   new host, E+1:  seal(agent, E+1) on the replicas the region state names
//!                        ─ one answer at least ─ newest (epoch, incarnation, seq) wins
//!                        ─ installed
//!                        ─ Full(E+1, inc', 0) to its replicas ─ serves
//! ```
//!
//! Why no acknowledged task is lost, and why an old host cannot answer
//! after a new one started:
//! - a host names its replicas through Raft (`RegionCommand::SetReplicas`,
//!   applied only under its current lease), after it copied its whole state
//!   to them; it answers a task only after every named replica stored the
//!   task's delta (its state writes and its result). So every replica in
//!   the set the region state names holds every task the host answered;
//! - a new host seals the replicas the region state names (the old host can
//!   name no others once the new lease is granted), and restores once one
//!   of them answered: the newest copy among those that answered wins;
//! - a sealed replica refuses deltas of an older epoch (so does any replica
//!   whose applied region state knows a newer epoch): the old host, which
//!   needs every one of its replicas to answer, can answer nothing more;
//! - the new host then takes over the claims of the old epoch (see
//!   `consensus::RegionCommand::ClaimTask`): a task the old host claimed but
//!   never answered runs again on the new host, once. The old run's audit
//!   record stays in the old host's chain (chains are append-only); the
//!   answer's provenance names the run that counts.
//!
//! A task whose delta a replica did not store is not answered: the host
//! deactivates the agent, and the client's retry activates it again from
//! its replicas, so the local state never runs ahead of its copies.
//!
//! A replica keeps each agent's copy in one of two slots: deltas change the
//! current slot; a whole copy (a new activation's, or for a replica that is
//! behind) is written page by page into the other slot and becomes current
//! with its last page, so a transfer cut short never leaves a replica with
//! half a copy.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use mesh_store::{Column, Durability, Store, WriteOp};
use serde::{Deserialize, Serialize};

use crate::TaskError;

/// Replicas of an agent's state, besides its host, unless configured.
pub const REPLICAS_DEFAULT: usize = 2;

/// Results are kept with a checkpoint while the region still holds their
/// task's claim (its claim window), so a task retried on the new host is
/// answered with the old host's result, never run again. Each write prunes
/// at most this many of the oldest results whose claim is gone.
pub const PRUNE_PER_WRITE: usize = 16;

/// A result goes only once it is also this old by the clock of the host
/// that wrote the newest result (the region's claim window): a node whose
/// applied state lags, and so has not applied a result's claim yet, never
/// drops a fresh result as if its claim were gone.
pub const RESULTS_KEPT_MS: u64 = consensus::state_machine::CLAIMS_KEPT_MS;

/// Most bytes of state and results in one page of a whole copy (a node's
/// API takes request bodies of at most 64 KiB).
pub const PAGE_BYTES_MAX: usize = 48 * 1024;

/// Most bytes of one page of a seal's answer (a forwarded answer is at
/// most 4 MiB): a larger copy is read page by page.
pub const SEAL_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Most bytes of an agent's whole state and kept results: a copy larger
/// than this is refused (507), where it is staged and where it is restored.
pub const STATE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Most pages of one whole copy, so a host cannot fill a replica's disk
/// through its spare slot.
pub const PAGES_MAX: u32 = (STATE_BYTES_MAX / PAGE_BYTES_MAX) as u32 + 2;

/// Longest key of agent state.
pub const STATE_KEY_MAX: usize = 1024;

/// Which copy of an agent's state is newer: by epoch, then by the
/// activation on its host, then by task.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    /// The lease epoch it was written under.
    pub epoch: u64,
    /// The host's activation of the agent under that epoch (a host that
    /// restarts activates again, with a larger one).
    pub incarnation: u64,
    /// Tasks since the activation.
    pub seq: u64,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.epoch, self.incarnation, self.seq)
    }
}

/// A task's result, kept with the state it produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResult {
    /// The task id.
    pub task_id: String,
    /// When its host finished it (its clock, ms since the Unix epoch).
    pub at_ms: u64,
    /// The answer, as the host stores it (JSON).
    pub answer: Vec<u8>,
}

/// What one task changed: its state writes and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The agent.
    pub agent: String,
    /// The version after it (seq is the previous one's plus one).
    pub version: Version,
    /// State keys and their new values.
    pub writes: Vec<(Vec<u8>, Vec<u8>)>,
    /// The task's result.
    pub result: Option<StoredResult>,
}

/// One page of a whole copy of an agent's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The agent.
    pub agent: String,
    /// The copy's version.
    pub version: Version,
    /// Its number, from 0.
    pub page: u32,
    /// The copy's last page: with it, the copy is the replica's.
    pub last: bool,
    /// State keys and values.
    pub state: Vec<(Vec<u8>, Vec<u8>)>,
    /// Results.
    pub results: Vec<StoredResult>,
}

/// What a host sends its replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// One task's changes.
    Delta(Delta),
    /// A page of a whole copy.
    Page(Page),
}

impl Push {
    /// The agent it is for.
    pub fn agent(&self) -> &str {
        match self {
            Push::Delta(d) => &d.agent,
            Push::Page(p) => &p.agent,
        }
    }

    /// The version it carries.
    pub fn version(&self) -> Version {
        match self {
            Push::Delta(d) => d.version,
            Push::Page(p) => p.version,
        }
    }
}

/// A replica's answer to a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushAnswer {
    /// Stored (synced).
    Stored,
    /// Not the next delta of what it holds: send a whole copy.
    Behind {
        /// What it holds.
        holds: Option<Version>,
    },
    /// The epoch is stale: the agent was activated elsewhere since.
    Fenced {
        /// The epoch the replica knows.
        epoch: u64,
    },
}

/// What a replica held when it was sealed: one page of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Its version (`None`: it holds no copy of the agent).
    pub version: Option<Version>,
    /// State keys and values.
    pub state: Vec<(Vec<u8>, Vec<u8>)>,
    /// Results of the claim window.
    pub results: Vec<StoredResult>,
    /// Where the next page starts, if there is one (ask again with it).
    pub next: Option<Vec<u8>>,
}

/// How a host reaches the other nodes of its region (libp2p in a node,
/// simulated links in the simulator).
#[async_trait]
pub trait Replicas: Send + Sync {
    /// The members of the region's group (voters and learners, this node
    /// included) and whether each is alive in this node's view.
    async fn members(&self) -> Vec<(String, bool)>;
    /// Sends `push` to `peer`'s replica.
    async fn push(&self, peer: &str, push: &Push) -> Result<PushAnswer, TaskError>;
    /// Seals `agent`'s copy on `peer` at `epoch` and returns its first page
    /// (`after: None`), or the page after `after` of the copy sealed.
    async fn seal(
        &self,
        peer: &str,
        agent: &str,
        epoch: u64,
        after: Option<Vec<u8>>,
    ) -> Result<Sealed, TaskError>;
}

/// Whether node `by` may push or seal `agent`'s copies at `epoch`, by the
/// replica's applied region `state`: only the agent's host at that very
/// epoch may (no other member can overwrite or fence an agent's copies).
/// `Ok(None)`: yes; `Ok(Some(known))`: the epoch is older than the
/// replica knows (a push is answered `Fenced`); an error otherwise (503
/// `behind` when this replica's state does not know the epoch yet).
pub fn check_sender(
    state: &consensus::RegionState,
    by: &str,
    agent: &str,
    epoch: u64,
) -> Result<Option<u64>, TaskError> {
    let entry = state.agents.get(agent);
    let known = entry.map(|e| e.epoch).unwrap_or(0);
    if epoch < known {
        return Ok(Some(known));
    }
    match entry.and_then(|e| e.lease.as_ref()) {
        Some(l) if l.epoch == epoch && l.node == by => Ok(None),
        Some(l) if l.epoch == epoch => Err(TaskError::new(
            403,
            "not_a_host",
            format!("node {by} is not agent {agent}'s host at epoch {epoch} ({} is)", l.node),
        )),
        _ => Err(TaskError::new(
            503,
            "behind",
            format!("this node's region state does not know epoch {epoch} of agent {agent} yet (it knows {known}); retry"),
        )),
    }
}

/// The members of a region's group (`voters`, then `learners`) and
/// whether each may take copies: `me`, and the others `alive` in this
/// node's view that are not draining in `state` (a draining node is about
/// to stop).
pub fn copy_targets(
    state: &consensus::RegionState,
    me: &str,
    voters: Vec<String>,
    learners: Vec<String>,
    alive: impl Fn(&str) -> bool,
) -> Vec<(String, bool)> {
    voters
        .into_iter()
        .chain(learners)
        .map(|m| {
            let ok = m == me || (!state.draining.contains(&m) && alive(&m));
            (m, ok)
        })
        .collect()
}

/// The `k` replicas of `agent` hosted on `host`: the members other than the
/// host that are alive, ranked by a hash of agent and member (so agents
/// spread over the region, and a member that goes changes one choice).
pub fn choose(agent: &str, host: &str, members: &[(String, bool)], k: usize) -> Vec<String> {
    let mut ranked: Vec<(String, &String)> = members
        .iter()
        .filter(|(m, alive)| *alive && m != host)
        .map(|(m, _)| {
            (
                mesh_agent::audit::sha256_hex(format!("{agent}\0{m}").as_bytes()),
                m,
            )
        })
        .collect();
    ranked.sort();
    ranked.into_iter().take(k).map(|(_, m)| m.clone()).collect()
}

/// Where state keys of `agent` live on its host: every kind keeps its
/// state under one of these.
pub fn state_prefixes(agent: &str) -> [Vec<u8>; 2] {
    [
        format!("counter\0{agent}\0").into_bytes(),
        format!("session\0{agent}\0").into_bytes(),
    ]
}

/// Whether `key` is a state key of `agent`.
pub fn is_state_key(agent: &str, key: &[u8]) -> bool {
    key.len() <= STATE_KEY_MAX && state_prefixes(agent).iter().any(|p| key.starts_with(p))
}

/// The end of the range of keys that start with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

/// A replica's bookkeeping for one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// The version of the current slot's copy.
    version: Option<Version>,
    /// The current slot (0 or 1).
    slot: u8,
    /// The highest epoch it was sealed at: pushes below it are refused.
    sealed: u64,
    /// A whole copy being written into the other slot: its version and the
    /// page expected next.
    staging: Option<(Version, u32)>,
}

fn meta_key(agent: &str) -> Vec<u8> {
    format!("ckpt\0m\0{agent}").into_bytes()
}

fn slot_prefix(agent: &str, slot: u8, part: u8) -> Vec<u8> {
    let mut key = format!("ckpt\0d\0{agent}\0").into_bytes();
    key.push(slot);
    key.push(part);
    key
}

fn state_key(agent: &str, slot: u8, key: &[u8]) -> Vec<u8> {
    let mut k = slot_prefix(agent, slot, b's');
    k.extend_from_slice(key);
    k
}

fn result_key(agent: &str, slot: u8, at_ms: u64, task_id: &str) -> Vec<u8> {
    let mut k = slot_prefix(agent, slot, b'r');
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(task_id.as_bytes());
    k
}

fn storage(what: &str, e: impl std::fmt::Display) -> TaskError {
    TaskError::storage(format!("checkpoint store: {what}: {e}"))
}

/// The copies of other hosts' agents that this node keeps.
pub struct ReplicaStore {
    store: Arc<dyn Store>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore").finish_non_exhaustive()
    }
}

pub(crate) fn too_large(agent: &str) -> TaskError {
    TaskError::new(
        507,
        "checkpoint_too_large",
        format!(
            "agent {agent}'s state and kept results are larger than {STATE_BYTES_MAX} bytes, the most a copy holds; keep the agent's state smaller (fewer keys, shorter sessions)"
        ),
    )
}

/// Whether `state` still holds the claim of a task id for `agent` (its
/// result is kept while it does).
pub fn claimed<'a>(
    state: &'a consensus::RegionState,
    agent: &'a str,
) -> impl Fn(&str) -> bool + Sync + 'a {
    move |id| state.claims.get(id).is_some_and(|c| c.agent == agent)
}

/// Deletes for at most [`PRUNE_PER_WRITE`] of the oldest results under
/// `prefix` (keys: `prefix`, the result's time in ms, big-endian, its task
/// id) that are both older than `before_ms` and no longer `claimed`: a
/// result goes once its claim has left the region's claim window, never
/// before (a lagging node's missing claim alone is not enough, nor a clock
/// alone).
pub(crate) fn prune(
    store: &dyn Store,
    prefix: &[u8],
    claimed: &(dyn Fn(&str) -> bool + Sync),
    before_ms: u64,
) -> Result<Vec<WriteOp>, TaskError> {
    let mut ops = Vec::new();
    let mut seen = 0usize;
    store
        .scan(
            Column::Tasks,
            prefix,
            Some(&prefix_end(prefix)),
            &mut |k, _| {
                seen += 1;
                let at_ms = k
                    .get(prefix.len()..prefix.len() + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                if at_ms >= before_ms {
                    // In time order: the rest are newer.
                    return false;
                }
                let id = k.get(prefix.len() + 8..).unwrap_or_default();
                if !claimed(&String::from_utf8_lossy(id)) {
                    ops.push(WriteOp::Delete {
                        column: Column::Tasks,
                        key: k.to_vec(),
                    });
                }
                seen < PRUNE_PER_WRITE
            },
        )
        .map_err(|e| storage("reading", e))?;
    Ok(ops)
}

fn bad(detail: String) -> TaskError {
    TaskError::new(400, "invalid_checkpoint", detail)
}

/// Checks what a push carries: keys of the agent's state only, sizes bounded.
fn check_push(push: &Push) -> Result<(), TaskError> {
    let agent = push.agent();
    let (writes, results): (&[(Vec<u8>, Vec<u8>)], Vec<&StoredResult>) = match push {
        Push::Delta(d) => (&d.writes, d.result.iter().collect()),
        Push::Page(p) => (&p.state, p.results.iter().collect()),
    };
    if let Some((key, _)) = writes.iter().find(|(k, _)| !is_state_key(agent, k)) {
        return Err(bad(format!(
            "key {:?} is not a state key of agent {agent}",
            String::from_utf8_lossy(key)
        )));
    }
    if let Some(r) = results.iter().find(|r| !crate::is_task_id(&r.task_id)) {
        return Err(bad(format!(
            "result task id {:?} is not a task id (1 to {} letters, digits and - _ . :)",
            r.task_id,
            crate::TASK_ID_MAX
        )));
    }
    Ok(())
}

impl ReplicaStore {
    /// Over the node's store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self, agent: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(agent.to_owned()).or_default().clone()
    }

    fn meta(&self, agent: &str) -> Result<Meta, TaskError> {
        match self
            .store
            .get(Column::Tasks, &meta_key(agent))
            .map_err(|e| storage("reading", e))?
        {
            None => Ok(Meta::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| storage("unreadable", e)),
        }
    }

    fn meta_op(agent: &str, meta: &Meta) -> Result<WriteOp, TaskError> {
        Ok(WriteOp::Put {
            column: Column::Tasks,
            key: meta_key(agent),
            value: serde_json::to_vec(meta).map_err(|e| storage("encoding", e))?,
        })
    }

    /// Stores `push` if it is the next thing this replica should hold;
    /// `epoch` is the agent's epoch in this node's applied region state,
    /// and `claimed` says whether a task id is still claimed there.
    pub async fn receive(
        &self,
        push: &Push,
        epoch: u64,
        claimed: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<PushAnswer, TaskError> {
        check_push(push)?;
        let agent = push.agent();
        let lock = self.lock(agent);
        let _held = lock.lock().await;
        let mut meta = self.meta(agent)?;
        let version = push.version();
        let known = meta.sealed.max(epoch);
        if version.epoch < known {
            return Ok(PushAnswer::Fenced { epoch: known });
        }
        let mut ops = Vec::new();
        match push {
            Push::Delta(delta) => {
                let next = meta.version.is_some_and(|v| {
                    v.epoch == version.epoch
                        && v.incarnation == version.incarnation
                        && v.seq.checked_add(1) == Some(version.seq)
                });
                let again = meta.version.is_some_and(|v| {
                    v.epoch == version.epoch
                        && v.incarnation == version.incarnation
                        && v.seq >= version.seq
                });
                if again {
                    // A push of the same host's activation sent again.
                    return Ok(PushAnswer::Stored);
                }
                if !next {
                    return Ok(PushAnswer::Behind {
                        holds: meta.version,
                    });
                }
                let slot = meta.slot;
                for (key, value) in &delta.writes {
                    ops.push(WriteOp::Put {
                        column: Column::Tasks,
                        key: state_key(agent, slot, key),
                        value: value.clone(),
                    });
                }
                if let Some(result) = &delta.result {
                    ops.push(WriteOp::Put {
                        column: Column::Tasks,
                        key: result_key(agent, slot, result.at_ms, &result.task_id),
                        value: serde_json::to_vec(result).map_err(|e| storage("encoding", e))?,
                    });
                }
                // Results whose claim the region forgot go.
                if let Some(result) = &delta.result {
                    ops.extend(prune(
                        &*self.store,
                        &slot_prefix(agent, slot, b'r'),
                        claimed,
                        result.at_ms.saturating_sub(RESULTS_KEPT_MS),
                    )?);
                }
                meta.version = Some(version);
            }
            Push::Page(page) => {
                if meta.version.is_some_and(|v| v >= version) {
                    // Holds this copy or a newer one already.
                    return Ok(if meta.version == Some(version) {
                        PushAnswer::Stored
                    } else {
                        PushAnswer::Behind {
                            holds: meta.version,
                        }
                    });
                }
                let spare = 1 - meta.slot.min(1);
                if page.page == 0 {
                    for part in [b's', b'r'] {
                        let from = slot_prefix(agent, spare, part);
                        ops.push(WriteOp::DeleteRange {
                            column: Column::Tasks,
                            to: prefix_end(&from),
                            from,
                        });
                    }
                } else if meta.staging != Some((version, page.page)) {
                    return Ok(PushAnswer::Behind {
                        holds: meta.version,
                    });
                }
                if page.page >= PAGES_MAX {
                    return Err(too_large(agent));
                }
                for (key, value) in &page.state {
                    ops.push(WriteOp::Put {
                        column: Column::Tasks,
                        key: state_key(agent, spare, key),
                        value: value.clone(),
                    });
                }
                for result in &page.results {
                    ops.push(WriteOp::Put {
                        column: Column::Tasks,
                        key: result_key(agent, spare, result.at_ms, &result.task_id),
                        value: serde_json::to_vec(result).map_err(|e| storage("encoding", e))?,
                    });
                }
                if page.last {
                    meta.slot = spare;
                    meta.version = Some(version);
                    meta.staging = None;
                } else {
                    meta.staging = Some((version, page.page.saturating_add(1)));
                }
            }
        }
        ops.push(Self::meta_op(agent, &meta)?);
        self.store
            .write(ops, Durability::Sync)
            .map_err(|e| storage("writing", e))?;
        Ok(PushAnswer::Stored)
    }

    /// Refuses every later push of `agent` below `epoch`, and returns the
    /// first page of the copy held (`after: None`); with `after` (a page's
    /// `next`), the page after it, of a copy sealed at `epoch` already.
    pub async fn seal(
        &self,
        agent: &str,
        epoch: u64,
        after: Option<&[u8]>,
    ) -> Result<Sealed, TaskError> {
        let lock = self.lock(agent);
        let _held = lock.lock().await;
        let mut meta = self.meta(agent)?;
        match after {
            None if epoch > meta.sealed => {
                meta.sealed = epoch;
                self.store
                    .write(vec![Self::meta_op(agent, &meta)?], Durability::Sync)
                    .map_err(|e| storage("writing", e))?;
            }
            None => {}
            Some(_) if meta.sealed != epoch => {
                return Err(TaskError::new(
                    409,
                    "stale_epoch",
                    format!("agent {agent}'s copy here is sealed at epoch {}, not {epoch}: read it again from its first page", meta.sealed),
                ))
            }
            Some(_) => {}
        }
        let Some(version) = meta.version else {
            return Ok(Sealed::default());
        };
        let mut sealed = Sealed {
            version: Some(version),
            ..Sealed::default()
        };
        // The slot's results ('r') then its state ('s'), in key order.
        let base = slot_prefix(agent, meta.slot, b'r');
        let base = &base[..base.len() - 1];
        let from = match after {
            None => slot_prefix(agent, meta.slot, b'r'),
            Some(cursor) => {
                let mut k = base.to_vec();
                k.extend_from_slice(cursor);
                k.push(0);
                k
            }
        };
        let to = prefix_end(&slot_prefix(agent, meta.slot, b's'));
        let mut size = 0usize;
        let mut failed = None;
        let mut last_key = Vec::new();
        self.store
            .scan(Column::Tasks, &from, Some(&to), &mut |k, v| {
                if size >= SEAL_PAGE_BYTES {
                    // Full: the next page starts after the last key taken.
                    sealed.next = Some(last_key.clone());
                    return false;
                }
                last_key = k.get(base.len()..).unwrap_or_default().to_vec();
                size = size.saturating_add(k.len() + v.len());
                match k.get(base.len()) {
                    Some(b'r') => match serde_json::from_slice::<StoredResult>(v) {
                        Ok(r) => sealed.results.push(r),
                        Err(e) => failed = Some(storage("a result is unreadable", e)),
                    },
                    _ => {
                        let key = k.get(base.len() + 1..).unwrap_or_default();
                        sealed.state.push((key.to_vec(), v.to_vec()));
                    }
                }
                failed.is_none()
            })
            .map_err(|e| storage("reading", e))?;
        match failed {
            Some(e) => Err(e),
            None => Ok(sealed),
        }
    }
}

/// Splits a whole copy into pages of at most [`PAGE_BYTES_MAX`] bytes
/// (one page at least, the last one marked).
pub fn pages(agent: &str, version: Version, copy: &Sealed) -> Vec<Page> {
    let mut pages = vec![Page {
        agent: agent.to_owned(),
        version,
        page: 0,
        last: false,
        state: Vec::new(),
        results: Vec::new(),
    }];
    let mut size = 0usize;
    let mut room = |pages: &mut Vec<Page>, bytes: usize| {
        if size > 0 && size + bytes > PAGE_BYTES_MAX {
            let page = u32::try_from(pages.len()).unwrap_or(u32::MAX);
            pages.push(Page {
                agent: agent.to_owned(),
                version,
                page,
                last: false,
                state: Vec::new(),
                results: Vec::new(),
            });
            size = 0;
        }
        size += bytes;
    };
    for (k, v) in &copy.state {
        room(&mut pages, k.len() + v.len() + 16);
        if let Some(p) = pages.last_mut() {
            p.state.push((k.clone(), v.clone()));
        }
    }
    for r in &copy.results {
        room(&mut pages, r.task_id.len() + r.answer.len() + 32);
        if let Some(p) = pages.last_mut() {
            p.results.push(r.clone());
        }
    }
    if let Some(p) = pages.last_mut() {
        p.last = true;
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(epoch: u64, incarnation: u64, seq: u64) -> Version {
        Version {
            epoch,
            incarnation,
            seq,
        }
    }

    fn delta(epoch: u64, inc: u64, seq: u64, value: &str) -> Push {
        Push::Delta(Delta {
            agent: "c".into(),
            version: v(epoch, inc, seq),
            writes: vec![(b"counter\0c\0k".to_vec(), value.as_bytes().to_vec())],
            result: Some(StoredResult {
                task_id: format!("t{epoch}.{inc}.{seq}"),
                at_ms: 1_000 + seq,
                answer: value.as_bytes().to_vec(),
            }),
        })
    }

    fn full(epoch: u64, inc: u64, value: &str) -> Vec<Push> {
        let copy = Sealed {
            version: None,
            state: vec![(b"counter\0c\0k".to_vec(), value.as_bytes().to_vec())],
            ..Sealed::default()
        };
        pages("c", v(epoch, inc, 0), &copy)
            .into_iter()
            .map(Push::Page)
            .collect()
    }

    fn replica() -> ReplicaStore {
        ReplicaStore::new(Arc::new(mesh_store::MemStore::default()))
    }

    #[tokio::test]
    async fn deltas_follow_a_whole_copy_in_order_and_a_gap_asks_for_a_copy() {
        let r = replica();
        assert_eq!(
            r.receive(&delta(1, 1, 1, "1"), 1, &|_| true).await.unwrap(),
            PushAnswer::Behind { holds: None }
        );
        for page in full(1, 1, "0") {
            assert_eq!(
                r.receive(&page, 1, &|_| true).await.unwrap(),
                PushAnswer::Stored
            );
        }
        assert_eq!(
            r.receive(&delta(1, 1, 1, "1"), 1, &|_| true).await.unwrap(),
            PushAnswer::Stored
        );
        assert_eq!(
            r.receive(&delta(1, 1, 1, "1"), 1, &|_| true).await.unwrap(),
            PushAnswer::Stored,
            "sent again"
        );
        assert_eq!(
            r.receive(&delta(1, 1, 3, "3"), 1, &|_| true).await.unwrap(),
            PushAnswer::Behind {
                holds: Some(v(1, 1, 1))
            }
        );
        let sealed = r.seal("c", 1, None).await.unwrap();
        assert_eq!(sealed.version, Some(v(1, 1, 1)));
        assert_eq!(
            sealed.state,
            vec![(b"counter\0c\0k".to_vec(), b"1".to_vec())]
        );
        assert_eq!(sealed.results.len(), 1);
    }

    #[tokio::test]
    async fn a_seal_fences_older_epochs_and_so_does_the_applied_state() {
        let r = replica();
        for page in full(1, 1, "0") {
            r.receive(&page, 1, &|_| true).await.unwrap();
        }
        r.seal("c", 2, None).await.unwrap();
        assert_eq!(
            r.receive(&delta(1, 1, 1, "1"), 1, &|_| true).await.unwrap(),
            PushAnswer::Fenced { epoch: 2 }
        );
        assert_eq!(
            r.receive(&delta(2, 1, 1, "1"), 3, &|_| true).await.unwrap(),
            PushAnswer::Fenced { epoch: 3 },
            "the region state knows a newer epoch"
        );
        let sealed = r.seal("c", 2, None).await.unwrap();
        assert_eq!(sealed.version, Some(v(1, 1, 0)), "nothing fenced was kept");
    }

    #[tokio::test]
    async fn a_copy_cut_short_leaves_the_previous_one_whole() {
        let r = replica();
        for page in full(1, 1, "old") {
            r.receive(&page, 1, &|_| true).await.unwrap();
        }
        let big = Sealed {
            version: None,
            state: (0..40)
                .map(|i| {
                    (
                        format!("counter\0c\0{i}").into_bytes(),
                        vec![b'x'; 8 * 1024],
                    )
                })
                .collect(),
            ..Sealed::default()
        };
        let pages = pages("c", v(2, 1, 0), &big);
        assert!(pages.len() > 2);
        r.receive(&Push::Page(pages[0].clone()), 2, &|_| true)
            .await
            .unwrap();
        r.receive(&Push::Page(pages[1].clone()), 2, &|_| true)
            .await
            .unwrap();
        let sealed = r.seal("c", 2, None).await.unwrap();
        assert_eq!(sealed.version, Some(v(1, 1, 0)));
        assert_eq!(
            sealed.state,
            vec![(b"counter\0c\0k".to_vec(), b"old".to_vec())]
        );
        // A page out of order is refused, the whole copy in order is taken.
        assert!(matches!(
            r.receive(&Push::Page(pages[2].clone()), 2, &|_| true)
                .await
                .unwrap(),
            PushAnswer::Stored | PushAnswer::Behind { .. }
        ));
        for page in &pages {
            r.receive(&Push::Page(page.clone()), 2, &|_| true)
                .await
                .unwrap();
        }
        let sealed = r.seal("c", 2, None).await.unwrap();
        assert_eq!(sealed.version, Some(v(2, 1, 0)));
        assert_eq!(sealed.state.len(), 40);
    }

    #[tokio::test]
    async fn a_copy_larger_than_a_seal_can_answer_is_refused_while_staged() {
        let r = replica();
        let page = |n: u32| {
            Push::Page(Page {
                agent: "c".into(),
                version: v(1, 1, 0),
                page: n,
                last: false,
                state: vec![(format!("counter\0c\0{n}").into_bytes(), vec![b'x'; 1024])],
                results: Vec::new(),
            })
        };
        for n in 0..PAGES_MAX {
            assert_eq!(
                r.receive(&page(n), 1, &|_| true).await.unwrap(),
                PushAnswer::Stored
            );
        }
        let e = r.receive(&page(PAGES_MAX), 1, &|_| true).await.unwrap_err();
        assert_eq!((e.status, e.name), (507, "checkpoint_too_large"));
    }

    /// Reads a whole copy page by page, as a restoring host does.
    async fn read_all(r: &ReplicaStore, epoch: u64) -> Sealed {
        let mut all = r.seal("c", epoch, None).await.unwrap();
        let mut pages = 1;
        while let Some(after) = all.next.take() {
            let page = r.seal("c", epoch, Some(&after)).await.unwrap();
            assert_eq!(page.version, all.version);
            all.state.extend(page.state);
            all.results.extend(page.results);
            all.next = page.next;
            pages += 1;
        }
        assert!(pages >= 1);
        all
    }

    #[tokio::test]
    async fn a_copy_larger_than_a_page_is_read_whole_page_by_page() {
        let r = replica();
        let big = Sealed {
            state: (0..48)
                .map(|i| {
                    (
                        format!("counter\0c\0{i:02}").into_bytes(),
                        vec![b'x'; 60 * 1024],
                    )
                })
                .collect(),
            ..Sealed::default()
        };
        for page in pages("c", v(1, 1, 0), &big) {
            r.receive(&Push::Page(page), 1, &|_| true).await.unwrap();
        }
        r.receive(&delta(1, 1, 1, "1"), 1, &|_| true).await.unwrap();
        let first = r.seal("c", 2, None).await.unwrap();
        assert!(first.next.is_some(), "more than one page");
        let all = read_all(&r, 2).await;
        assert_eq!(all.state.len(), 49, "every key once (48 and the delta's)");
        assert_eq!(all.results.len(), 1);
        // Another epoch's seal since: the pages of this one are refused.
        r.seal("c", 3, None).await.unwrap();
        let e = r.seal("c", 2, first.next.as_deref()).await.unwrap_err();
        assert_eq!(e.name, "stale_epoch");
    }

    #[tokio::test]
    async fn results_go_only_once_their_claim_is_gone() {
        let r = replica();
        for page in full(1, 1, "0") {
            r.receive(&page, 1, &|_| true).await.unwrap();
        }
        for seq in 1..=3 {
            r.receive(&delta(1, 1, seq, "x"), 1, &|_| true)
                .await
                .unwrap();
        }
        // t1.1.1's claim is not (yet) in this replica's state, but the
        // result is recent: it stays (a lagging replica drops nothing).
        r.receive(&delta(1, 1, 4, "x"), 1, &|id| id != "t1.1.1")
            .await
            .unwrap();
        assert_eq!(read_all(&r, 1).await.results.len(), 4);
        // A result a claim window later: the one whose claim is gone goes.
        let mut late = delta(1, 1, 5, "x");
        if let Push::Delta(d) = &mut late {
            if let Some(res) = &mut d.result {
                res.at_ms += RESULTS_KEPT_MS;
            }
        }
        r.receive(&late, 1, &|id| id != "t1.1.1").await.unwrap();
        let ids: Vec<String> = read_all(&r, 1)
            .await
            .results
            .into_iter()
            .map(|r| r.task_id)
            .collect();
        assert_eq!(ids, ["t1.1.2", "t1.1.3", "t1.1.4", "t1.1.5"]);
    }

    #[tokio::test]
    async fn only_the_agents_own_state_keys_are_taken() {
        let r = replica();
        let evil = Push::Delta(Delta {
            agent: "c".into(),
            version: v(1, 1, 1),
            writes: vec![(b"ckpt\0m\0c".to_vec(), b"{}".to_vec())],
            result: None,
        });
        assert_eq!(
            r.receive(&evil, 1, &|_| true).await.unwrap_err().name,
            "invalid_checkpoint"
        );
        let other = Push::Delta(Delta {
            agent: "c".into(),
            version: v(1, 1, 1),
            writes: vec![(b"counter\0d\0k".to_vec(), b"1".to_vec())],
            result: None,
        });
        assert!(
            r.receive(&other, 1, &|_| true).await.is_err(),
            "another agent's key"
        );
    }

    #[test]
    fn replicas_are_live_members_other_than_the_host_chosen_alike_everywhere() {
        let mut members: Vec<(String, bool)> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|m| (m.to_string(), true))
            .collect();
        let r = choose("agent", "a", &members, 2);
        assert_eq!(r.len(), 2);
        assert!(!r.contains(&"a".to_owned()));
        assert_eq!(r, choose("agent", "a", &members, 2), "deterministic");
        // A member that goes changes only its own place.
        let gone = r[0].clone();
        for m in members.iter_mut().filter(|(m, _)| *m == gone) {
            m.1 = false;
        }
        let after = choose("agent", "a", &members, 2);
        assert!(after.contains(&r[1]) && !after.contains(&gone));
        assert_eq!(choose("agent", "a", &members[..1], 2), Vec::<String>::new());
    }
}
