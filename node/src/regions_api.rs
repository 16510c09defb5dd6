//! `/v1/regions/{region}/...`: bootstrap, status and policy, served by any
//! node. A request for another region is forwarded to a live node of that
//! region; a write (or a consistent read) is forwarded to the leader,
//! always over libp2p to a peer id (`crate::forward`), never over HTTP to
//! an address a peer advertised. A request is forwarded at most twice
//! (`x-agentmesh-forwarded` counts): to the right region, then to its leader.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use consensus::{GroupError, RegionStatus};
use libp2p::PeerId;
use mesh_net::{ForwardError, ForwardRequest};
use mesh_types::policy::Policy;
use mesh_types::{MemberState, Region};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiState};
use crate::region::pick_voters;

/// How many times a request was forwarded already.
const FORWARDED: &str = crate::forward::FORWARDED;
/// Most forwards of one request: to the right region, then to its leader.
const FORWARD_HOPS_MAX: u8 = 2;

pub(crate) fn hops(headers: &HeaderMap) -> u8 {
    headers
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
/// How long a new group may take to elect its first leader.
const FIRST_LEADER_WITHIN: Duration = Duration::from_secs(15);
/// A forwarded bootstrap may wait for the first leader on the other side (up
/// to two hops).
const BOOTSTRAP_FORWARD_TIMEOUT: Duration = Duration::from_secs(40);

/// Body of `POST /v1/regions/{region}/bootstrap`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BootstrapRequest {
    /// How many voters to pick.
    pub voters: usize,
    /// Start with fewer voters if fewer nodes are alive.
    #[serde(default)]
    pub allow_fewer: bool,
    /// The voters, once a node of the region has picked them: carried as
    /// they are to the node that initializes, never picked again on the
    /// way (two views of the region must not make two voter sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voter_set: Option<Vec<String>>,
}

/// Answer of a bootstrap.
#[derive(Debug, Serialize, Deserialize)]
pub struct BootstrapAnswer {
    /// The region.
    pub region: String,
    /// True when the group existed already and nothing changed.
    pub already_bootstrapped: bool,
    /// The leader, if one is elected.
    pub leader: Option<String>,
    /// Voters' peer ids.
    pub voters: Vec<String>,
    /// Learners' peer ids.
    pub learners: Vec<String>,
}

/// Answer of a policy write.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyWritten {
    /// The region.
    pub region: String,
    /// The new policy version (the Raft log index).
    pub version: u64,
    /// A concurrent write committed in the same entry replaced this policy
    /// at the same version (see consensus::batcher).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

/// Answer of a policy read.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyRead {
    /// The region.
    pub region: String,
    /// Version of the policy (0: none applied yet).
    pub version: u64,
    /// The policy, if one was applied.
    pub policy: Option<Policy>,
    /// True for a linearizable read through the leader.
    pub consistent: bool,
    /// The node that answered.
    pub served_by: String,
    /// Entries the answering replica is behind the leader's log (None: unknown).
    pub behind_leader: Option<u64>,
}

/// Query of `GET .../policy`.
#[derive(Debug, Deserialize)]
pub struct PolicyQuery {
    #[serde(default)]
    consistent: bool,
}

pub(crate) fn error(status: StatusCode, error: &'static str, detail: String) -> ApiError {
    ApiError::new(status, error, detail)
}

pub(crate) fn parse_region(name: &str) -> Result<Region, ApiError> {
    Region::parse(name).map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_region", e.to_string()))
}

pub(crate) fn group_error(region: &Region, e: GroupError) -> ApiError {
    match e {
        GroupError::Timeout(_)
        | GroupError::NoQuorum(_)
        | GroupError::Unreachable(_)
        | GroupError::NotLeader { leader: None }
        | GroupError::ChangeInProgress => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_quorum",
            format!("region {region}: {e}; this is retryable"),
        ),
        // Not a refusal: the write may still take effect. Never retried or
        // forwarded again here; the client decides after reading.
        GroupError::OutcomeUnknown(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            format!("region {region}: {e}"),
        ),
        GroupError::Busy(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("region {region}: {e}"),
        ),
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "raft",
            format!("region {region}: {other}"),
        ),
    }
}

