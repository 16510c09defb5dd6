//! The HTTP side of streamed tasks (see `streams`): the entry node's
//! server-sent events, and the long polls that read a host's buffer.
//!
//! Events: `token` (data: `{"text": "..."}`) as pieces come, then one
//! `result` (data: the task's answer, as `POST /v1/tasks` returns it) or
//! one `error` (data: `{"status": N, "error": {...}}`).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;

use crate::api::{ApiError, ApiState};
use crate::regions_api::{error, forward_to_peer, forward_to_region, hops, parse_region};
use crate::streams::{Tokens, POLL_WAIT};
use crate::tasks::TaskRun;

/// Query of `GET /v1/regions/{region}/tasks/{id}/tokens`.
#[derive(Debug, Deserialize)]
pub struct TokensQuery {
    /// The task's agent (its lease says which node hosts it).
    agent: String,
    /// The first piece wanted.
    #[serde(default)]
    from: usize,
    /// The task's entry node: only it reads the stream.
    entry: String,
}

fn tokens_path(region: &str, task_id: &str, agent: &str, from: usize, entry: &str) -> String {
    format!("/v1/regions/{region}/tasks/{task_id}/tokens?agent={agent}&from={from}&entry={entry}")
}

/// `GET /v1/regions/{region}/tasks/{id}/tokens?agent=A&from=N&entry=E`: the
/// pieces of a streamed task from `from` on, read where its agent lives
/// (waiting up to 2 s for one). Only the task's entry node reads them:
/// where a result may go was checked for it.
pub async fn region_tokens(
    State(state): State<ApiState>,
    Path((name, task_id)): Path<(String, String)>,
    Query(query): Query<TokensQuery>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= crate::tasks::TASK_ID_MAX
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if !plain(&query.agent) || !plain(&query.entry) || !plain(&task_id) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "agent, entry and task id are names: letters, digits and - _ . :".into(),
        ));
    }
    let by = forwarded_by.map(|b| b.0 .0.clone());
    let path = tokens_path(
        region.as_str(),
        &task_id,
        &query.agent,
        query.from,
        &query.entry,
    );
    let refused = |why: String| Err(error(StatusCode::FORBIDDEN, "not_the_entry", why));
    // The one who asks must be the entry node, or a node of this region's
    // group relaying for it (which checked it).
    let relayed = by
        .as_deref()
        .is_some_and(|b| b != query.entry && state.group.role_of(b).is_some());
    let from_entry = match &by {
        Some(b) => *b == query.entry,
        None => query.entry == state.peer_id,
    };
    if !from_entry && !relayed {
        return refused(format!(
            "only task {task_id}'s entry node {} reads its stream",
            query.entry
        ));
    }
    if region != state.region {
        return forward_to_region(&state, &headers, &region, Method::GET, &path, None).await;
    }
    let lease = state
        .group
        .local_state()
        .agents
        .get(&query.agent)
        .and_then(|e| e.lease.clone());
    let Some(lease) = lease else {
        return Ok(Json(Tokens::default()).into_response());
    };
    if lease.node == state.peer_id {
        let Some(stream) = state.streams.get(&task_id) else {
            return Ok(Json(Tokens::default()).into_response());
        };
        if stream.entry != query.entry {
            return refused(format!(
                "task {task_id} entered at {}, not {}",
                stream.entry, query.entry
            ));
        }
        return Ok(Json(stream.read(query.from, POLL_WAIT).await).into_response());
    }
    if hops(&headers) >= 2 {
        return Ok(Json(Tokens::default()).into_response());
    }
    let host = lease.node.parse().map_err(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
            format!("the lease names a bad peer id {}", lease.node),
        )
    })?;
    forward_to_peer(&state, &headers, host, Method::GET, &path, None).await
}

/// The region that deploys `agent`: this node's own when it does, else the
/// first other region (of those it sees) that answers for it.
async fn agent_region(state: &ApiState, headers: &HeaderMap, agent: &str) -> Option<String> {
    if state.group.local_state().agents.contains_key(agent) {
        return Some(state.region.to_string());
    }
    for region in crate::tasks::other_regions(state).await.ok()? {
        let path = format!("/v1/regions/{region}/agents/{agent}");
        if let Ok(r) = forward_to_region(state, headers, &region, Method::GET, &path, None).await {
            if r.status().is_success() {
                return Some(region.to_string());
            }
        }
    }
    None
}

