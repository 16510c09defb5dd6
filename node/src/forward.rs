//! Node-to-node forwarding, the node's side (the wire is
//! `mesh_net::forward`): a request another node could not serve arrives
//! over libp2p and is served by this node's own API router, as if a client
//! had sent it, and the answer goes back the same way.
//!
//! Only requests that nodes forward are taken: the routes under
//! `/v1/regions/`, from a peer this node's membership view knows (not one
//! it has seen leave or die). The sender is the peer id the Noise
//! handshake proved; its address is never used.
//!
//! Until admission control exists any key can be a member, so what a
//! sender may ask depends on what it is to this node ([`Need`]): reads and
//! tasks and bootstraps (a no-op once a group exists) any member;
//! registering a dataset a member of this node's group; every other
//! write (policy, agents, members) only a voter of this node's group — a
//! follower passing a write to its leader. A write for another region is
//! sent to a node of that region, not through this one.

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use mesh_net::forward::FORWARD_RESPONSE_MAX;
use mesh_net::{ForwardResponse, InboundForward, Network};
use mesh_types::MemberState;
use tokio::sync::mpsc;
use tower::ServiceExt;

/// The header that counts how many times a request was forwarded.
pub const FORWARDED: &str = "x-agentmesh-forwarded";

/// The routes another node may forward here.
const FORWARDABLE_PREFIX: &str = "/v1/regions/";

/// What a sender must be for a forwarded request to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any member of the gossip view that is alive or suspect.
    Member,
    /// A voter or learner of this node's group.
    GroupMember,
    /// A voter of this node's group.
    Voter,
}

/// What `method path` needs of its sender (see [`Need`]).
/// The path is matched whole against the routes' shapes, after refusing
/// anything a URI parser could read differently (a `#` fragment is dropped
/// by the router: `.../agents#/tasks` must not pass as a task).
pub fn need(method: &str, path: &str) -> Need {
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-_.~%?=&".contains(&b));
    if !plain {
        return Need::Voter;
    }
    let route = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = route.split('/').collect();
    let action = match segments.as_slice() {
        ["", "v1", "regions", region, action] if !region.is_empty() => *action,
        _ => "",
    };
    match (method, action) {
        ("GET", _) => Need::Member,
        ("POST", "tasks") => Need::Member,
        // Harmless once there is a group (it changes nothing then); before
        // it, any region node could ask as well (see SECURITY.md).
        ("POST", "bootstrap") => Need::Member,
        ("POST", "datasets") => Need::GroupMember,
        // A host (any member of the group, learners too) claims the task
        // ids it runs; the route checks that it claims for itself.
        ("POST", "claims") => Need::GroupMember,
        // A host copies its agents' state to members of its group; the
        // routes check that it is the agent's host.
        ("POST", "checkpoints" | "seals") => Need::GroupMember,
        // A node asks its leader to mark it draining; the route checks
        // that it asks for itself.
        ("POST", "draining") => Need::GroupMember,
        _ => Need::Voter,
    }
}

/// Serves peers' forwarded requests with `router` until the channel closes.
pub async fn serve(
    router: Router,
    network: Network,
    group: consensus::RegionGroup,
    region: mesh_types::Region,
    mut inbound: mpsc::Receiver<InboundForward>,
) {
    while let Some(forward) = inbound.recv().await {
        let router = router.clone();
        let network = network.clone();
        let group = group.clone();
        let region = region.clone();
        tokio::spawn(async move {
            let answer = answer(router, &network, &group, &region, &forward).await;
            // The sender may have given up; nothing to do then.
            let _ = forward.reply.send(answer);
        });
    }
}

