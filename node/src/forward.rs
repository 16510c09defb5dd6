//! Node-to-node forwarding, the node's side (the wire is
//! `mesh_net::forward`): a request another node could not serve arrives
//! over libp2p and is served by this node's own API router, as if a client
//! had sent it, and the answer goes back the same way.
//!
//! Only requests that nodes forward are taken: the routes under
//! `/v1/regions/`, from a peer this node's membership view knows (not one
//! it has seen leave or die). The sender is the peer id the Noise
//! handshake proved; its address is never used.

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

/// Serves peers' forwarded requests with `router` until the channel closes.
pub async fn serve(router: Router, network: Network, mut inbound: mpsc::Receiver<InboundForward>) {
    while let Some(forward) = inbound.recv().await {
        let router = router.clone();
        let network = network.clone();
        tokio::spawn(async move {
            let answer = answer(router, &network, &forward).await;
            // The sender may have given up; nothing to do then.
            let _ = forward.reply.send(answer);
        });
    }
}

async fn answer(router: Router, network: &Network, forward: &InboundForward) -> ForwardResponse {
    let request = &forward.request;
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
