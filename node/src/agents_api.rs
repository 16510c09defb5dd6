//! `/v1/regions/{region}/agents[/{name}]`: deploy, list, get and remove
//! agents, served by any node like the policy routes (`regions_api`): a
//! request for another region is forwarded there, a write to the leader.
//! The leader checks a manifest against the model registry and the region's
//! policy and datasets as they are when it proposes the deploy.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use consensus::{AgentEntry, RegionResponse, RegionState};
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

fn row(region: &str, entry: &AgentEntry, members: &[MemberView]) -> AgentRow {
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
        .map(|entry| row(region.as_str(), entry, &members))
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
    let mut row = row(region.as_str(), entry, &members);
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
