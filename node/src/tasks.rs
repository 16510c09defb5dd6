//! Tasks (issue 13): submitted to any node, run where the agent lives.
//!
//! ```text
//!   client ─ POST /v1/tasks ─> entry node: the agent's region (its own first, else
//!            the other regions it sees, one after the other)
//!        ─ forward (libp2p) ─> POST /v1/regions/R/tasks on a node of R: the lease
//!        ─ forward (libp2p) ─> the host: epoch, residency, models, then run once per
//!                              task id, audit record + result in one synced batch
//! ```
//!
//! The task id is the idempotency key: the host keeps every result under
//! it, and a resubmission gets the stored result without running again.
//! Kinds: `echo`, `embed`, `generate` (a conversation per `--session`, kept
//! on the host as agent state, written with the task's audit record),
//! `search` and `rag` (at the dataset's node).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use consensus::Dataset;
use mesh_agent::audit::{self, AuditRecord, Chain, SealedRecord};
use mesh_store::{Column, Durability, Store, WriteOp};
use mesh_types::agent::{AgentKind, Manifest};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiState};
use crate::regions_api::{error, forward_to_peer, forward_to_region, hops, parse_region};

/// Largest task input, in bytes.
pub const INPUT_MAX: usize = 32 * 1024;
/// Most tags on a task, and their longest length.
pub const TAGS_MAX: usize = 32;
const TAG_LEN_MAX: usize = 64;
/// How long a forwarded task may take end to end (a generation on a busy
/// node's CPU takes tens of seconds; the API cuts any request at 300 s).
pub const TASK_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(240);

/// The state with the forwarding deadline of tasks.
fn for_tasks(state: &ApiState) -> ApiState {
    let mut state = state.clone();
    state.forward_timeout = TASK_FORWARD_TIMEOUT;
    state
}

/// Documents a search returns.
pub const SEARCH_TOP_K: usize = 5;
/// Documents a rag answer is given.
pub const RAG_DOCUMENTS: usize = 3;
/// Turns of a conversation kept per session.
pub const SESSION_TURNS_MAX: usize = 8;
/// New tokens of a generated answer at most.
pub const ANSWER_TOKENS_MAX: usize = 96;

/// Where a forwarded task says it entered decides where its result may go
/// (residency), so it is checked against the node that forwarded it: the
/// entry node itself, whose region the gossip view knows, or a node of this
/// region's group relaying it.
async fn check_entry(state: &ApiState, by: &str, run: &TaskRun) -> Result<(), ApiError> {
    let refused = |why: String| Err(error(StatusCode::FORBIDDEN, "bad_entry", why));
    if by != run.entry_node {
        if state.group.role_of(by).is_none() {
            return refused(format!(
                "{by} relayed a task entered at {} but is not a member of region {}'s group",
                run.entry_node, state.region
            ));
        }
        return Ok(());
    }
    let peer: libp2p::PeerId = match by.parse() {
        Ok(p) => p,
        Err(_) => return refused(format!("{by:?} is not a peer id")),
    };
    match state.network.member(&peer).await? {
        Some((_, record)) if record.region.as_str() == run.entry_region => Ok(()),
        Some((_, record)) => refused(format!(
            "{by} says the task entered in {}, but it is a node of {}",
            run.entry_region, record.region
        )),
        None => refused(format!("{by} is not a member of the mesh")),
    }
}

/// The embedding of `text` by this node's embedding model.
async fn embed_here(state: &ApiState, text: &str) -> Result<Vec<f32>, ApiError> {
    let (_, embedder) = crate::datasets::embedder(state)?;
    Ok(embedder
        .embed(vec![text.to_owned()])
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, "model_busy", e.to_string()))?
        .pop()
        .unwrap_or_default())
}

/// The `k` documents of the agent's dataset nearest `query`: the dataset
/// must be registered, and on this node (the agent moves to its data).
async fn search_here(
    state: &ApiState,
    dataset: Option<&Dataset>,
    manifest: &Manifest,
    query: &str,
    k: usize,
) -> Result<Vec<crate::datasets::Hit>, ApiError> {
    let dataset = dataset.ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "dataset_not_registered",
            format!(
                "dataset {:?} is not registered in region {} yet",
                manifest.dataset, state.region
            ),
        )
    })?;
    if dataset.node != state.peer_id {
        return Err(error(
            StatusCode::CONFLICT,
            "data_elsewhere",
            format!(
                "dataset {} is on node {}; the agent is being moved there, retry shortly",
                dataset.name, dataset.node
            ),
        ));
    }
    let query = embed_here(state, query).await?;
    crate::datasets::search(&*state.tasks.store(), &dataset.name, &query, k)
}

