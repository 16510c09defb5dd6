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
//! it, and a resubmission gets the stored result without running again;
//! before it runs a task, the host claims its id through the region's Raft
//! group (fenced by the lease's epoch), so a task id runs once in its
//! region even when its agent moves. What the host does is
//! `mesh_task::Host::execute` (the simulator runs the same code); the
//! kinds (`echo`, `embed`, `generate`, `search`, `rag`) are
//! `mesh_task::kinds`. This module is the HTTP and libp2p side: the entry
//! node, the routing to the host, the node's models and claims.

use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use consensus::{RegionCommand, RegionResponse};
use mesh_agent::audit::{self, SealedRecord};
use mesh_task::TaskError;
pub use mesh_task::{TaskAnswer, TaskRequest, TaskRun};
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

/// This node's models, as the agent kinds use them.
struct NodeModels<'a>(&'a ApiState);

#[async_trait::async_trait]
impl mesh_task::Models for NodeModels<'_> {
    async fn embed(&self, text: &str) -> Result<Vec<f32>, TaskError> {
        let (_, embedder) = crate::datasets::embedder(self.0).map_err(task_error)?;
        Ok(embedder
            .embed(vec![text.to_owned()])
            .await
            .map_err(|e| TaskError::new(503, "model_busy", e.to_string()))?
            .pop()
            .unwrap_or_default())
    }

    async fn generate(
        &self,
        prompt: String,
        tokens: Option<&mesh_task::kinds::TokenSink>,
    ) -> Result<String, TaskError> {
        let service = self
            .0
            .models
            .services()
            .find_map(|(_, s)| match s {
                crate::models::Service::Generate(g) => Some(g.clone()),
                crate::models::Service::Embed(_) => None,
            })
            .ok_or_else(|| {
                TaskError::new(
                    409,
                    "no_generation_model",
                    "this node runs no generation model: start it with --models-dir".into(),
                )
            })?;
        let params = models::Params {
            max_tokens: ANSWER_TOKENS_MAX,
            ..models::Params::default()
        };
        let busy = |e: models::ServeError| TaskError::new(503, "model_busy", e.to_string());
        let mut pieces = service.generate(prompt, params).map_err(busy)?;
        loop {
            match pieces.recv().await {
                Some(models::Piece::Text(piece)) => {
                    if let Some(sink) = tokens {
                        sink(&piece);
                    }
                }
                Some(models::Piece::Done { text, .. }) => return Ok(text.trim().to_owned()),
                Some(models::Piece::Failed(e)) => {
                    return Err(TaskError::new(500, "model_failed", e))
                }
                None => {
                    return Err(TaskError::new(
                        503,
                        "model_stopped",
                        "the generation model stopped before it answered".into(),
                    ))
                }
            }
        }
    }
}

/// A task error as the API answers it.
pub(crate) fn task_error_into(e: TaskError) -> ApiError {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, e.name, e.detail)
}

/// An API error as a task error (the models' errors are the API's).
fn task_error(e: ApiError) -> TaskError {
    TaskError::new(
        e.status().as_u16(),
        "model_unavailable",
        e.detail().to_owned(),
    )
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        task_error_into(e)
    }
}

/// Claims go to the region's leader: proposed here when this node leads,
/// else forwarded to it over libp2p (`POST /v1/regions/R/claims`).
struct NodeClaimer<'a>(&'a ApiState);

