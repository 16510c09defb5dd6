//! `/v1/regions/{region}/agents[/{name}]`: deploy, list, get and remove
//! agents, served by any node like the policy routes (`regions_api`): a
//! request for another region is forwarded there, a write to the leader.
//! The leader checks a manifest against the model registry and the region's
//! policy and datasets as they are when it proposes the deploy.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use consensus::{AgentEntry, Move, MoveReason, RegionCommand, RegionResponse, RegionState};
use mesh_agent::manifest::{self, ModelInfo};
use mesh_types::agent::Manifest;
use mesh_types::{MemberState, MemberView};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiState};
use crate::regions_api::{
    error, forward_to_region, group_error, not_bootstrapped, on_leader, parse_region,
};

/// Answer of a deploy.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deployed {
    /// The region.
    pub region: String,
    /// The agent.
    pub name: String,
    /// The log index of the deploy.
    pub version: u64,
}

/// One agent as `agent list` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentRow {
    /// Its name.
    pub name: String,
    /// Its manifest's version.
    pub version: String,
    /// Its kind.
    pub kind: String,
    /// The region it is deployed to.
    pub region: String,
    /// Its host, once placed.
    pub node: Option<String>,
    /// The epoch of its lease (0: never placed).
    pub epoch: u64,
    /// `placing`, `active` or `unavailable`.
    pub status: String,
    /// Why it is not active, when it is not.
    pub reason: Option<String>,
    /// The nodes its host copies its state to.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Its last moves, oldest first.
    #[serde(default)]
    pub moves: Vec<Move>,
    /// The manifest (in `agent get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
}

/// The models of the registry, as manifests are checked against them.
pub fn registry() -> Vec<ModelInfo> {
    models::ALL
        .iter()
        .map(|spec| ModelInfo {
            name: spec.name.to_owned(),
            sha256: spec.sha256().to_owned(),
            embeds: spec.kind == models::Kind::Embedding,
        })
        .collect()
}

fn row(region: &str, state: &RegionState, entry: &AgentEntry, members: &[MemberView]) -> AgentRow {
    let (status, reason) = match &entry.lease {
        None => (
            "placing",
            Some("no node of the region has been chosen yet".to_owned()),
        ),
        Some(lease) => match members.iter().find(|m| m.peer_id.0 == lease.node) {
            Some(m) if m.state == MemberState::Alive => ("active", None),
            Some(m) => (
                "unavailable",
                Some(format!("its host {} is {}", lease.node, m.state.as_str())),
            ),
            None => (
                "unavailable",
                Some(format!(
                    "its host {} is not in this node's view",
                    lease.node
                )),
            ),
        },
    };
    AgentRow {
        name: entry.manifest.name.clone(),
        version: entry.manifest.version.clone(),
        kind: entry.manifest.kind.as_str().to_owned(),
        region: region.to_owned(),
        node: entry.lease.as_ref().map(|l| l.node.clone()),
        epoch: entry.epoch,
        status: status.to_owned(),
        reason,
        replicas: state
            .replicas
            .get(&entry.manifest.name)
            .map(|r| r.nodes.clone())
            .unwrap_or_default(),
        moves: state
            .moves
            .get(&entry.manifest.name)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default(),
        manifest: None,
    }
}

fn unknown_agent(region: &str, name: &str, state: &RegionState) -> ApiError {
    let known: Vec<&str> = state.agents.keys().map(String::as_str).collect();
    error(
        StatusCode::NOT_FOUND,
        "unknown_agent",
        format!(
            "no agent {name:?} in region {region} (agents: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ),
    )
}

/// `POST /v1/regions/{region}/agents` with a manifest (JSON).
pub async fn deploy(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(manifest): Json<Manifest>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let path = format!("/v1/regions/{region}/agents");
    let json = serde_json::to_value(&manifest).ok();
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::POST, &path, json).await;
    }
    if let Some(answer) = on_leader(&state, &headers, &region, Method::POST, &path, json).await {
        return answer;
    }
    let local = state.group.local_state();
    let datasets: Vec<String> = local.datasets.keys().cloned().collect();
    if let Err(problems) = manifest::check(
        &manifest,
        &region,
        &registry(),
        local.policy.as_ref(),
        &datasets,
    ) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_manifest",
            problems.join("; "),
        ));
    }
    let agent = manifest.name.clone();
    match state
        .group
        .propose(consensus::RegionCommand::DeployAgent(manifest))
        .await
    {
        Ok(RegionResponse::AgentDeployed { version }) => {
            tracing::info!(%agent, %region, version, "deployed an agent");
            Ok(Json(Deployed {
                region: region.to_string(),
                name: agent,
                version,
            })
            .into_response())
        }
        Ok(other) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "raft",
            format!("the deploy was applied as {other:?}"),
        )),
        // Leadership lost since the check: retryable (503).
        Err(e) => Err(group_error(&region, e)),
    }
}

