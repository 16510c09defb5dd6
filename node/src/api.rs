//! The HTTP API every node serves (axum). Handlers ask the network actor for
//! a snapshot and render it; errors are JSON `{"error", "detail"}`.
//!
//! | route            | answer                                        |
//! |------------------|-----------------------------------------------|
//! | GET /v1/health   | `{status, peer_id, region, version}`          |
//! | GET /v1/members  | `[MemberView]`, the local node first          |
//! | GET /metrics     | Prometheus text                               |
//! | POST /v1/regions/{r}/bootstrap, GET .../status, GET/PUT .../policy | see `regions_api` |

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mesh_net::{Network, Snapshot};
use mesh_types::MemberView;
use serde::Serialize;

/// Largest request body accepted (a policy is a few KiB), on every route.
pub const REQUEST_BODY_MAX: usize = 64 * 1024;
/// Requests served at once; one more is answered 503 at once rather than
/// queued, so a flood cannot pile up memory or tasks.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// A request, its body included, is answered within this or cut off (504:
/// for a write, its outcome is then unknown). Long: a model run may wait
/// behind a full queue of others, and a bootstrap forwarded twice takes 40 s.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Connections served at once; one more is closed as soon as it is accepted.
pub const CONNECTIONS_MAX: usize = 512;
/// Connections from one IP address at once (loopback included: the CLI
/// opens one per command).
pub const CONNECTIONS_PER_IP_MAX: usize = 128;
/// A client must send a request's headers within this (slowloris).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// ... and its body within this, once the headers are in.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown`: HTTP/1.1, at most
/// [`CONNECTIONS_MAX`] connections, each request's headers within
/// [`HEADER_READ_TIMEOUT`]. In-flight requests finish on shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let per_ip = PerClient::default();
    let mut refused_log = std::time::Instant::now() - std::time::Duration::from_secs(60);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, for one: wait, do not spin.
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            if refused_log.elapsed() >= std::time::Duration::from_secs(10) {
                refused_log = std::time::Instant::now();
                tracing::warn!(%remote, "{CONNECTIONS_MAX} API connections are open; refusing more");
            }
            drop(tcp);
            continue;
        };
        let Some(per_ip) = per_ip.take(&remote.ip().to_string(), CONNECTIONS_PER_IP_MAX) else {
            drop(tcp);
            continue;
        };
        let client = Client(remote.ip().to_string());
        let service = TowerToHyperService::new(router.clone().map_request(
            move |r: axum::http::Request<hyper::body::Incoming>| {
                let mut r = r.map(axum::body::Body::new);
                r.extensions_mut().insert(client.clone());
                r
            },
        ));
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%remote, error = %e, "API connection ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop((permit, per_ip));
        });
    }
    // Let requests in flight finish (start.rs bounds the wait).
    let _ = connections
        .acquire_many(u32::try_from(CONNECTIONS_MAX).unwrap_or(u32::MAX))
        .await;
}

/// Who sent a request, for per-client limits: the remote IP of an HTTP
/// client, or the peer id of a node that forwarded it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client(pub String);

/// Set on a request another node forwarded here: that node's peer id, as
/// the Noise handshake proved it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ForwardedBy(pub String);