#[async_trait::async_trait]
impl mesh_task::Claimer for NodeClaimer<'_> {
    async fn claim(&self, command: RegionCommand) -> Result<RegionResponse, TaskError> {
        let state = self.0;
        let unknown = |detail: String| {
            TaskError::new(
                503,
                "claim_unknown",
                format!("{detail}; the task did not run: retry with the same task id"),
            )
        };
        if state.group.is_leader() {
            return state
                .group
                .propose(leader_clock(command))
                .await
                .map_err(|e| unknown(format!("the claim was not committed: {e}")));
        }
        let Some(leader) = state.group.leader() else {
            return Err(unknown(format!(
                "region {} has no leader now",
                state.region
            )));
        };
        let path = format!("/v1/regions/{}/claims", state.region);
        let body = serde_json::to_value(&command).ok();
        let response = crate::regions_api::forward_to_leader(
            state,
            &HeaderMap::new(),
            &state.region,
            &leader,
            Method::POST,
            &path,
            body,
        )
        .await
        .map_err(|e| unknown(format!("the leader did not take the claim: {}", e.detail())))?;
        let ok = response.status().is_success();
        let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .map_err(|e| {
                unknown(format!(
                    "the leader's answer to the claim is unreadable: {e}"
                ))
            })?;
        if !ok {
            return Err(unknown(format!(
                "the leader refused the claim: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            unknown(format!(
                "the leader's answer to the claim is unreadable: {e}"
            ))
        })
    }
}

/// `POST /v1/regions/{region}/claims`: a host's claim of a task id, on the
/// leader. Only the host itself may claim for itself.
pub async fn region_claim(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    headers: HeaderMap,
    Json(command): Json<RegionCommand>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let (node, task_id, agent) = match &command {
        RegionCommand::ClaimTask {
            node,
            task_id,
            agent,
            ..
        } => (node, task_id.as_str(), agent),
        RegionCommand::SetReplicas {
            node,
            agent,
            replicas,
            ..
        } => {
            if replicas.len() > crate::config::CHECKPOINT_REPLICAS_MAX
                || replicas.iter().any(|r| r.len() > 128)
            {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_claim",
                    format!(
                        "at most {} replicas, each a peer id",
                        crate::config::CHECKPOINT_REPLICAS_MAX
                    ),
                ));
            }
            (node, "replicas", agent)
        }
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_claim",
                "a claim is a ClaimTask or SetReplicas command".into(),
            ))
        }
    };
    let by = forwarded_by.map(|b| b.0 .0.clone());
    if by.as_deref() != Some(node.as_str()) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "bad_claim",
            format!("a claim for node {node} must come from that node over libp2p"),
        ));
    }
    if task_id.is_empty()
        || task_id.len() > TASK_ID_MAX
        || agent.len() > mesh_types::agent::NAME_MAX
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_claim",
            format!("a task id has 1 to {TASK_ID_MAX} characters"),
        ));
    }
    let path = format!("/v1/regions/{region}/claims");
    let json = serde_json::to_value(&command).ok();
    if let Some(answer) =
        crate::regions_api::on_leader(&state, &headers, &region, Method::POST, &path, json).await
    {
        return answer;
    }
    let response = state
        .group
        .propose(leader_clock(command))
        .await
        .map_err(|e| crate::regions_api::group_error(&region, e))?;
    Ok(Json(response).into_response())
}

/// A claim carries the leader's clock, not the host's: the claim window
/// is measured by it, and a host whose clock ran ahead must not make the
/// region forget every claim.
fn leader_clock(command: RegionCommand) -> RegionCommand {
    match command {
        RegionCommand::ClaimTask {
            agent,
            task_id,
            node,
            epoch,
            ..
        } => RegionCommand::ClaimTask {
            agent,
            task_id,
            node,
            epoch,
            at_ms: mesh_net::actor::unix_now_ms(),
        },
        other => other,
    }
}

/// Longest task id a client may choose.
pub use mesh_task::TASK_ID_MAX;

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
        if !mesh_task::is_task_id(id) {
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
    if let Some(answer) = state
        .tasks
        .replay(&task_id, &request.agent, &request.input)?
    {
        return Ok(Json(answer).into_response());
    }
    let run = TaskRun {
        request,
        entry_node: state.peer_id.clone(),
        entry_region: state.region.to_string(),
        trace_id: new_id(),
    };
    if run.request.stream {
        return crate::streams_api::stream(state, headers, run).await;
    }
    route(&state, &headers, run).await
}

