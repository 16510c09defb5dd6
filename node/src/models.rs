//! The node's models: loaded at start from `--models-dir` (each checked by
//! hash; a refused model is reported and the node runs on without it),
//! advertised in the gossip record, served off the async runtime, and
//! reachable over HTTP (`GET /v1/models`, `POST /v1/models/{name}/run`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use mesh_types::ModelAdvert;
use models::generate::Params;
use models::{
    chat_prompt, EmbedService, Embedder, GenerateService, Generator, Kind, ModelSpec, Piece,
    ServeConfig, ServeError,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::api::{ApiError, ApiState};

/// Model jobs one client (an IP address, or a forwarding node) may have
/// queued or running at once, so that one client cannot fill a model's
/// queue (64) and keep everyone else out.
pub const MODEL_JOBS_PER_CLIENT_MAX: usize = 8;

/// A model that runs here.
#[derive(Debug, Clone)]
pub enum Service {
    /// An embedding model.
    Embed(EmbedService),
    /// A generation model.
    Generate(GenerateService),
}

/// One model of the registry, as this node holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    spec: &'static ModelSpec,
    size: u64,
    service: Result<Service, String>,
}

/// Every model of the registry, loaded or not.
#[derive(Debug, Clone, Default)]
pub struct Models {
    entries: Arc<Vec<Entry>>,
}

impl Models {
    /// No models (the node was started without `--models-dir`).
    pub fn none() -> Self {
        Self::default()
    }

    /// Verifies and loads every registry model from `dir`, one after the
    /// other, logging progress and time. Blocking: call it off the runtime.
    pub fn load(dir: &Path) -> Self {
        let device = models::device();
        let entries = models::ALL
            .iter()
            .map(|spec| {
                let size = spec
                    .files
                    .iter()
                    .filter_map(|f| std::fs::metadata(dir.join(f.path)).ok())
                    .map(|m| m.len())
                    .sum();
                info!(model = spec.name, mb = size / 1_000_000, "checking sha256 and loading");
                let started = Instant::now();
                let service = match spec.kind {
                    Kind::Embedding => Embedder::load(spec, dir, &device).map(|m| {
                        Service::Embed(EmbedService::start(spec.name, m, ServeConfig::default()))
                    }),
                    Kind::Generation => Generator::load(spec, dir, &device).map(|m| {
                        Service::Generate(GenerateService::start(
                            spec.name,
                            m,
                            ServeConfig::default(),
                        ))
                    }),
                };
                let service = match service {
                    Ok(s) => {
                        info!(model = spec.name, secs = format!("{:.2}", started.elapsed().as_secs_f64()), "model loaded");
                        Ok(s)
                    }
                    Err(e) => {
                        error!(model = spec.name, error = %e, "model refused; the node runs on without it");
                        Err(e.to_string())
                    }
                };
                Entry {
                    spec,
                    size,
                    service,
                }
            })
            .collect();
        Self {
            entries: Arc::new(entries),
        }
    }

    /// The models that loaded, with their services.
    pub fn services(&self) -> impl Iterator<Item = (&'static ModelSpec, &Service)> {
        self.entries
            .iter()
            .filter_map(|e| e.service.as_ref().ok().map(|s| (e.spec, s)))
    }

    /// What the gossip record says this node holds.
    pub fn adverts(&self) -> Vec<ModelAdvert> {
        self.entries
            .iter()
            .filter(|e| e.service.is_ok())
            .map(|e| ModelAdvert {
                name: e.spec.name.into(),
                sha256: e.spec.sha256().into(),
            })
            .collect()
    }
}

/// A row of `GET /v1/models`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelRow {
    /// Registry name.
    pub name: String,
    /// `embedding` or `generation`.
    pub kind: Kind,
    /// sha256 of its main file.
    pub sha256: String,
    /// Bytes on disk (0 when missing).
    pub size: u64,
    /// Loaded and serving.
    pub loaded: bool,
    /// Why it is not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/models`
