//! Agent state copies between the nodes of a region (issue 14; the rules
//! are in `mesh_task::checkpoint`), over libp2p:
//!
//! ```text
//!   host ──POST /v1/regions/R/checkpoints (bincode Push)──> replica: stores it, or Fenced/Behind
//!   new host ──POST /v1/regions/R/seals (bincode (agent, epoch, after))──> replica: seals, answers its copy, a page at a time
//! ```
//!
//! A replica takes a push or a seal only from the node its applied region
//! state names as the agent's host at that very epoch: no other member can
//! overwrite or fence an agent's copies. A replica whose state is behind
//! answers 503 and the host retries.
//!
//! Beside the routes, [`keep_agents`] activates the agents this node is
//! granted at once (their state restored before the first task comes) and
//! stops the ones whose lease moved away, with a log line for each.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use mesh_net::forward::ForwardRequest;
use mesh_task::checkpoint::{Push, PushAnswer, Replicas, Sealed};
use mesh_task::{Kept, TaskError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{ApiError, ApiState};
use crate::regions_api::{error, parse_region};

/// How often a node looks for agents granted to it or moved off it.
const KEEP_INTERVAL: Duration = Duration::from_millis(mesh_task::lease::KEEP_INTERVAL_MS);

/// Copies go to peers over libp2p, as bincode (a page of a whole copy is
/// raw bytes: JSON would make it several times larger).
pub(crate) struct NodeReplicas<'a>(pub(crate) &'a ApiState);

fn unreachable(peer: &str, why: String) -> TaskError {
    TaskError::new(503, "replica_unreachable", format!("replica {peer}: {why}"))
}

impl NodeReplicas<'_> {
    async fn call(&self, peer: &str, path: String, body: Vec<u8>) -> Result<Vec<u8>, TaskError> {
        let state = self.0;
        let to = peer
            .parse::<libp2p::PeerId>()
            .map_err(|_| unreachable(peer, "not a peer id".into()))?;
        let request = ForwardRequest {
            method: "POST".into(),
            path,
            hops: 1,
            body,
            deadline_ms: 0,
        };
        let answer = state
            .network
            .forward(to, &request, state.forward_timeout)
            .await
            .map_err(|e| unreachable(peer, e.to_string()))?;
        if answer.status != 200 {
            return Err(unreachable(
                peer,
                format!(
                    "answered {}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body[..answer.body.len().min(512)])
                ),
            ));
        }
        Ok(answer.body)
    }
}

#[async_trait::async_trait]
impl Replicas for NodeReplicas<'_> {
    async fn members(&self) -> Vec<(String, bool)> {
        let state = self.0;
        let (voters, learners) = state.group.members();
        let alive = crate::tasks::alive_members(state).await;
        mesh_task::checkpoint::copy_targets(
            &state.group.local_state(),
            &state.peer_id,
            voters,
            learners,
            |m| alive.contains(m),
        )
    }

    async fn push(&self, peer: &str, push: &Push) -> Result<PushAnswer, TaskError> {
        let body = consensus::codec::encode(push)
            .map_err(|e| TaskError::storage(format!("encoding a checkpoint: {e}")))?;
        let path = format!("/v1/regions/{}/checkpoints", self.0.region);
        let answer = self.call(peer, path, body).await?;
        consensus::codec::decode(&answer)
            .map_err(|e| unreachable(peer, format!("its answer is unreadable: {e}")))
    }

    async fn seal(
        &self,
        peer: &str,
        agent: &str,
        epoch: u64,
        after: Option<Vec<u8>>,
    ) -> Result<Sealed, TaskError> {
        let body = consensus::codec::encode(&(agent, epoch, after))
            .map_err(|e| TaskError::storage(format!("encoding a seal: {e}")))?;
        let path = format!("/v1/regions/{}/seals", self.0.region);
        let answer = self.call(peer, path, body).await?;
        consensus::codec::decode(&answer)
            .map_err(|e| unreachable(peer, format!("its answer is unreadable: {e}")))
    }
}

fn bincode_answer<T: serde::Serialize>(value: &T) -> Result<Response, ApiError> {
    let bytes = consensus::codec::encode(value).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
            format!("encoding the answer: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// [`mesh_task::checkpoint::check_sender`], for a request that came over
/// libp2p from `by` (never from a client).
fn check_host(
    state: &ApiState,
    by: Option<&str>,
    agent: &str,
    epoch: u64,
) -> Result<Option<u64>, ApiError> {
    let Some(by) = by else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "not_a_host",
            "checkpoints come from an agent's host over libp2p, never from a client".into(),
        ));
    };
    let local = state.group.local_state();
    mesh_task::checkpoint::check_sender(&local, by, agent, epoch).map_err(ApiError::from)
}

/// Copies are kept only inside their region: a request for another region's
/// agents is refused.
fn this_region(state: &ApiState, name: &str) -> Result<(), ApiError> {
    let region = parse_region(name)?;
    if region != state.region {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "wrong_region",
            format!("this node is in region {}, not {region}: copies of an agent's state stay in its region", state.region),
        ));
    }
    Ok(())
}