/// Sends the same request to `peer` over libp2p (see `crate::forward`)
/// and relays its answer.
pub(crate) async fn forward_to_peer(
    state: &ApiState,
    headers: &HeaderMap,
    peer: PeerId,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    forward(state, headers, peer, method, path, body).await
}

async fn forward(
    state: &ApiState,
    headers: &HeaderMap,
    peer: PeerId,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    forward_with_timeout(
        state,
        headers,
        peer,
        method,
        path,
        body,
        state.forward_timeout,
    )
    .await
}

/// [`forward`] with its own deadline, for requests that may wait long on the other side.
async fn forward_with_timeout(
    state: &ApiState,
    headers: &HeaderMap,
    peer: PeerId,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let hops = hops(headers);
    if hops >= FORWARD_HOPS_MAX {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "forwarding_loop",
            format!("{path} was forwarded here but this node cannot serve it either (the view is changing); retry"),
        ));
    }
    let request = ForwardRequest {
        method: method.to_string(),
        path: path.to_owned(),
        hops: hops + 1,
        body: body
            .map(|b| serde_json::to_vec(&b).unwrap_or_default())
            .unwrap_or_default(),
        deadline_ms: 0,
    };
    let answer = state
        .network
        .forward(peer, &request, timeout)
        .await
        .map_err(|e| {
            let (status, name) = match e {
                ForwardError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "outcome_unknown"),
                _ => (StatusCode::BAD_GATEWAY, "unreachable_peer"),
            };
            error(
                status,
                name,
                format!(
                    "{e}; the node may have just failed: read before writing again, then retry"
                ),
            )
        })?;
    // A final status only: 1xx (or nonsense) from a peer becomes 502.
    let status = StatusCode::from_u16(answer.status)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()))
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer.body,
    )
        .into_response();
    // A forwarded answer carries only its body: put Retry-After back.
    if status == StatusCode::TOO_MANY_REQUESTS {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, mesh_net::forward::FORWARD_RESPONSE_MAX)
            .await
            .unwrap_or_default();
        let retry = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["retry_after_s"].as_u64());
        response = Response::from_parts(parts, axum::body::Body::from(bytes));
        if let Some(retry) = retry {
            if let Ok(value) = axum::http::HeaderValue::from_str(&retry.to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
    }
    Ok(response)
}

/// Forwards a request about another region to a live node of that region.
pub(crate) async fn forward_to_region(
    state: &ApiState,
    headers: &HeaderMap,
    region: &Region,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    let peer = peer_in_region(state, region, None).await?;
    forward(state, headers, peer, method, path, body).await
}

/// Forwards a request this follower cannot serve to the region's leader.
pub(crate) async fn forward_to_leader(
    state: &ApiState,
    headers: &HeaderMap,
    region: &Region,
    leader: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    let peer = peer_in_region(state, region, Some(leader)).await?;
    forward(state, headers, peer, method, path, body).await
}

/// A live node of `region` to forward to: `preferred` (a peer id: the
/// leader the group names) and no other when one is given — a gossip claim
/// must not redirect a write meant for the leader; else a node of the
/// region that gossips a Raft role, else any live node of the region.
/// Answers from another region are as trustworthy as its nodes' keys until
/// admission control exists (see SECURITY.md).
async fn peer_in_region(
    state: &ApiState,
    region: &Region,
    preferred: Option<&str>,
) -> Result<PeerId, ApiError> {
    let members = state.network.snapshot().await?.members;
    let live = |m: &&mesh_types::MemberView| {
        &m.region == region && m.state == MemberState::Alive && !m.is_self
    };
    let found = match preferred {
        Some(p) => {
            // Named by the group itself (not by gossip): a merely suspect
            // one is still worth the try.
            let found = members.iter().find(|m| {
                m.peer_id.0 == p
                    && &m.region == region
                    && !m.is_self
                    && matches!(m.state, MemberState::Alive | MemberState::Suspect)
            });
            if found.is_none() {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "peer_unreachable",
                    format!("node {p} of region {region} (the leader, or the voter that starts the group) is not alive in this node's view; retry shortly"),
                ));
            }
            found
        }
        None => members
            .iter()
            .filter(live)
            .find(|m| m.raft.is_some())
            .or_else(|| members.iter().find(live)),
    };
    found
        .and_then(|m| m.peer_id.0.parse::<PeerId>().ok())
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "unknown_region",
                format!("no live node of region {region} is known to this node; start one with `agentmesh node start --region {region}`"),
            )
        })
}