/// One poll of the host's buffer, from this (the entry) node.
async fn poll(
    state: &ApiState,
    headers: &HeaderMap,
    region: &str,
    task_id: &str,
    agent: &str,
    from: usize,
) -> Option<Tokens> {
    let path = tokens_path(region, task_id, agent, from, &state.peer_id);
    let region = parse_region(region).ok()?;
    let response = if region == state.region {
        // Through the same handler a peer's poll takes, as this node.
        let lease = state
            .group
            .local_state()
            .agents
            .get(agent)
            .and_then(|e| e.lease.clone())?;
        if lease.node == state.peer_id {
            let stream = state.streams.get(task_id)?;
            return Some(stream.read(from, POLL_WAIT).await);
        }
        let host = lease.node.parse().ok()?;
        forward_to_peer(state, headers, host, Method::GET, &path, None).await
    } else {
        forward_to_region(state, headers, &region, Method::GET, &path, None).await
    };
    let response = response.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let bytes = axum::body::to_bytes(
        response.into_body(),
        mesh_net::forward::FORWARD_RESPONSE_MAX,
    )
    .await
    .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn token_events(tokens: &Tokens) -> Vec<Event> {
    let mut events: Vec<Event> = tokens
        .pieces
        .iter()
        .map(|p| {
            Event::default()
                .event("token")
                .data(serde_json::json!({ "text": p }).to_string())
        })
        .collect();
    if tokens.cut {
        events.push(
            Event::default()
                .event("cut")
                .data("{\"detail\": \"the streamed text passed the buffer's limit; the result has all of it\"}"),
        );
    }
    events
}

/// What the stream of events is doing next.
enum Step {
    Polling { from: usize, cut_said: bool },
    Done,
}

/// `POST /v1/tasks` with `"stream": true`: the task runs as always; its
/// generated pieces come as `token` events while it runs, then its answer.
pub async fn stream(
    state: ApiState,
    headers: HeaderMap,
    run: TaskRun,
) -> Result<Response, ApiError> {
    let agent = run.request.agent.clone();
    let task_id = run.request.task_id.clone().unwrap_or_default();
    let Some(region) = agent_region(&state, &headers, &agent).await else {
        // Not deployed anywhere it can see: the usual answer says so.
        return crate::tasks::route(&state, &headers, run).await;
    };
    let task = {
        let (state, headers) = (state.clone(), headers.clone());
        tokio::spawn(async move { crate::tasks::route(&state, &headers, run).await })
    };
    let task = std::sync::Arc::new(tokio::sync::Mutex::new(Some(task)));
    let events = futures::stream::unfold(
        Step::Polling {
            from: 0,
            cut_said: false,
        },
        move |step| {
            let (state, headers, region, agent, task_id, task) = (
                state.clone(),
                headers.clone(),
                region.clone(),
                agent.clone(),
                task_id.clone(),
                task.clone(),
            );
            async move {
                let Step::Polling { from, cut_said } = step else {
                    return None;
                };
                let finished = task
                    .lock()
                    .await
                    .as_ref()
                    .is_none_or(tokio::task::JoinHandle::is_finished);
                if !finished {
                    let events = match poll(&state, &headers, &region, &task_id, &agent, from).await
                    {
                        Some(tokens) if tokens.known => {
                            let mut t = tokens;
                            if cut_said {
                                t.cut = false;
                            }
                            let cut = cut_said || t.cut;
                            let next = t.next;
                            let events = token_events(&t);
                            return Some((
                                events,
                                Step::Polling {
                                    from: next,
                                    cut_said: cut,
                                },
                            ));
                        }
                        // Not started on its host yet, or the host is
                        // unreachable: the task's own answer will say.
                        _ => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Vec::new()
                        }
                    };
                    return Some((events, Step::Polling { from, cut_said }));
                }
                // The task ended: the pieces not read yet, then its answer.
                let mut events = Vec::new();
                if let Some(t) = poll(&state, &headers, &region, &task_id, &agent, from).await {
                    if t.known && !t.pieces.is_empty() {
                        events.extend(token_events(&Tokens {
                            cut: t.cut && !cut_said,
                            ..t
                        }));
                    }
                }
                let handle = task.lock().await.take();
                let outcome = match handle {
                    Some(h) => h.await.unwrap_or_else(|e| {
                        Err(error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "task_failed",
                            format!("the task stopped: {e}"),
                        ))
                    }),
                    None => Err(error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "task_failed",
                        "no task".into(),
                    )),
                };
                let response = match outcome {
                    Ok(r) => r,
                    Err(e) => e.into_response(),
                };
                let status = response.status();
                let body = axum::body::to_bytes(
                    response.into_body(),
                    mesh_net::forward::FORWARD_RESPONSE_MAX,
                )
                .await
                .unwrap_or_default();
                let body = String::from_utf8_lossy(&body).into_owned();
                events.push(if status.is_success() {
                    Event::default().event("result").data(body)
                } else {
                    let error: serde_json::Value =
                        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
                    Event::default().event("error").data(
                        serde_json::json!({ "status": status.as_u16(), "error": error })
                            .to_string(),
                    )
                });
                Some((events, Step::Done))
            }
        },
    )
    .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok::<Event, Infallible>)));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