pub async fn list(State(state): State<ApiState>) -> Json<Vec<ModelRow>> {
    let rows = if state.models.entries.is_empty() {
        // Not started with --models-dir: the registry, nothing loaded.
        models::ALL
            .iter()
            .map(|spec| ModelRow {
                name: spec.name.into(),
                kind: spec.kind,
                sha256: spec.sha256().into(),
                size: 0,
                loaded: false,
                error: Some("the node was started without --models-dir".into()),
            })
            .collect()
    } else {
        state
            .models
            .entries
            .iter()
            .map(|e| ModelRow {
                name: e.spec.name.into(),
                kind: e.spec.kind,
                sha256: e.spec.sha256().into(),
                size: e.size,
                loaded: e.service.is_ok(),
                error: e.service.as_ref().err().cloned(),
            })
            .collect()
    };
    Json(rows)
}

/// Body of `POST /v1/models/{name}/run`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Text to embed, or the user's message.
    pub input: String,
    /// New tokens at most (generation). Default 64.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Continue the input as raw text instead of a chat turn.
    #[serde(default)]
    pub raw: bool,
}

/// Answer of `POST /v1/models/{name}/run`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunAnswer {
    /// The model.
    pub model: String,
    /// Embedding: its dimensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dims: Option<usize>,
    /// Embedding: its L2 norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<f32>,
    /// Embedding: its first values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<Vec<f32>>,
    /// Generation: the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Generation: new tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    /// Time on this node.
    pub millis: u64,
}

fn serve_error(e: ServeError) -> ApiError {
    if e.retryable() {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model", e.to_string())
    }
}

/// `POST /v1/models/{name}/run`
pub async fn run(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    client: Option<axum::Extension<crate::api::Client>>,
    Json(request): Json<RunRequest>,
) -> Result<Json<RunAnswer>, ApiError> {
    let client = client.map(|c| c.0 .0).unwrap_or_default();
    let _slot = state
        .model_jobs
        .take(&client, MODEL_JOBS_PER_CLIENT_MAX)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_jobs",
                format!("this client has {MODEL_JOBS_PER_CLIENT_MAX} model jobs queued or running on this node; wait for one to finish"),
            )
        })?;
    let entry = state
        .models
        .entries
        .iter()
        .find(|e| e.spec.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = models::ALL.iter().map(|s| s.name).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!(
                    "no model {name:?} on this node; known: {}",
                    known.join(", ")
                ),
            )
        })?;
    let service = entry.service.as_ref().map_err(|why| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_not_loaded",
            format!("model {name} is not loaded here: {why}"),
        )
    })?;
    let started = Instant::now();
    let mut answer = RunAnswer {
        model: name.clone(),
        dims: None,
        norm: None,
        first: None,
        text: None,
        tokens: None,
        millis: 0,
    };
    match service {
        Service::Embed(s) => {
            let mut v = s.embed(vec![request.input]).await.map_err(serve_error)?;
            let v = v.pop().unwrap_or_default();
            answer.dims = Some(v.len());
            answer.norm = Some(v.iter().map(|x| x * x).sum::<f32>().sqrt());
            answer.first = Some(v.iter().take(8).copied().collect());
        }
        Service::Generate(s) => {
            let prompt = if request.raw {
                request.input
            } else {
                chat_prompt(&request.input)
            };
            let params = Params {
                max_tokens: request.max_tokens.unwrap_or(64).clamp(1, 1024),
                ..Params::default()
            };
            let mut pieces = s.generate(prompt, params).map_err(serve_error)?;
            loop {
                match pieces.recv().await {
                    Some(Piece::Text(_)) => {}
                    Some(Piece::Done { text, tokens }) => {
                        answer.text = Some(text);
                        answer.tokens = Some(tokens);
                        break;
                    }
                    Some(Piece::Failed(e)) => {
                        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model", e))
                    }
                    None => {
                        return Err(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "model",
                            format!("model {name} stopped"),
                        ))
                    }
                }
            }
        }
    }
    answer.millis = started.elapsed().as_millis() as u64;
    Ok(Json(answer))
}