/// Counts what each client has in flight, up to a bound per client.
#[derive(Debug, Clone, Default)]
pub struct PerClient(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// One client's slot; given back on drop.
#[derive(Debug)]
pub struct ClientSlot {
    counts: PerClient,
    client: String,
}

impl PerClient {
    /// A slot for `client`, unless it holds `max` already.
    pub fn take(&self, client: &str, max: usize) -> Option<ClientSlot> {
        let mut counts = self.0.lock().ok()?;
        let n = counts.entry(client.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            client: client.to_owned(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.0.lock() {
            if let Some(n) = counts.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&self.client);
                }
            }
        }
    }
}

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The network actor.
    pub network: Network,
    /// This node's peer id.
    pub peer_id: String,
    /// This node's region.
    pub region: mesh_types::Region,
    /// This node's region group.
    pub group: consensus::RegionGroup,
    /// How long a request forwarded to another node may take (a Raft write
    /// there, plus a margin).
    pub forward_timeout: std::time::Duration,
    /// The models this node runs.
    pub models: crate::models::Models,
    /// Model jobs each client has queued or running.
    pub model_jobs: PerClient,
    /// The tasks this node runs and the audit log it keeps.
    pub tasks: std::sync::Arc<mesh_task::Host>,
    /// Copies of each hosted agent's state on other nodes (`[agents]`).
    pub checkpoint_replicas: usize,
    /// Rate-limit buckets (per client here, per agent on its host).
    pub buckets: std::sync::Arc<crate::rate::Buckets>,
    /// The buffers of streamed tasks this node hosts.
    pub streams: std::sync::Arc<crate::streams::Streams>,
    /// The API listens on a loopback address (its Host header is checked).
    pub api_is_loopback: bool,
}

/// An API error: a status and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Its stable name (`unknown_agent`, `not_bootstrapped`, ...).
    pub fn name(&self) -> &'static str {
        self.error
    }

    /// What it says for people.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// An error with its status, a short machine-readable name and a detail for people.
    pub fn new(status: StatusCode, error: &'static str, detail: String) -> Self {
        Self {
            status,
            error,
            detail,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    detail: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            detail: &self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<mesh_net::NetworkError> for ApiError {
    fn from(e: mesh_net::NetworkError) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "unavailable",
            detail: format!("{e}; the node is shutting down, try another node"),
        }
    }
}

/// The router with every route.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/members", get(members))
        .route("/metrics", get(metrics))
        .route(
            "/v1/regions/{region}/bootstrap",
            post(crate::regions_api::bootstrap),
        )
        .route(
            "/v1/regions/{region}/status",
            get(crate::regions_api::status),
        )
        .route(
            "/v1/regions/{region}/members/{peer}",
            axum::routing::delete(crate::regions_api::remove_member),
        )
        .route(
            "/v1/regions/{region}/agents",
            get(crate::agents_api::list).post(crate::agents_api::deploy),
        )
        .route(
            "/v1/regions/{region}/agents/{name}",
            get(crate::agents_api::get).delete(crate::agents_api::remove),
        )
        .route(
            "/v1/regions/{region}/agents/{name}/move",
            post(crate::agents_api::move_agent),
        )
        .route(
            "/v1/regions/{region}/draining",
            post(crate::agents_api::set_draining),
        )
        .route(
            "/v1/datasets/{name}/documents",
            post(crate::datasets::put_documents),
        )
        .route(
            "/v1/datasets/{name}/register",
            post(crate::datasets::register),
        )
        .route(
            "/v1/regions/{region}/datasets",
            get(crate::datasets::list).post(crate::datasets::region_register),
        )
        .route("/v1/tasks", post(crate::tasks::submit))
        .route("/v1/tasks/{id}", get(crate::tasks::get))
        .route(
            "/v1/regions/{region}/tasks",
            post(crate::tasks::region_task),
        )
        .route(
            "/v1/regions/{region}/tasks/{id}/tokens",
            get(crate::streams_api::region_tokens),
        )
        .route(
            "/v1/regions/{region}/claims",
            post(crate::tasks::region_claim),
        )
        .route(
            "/v1/regions/{region}/checkpoints",
            post(crate::checkpoints::region_checkpoints),
        )
        .route(
            "/v1/regions/{region}/seals",
            post(crate::checkpoints::region_seals),
        )
        .route("/v1/audit", get(crate::tasks::audit_log))
        .route("/v1/audit/verify", get(crate::tasks::audit_verify))
        .route(
            "/v1/regions/{region}/audit/{peer}",
            get(crate::tasks::node_audit),
        )
        .route("/v1/models", get(crate::models::list))
        .route("/v1/models/{name}/run", post(crate::models::run))
        .route(
            "/v1/regions/{region}/policy",
            get(crate::regions_api::get_policy).put(crate::regions_api::put_policy),
        )
        // Policies are small; this bound also keeps Raft batches under the frame limit.
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BODY_MAX))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Guard {
                in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
                local_only: state.api_is_loopback,
            },
            guard,
        ))
        .with_state(state)
}