/// A conversation: (user, assistant) turns, oldest first.
type Turns = Vec<(String, String)>;

fn session_key(agent: &str, session: &str) -> Vec<u8> {
    format!("session\0{agent}\0{session}").into_bytes()
}

/// A chat prompt (SmolLM2's template) with earlier turns and, for rag, the
/// documents to answer from.
fn chat(history: &[(String, String)], user: &str, documents: Option<&str>) -> String {
    let system = match documents {
        None => "You are a helpful assistant. Answer briefly.".to_owned(),
        Some(docs) => format!(
            "Answer the question using only these documents, and cite the ones you use by their id in brackets, like [hr-1].\n{docs}"
        ),
    };
    let mut prompt = format!("<|im_start|>system\n{system}<|im_end|>\n");
    for (question, answer) in history {
        prompt.push_str(&format!(
            "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        ));
    }
    prompt.push_str(&format!(
        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ));
    prompt
}

/// Generates with this node's generation model.
async fn generate(state: &ApiState, prompt: String) -> Result<String, ApiError> {
    let service = state
        .models
        .services()
        .find_map(|(_, s)| match s {
            crate::models::Service::Generate(g) => Some(g.clone()),
            crate::models::Service::Embed(_) => None,
        })
        .ok_or_else(|| {
            error(
                StatusCode::CONFLICT,
                "no_generation_model",
                "this node runs no generation model: start it with --models-dir".into(),
            )
        })?;
    let params = models::Params {
        max_tokens: ANSWER_TOKENS_MAX,
        ..models::Params::default()
    };
    let busy =
        |e: models::ServeError| error(StatusCode::SERVICE_UNAVAILABLE, "model_busy", e.to_string());
    let mut pieces = service.generate(prompt, params).map_err(busy)?;
    loop {
        match pieces.recv().await {
            Some(models::Piece::Text(_)) => {}
            Some(models::Piece::Done { text, .. }) => return Ok(text.trim().to_owned()),
            Some(models::Piece::Failed(e)) => {
                return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "model_failed", e))
            }
            None => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "model_stopped",
                    "the generation model stopped before it answered".into(),
                ))
            }
        }
    }
}
/// Longest task id a client may choose.
pub const TASK_ID_MAX: usize = 128;

/// `POST /v1/tasks`: what a client submits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The agent.
    pub agent: String,
    /// The input text.
    pub input: String,
    /// Data tags of the input (residency rules apply to each).
    #[serde(default)]
    pub tags: Vec<String>,
    /// A conversation, for agents that remember one.
    #[serde(default)]
    pub session: Option<String>,
    /// The idempotency key; one is made when none is given.
    #[serde(default)]
    pub task_id: Option<String>,
}

/// A task on its way to its host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRun {
    /// The request, its task id filled in.
    pub request: TaskRequest,
    /// The node the client sent it to.
    pub entry_node: String,
    /// That node's region: where the result goes back to.
    pub entry_region: String,
    /// The trace id.
    pub trace_id: String,
}

/// What a task returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskAnswer {
    /// The task id.
    pub task_id: String,
    /// The agent.
    pub agent: String,
    /// The agent's output.
    pub output: serde_json::Value,
    /// Whether the task met the agent's latency budget on its host.
    pub met_budget: bool,
    /// How long it ran on its host, in milliseconds.
    pub millis: u64,
    /// True when this is a stored result of an earlier submission.
    #[serde(default)]
    pub replayed: bool,
    /// The audit record the host wrote before answering.
    pub provenance: SealedRecord,
}