/// `GET /v1/regions/{region}/agents`
pub async fn list(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if region != state.region {
        let path = format!("/v1/regions/{region}/agents");
        return forward_to_region(&state, &headers, &region, Method::GET, &path, None).await;
    }
    if !state.group.is_bootstrapped() {
        return Err(not_bootstrapped(&region));
    }
    let local = state.group.local_state();
    let members = state.network.snapshot().await?.members;
    let rows: Vec<AgentRow> = local
        .agents
        .values()
        .map(|entry| row(region.as_str(), &local, entry, &members))
        .collect();
    Ok(Json(rows).into_response())
}

/// `GET /v1/regions/{region}/agents/{name}`
pub async fn get(
    State(state): State<ApiState>,
    Path((name, agent)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if region != state.region {
        let path = format!("/v1/regions/{region}/agents/{agent}");
        return forward_to_region(&state, &headers, &region, Method::GET, &path, None).await;
    }
    if !state.group.is_bootstrapped() {
        return Err(not_bootstrapped(&region));
    }
    let local = state.group.local_state();
    let entry = local
        .agents
        .get(&agent)
        .ok_or_else(|| unknown_agent(region.as_str(), &agent, &local))?;
    let members = state.network.snapshot().await?.members;
    let mut row = row(region.as_str(), &local, entry, &members);
    row.manifest = Some(entry.manifest.clone());
    Ok(Json(row).into_response())
}

/// `DELETE /v1/regions/{region}/agents/{name}`
pub async fn remove(
    State(state): State<ApiState>,
    Path((name, agent)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let path = format!("/v1/regions/{region}/agents/{agent}");
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::DELETE, &path, None).await;
    }
    if let Some(answer) = on_leader(&state, &headers, &region, Method::DELETE, &path, None).await {
        return answer;
    }
    let command = consensus::RegionCommand::RemoveAgent(agent.clone());
    match state.group.propose(command).await {
        Ok(RegionResponse::AgentRemoved { found: true }) => {
            tracing::info!(%agent, %region, "removed an agent");
            Ok(
                Json(serde_json::json!({"region": region.to_string(), "removed": agent}))
                    .into_response(),
            )
        }
        Ok(_) => Err(unknown_agent(
            region.as_str(),
            &agent,
            &state.group.local_state(),
        )),
        Err(e) => Err(group_error(&region, e)),
    }
}

/// Body of `POST /v1/regions/{region}/agents/{name}/move`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The node to move it to: a peer id, or a prefix of one that names
    /// one node of the region.
    pub to: String,
}

/// Answer of a move.
#[derive(Debug, Serialize, Deserialize)]
pub struct Moved {
    /// The region.
    pub region: String,
    /// The agent.
    pub name: String,
    /// Its host before, if it was placed.
    pub from: Option<String>,
    /// Its host now.
    pub to: String,
    /// The epoch of its lease now (unchanged when it was there already).
    pub epoch: u64,
}

/// The one node of `region` in `members` whose peer id is `to` or starts
/// with it.
fn region_node<'a>(
    members: &'a [MemberView],
    region: &mesh_types::Region,
    to: &str,
) -> Result<&'a MemberView, ApiError> {
    let in_region: Vec<&MemberView> = members.iter().filter(|m| &m.region == region).collect();
    let found: Vec<&&MemberView> = in_region
        .iter()
        .filter(|m| !to.is_empty() && m.peer_id.0.starts_with(to))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(error(
            StatusCode::BAD_REQUEST,
            "unknown_node",
            format!(
                "no node of region {region} has peer id {to:?} (its nodes: {}); see `agentmesh members`",
                in_region
                    .iter()
                    .map(|m| m.peer_id.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "ambiguous_node",
            format!("{to:?} starts {} peer ids of region {region}; give more of it", found.len()),
        )),
    }
}