/// `POST /v1/regions/{region}/checkpoints`: a host's push (bincode).
pub async fn region_checkpoints(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    this_region(&state, &name)?;
    let push: Push = consensus::codec::decode(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_checkpoint",
            format!("the checkpoint is unreadable: {e}"),
        )
    })?;
    let by = forwarded_by.map(|b| b.0 .0.clone());
    let version = push.version();
    if let Some(known) = check_host(&state, by.as_deref(), push.agent(), version.epoch)? {
        return bincode_answer(&PushAnswer::Fenced { epoch: known });
    }
    let local = state.group.local_state();
    let claimed = mesh_task::checkpoint::claimed(&local, push.agent());
    let answer = state
        .tasks
        .replica()
        .receive(&push, version.epoch, &claimed)
        .await
        .map_err(ApiError::from)?;
    bincode_answer(&answer)
}

/// `POST /v1/regions/{region}/seals`: a new host seals this node's copy of
/// an agent and reads it (bincode `(agent, epoch, after)`: the first page
/// when `after` is `None`, else the page after it).
pub async fn region_seals(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    this_region(&state, &name)?;
    let (agent, epoch, after): (String, u64, Option<Vec<u8>>) = consensus::codec::decode(&body)
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_seal",
                format!("the seal is unreadable: {e}"),
            )
        })?;
    let by = forwarded_by.map(|b| b.0 .0.clone());
    if let Some(known) = check_host(&state, by.as_deref(), &agent, epoch)? {
        return Err(error(
            StatusCode::CONFLICT,
            "stale_epoch",
            format!("agent {agent} is at epoch {known} here; epoch {epoch} is stale"),
        ));
    }
    let sealed = state
        .tasks
        .replica()
        .seal(&agent, epoch, after.as_deref())
        .await
        .map_err(ApiError::from)?;
    bincode_answer(&sealed)
}

/// Activates the agents this node is granted, at once, stops the ones
/// whose lease moved away, and moves copies off draining nodes
/// ([`mesh_task::Host::keep_agents`]), until `shutdown`; logs each.
pub async fn keep_agents(state: ApiState, shutdown: CancellationToken) {
    // Contact is judged on its own loop: a keep round may wait seconds on
    // a replica, and a cut-off node must step down within one interval.
    tokio::spawn(keep_contact(state.clone(), shutdown.clone()));
    let mut interval = tokio::time::interval(KEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: std::collections::BTreeMap<(String, u64), String> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let local = state.group.local_state();
        let kept = crate::tasks::keep_agents(&state, &local).await;
        log_kept(kept, &mut failing);
    }
}

/// Every [`KEEP_INTERVAL`], until `shutdown`: tells the host whether this
/// node is in contact with its region's majority (it steps down when not).
async fn keep_contact(state: ApiState, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(KEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = std::collections::BTreeMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let contact = crate::tasks::contact(&state).await;
        log_kept(state.tasks.set_contact(contact), &mut failing);
    }
}

/// Logs what a keep round or a contact check did; a failing activation once
/// per reason.
fn log_kept(kept: Vec<Kept>, failing: &mut std::collections::BTreeMap<(String, u64), String>) {
    {
        for kept in kept {
            match kept {
                Kept::Stopped {
                    agent,
                    epoch,
                    to: Some((to, to_epoch)),
                } => {
                    info!(%agent, epoch, %to, to_epoch, "agent stopped here: its lease moved")
                }
                Kept::Stopped {
                    agent,
                    epoch,
                    to: None,
                } => {
                    info!(%agent, epoch, "agent stopped here: it is no longer placed")
                }
                Kept::Activated { agent, epoch, ms } => {
                    failing.remove(&(agent.clone(), epoch));
                    info!(%agent, epoch, ms, "agent active here: its state restored from its replicas")
                }
                Kept::Failed {
                    agent,
                    epoch,
                    error,
                } => {
                    // Said once per reason, not five times a second.
                    let key = (agent.clone(), epoch);
                    if failing.get(&key) != Some(&error.detail) {
                        warn!(%agent, epoch, %error, "cannot activate the agent yet; trying again");
                        failing.insert(key, error.detail.clone());
                    }
                }
                Kept::SteppedDown { agent, epoch, why } if agent.is_empty() => {
                    let _ = epoch;
                    warn!(%why, "stepped down: no agent is activated here until this node is back in contact with its region's majority")
                }
                Kept::SteppedDown { agent, epoch, why } => {
                    warn!(%agent, epoch, %why, "agent stopped here: stepped down, out of contact with the region's majority")
                }
                Kept::BackInContact { was } => {
                    info!(%was, "back in contact with the region's majority: agents granted here are activated again")
                }
                Kept::Recopy {
                    agent,
                    epoch,
                    replica,
                } => {
                    info!(%agent, epoch, %replica, "copying the agent's state to another node: a replica is draining")
                }
            }
        }
    }
}