/// Runs `run` in the agent's region: this node's own first, then the others
/// it sees; a success is kept at this (the entry) node.
pub(crate) async fn route(
    state: &ApiState,
    headers: &HeaderMap,
    run: TaskRun,
) -> Result<Response, ApiError> {
    let state = state.clone();
    let headers = headers.clone();
    let body = serde_json::to_value(&run).ok();
    // The agent's region: this node's own first, then the others it sees
    // (the view is read only when this region does not deploy it).
    let mut tried = Vec::new();
    let own = run_in_region(&state, &headers, &state.region, run.clone()).await;
    if let Some(answer) = settle(&state, own, &state.region, &mut tried, &run).await {
        return answer;
    }
    for region in other_regions(&state).await? {
        let path = format!("/v1/regions/{region}/tasks");
        let response =
            forward_to_region(&state, &headers, &region, Method::POST, &path, body.clone()).await;
        if let Some(answer) = settle(&state, response, &region, &mut tried, &run).await {
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
/// The regions other than this node's that have a live node in its view.
pub(crate) async fn other_regions(state: &ApiState) -> Result<Vec<mesh_types::Region>, ApiError> {
    let members = state.network.snapshot().await?.members;
    let mut others: Vec<_> = members
        .iter()
        .filter(|m| m.state == mesh_types::MemberState::Alive && m.region != state.region)
        .map(|m| m.region.clone())
        .collect();
    others.sort();
    others.dedup();
    Ok(others)
}

/// Whether a region's refusal means "not here, ask the next region": it
/// does not deploy the agent (404) or has no group yet (409
/// `not_bootstrapped`). Any other refusal (a stale epoch, a task id claimed
/// elsewhere or reused) is the answer: running the task in another region
/// could run it twice.
fn not_here(status: StatusCode, name: &str) -> bool {
    status == StatusCode::NOT_FOUND
        || (status == StatusCode::CONFLICT && name == "not_bootstrapped")
}

/// A region's answer to a task: final (relayed, a success kept at the
/// entry node), or `None` when the region does not deploy the agent or has
/// no group (the next region is asked; `tried` names it).
async fn settle(
    state: &ApiState,
    response: Result<Response, ApiError>,
    region: &mesh_types::Region,
    tried: &mut Vec<String>,
    run: &TaskRun,
) -> Option<Result<Response, ApiError>> {
    match response {
        Err(e) if not_here(e.status(), e.name()) => {
            tried.push(region.to_string());
            None
        }
        Err(e) => Some(Err(e)),
        Ok(r) if r.status() == StatusCode::NOT_FOUND || r.status() == StatusCode::CONFLICT => {
            let (parts, body) = r.into_parts();
            let bytes = axum::body::to_bytes(body, 64 * 1024)
                .await
                .unwrap_or_default();
            let name = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if not_here(parts.status, &name) {
                tried.push(region.to_string());
                return None;
            }
            Some(Ok(Response::from_parts(
                parts,
                axum::body::Body::from(bytes),
            )))
        }
        Ok(r) => Some(Ok(remember_answer(state, r, run).await)),
    }
}

/// Keeps a copy of a successful answer at the entry node and relays it; a
/// copy only of the answer to this task (its id, agent and input).
async fn remember_answer(state: &ApiState, response: Response, run: &TaskRun) -> Response {
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
        let ours = Some(&answer.task_id) == run.request.task_id.as_ref()
            && answer.agent == run.request.agent
            && answer.provenance.record.input_sha256
                == audit::sha256_hex(run.request.input.as_bytes());
        if !ours {
            tracing::warn!(task = ?run.request.task_id, "a task's answer is for another task; not kept");
        } else if let Err(e) = state.tasks.remember(&answer) {
            tracing::warn!(task = %answer.task_id, error = %e, "cannot keep a copy of a task result");
        }
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

/// How long a task waits for its agent to be active again (its host
/// failed, or it is moving) before the answer is an error: above the
/// failure detector's `dead_after` (4 s by default) plus a placement round
/// and a restore.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(15);

/// Whether an answer means "the agent is not serving right now, but will
/// be": its host is unreachable or lost its lease, it is not placed yet, or
/// it is being activated. A retry by task id is safe: it runs once.
fn failover_pending(status: StatusCode, name: &str) -> bool {
    match status {
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => true,
        StatusCode::SERVICE_UNAVAILABLE => matches!(
            name,
            "not_placed"
                | "not_copied"
                | "unavailable"
                | "claim_unknown"
                | "replica_unreachable"
                | "unreachable_peer"
                | "no_quorum"
        ),
        StatusCode::CONFLICT => name == "stale_epoch",
        _ => false,
    }
}

/// Runs `run` in this region, waiting through a failover or a move (up to
/// [`FAILOVER_WAIT`]) for the agent to serve again.
async fn run_in_region(
    state: &ApiState,
    headers: &HeaderMap,
    region: &mesh_types::Region,
    run: TaskRun,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + FAILOVER_WAIT;
    let mut pause = Duration::from_millis(50);
    loop {
        let outcome = run_in_region_once(state, headers, region, run.clone()).await;
        let (outcome, status, name) = match outcome {
            Err(e) => {
                let (status, name) = (e.status(), e.name().to_owned());
                (Err(e), status, name)
            }
            Ok(r) if r.status().is_success() => return Ok(r),
            Ok(r) => {
                let (parts, body) = r.into_parts();
                let bytes = axum::body::to_bytes(body, mesh_net::forward::FORWARD_RESPONSE_MAX)
                    .await
                    .unwrap_or_default();
                let name = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let status = parts.status;
                (
                    Ok(Response::from_parts(parts, axum::body::Body::from(bytes))),
                    status,
                    name,
                )
            }
        };
        if !failover_pending(status, &name) || Instant::now() + pause > deadline {
            return outcome;
        }
        tracing::debug!(task = ?run.request.task_id, agent = %run.request.agent, %status, %name, "the agent is not serving; the task waits");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

async fn run_in_region_once(
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

fn internal(detail: String) -> ApiError {
    error(StatusCode::INTERNAL_SERVER_ERROR, "storage", detail)
}

/// Runs a task on this node, its host, once per task id (see `mesh_task::host`).
async fn run_here(
    state: &ApiState,
    run: TaskRun,
    epoch: u64,
    hops: u8,
) -> Result<Response, ApiError> {
    let local = state.group.local_state();
    let admit = |manifest: &mesh_types::agent::Manifest,
                 limits: &mesh_types::policy::RateLimits|
     -> Result<(), TaskError> {
        state
            .buckets
            .take(
                &format!("agent:{}", manifest.name),
                &limits.per_agent,
                Instant::now(),
            )
            .map_err(|retry| {
                TaskError::too_many(
                    format!(
                        "agent {} is past its rate limit ({} tasks/s, bursts of {})",
                        manifest.name, limits.per_agent.per_second, limits.per_agent.burst
                    ),
                    retry,
                )
            })
    };
    let region = state.region.to_string();
    // A streamed task's pieces go to its buffer, read by the entry node.
    let stream = run
        .request
        .stream
        .then(|| {
            run.request
                .task_id
                .as_deref()
                .map(|id| state.streams.open(id, &run.entry_node))
        })
        .flatten();
    let sink = stream.clone().map(|s| move |piece: &str| s.push(piece));
    let env = mesh_task::Env {
        node: &state.peer_id,
        region: &region,
        models: &NodeModels(state),
        claimer: &NodeClaimer(state),
        admit: &admit,
        tokens: sink.as_ref().map(|f| f as &mesh_task::kinds::TokenSink),
        replicas: &crate::checkpoints::NodeReplicas(state),
        replica_count: state.checkpoint_replicas,
    };
    let result = state.tasks.execute(&env, &local, &run, epoch, hops).await;
    if let Some(s) = &stream {
        s.finish();
    }
    match result {
        Ok(answer) => Ok(Json(answer).into_response()),
        Err(e) => match e.retry_after_s {
            Some(retry) => Ok(crate::rate::too_many(e.detail, retry)),
            None => Err(e.into()),
        },
    }
}

/// Whether this node is in contact with its region's majority, judged on
/// its member view (`mesh_task::lease::contact`).
pub(crate) async fn contact(state: &ApiState) -> Result<(), String> {
    let (voters, _) = state.group.members();
    let alive = alive_members(state).await;
    mesh_task::lease::contact(&state.peer_id, &voters, |m| alive.contains(m))
}

/// The peer ids this node's member view holds alive.
pub(crate) async fn alive_members(state: &ApiState) -> std::collections::BTreeSet<String> {
    state
        .network
        .snapshot()
        .await
        .map(|s| s.members)
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.state == mesh_types::MemberState::Alive)
        .map(|v| v.peer_id.0)
        .collect()
}

/// One keep round of this node's agents (`mesh_task::Host::keep_agents`):
/// `local` is this node's applied state.
pub(crate) async fn keep_agents(
    state: &ApiState,
    local: &consensus::RegionState,
) -> Vec<mesh_task::Kept> {
    let region = state.region.to_string();
    let admit = |_: &mesh_types::agent::Manifest, _: &mesh_types::policy::RateLimits| Ok(());
    let env = mesh_task::Env {
        node: &state.peer_id,
        region: &region,
        models: &NodeModels(state),
        claimer: &NodeClaimer(state),
        admit: &admit,
        tokens: None,
        replicas: &crate::checkpoints::NodeReplicas(state),
        replica_count: state.checkpoint_replicas,
    };
    state.tasks.keep_agents(&env, local).await
}

/// `GET /v1/tasks/{id}`: a result this node holds (as host or as entry node).
pub async fn get(
    State(state): State<ApiState>,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    let found = match state.tasks.stored(&task_id)? {
        Some(a) => Some(a),
        None => state.tasks.copy(&task_id)?,
    };
    match found {
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

/// Audit records in one page of `GET /v1/regions/R/audit/PEER`: at most
/// this much JSON (a forwarded answer is at most 4 MiB).
pub const AUDIT_PAGE_BYTES: usize = 1024 * 1024;

/// Query of `GET /v1/regions/{region}/audit/{peer}`.
#[derive(Debug, Deserialize)]
pub struct AuditPage {
    /// The first sequence number wanted.
    #[serde(default)]
    from: u64,
}

/// `GET /v1/regions/{region}/audit/{peer}?from=SEQ`: the audit records of
/// node `peer` (of that region) from `from` on, read through any node
/// (`audit verify --all`), one page of at most [`AUDIT_PAGE_BYTES`]: ask
/// again from the last one's seq + 1 until a page is empty.
pub async fn node_audit(
    State(state): State<ApiState>,
    Path((name, peer)): Path<(String, String)>,
    Query(page): Query<AuditPage>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if peer == state.peer_id {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        state.tasks.visit_audit(page.from, &mut |r| {
            bytes = bytes.saturating_add(serde_json::to_vec(&r).map(|v| v.len() + 1).unwrap_or(0));
            // Always at least one record, so a page always moves on.
            if bytes > AUDIT_PAGE_BYTES && !records.is_empty() {
                return false;
            }
            records.push(r);
            true
        })?;
        return Ok(Json(records).into_response());
    }
    let target = peer.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_peer",
            format!("{peer:?} is not a peer id"),
        )
    })?;
    let path = format!("/v1/regions/{region}/audit/{peer}?from={}", page.from);
    forward_to_peer(&state, &headers, target, Method::GET, &path, None).await
}