/// `POST /v1/regions/{region}/agents/{name}/move` (`agentmesh agent move`):
/// the leader moves the agent to a live node of its region with the next
/// epoch; the old host stops it, the new one restores its state from its
/// replicas, and tasks sent meanwhile wait for it (see `tasks`).
pub async fn move_agent(
    State(state): State<ApiState>,
    Path((name, agent)): Path<(String, String)>,
    headers: HeaderMap,
    Json(request): Json<MoveRequest>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let path = format!("/v1/regions/{region}/agents/{agent}/move");
    let json = serde_json::to_value(&request).ok();
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::POST, &path, json).await;
    }
    if let Some(answer) = on_leader(&state, &headers, &region, Method::POST, &path, json).await {
        return answer;
    }
    let local = state.group.local_state();
    let entry = local
        .agents
        .get(&agent)
        .ok_or_else(|| unknown_agent(region.as_str(), &agent, &local))?;
    let members = state.network.snapshot().await?.members;
    let to = region_node(&members, &region, &request.to)?;
    let to_id = to.peer_id.0.clone();
    if to.state != MemberState::Alive {
        return Err(error(
            StatusCode::CONFLICT,
            "node_not_alive",
            format!(
                "node {to_id} is {}; move the agent to a live node",
                to.state.as_str()
            ),
        ));
    }
    if local.draining.contains(&to_id) {
        return Err(error(
            StatusCode::CONFLICT,
            "node_draining",
            format!("node {to_id} is draining; move the agent to another node (or undo the drain: `agentmesh node drain --cancel`)"),
        ));
    }
    let from = entry.lease.as_ref().map(|l| l.node.clone());
    if from.as_deref() == Some(to_id.as_str()) {
        return Ok(Json(Moved {
            region: region.to_string(),
            name: agent,
            from,
            to: to_id,
            epoch: entry.epoch,
        })
        .into_response());
    }
    if let Some(dataset) = entry
        .manifest
        .dataset
        .as_ref()
        .and_then(|d| local.datasets.get(d))
    {
        if dataset.node != to_id {
            return Err(error(
                StatusCode::CONFLICT,
                "data_elsewhere",
                format!(
                    "agent {agent} works on dataset {}, which is on node {}: placement keeps it next to its data, so it would move back; move it to {}, or put the dataset on {to_id} first",
                    dataset.name, dataset.node, dataset.node
                ),
            ));
        }
    }
    let command = RegionCommand::MoveAgent {
        agent: agent.clone(),
        to: to_id.clone(),
        after_epoch: entry.epoch,
        reason: MoveReason::Operator,
    };
    match state.group.propose(command).await {
        Ok(RegionResponse::LeaseGranted { epoch }) => {
            tracing::info!(%agent, from = from.as_deref().unwrap_or("-"), to = %to_id, epoch, reason = "operator", %region, "moved an agent");
            Ok(Json(Moved {
                region: region.to_string(),
                name: agent,
                from,
                to: to_id,
                epoch,
            })
            .into_response())
        }
        Ok(RegionResponse::LeaseRefused { epoch }) => Err(error(
            StatusCode::CONFLICT,
            "moved_meanwhile",
            format!("agent {agent} moved meanwhile (its epoch is {epoch} now); look at `agentmesh agent get {agent}` and retry"),
        )),
        Ok(RegionResponse::MoveRefused { why }) => Err(error(
            StatusCode::CONFLICT,
            "cannot_move",
            format!("agent {agent} cannot move to {to_id}: {why}"),
        )),
        Ok(other) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "raft",
            format!("the move was applied as {other:?}"),
        )),
        Err(e) => Err(group_error(&region, e)),
    }
}

/// Body of `POST /v1/regions/{region}/draining`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainRequest {
    /// The node: the one asked, or, forwarded, the one that sent it.
    pub node: String,
    /// Draining (true) or not.
    pub draining: bool,
}

/// Answer of a drain request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Draining {
    /// The node.
    pub node: String,
    /// Whether it is draining now.
    pub draining: bool,
    /// The log index of the change.
    pub index: u64,
}

/// `POST /v1/regions/{region}/draining` (`agentmesh node drain`): marks the
/// node draining, or takes the mark off. A node marks only itself: a
/// client asks the node to drain, which passes it to its leader.
pub async fn set_draining(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    headers: HeaderMap,
    Json(request): Json<DrainRequest>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if region != state.region {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "wrong_region",
            format!(
                "this node is in region {}, not {region}; ask the node to drain itself",
                state.region
            ),
        ));
    }
    let by = forwarded_by
        .map(|b| b.0 .0.clone())
        .unwrap_or_else(|| state.peer_id.clone());
    if request.node != by {
        return Err(error(
            StatusCode::FORBIDDEN,
            "not_this_node",
            format!("a node drains only itself: run `agentmesh node drain --api` with the API of node {}", request.node),
        ));
    }
    if !state.group.is_bootstrapped() {
        return Err(not_bootstrapped(&region));
    }
    let path = format!("/v1/regions/{region}/draining");
    let json = serde_json::to_value(&request).ok();
    if let Some(answer) = on_leader(&state, &headers, &region, Method::POST, &path, json).await {
        return answer;
    }
    let command = RegionCommand::SetDraining {
        node: request.node.clone(),
        draining: request.draining,
    };
    match state.group.propose(command).await {
        Ok(RegionResponse::DrainingSet { index }) => {
            tracing::info!(node = %request.node, draining = request.draining, %region, "set a node's draining mark");
            Ok(Json(Draining {
                node: request.node,
                draining: request.draining,
                index,
            })
            .into_response())
        }
        Ok(RegionResponse::MoveRefused { why }) => Err(error(
            StatusCode::CONFLICT,
            "cannot_drain",
            format!("node {} cannot drain: {why}", request.node),
        )),
        Ok(other) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "raft",
            format!("the drain was applied as {other:?}"),
        )),
        Err(e) => Err(group_error(&region, e)),
    }
}