/// The host side: the task results and the audit chain of this node.
#[derive(Debug)]
pub struct TaskHost {
    store: Arc<dyn Store>,
    chain: tokio::sync::Mutex<Chain>,
    /// A lock per task id being run, so a task id runs once however many
    /// submissions of it arrive at once.
    running: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TaskHost {
    /// The host over the node's store, its audit chain resumed.
    pub fn open(store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let last = match store.last(Column::Audit)? {
            Some((_, bytes)) => Some(decode_sealed(&bytes)?),
            None => None,
        };
        Ok(Self {
            chain: tokio::sync::Mutex::new(Chain::after(last.as_ref())),
            store,
            running: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The remembered turns of a conversation.
    pub fn session(&self, agent: &str, session: &str) -> Result<Turns, ApiError> {
        match self
            .store
            .get(Column::Tasks, &session_key(agent, session))
            .map_err(|e| internal(format!("reading session {session}: {e}")))?
        {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| internal(format!("session {session} is unreadable: {e}"))),
        }
    }

    /// The node's store (tasks, audit log, documents).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The stored result of `task_id`, if this node has one.
    pub fn stored(&self, task_id: &str) -> Result<Option<TaskAnswer>, ApiError> {
        let bytes = self
            .store
            .get(Column::Tasks, task_id.as_bytes())
            .map_err(|e| internal(format!("reading task {task_id}: {e}")))?;
        bytes
            .map(|b| {
                serde_json::from_slice::<TaskAnswer>(&b)
                    .map_err(|e| internal(format!("stored task {task_id} is unreadable: {e}")))
            })
            .transpose()
    }

    /// Keeps a copy of a result at the entry node (buffered: the host holds
    /// the durable one).
    fn remember(&self, answer: &TaskAnswer) {
        if let Ok(bytes) = serde_json::to_vec(answer) {
            let op = WriteOp::Put {
                column: Column::Tasks,
                key: answer.task_id.as_bytes().to_vec(),
                value: bytes,
            };
            if let Err(e) = self.store.write(vec![op], Durability::Buffered) {
                tracing::warn!(task = %answer.task_id, error = %e, "cannot keep a copy of a task result");
            }
        }
    }

    fn lock_for(&self, task_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.retain(|_, l| Arc::strong_count(l) > 1);
        running.entry(task_id.to_owned()).or_default().clone()
    }

    /// Every audit record of this node, in order.
    pub fn audit_records(&self) -> Result<Vec<SealedRecord>, ApiError> {
        let mut records = Vec::new();
        let mut failed = None;
        self.store
            .scan(
                Column::Audit,
                &[],
                None,
                &mut |_, v| match decode_sealed(v) {
                    Ok(r) => {
                        records.push(r);
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                },
            )
            .map_err(|e| internal(format!("reading the audit log: {e}")))?;
        match failed {
            Some(e) => Err(internal(format!("the audit log is unreadable: {e}"))),
            None => Ok(records),
        }
    }
}

fn decode_sealed(bytes: &[u8]) -> anyhow::Result<SealedRecord> {
    Ok(serde_json::from_slice(bytes)?)
}

fn internal(detail: String) -> ApiError {
    error(StatusCode::INTERNAL_SERVER_ERROR, "storage", detail)
}

fn check_request(request: &TaskRequest) -> Result<(), ApiError> {
    if request.input.len() > INPUT_MAX {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_large",
            format!(
                "the input is {} bytes; the limit is {INPUT_MAX}",
                request.input.len()
            ),
        ));
    }
    let mut problems = Vec::new();
    if request.agent.is_empty() || request.agent.len() > mesh_types::agent::NAME_MAX {
        problems.push("name the agent (--agent NAME)".to_owned());
    }
    if request.tags.len() > TAGS_MAX
        || request
            .tags
            .iter()
            .any(|t| t.is_empty() || t.len() > TAG_LEN_MAX)
    {
        problems.push(format!(
            "at most {TAGS_MAX} tags of 1 to {TAG_LEN_MAX} characters"
        ));
    }
    if request
        .session
        .as_ref()
        .is_some_and(|s| s.is_empty() || s.len() > TASK_ID_MAX)
    {
        problems.push(format!("a session id has 1 to {TASK_ID_MAX} characters"));
    }
    if let Some(id) = &request.task_id {
        let ok = !id.is_empty()
            && id.len() <= TASK_ID_MAX
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !ok {
            problems.push(format!(
                "task id {id:?}: use 1 to {TASK_ID_MAX} letters, digits and - _ . :"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_task",
            problems.join("; "),
        ))
    }
}

fn new_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_ms() -> u64 {
    mesh_net::actor::unix_now_ms()
}

/// `POST /v1/tasks` on any node.
pub async fn submit(
    State(state): State<ApiState>,
    client: Option<axum::Extension<crate::api::Client>>,
    headers: HeaderMap,
    Json(mut request): Json<TaskRequest>,
) -> Result<Response, ApiError> {
    let state = for_tasks(&state);
    check_request(&request)?;
    // Per client, under this (the entry) node's region policy.
    let limits = state
        .group
        .local_state()
        .policy
        .map(|p| p.rate_limits)
        .unwrap_or_default();
    let who = client.map(|c| c.0 .0).unwrap_or_default();
    if let Err(retry) =
        state
            .buckets
            .take(&format!("client:{who}"), &limits.per_client, Instant::now())
    {
        return Ok(crate::rate::too_many(
            format!(
                "client {who} is past its rate limit ({} tasks/s, bursts of {})",
                limits.per_client.per_second, limits.per_client.burst
            ),
            retry,
        ));
    }
    let task_id = request.task_id.clone().unwrap_or_else(new_id);
    request.task_id = Some(task_id.clone());
    if let Some(mut answer) = state.tasks.stored(&task_id)? {
        answer.replayed = true;
        return Ok(Json(answer).into_response());
    }
    let run = TaskRun {
        request,
        entry_node: state.peer_id.clone(),
        entry_region: state.region.to_string(),
        trace_id: new_id(),
    };
    let body = serde_json::to_value(&run).ok();
    // The agent's region: this node's own first, then the others it sees
    // (the view is read only when this region does not deploy it).
    let mut tried = Vec::new();
    let own = run_in_region(&state, &headers, &state.region, run.clone()).await;
    if let Some(answer) = settle(&state, own, &state.region, &mut tried).await {
        return answer;
    }
    let members = state.network.snapshot().await?.members;
    let mut others: Vec<_> = members
        .iter()
        .filter(|m| m.state == mesh_types::MemberState::Alive && m.region != state.region)
        .map(|m| m.region.clone())
        .collect();
    others.sort();
    others.dedup();
    for region in others {
        let path = format!("/v1/regions/{region}/tasks");
        let response =
            forward_to_region(&state, &headers, &region, Method::POST, &path, body.clone()).await;
        if let Some(answer) = settle(&state, response, &region, &mut tried).await {
            return answer;
        }
    }
    let known: Vec<String> = state.group.local_state().agents.keys().cloned().collect();
    Err(error(
        StatusCode::NOT_FOUND,
        "unknown_agent",
        format!(
            "no region deploys agent {:?} (asked {}); region {}'s agents: {}",
            run.request.agent,
            tried.join(", "),
            state.region,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ),
    ))
}

/// A region's answer to a task: final (relayed, a success kept at the
/// entry node), or `None` when the region does not deploy the agent or has
/// no group (the next region is asked; `tried` names it).
async fn settle(
    state: &ApiState,
    response: Result<Response, ApiError>,
    region: &mesh_types::Region,
    tried: &mut Vec<String>,
) -> Option<Result<Response, ApiError>> {
    let not_here =
        |status: StatusCode| status == StatusCode::NOT_FOUND || status == StatusCode::CONFLICT;
    match response {
        Ok(r) if not_here(r.status()) => {
            tried.push(region.to_string());
            None
        }
        Err(e) if not_here(e.status()) => {
            tried.push(region.to_string());
            None
        }
        Ok(r) => Some(Ok(remember_answer(state, r).await)),
        Err(e) => Some(Err(e)),
    }
}

/// Keeps a copy of a successful answer at the entry node and relays it.
async fn remember_answer(state: &ApiState, response: Response) -> Response {
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, mesh_net::forward::FORWARD_RESPONSE_MAX).await
    else {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "answer_too_large",
            "the task's answer could not be read".into(),
        )
        .into_response();
    };
    if let Ok(answer) = serde_json::from_slice::<TaskAnswer>(&bytes) {
        state.tasks.remember(&answer);
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `POST /v1/regions/{region}/tasks`: on a node of the agent's region.
pub async fn region_task(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    headers: HeaderMap,
    Json(run): Json<TaskRun>,
) -> Result<Response, ApiError> {
    let state = for_tasks(&state);
    let region = parse_region(&name)?;
    check_request(&run.request)?;
    if let Some(by) = forwarded_by {
        check_entry(&state, &by.0 .0, &run).await?;
    }
    if region != state.region {
        let path = format!("/v1/regions/{region}/tasks");
        let body = serde_json::to_value(&run).ok();
        return forward_to_region(&state, &headers, &region, Method::POST, &path, body).await;
    }
    run_in_region(&state, &headers, &region, run).await
}

async fn run_in_region(
    state: &ApiState,
    headers: &HeaderMap,
    region: &mesh_types::Region,
    run: TaskRun,
) -> Result<Response, ApiError> {
    if !state.group.is_bootstrapped() {
        return Err(crate::regions_api::not_bootstrapped(region));
    }
    let local = state.group.local_state();
    let Some(entry) = local.agents.get(&run.request.agent) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown_agent",
            format!("no agent {:?} in region {region}", run.request.agent),
        ));
    };
    let Some(lease) = entry.lease.clone() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_placed",
            format!(
                "agent {} is not placed on a node yet; retry in a few seconds",
                run.request.agent
            ),
        ));
    };
    if lease.node == state.peer_id {
        return run_here(state, run, lease.epoch, hops(headers)).await;
    }
    let peer = lease
        .node
        .parse()
        .map_err(|_| internal(format!("the lease names a bad peer id {}", lease.node)))?;
    let path = format!("/v1/regions/{region}/tasks");
    let body = serde_json::to_value(&run).ok();
    let direct =
        match forward_to_peer(state, headers, peer, Method::POST, &path, body.clone()).await {
            Err(e)
                if matches!(
                    e.status(),
                    StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                ) =>
            {
                e
            }
            other => return other,
        };
    // The host did not answer: another route, through another node of the
    // region (its link to the host may work). Safe to repeat: the host runs
    // a task id once.
    let members = state.network.snapshot().await?.members;
    let relay = members
        .iter()
        .filter(|m| {
            &m.region == region
                && m.state == mesh_types::MemberState::Alive
                && !m.is_self
                && m.peer_id.0 != lease.node
        })
        .find_map(|m| {
            m.peer_id
                .0
                .parse::<libp2p::PeerId>()
                .ok()
                .map(|p| (p, m.peer_id.0.clone()))
        });
    let mut tried = vec![format!("{} directly ({})", lease.node, direct.detail())];
    if let Some((relay, name)) = relay {
        if crate::regions_api::hops(headers) + 1 < 2 {
            let failed = |status: StatusCode| {
                matches!(
                    status,
                    StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                )
            };
            match forward_to_peer(state, headers, relay, Method::POST, &path, body).await {
                Err(e) if failed(e.status()) => {
                    tried.push(format!("through {name} ({})", e.detail()));
                }
                // The relay answered, but could not reach the host either.
                Ok(r) if failed(r.status()) => {
                    tried.push(format!(
                        "through {name} (it could not reach the host either)"
                    ));
                }
                other => return other,
            }
        }
    }
    Err(error(
        StatusCode::GATEWAY_TIMEOUT,
        "host_unreachable",
        format!(
            "agent {}'s host did not answer; tried {}. If the host failed, the agent is placed on a survivor within seconds: retry with the same --task-id (it runs once)",
            run.request.agent,
            tried.join(", then ")
        ),
    ))
}