/// What every request passes (see [`guard`]).
#[derive(Debug, Clone)]
struct Guard {
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
    /// The API listens on a loopback address: only this machine's clients
    /// reach it, and a browser's page is the one that must be kept out.
    local_only: bool,
}

/// Every request: on an API bound to loopback, its Host header names the
/// node by address or `localhost` (a web page a browser shows cannot reach
/// it through DNS rebinding, which needs a name of the attacker's; an API
/// bound to another address is reached by name legitimately); at most
/// [`REQUESTS_IN_FLIGHT_MAX`] at once; each answered within
/// [`REQUEST_TIMEOUT`].
async fn guard(
    State(guard): State<Guard>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .filter(|_| guard.local_only);
    if let Some(host) = host {
        if !host.to_str().is_ok_and(host_is_an_address) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "foreign_host",
                format!(
                    "Host {:?} is not this node's address: address the API by IP (or localhost), as the CLI does",
                    host
                ),
            )
            .into_response();
        }
    }
    // The body is read here, whole, within BODY_READ_TIMEOUT and before a
    // request slot is taken: a client that trickles it holds no slot, and
    // one that sends too much is refused at the limit, not read to its end.
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, REQUEST_BODY_MAX),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body exceeds the {REQUEST_BODY_MAX}-byte limit"),
            )
            .into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "slow_client",
                format!("the request body did not arrive within {BODY_READ_TIMEOUT:?}"),
            )
            .into_response()
        }
    };
    let Ok(_permit) = guard.in_flight.try_acquire() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{REQUESTS_IN_FLIGHT_MAX} requests are in flight on this node; retry shortly"),
        )
        .into_response();
    };
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the request was not answered within {REQUEST_TIMEOUT:?} (a slow client, or a stuck forward); a write's outcome is unknown: read before writing again"),
        )
        .into_response(),
    }
}

/// True for `IP`, `IP:port`, `[IPv6]:port` and `localhost[:port]`.
fn host_is_an_address(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port[1..].parse::<u16>().is_ok() => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod per_client_tests {
    use super::PerClient;

    #[test]
    fn a_client_holds_at_most_its_bound_and_slots_come_back() {
        let jobs = PerClient::default();
        let held: Vec<_> = (0..3)
            .map(|_| jobs.take("10.0.0.1", 3).expect("slot"))
            .collect();
        assert!(jobs.take("10.0.0.1", 3).is_none(), "a fourth");
        assert!(
            jobs.take("10.0.0.2", 3).is_some(),
            "another client is not held up"
        );
        drop(held);
        assert!(jobs.take("10.0.0.1", 3).is_some(), "slots came back");
        assert!(
            jobs.0.lock().expect("lock").get("10.0.0.2").is_none(),
            "no entry left behind"
        );
    }
}

#[cfg(test)]
mod host_tests {
    use super::host_is_an_address;

    #[test]
    fn only_addresses_and_localhost_are_hosts_of_this_api() {
        for ok in [
            "127.0.0.1:7070",
            "127.0.0.1",
            "[::1]:7070",
            "[::1]",
            "localhost:7070",
            "LOCALHOST",
            "10.1.2.3:80",
        ] {
            assert!(host_is_an_address(ok), "{ok}");
        }
        for bad in [
            "evil.example:7070",
            "evil.example",
            "127.0.0.1.evil.example",
            "[::1",
            "[::1]x",
            "",
            "localhost.evil:1",
        ] {
            assert!(!host_is_an_address(bad), "{bad}");
        }
    }
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'a str,
    peer_id: &'a str,
    region: &'a str,
    version: &'a str,
}

async fn health(State(state): State<ApiState>) -> Result<Response, ApiError> {
    // Answering through the actor proves the event loop is alive, not only the HTTP task.
    state.network.snapshot().await?;
    // A node whose Raft stopped exits (start.rs); until it has, say so.
    if let Some(reason) = state.group.stopped() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "raft_stopped",
            format!("this node's region Raft stopped ({reason}); the node is exiting: fix the cause and restart it"),
        ));
    }
    Ok(Json(Health {
        status: "ok",
        peer_id: &state.peer_id,
        region: state.region.as_str(),
        version: mesh_types::AGENTMESH_VERSION,
    })
    .into_response())
}

