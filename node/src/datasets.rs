//! Datasets (issue 13): documents put on a node stay on it. The node embeds
//! them with its embedding model and keeps text, metadata and vector in
//! its store (`Column::Documents`, key `dataset \0 document id`); the
//! region's state machine learns only the dataset's name, node, tags, size
//! and embedding model.
//!
//! Search is exact: a brute-force cosine over every vector of the dataset,
//! read one at a time (a scan, never the whole dataset in memory); see
//! `mesh_task::documents`, which the agent kinds search with. At 384
//! floats a document that is about 0.3 ms per 1,000 documents here; past
//! [`DOCUMENTS_MAX`] documents an approximate index (HNSW) would take over.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use consensus::{Dataset, RegionResponse};
use mesh_store::{Durability, Store};
use mesh_task::documents;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiState};
use crate::models::Service;
use crate::regions_api::{
    error, forward_to_region, group_error, not_bootstrapped, on_leader, parse_region,
};

/// Most documents in one dataset (exact search stays fast up to here).
pub const DOCUMENTS_MAX: u64 = 100_000;
/// Longest document text, in bytes.
pub const TEXT_MAX: usize = 8 * 1024;
/// Longest document id and dataset name.
pub const ID_MAX: usize = 128;
/// Largest metadata of one document, as JSON bytes.
pub const METADATA_MAX: usize = 4 * 1024;

/// One line of a `docs.jsonl` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Unique in its dataset.
    pub id: String,
    /// The text that is embedded and searched.
    pub text: String,
    /// Anything else, returned with search hits.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// Checks one document, naming what is wrong.
pub fn check_document(doc: &Document) -> Result<(), String> {
    if doc.id.is_empty() || doc.id.len() > ID_MAX || doc.id.contains('\0') {
        return Err(format!("id {:?}: use 1 to {ID_MAX} characters", doc.id));
    }
    if doc.text.trim().is_empty() || doc.text.len() > TEXT_MAX {
        return Err(format!(
            "document {}: the text must have 1 to {TEXT_MAX} bytes",
            doc.id
        ));
    }
    let metadata = serde_json::to_vec(&doc.metadata)
        .map(|m| m.len())
        .unwrap_or(usize::MAX);
    if metadata > METADATA_MAX {
        return Err(format!(
            "document {}: metadata of {metadata} bytes, more than {METADATA_MAX}",
            doc.id
        ));
    }
    Ok(())
}

/// Checks what a node registers (it may come from another node): its
/// name, its tags, and the sizes of what the region will store.
fn check_dataset(dataset: &Dataset) -> Result<(), ApiError> {
    check_name(&dataset.name)?;
    let tags_ok = dataset.tags.len() <= crate::tasks::TAGS_MAX
        && dataset.tags.iter().all(|t| !t.is_empty() && t.len() <= 64);
    if !tags_ok || dataset.node.len() > ID_MAX || dataset.embed_model_sha256.len() > 64 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_dataset",
            format!(
                "a dataset has at most {} tags of 1 to 64 characters, a peer id and a sha256",
                crate::tasks::TAGS_MAX
            ),
        ));
    }
    Ok(())
}

/// Checks a dataset name: lowercase letters, digits and '-'.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= ID_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_dataset",
            format!("dataset name {name:?}: use 1 to {ID_MAX} lowercase letters, digits and '-'"),
        ))
    }
}

/// How many documents of `dataset` this node holds.
pub fn count(store: &dyn Store, dataset: &str) -> Result<u64, ApiError> {
    Ok(documents::count(store, dataset)?)
}

fn storage(detail: String) -> ApiError {
    error(StatusCode::INTERNAL_SERVER_ERROR, "storage", detail)
}

/// This node's embedding model, if it runs one: its sha256 and service.
pub fn embedder(state: &ApiState) -> Result<(String, models::EmbedService), ApiError> {
    state
        .models
        .services()
        .find_map(|(spec, service)| match service {
            Service::Embed(s) => Some((spec.sha256().to_owned(), s.clone())),
            Service::Generate(_) => None,
        })
        .ok_or_else(|| {
            error(
                StatusCode::CONFLICT,
                "no_embedding_model",
                "this node runs no embedding model: start it with --models-dir (scripts/models.sh fills ~/.cache/agentmesh/models)".into(),
            )
        })
}

/// Answer of a documents batch.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    /// Documents stored by this batch.
    pub stored: u64,
    /// Documents of the dataset on this node now.
    pub total: u64,
}