/// A write of this region: `None` when this node leads and makes it
/// itself, else the leader's answer (forwarded, at most the usual hops) or
/// why there is none. Every write route starts with this.
pub(crate) async fn on_leader(
    state: &ApiState,
    headers: &HeaderMap,
    region: &Region,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Option<Result<Response, ApiError>> {
    if !state.group.is_bootstrapped() {
        return Some(Err(not_bootstrapped(region)));
    }
    if state.group.is_leader() {
        return None;
    }
    Some(match state.group.leader() {
        Some(leader) if hops(headers) < FORWARD_HOPS_MAX => {
            forward_to_leader(state, headers, region, &leader, method, path, body).await
        }
        _ => Err(group_error(region, GroupError::NotLeader { leader: None })),
    })
}

pub(crate) fn not_bootstrapped(region: &Region) -> ApiError {
    error(
        StatusCode::CONFLICT,
        "not_bootstrapped",
        format!("region {region} has no Raft group yet; run `agentmesh region bootstrap --region {region}` first"),
    )
}

/// `POST /v1/regions/{region}/bootstrap`
pub async fn bootstrap(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<BootstrapRequest>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if body.voters == 0 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "--voters must be at least 1".into(),
        ));
    }
    let already_bootstrapped = match bootstrap_target(&state, &region, &body).await? {
        BootstrapTarget::Forward(peer, voter_set) => {
            let path = format!("/v1/regions/{region}/bootstrap");
            let body = BootstrapRequest {
                voter_set: voter_set.or(body.voter_set),
                ..body
            };
            let json = serde_json::to_value(&body).ok();
            let timeout = BOOTSTRAP_FORWARD_TIMEOUT;
            return forward_with_timeout(
                &state,
                &headers,
                peer,
                Method::POST,
                &path,
                json,
                timeout,
            )
            .await;
        }
        BootstrapTarget::AlreadyHere => true,
        BootstrapTarget::Initialize(voters) => match state.group.initialize(&voters).await {
            Ok(()) => {
                tracing::info!(%region, ?voters, "bootstrapped the region group");
                // Gossip the role now, so other nodes see the group at once.
                let _ = state
                    .network
                    .set_raft_role(Some(mesh_types::RaftRole::Voter))
                    .await;
                false
            }
            Err(GroupError::AlreadyInitialized) => true,
            Err(GroupError::BootstrapConflict(e)) => {
                return Err(error(StatusCode::CONFLICT, "bootstrap_conflict", e))
            }
            Err(e) => return Err(group_error(&region, e)),
        },
    };
    let deadline = tokio::time::Instant::now() + FIRST_LEADER_WITHIN;
    while state.group.leader().is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (voters, learners) = state.group.members();
    Ok(Json(BootstrapAnswer {
        region: region.to_string(),
        already_bootstrapped,
        leader: state.group.leader(),
        voters,
        learners,
    })
    .into_response())
}

/// Where a bootstrap request is carried out.
enum BootstrapTarget {
    /// On this node, with the voters picked here, if any.
    Forward(PeerId, Option<Vec<String>>),
    /// Nowhere: this node's group exists already.
    AlreadyHere,
    /// Here, with these voters.
    Initialize(Vec<String>),
}