fn forbidden(name: &'static str, detail: String) -> ApiError {
    error(StatusCode::FORBIDDEN, name, detail)
}

/// Runs a task on this node, its host, once per task id.
async fn run_here(
    state: &ApiState,
    run: TaskRun,
    epoch: u64,
    hops: u8,
) -> Result<Response, ApiError> {
    let local = state.group.local_state();
    let request = &run.request;
    let entry = local
        .agents
        .get(&request.agent)
        .filter(|e| {
            e.lease
                .as_ref()
                .is_some_and(|l| l.node == state.peer_id && l.epoch == epoch)
        })
        .ok_or_else(|| {
            error(
                StatusCode::CONFLICT,
                "stale_epoch",
                format!(
                    "agent {} moved off this node (epoch {epoch} is stale); retry through any node",
                    request.agent
                ),
            )
        })?;
    let manifest = entry.manifest.clone();
    // Residency: every tag's rule must allow this region to process it and
    // the entry node's region to receive the result.
    let dataset = manifest
        .dataset
        .as_ref()
        .and_then(|d| local.datasets.get(d))
        .cloned();
    let mut tags = request.tags.clone();
    if let Some(d) = &dataset {
        tags.extend(d.tags.iter().cloned());
    }
    tags.sort();
    tags.dedup();
    if let Some(policy) = &local.policy {
        for tag in &tags {
            if let Some(rule) = policy.residency.iter().find(|r| &r.tag == tag) {
                let allowed: Vec<&str> = rule.regions.iter().map(|r| r.as_str()).collect();
                if !rule.regions.contains(&state.region) {
                    return Err(forbidden(
                        "residency",
                        format!(
                            "data tagged {tag} may only be processed in {}; agent {} runs in {}",
                            allowed.join(", "),
                            request.agent,
                            state.region
                        ),
                    ));
                }
                if !allowed.contains(&run.entry_region.as_str()) {
                    return Err(forbidden(
                        "residency",
                        format!("a result from data tagged {tag} may only go to {}; this task entered in {}: submit it to a node of an allowed region", allowed.join(", "), run.entry_region),
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
                            "model {} ({}) is not allowed by region {}'s policy",
                            model.name, model.sha256, state.region
                        ),
                    ));
                }
            }
        }
    }
    let task_id = request.task_id.clone().unwrap_or_else(new_id);
    let lock = state.tasks.lock_for(&task_id);
    let _running = lock.lock().await;
    if let Some(mut answer) = state.tasks.stored(&task_id)? {
        answer.replayed = true;
        return Ok(Json(answer).into_response());
    }
    // Per agent, under this (the host) node's region policy; a stored
    // result above cost nothing.
    let limits = local
        .policy
        .as_ref()
        .map(|p| p.rate_limits.clone())
        .unwrap_or_default();
    if let Err(retry) = state.buckets.take(
        &format!("agent:{}", manifest.name),
        &limits.per_agent,
        Instant::now(),
    ) {
        return Ok(crate::rate::too_many(
            format!(
                "agent {} is past its rate limit ({} tasks/s, bursts of {})",
                manifest.name, limits.per_agent.per_second, limits.per_agent.burst
            ),
            retry,
        ));
    }
    let started = Instant::now();
    let started_at_ms = unix_ms();
    // (session, history, new answer) of a generate task with a session.
    let mut session_turn: Option<(String, Turns, String)> = None;
    let output = match manifest.kind {
        AgentKind::Echo => serde_json::Value::String(request.input.clone()),
        AgentKind::Search => {
            let hits = search_here(
                state,
                dataset.as_ref(),
                &manifest,
                &request.input,
                SEARCH_TOP_K,
            )
            .await?;
            serde_json::json!({ "hits": hits })
        }
        AgentKind::Embed => {
            let vector = embed_here(state, &request.input).await?;
            serde_json::json!({ "dims": vector.len(), "vector": vector })
        }
        AgentKind::Generate => {
            let history = match &request.session {
                Some(session) => state.tasks.session(&manifest.name, session)?,
                None => Vec::new(),
            };
            let prompt = chat(&history, &request.input, None);
            let text = generate(state, prompt).await?;
            session_turn = request
                .session
                .as_ref()
                .map(|session| (session.clone(), history, text.clone()));
            serde_json::Value::String(text)
        }
        AgentKind::Rag => {
            let hits = search_here(
                state,
                dataset.as_ref(),
                &manifest,
                &request.input,
                RAG_DOCUMENTS,
            )
            .await?;
            let context: String = hits
                .iter()
                .map(|h| format!("[{}] {}\n", h.id, h.text))
                .collect();
            let prompt = chat(&[], &request.input, Some(&context));
            let answer = generate(state, prompt).await?;
            let mut cited: Vec<&str> = hits
                .iter()
                .map(|h| h.id.as_str())
                .filter(|id| answer.contains(&format!("[{id}]")) || answer.contains(id))
                .collect();
            // The model used what it was given: when it names none, the
            // documents it was given are its sources.
            if cited.is_empty() {
                cited = hits.iter().map(|h| h.id.as_str()).collect();
            }
            serde_json::json!({ "answer": answer, "cited": cited, "documents": hits })
        }
    };
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let output_bytes = serde_json::to_vec(&output).unwrap_or_default();
    let record = AuditRecord {
        task_id: task_id.clone(),
        agent: manifest.name.clone(),
        agent_version: manifest.version.clone(),
        epoch,
        models: manifest.models.iter().map(|m| m.sha256.clone()).collect(),
        node: state.peer_id.clone(),
        region: state.region.to_string(),
        policy_version: local.policy_version,
        dataset: manifest.dataset.clone(),
        tags,
        input_sha256: audit::sha256_hex(request.input.as_bytes()),
        output_sha256: audit::sha256_hex(&output_bytes),
        entry_node: run.entry_node.clone(),
        hops,
        started_at_ms,
        finished_at_ms: unix_ms(),
        trace_id: run.trace_id.clone(),
    };
    // The record and the result in one synced batch, appended in chain order.
    let mut chain = state.tasks.chain.lock().await;
    let mut next = chain.clone();
    let sealed = next.append(record);
    let answer = TaskAnswer {
        task_id: task_id.clone(),
        agent: manifest.name.clone(),
        output,
        met_budget: millis <= manifest.latency_budget_ms,
        millis,
        replayed: false,
        provenance: sealed.clone(),
    };
    let mut ops = vec![
        WriteOp::Put {
            column: Column::Audit,
            key: sealed.seq.to_be_bytes().to_vec(),
            value: serde_json::to_vec(&sealed).map_err(|e| internal(e.to_string()))?,
        },
        WriteOp::Put {
            column: Column::Tasks,
            key: task_id.as_bytes().to_vec(),
            value: serde_json::to_vec(&answer).map_err(|e| internal(e.to_string()))?,
        },
    ];
    // The conversation, as agent state, in the same batch: a turn is
    // remembered exactly when its task is recorded.
    if let Some((session, mut history, text)) = session_turn {
        history.push((request.input.clone(), text));
        let keep = history.len().saturating_sub(SESSION_TURNS_MAX);
        history.drain(..keep);
        ops.push(WriteOp::Put {
            column: Column::Tasks,
            key: session_key(&manifest.name, &session),
            value: serde_json::to_vec(&history).map_err(|e| internal(e.to_string()))?,
        });
    }
    let store = state.tasks.store.clone();
    tokio::task::spawn_blocking(move || store.write(ops, Durability::Sync))
        .await
        .map_err(|e| internal(format!("the audit write did not finish: {e}")))?
        .map_err(|e| {
            internal(format!(
                "cannot write the audit record: {e}; the task's result is not returned"
            ))
        })?;
    *chain = next;
    Ok(Json(answer).into_response())
}