async fn answer(
    router: Router,
    network: &Network,
    group: &consensus::RegionGroup,
    region: &mesh_types::Region,
    forward: &InboundForward,
) -> ForwardResponse {
    let request = &forward.request;
    let from = forward.from.to_base58();
    match network.member(&forward.from).await {
        Ok(Some((MemberState::Alive | MemberState::Suspect, _))) => {}
        Ok(member) => {
            let state = member.map(|(state, _)| state);
            tracing::debug!(from = %forward.from, ?state, path = %request.path, "refused a forward from a non-member");
            return ForwardResponse::error(
                403,
                "not_a_member",
                "this node forwards requests only between members of the mesh it sees alive",
            );
        }
        Err(e) => return ForwardResponse::error(503, "unavailable", &e.to_string()),
    }
    let (voters, learners) = group.members();
    let needs = need(&request.method, &request.path);
    let allowed = match needs {
        Need::Member => true,
        Need::GroupMember => voters.contains(&from) || learners.contains(&from),
        Need::Voter => voters.contains(&from),
    };
    if !allowed {
        tracing::debug!(%from, method = %request.method, path = %request.path, "refused a forwarded write");
        return ForwardResponse::error(
            403,
            "write_not_forwardable",
            &format!(
                "a node of region {region} takes this forwarded write only from {} of its group, until admission control exists: send {} {} with --api to a voter of the region it names (`agentmesh region status --region REGION` lists them)",
                if needs == Need::GroupMember { "the members" } else { "the voters" },
                request.method, request.path
            ),
        );
    }
    let method = match request.method.as_str() {
        "GET" => Method::GET,
        "PUT" => Method::PUT,
        "POST" => Method::POST,
        "DELETE" => Method::DELETE,
        other => {
            return ForwardResponse::error(
                405,
                "method_not_allowed",
                &format!("{other:?} is not forwarded"),
            )
        }
    };
    if !request.path.starts_with(FORWARDABLE_PREFIX) || request.path.contains("..") {
        return ForwardResponse::error(
            404,
            "not_forwardable",
            &format!("{:?} is not a route nodes forward", request.path),
        );
    }
    let built = Request::builder()
        .method(method)
        .uri(&request.path)
        .header(FORWARDED, request.hops.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(request.body.clone()));
    let mut http = match built {
        Ok(http) => http,
        Err(e) => return ForwardResponse::error(400, "bad_request", &e.to_string()),
    };
    http.extensions_mut()
        .insert(crate::api::Client(forward.from.to_base58()));
    http.extensions_mut()
        .insert(crate::api::ForwardedBy(forward.from.to_base58()));
    let response = match router.oneshot(http).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    match axum::body::to_bytes(response.into_body(), FORWARD_RESPONSE_MAX).await {
        Ok(body) => ForwardResponse {
            status,
            body: body.to_vec(),
        },
        Err(e) => ForwardResponse::error(
            502,
            "answer_too_large",
            &format!("the answer could not be relayed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{need, Need};

    #[test]
    fn reads_and_tasks_are_open_to_members_and_writes_to_voters_only() {
        for (method, path, needs) in [
            (
                "GET",
                "/v1/regions/eu-west/policy?consistent=true",
                Need::Member,
            ),
            ("POST", "/v1/regions/eu-west/tasks", Need::Member),
            ("POST", "/v1/regions/eu-west/bootstrap", Need::Member),
            ("POST", "/v1/regions/eu-west/datasets", Need::GroupMember),
            ("POST", "/v1/regions/eu-west/draining", Need::GroupMember),
            // Disguised writes: a fragment the router drops, extra segments.
            ("POST", "/v1/regions/eu-west/agents#/tasks", Need::Voter),
            ("POST", "/v1/regions/eu-west/agents#/datasets", Need::Voter),
            ("POST", "/v1/regions/eu-west/agents/x/tasks", Need::Voter),
            ("POST", "/v1/regions//tasks", Need::Voter),
            ("POST", "/v1/regions/eu-west/agents\n/tasks", Need::Voter),
            ("GET", "/v1/regions/eu-west/policy#x", Need::Voter),
        ] {
            assert_eq!(need(method, path), needs, "{method} {path}");
        }
        for (method, path) in [
            ("PUT", "/v1/regions/eu-west/policy"),
            ("POST", "/v1/regions/eu-west/agents"),
            ("DELETE", "/v1/regions/eu-west/agents/echo"),
            ("DELETE", "/v1/regions/eu-west/members/12D3KooW"),
            ("PATCH", "/v1/regions/eu-west/tasks"),
        ] {
            assert_eq!(need(method, path), Need::Voter, "{method} {path}");
        }
    }
}