async fn bootstrap_target(
    state: &ApiState,
    region: &Region,
    body: &BootstrapRequest,
) -> Result<BootstrapTarget, ApiError> {
    if region != &state.region {
        return Ok(BootstrapTarget::Forward(
            peer_in_region(state, region, None).await?,
            None,
        ));
    }
    if state.group.is_bootstrapped() {
        return Ok(BootstrapTarget::AlreadyHere);
    }
    let members = state.network.snapshot().await?.members;
    // This node may just not have been added yet: if any live node of the
    // region gossips a Raft role, the group exists; ask that node, never
    // start a second group (also when the set was picked elsewhere).
    let member_of_group = members.iter().find(|m| {
        !m.is_self && &m.region == region && m.state == MemberState::Alive && m.raft.is_some()
    });
    if let Some(member) = member_of_group {
        return Ok(BootstrapTarget::Forward(
            peer_in_region(state, region, Some(&member.peer_id.0)).await?,
            None,
        ));
    }
    // Picked already by the node that forwarded this: carry it out as it is.
    if let Some(voters) = &body.voter_set {
        let mut voters = voters.clone();
        voters.sort();
        voters.dedup();
        if let Some(stranger) = voters.iter().find(|v| {
            !members
                .iter()
                .any(|m| m.peer_id.0 == **v && &m.region == region)
        }) {
            return Err(error(
                StatusCode::CONFLICT,
                "unknown_voter",
                format!("voter {stranger} is not a member of region {region} as this node sees it; retry the bootstrap once the region's nodes see each other"),
            ));
        }
        return match voters.first() {
            Some(first) if *first == state.peer_id => Ok(BootstrapTarget::Initialize(voters)),
            Some(first) => Ok(BootstrapTarget::Forward(
                peer_in_region(state, region, Some(first)).await?,
                Some(voters.clone()),
            )),
            None => Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "voter_set is empty".into(),
            )),
        };
    }
    let mut voters = pick_voters(&members, region, body.voters);
    voters.sort();
    if voters.len() < body.voters && !body.allow_fewer {
        return Err(error(
            StatusCode::CONFLICT,
            "too_few_nodes",
            format!(
                "region {region} has {} live node(s), fewer than --voters {}; start more nodes of the region, or pass --allow-fewer",
                voters.len(),
                body.voters
            ),
        ));
    }
    // Exactly one node initializes: the first voter. Any other node forwards
    // there, so two concurrent bootstraps cannot race.
    if voters.first() != Some(&state.peer_id) {
        return Ok(BootstrapTarget::Forward(
            peer_in_region(state, region, voters.first().map(String::as_str)).await?,
            Some(voters),
        ));
    }
    Ok(BootstrapTarget::Initialize(voters))
}

/// `GET /v1/regions/{region}/status`
pub async fn status(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if region != state.region {
        let path = format!("/v1/regions/{region}/status");
        return forward_to_region(&state, &headers, &region, Method::GET, &path, None).await;
    }
    // The leader knows every member's progress: ask it when this node is not it.
    if !state.group.is_leader() && hops(&headers) < FORWARD_HOPS_MAX {
        if let Some(leader) = state.group.leader() {
            if let Ok(peer) = peer_in_region(&state, &region, Some(&leader)).await {
                if let Ok(answer) = forward(
                    &state,
                    &headers,
                    peer,
                    Method::GET,
                    &format!("/v1/regions/{region}/status"),
                    None,
                )
                .await
                {
                    if answer.status().is_success() {
                        return Ok(answer);
                    }
                }
            }
        }
    }
    let mut status = state.group.status();
    // Liveness as this node's membership view sees each member.
    if let Ok(snapshot) = state.network.snapshot().await {
        for m in status.members.iter_mut() {
            let seen = snapshot.members.iter().find(|v| v.peer_id.0 == m.peer_id);
            m.state = Some(match seen {
                Some(v) => format!("{:?}", v.state).to_lowercase(),
                None => "unknown".to_owned(),
            });
        }
    }
    Ok(Json(StatusAnswer {
        region: region.to_string(),
        status,
    })
    .into_response())
}

/// Answer of `region status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// The region.
    pub region: String,
    /// The status, as the answering node (the leader when reachable) sees it.
    #[serde(flatten)]
    pub status: RegionStatus,
}

/// Answer of `DELETE /v1/regions/{region}/members/{peer}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MemberRemoved {
    /// The region.
    pub region: String,
    /// The peer removed.
    pub removed: String,
    /// The voters after the change.
    pub voters: Vec<String>,
    /// The learners after the change.
    pub learners: Vec<String>,
}

