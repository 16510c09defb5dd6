//! A dataset's documents on their node: one key each in
//! `Column::Documents` (`dataset \0 id`), with the vector they were
//! embedded to; and exact search over them.
//!
//! Search is exact: a brute-force cosine over every stored vector of the
//! dataset, streamed from the store (one document in memory at a time).
//! At the documented limit of 100,000 documents of 384 dimensions that is
//! about 38 million multiply-adds, tens of milliseconds on one core; past
//! it an approximate index (HNSW) would take over, built when a dataset is
//! put and kept in the same column family.

use std::cmp::Ordering;

use mesh_store::{Column, Store, WriteOp};
use serde::{Deserialize, Serialize};

use crate::TaskError;

/// A document as it is stored: its text, metadata and vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredDocument {
    /// Unique in its dataset.
    pub id: String,
    /// The text that was embedded.
    pub text: String,
    /// Returned with search hits.
    pub metadata: serde_json::Value,
    /// Its embedding.
    pub vector: Vec<f32>,
}

/// A search hit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hit {
    /// The document id.
    pub id: String,
    /// Cosine similarity to the query.
    pub score: f32,
    /// The text.
    pub text: String,
    /// Its metadata.
    pub metadata: serde_json::Value,
}

/// The key range of a dataset's documents.
pub fn prefix(dataset: &str) -> (Vec<u8>, Vec<u8>) {
    let mut from = dataset.as_bytes().to_vec();
    from.push(0);
    let mut to = dataset.as_bytes().to_vec();
    to.push(1);
    (from, to)
}

/// The write that stores `doc` in `dataset`.
pub fn put(dataset: &str, doc: &StoredDocument) -> Result<WriteOp, TaskError> {
    let (mut key, _) = prefix(dataset);
    key.extend_from_slice(doc.id.as_bytes());
    Ok(WriteOp::Put {
        column: Column::Documents,
        key,
        value: serde_json::to_vec(doc).map_err(|e| TaskError::storage(e.to_string()))?,
    })
}

/// How many documents of `dataset` this node holds.
pub fn count(store: &dyn Store, dataset: &str) -> Result<u64, TaskError> {
    let (from, to) = prefix(dataset);
    let mut n = 0u64;
    store
        .scan(Column::Documents, &from, Some(&to), &mut |_, _| {
            n += 1;
            true
        })
        .map_err(|e| TaskError::storage(e.to_string()))?;
    Ok(n)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// The `k` documents of `dataset` most similar to `query`, best first.
pub fn search(
    store: &dyn Store,
    dataset: &str,
    query: &[f32],
    k: usize,
) -> Result<Vec<Hit>, TaskError> {
    let (from, to) = prefix(dataset);
    let mut best: Vec<Hit> = Vec::with_capacity(k + 1);
    let mut failed = None;
    store
        .scan(Column::Documents, &from, Some(&to), &mut |_, v| {
            let doc: StoredDocument = match serde_json::from_slice(v) {
                Ok(d) => d,
                Err(e) => {
                    failed = Some(e.to_string());
                    return false;
                }
            };
            let score = cosine(query, &doc.vector);
            if best.len() < k || best.last().is_some_and(|w| score > w.score) {
                best.push(Hit {
                    id: doc.id,
                    score,
                    text: doc.text,
                    metadata: doc.metadata,
                });
                best.sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap_or(Ordering::Equal));
                best.truncate(k);
            }
            true
        })
        .map_err(|e| TaskError::storage(e.to_string()))?;
    match failed {
        Some(e) => Err(TaskError::storage(format!(
            "a stored document of {dataset} is unreadable: {e}"
        ))),
        None => Ok(best),
    }
}