/// `GET /v1/tasks/{id}`: a result this node holds (as host or as entry node).
pub async fn get(
    State(state): State<ApiState>,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    match state.tasks.stored(&task_id)? {
        Some(answer) => Ok(Json(answer).into_response()),
        None => Err(error(
            StatusCode::NOT_FOUND,
            "unknown_task",
            format!(
                "this node holds no result of task {task_id:?}; ask the node it was submitted to"
            ),
        )),
    }
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    agent: Option<String>,
    /// Unix milliseconds.
    since: Option<u64>,
}

/// `GET /v1/audit[?agent=A&since=MS]`: this node's audit records.
pub async fn audit_log(
    State(state): State<ApiState>,
    Query(query): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let records: Vec<SealedRecord> = state
        .tasks
        .audit_records()?
        .into_iter()
        .filter(|r| query.agent.as_ref().is_none_or(|a| &r.record.agent == a))
        .filter(|r| query.since.is_none_or(|s| r.record.started_at_ms >= s))
        .collect();
    Ok(Json(records).into_response())
}

/// Answer of `GET /v1/audit/verify`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Verified {
    /// The node.
    pub node: String,
    /// Records checked.
    pub records: u64,
    /// The first problem, if any.
    pub problem: Option<String>,
}

/// `GET /v1/audit/verify`: checks this node's chain.
pub async fn audit_verify(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let records = state.tasks.audit_records()?;
    let verdict = audit::verify(&records);
    Ok(Json(Verified {
        node: state.peer_id.clone(),
        records: records.len() as u64,
        problem: verdict.err().map(|e| e.to_string()),
    })
    .into_response())
}

/// `GET /v1/regions/{region}/audit/{peer}`: the audit records of node
/// `peer` (of that region), read through any node (`audit verify --all`).
pub async fn node_audit(
    State(state): State<ApiState>,
    Path((name, peer)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if peer == state.peer_id {
        return Ok(Json(state.tasks.audit_records()?).into_response());
    }
    let target = peer.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_peer",
            format!("{peer:?} is not a peer id"),
        )
    })?;
    let path = format!("/v1/regions/{region}/audit/{peer}");
    forward_to_peer(&state, &headers, target, Method::GET, &path, None).await
}