/// `DELETE /v1/regions/{region}/members/{peer}` (`region remove-node`): on
/// the leader, forwarded there from any node of the region.
pub async fn remove_member(
    State(state): State<ApiState>,
    Path((name, peer)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let path = format!("/v1/regions/{region}/members/{peer}");
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::DELETE, &path, None).await;
    }
    if let Some(answer) = on_leader(&state, &headers, &region, Method::DELETE, &path, None).await {
        return answer;
    }
    match state.group.remove_member(&peer).await {
        Ok(()) => {
            tracing::info!(%peer, %region, "removed a member on request");
            let (voters, learners) = state.group.members();
            Ok(Json(MemberRemoved {
                region: region.to_string(),
                removed: peer,
                voters,
                learners,
            })
            .into_response())
        }
        Err(GroupError::NotAMember(p)) => Err(error(
            StatusCode::NOT_FOUND,
            "not_a_member",
            format!("{p} is not a member of region {region}'s group; `agentmesh region status --region {region}` lists them"),
        )),
        Err(e) => Err(group_error(&region, e)),
    }
}

/// `PUT /v1/regions/{region}/policy`
pub async fn put_policy(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(policy): Json<Policy>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let path = format!("/v1/regions/{region}/policy");
    if let Err(problems) = policy.validate() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_policy",
            problems.join("; "),
        ));
    }
    let json = serde_json::to_value(&policy).ok();
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::PUT, &path, json).await;
    }
    if !state.group.is_bootstrapped() {
        return Err(not_bootstrapped(&region));
    }
    match state.group.set_policy(policy).await {
        Ok(applied) => Ok(Json(PolicyWritten {
            region: region.to_string(),
            version: applied.version,
            superseded: applied.superseded,
        })
        .into_response()),
        Err(GroupError::NotLeader {
            leader: Some(leader),
        }) => forward_to_leader(&state, &headers, &region, &leader, Method::PUT, &path, json).await,
        Err(e) => Err(group_error(&region, e)),
    }
}

/// `GET /v1/regions/{region}/policy[?consistent=true]`
pub async fn get_policy(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<PolicyQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let path = format!(
        "/v1/regions/{region}/policy{}",
        if query.consistent {
            "?consistent=true"
        } else {
            ""
        }
    );
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::GET, &path, None).await;
    }
    if !state.group.is_bootstrapped() {
        return Err(not_bootstrapped(&region));
    }
    if query.consistent {
        return match state.group.consistent_state().await {
            Ok(s) => Ok(Json(PolicyRead {
                region: region.to_string(),
                version: s.policy_version,
                policy: s.policy,
                consistent: true,
                served_by: state.peer_id.clone(),
                behind_leader: Some(0),
            })
            .into_response()),
            Err(GroupError::NotLeader {
                leader: Some(leader),
            }) => {
                forward_to_leader(&state, &headers, &region, &leader, Method::GET, &path, None)
                    .await
            }
            Err(e) => Err(group_error(&region, e)),
        };
    }
    let local = state.group.local_state();
    let applied = state.group.status().last_applied.unwrap_or(0);
    let behind_leader = leader_last_index(&state, &region)
        .await
        .map(|l| l.saturating_sub(applied));
    Ok(Json(PolicyRead {
        region: region.to_string(),
        version: local.policy_version,
        policy: local.policy,
        consistent: false,
        served_by: state.peer_id.clone(),
        behind_leader,
    })
    .into_response())
}

/// The leader's last log index: local if this node leads, else one status call.
async fn leader_last_index(state: &ApiState, region: &Region) -> Option<u64> {
    if state.group.is_leader() {
        return state.group.status().last_log_index;
    }
    let leader = state.group.leader()?;
    let peer = peer_in_region(state, region, Some(&leader)).await.ok()?;
    // Counted as forwarded to the limit: the leader answers itself.
    let request = ForwardRequest {
        method: "GET".into(),
        path: format!("/v1/regions/{region}/status"),
        hops: FORWARD_HOPS_MAX,
        body: Vec::new(),
        deadline_ms: 0,
    };
    let answer = state
        .network
        .forward(peer, &request, Duration::from_secs(2))
        .await
        .ok()
        .filter(|a| a.status == 200)?;
    let answer: StatusAnswer = serde_json::from_slice(&answer.body).ok()?;
    answer.status.last_log_index
}