/// `POST /v1/datasets/{name}/documents` with a JSON array of documents:
/// embedded and stored on this node.
pub async fn put_documents(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(docs): Json<Vec<Document>>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    for doc in &docs {
        check_document(doc).map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_document", e))?;
    }
    let store = state.tasks.store();
    let before = count(&*store, &name)?;
    if before.saturating_add(docs.len() as u64) > DOCUMENTS_MAX {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "dataset_too_large",
            format!("a dataset holds at most {DOCUMENTS_MAX} documents on a node (exact search)"),
        ));
    }
    let (_, embedder) = embedder(&state)?;
    let texts: Vec<String> = docs.iter().map(|d| d.text.clone()).collect();
    let vectors = embedder.embed(texts).await.map_err(|e| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_busy",
            format!("embedding failed: {e}"),
        )
    })?;
    let mut ops = Vec::with_capacity(docs.len());
    for (doc, vector) in docs.into_iter().zip(vectors) {
        let stored = documents::StoredDocument {
            id: doc.id,
            text: doc.text,
            metadata: doc.metadata,
            vector,
        };
        ops.push(documents::put(&name, &stored)?);
    }
    let stored = ops.len() as u64;
    let writer = store.clone();
    tokio::task::spawn_blocking(move || writer.write(ops, Durability::Sync))
        .await
        .map_err(|e| storage(e.to_string()))?
        .map_err(|e| storage(format!("cannot store the documents: {e}")))?;
    Ok(Json(Stored {
        stored,
        total: count(&*store, &name)?,
    })
    .into_response())
}

/// Body of `POST /v1/datasets/{name}/register`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The dataset's data tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `POST /v1/datasets/{name}/register`: registers what this node holds of
/// the dataset in its region's state machine (through the leader).
pub async fn register(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(request): Json<RegisterRequest>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let documents = count(&*state.tasks.store(), &name)?;
    if documents == 0 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "empty_dataset",
            format!("this node holds no document of {name}; put some first"),
        ));
    }
    let (sha256, _) = embedder(&state)?;
    let dataset = Dataset {
        name,
        node: state.peer_id.clone(),
        tags: request.tags,
        documents,
        embed_model_sha256: sha256,
    };
    let path = format!("/v1/regions/{}/datasets", state.region);
    let region = state.region.clone();
    add_dataset(&state, &headers, &region, dataset, &path).await
}

async fn add_dataset(
    state: &ApiState,
    headers: &HeaderMap,
    region: &mesh_types::Region,
    dataset: Dataset,
    path: &str,
) -> Result<Response, ApiError> {
    check_dataset(&dataset)?;
    let json = serde_json::to_value(&dataset).ok();
    if let Some(answer) = on_leader(state, headers, region, Method::POST, path, json).await {
        return answer;
    }
    let name = dataset.name.clone();
    // One holder per name: another node cannot take a dataset over (and the
    // agents placed at it) by registering the same name.
    if let Some(held) = state.group.local_state().datasets.get(&name) {
        if held.node != dataset.node {
            return Err(error(
                StatusCode::CONFLICT,
                "dataset_held_elsewhere",
                format!(
                    "dataset {name} is held by node {}; pick another name",
                    held.node
                ),
            ));
        }
    }
    match state
        .group
        .propose(consensus::RegionCommand::RegisterDataset(dataset))
        .await
    {
        Ok(RegionResponse::DatasetRegistered { version }) => {
            tracing::info!(dataset = %name, %region, version, "registered a dataset");
            Ok(Json(serde_json::json!({"region": region.to_string(), "dataset": name, "version": version})).into_response())
        }
        Ok(other) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "raft",
            format!("applied as {other:?}"),
        )),
        Err(e) => Err(group_error(region, e)),
    }
}

/// `POST /v1/regions/{region}/datasets` (a node registering what it holds;
/// carried to the leader) and `GET` (the region's datasets).
pub async fn region_register(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    forwarded_by: Option<axum::Extension<crate::api::ForwardedBy>>,
    headers: HeaderMap,
    Json(dataset): Json<Dataset>,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    check_name(&dataset.name)?;
    // A node registers only what it holds itself.
    if let Some(by) = forwarded_by {
        if by.0 .0 != dataset.node {
            return Err(error(
                StatusCode::FORBIDDEN,
                "not_the_holder",
                format!(
                    "node {} cannot register a dataset for node {}",
                    by.0 .0, dataset.node
                ),
            ));
        }
    }
    let path = format!("/v1/regions/{region}/datasets");
    if region != state.region {
        let json = serde_json::to_value(&dataset).ok();
        return forward_to_region(&state, &headers, &region, Method::POST, &path, json).await;
    }
    add_dataset(&state, &headers, &region, dataset, &path).await
}

/// `GET /v1/regions/{region}/datasets`
pub async fn list(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let region = parse_region(&name)?;
    if region != state.region {
        let path = format!("/v1/regions/{region}/datasets");
        return forward_to_region(&state, &headers, &region, Method::GET, &path, None).await;
    }
    if !state.group.is_bootstrapped() {
        return Err(not_bootstrapped(&region));
    }
    let datasets: Vec<Dataset> = state.group.local_state().datasets.into_values().collect();
    Ok(Json(datasets).into_response())
}