async fn members(State(state): State<ApiState>) -> Result<Json<Vec<MemberView>>, ApiError> {
    Ok(Json(state.network.snapshot().await?.members))
}

async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let snapshot = state.network.snapshot().await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&snapshot),
    )
        .into_response())
}

/// Prometheus text exposition of a snapshot.
pub fn render_metrics(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let by_state: Vec<(String, u64)> = s
        .counts
        .iter()
        .map(|(state, n)| (format!("{{state=\"{state}\"}}"), *n as u64))
        .collect();
    family(
        "agentmesh_members",
        "gauge",
        "Remote members in this node's view, by state.",
        &by_state,
    );
    let one = |v: u64| vec![(String::new(), v)];
    family(
        "agentmesh_connections_open",
        "gauge",
        "Open libp2p connections.",
        &one(u64::from(s.connections)),
    );
    family(
        "agentmesh_peers_connected",
        "gauge",
        "Peers with at least one open connection.",
        &one(s.connected_peers as u64),
    );
    family(
        "agentmesh_gossip_messages_received_total",
        "counter",
        "gossipsub messages received on the members topic.",
        &one(s.gossip_in),
    );
    family(
        "agentmesh_gossip_messages_published_total",
        "counter",
        "Node records this node published.",
        &one(s.gossip_out),
    );
    family(
        "agentmesh_gossip_publish_failures_total",
        "counter",
        "Publishes that reached no peer.",
        &one(s.publish_failures),
    );
    family(
        "agentmesh_records_rejected_total",
        "counter",
        "Records refused: malformed, bad signature or wrong signer.",
        &one(s.records_rejected),
    );
    family(
        "agentmesh_records_ignored_total",
        "counter",
        "Records ignored: stale sequence number or from the future.",
        &one(s.records_ignored),
    );
    family(
        "agentmesh_connections_refused_total",
        "counter",
        "Connections refused by a limit (total, per peer, per IP, pending, memory).",
        &one(s.connections_refused),
    );
    out
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        error: "not_found",
        detail: format!("no route {uri}; this node serves /v1/health, /v1/members, /v1/regions/REGION/{{bootstrap,status,policy}} and /metrics"),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        error: "method_not_allowed",
        detail: format!("{method} is not allowed on {uri}; use GET"),
    }
}

#[cfg(test)]
mod tests {
    use mesh_types::MemberState;

    use super::*;

    #[test]
    fn metrics_render_every_family_with_help_and_type() {
        let snapshot = Snapshot {
            members: vec![],
            counts: [
                (MemberState::Alive, 4),
                (MemberState::Suspect, 1),
                (MemberState::Dead, 0),
                (MemberState::Left, 2),
            ],
            connections: 5,
            connected_peers: 4,
            gossip_in: 10,
            gossip_out: 3,
            publish_failures: 1,
            records_rejected: 0,
            records_ignored: 2,
            connections_refused: 7,
        };
        let text = render_metrics(&snapshot);
        assert!(
            text.contains("agentmesh_members{state=\"alive\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("agentmesh_members{state=\"left\"} 2\n"));
        assert!(text.contains("agentmesh_connections_open 5\n"));
        assert!(text.contains("agentmesh_gossip_messages_received_total 10\n"));
        assert!(text.contains("agentmesh_gossip_messages_published_total 3\n"));
        assert!(text.contains("agentmesh_connections_refused_total 7\n"));
        assert_eq!(
            text.matches("# TYPE").count(),
            text.matches("# HELP").count()
        );
    }
}
