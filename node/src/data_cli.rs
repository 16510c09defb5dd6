//! `agentmesh data ...`: put a JSON-lines file of documents on a node, and
//! list a region's datasets.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use reqwest::Method;

use crate::client::ApiClient;
use crate::datasets::{check_document, Document, RegisterRequest, Stored};

/// Largest batch of documents sent at once (the API takes 64 KiB bodies).
const BATCH_BYTES: usize = 48 * 1024;

/// Reads and checks every line first: a bad line names its number and
/// nothing is sent.
pub fn read_documents(file: &Path) -> Result<Vec<Document>> {
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let mut docs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line =
            line.with_context(|| format!("{}: line {n} is not readable text", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let doc: Document = serde_json::from_str(&line).map_err(|e| {
            anyhow!(
                "{}: line {n}: {e}; each line is one JSON object {{\"id\": .., \"text\": .., \"metadata\": {{..}}}}; nothing was stored",
                file.display()
            )
        })?;
        check_document(&doc)
            .map_err(|e| anyhow!("{}: line {n}: {e}; nothing was stored", file.display()))?;
        if !ids.insert(doc.id.clone()) {
            return Err(anyhow!(
                "{}: line {n}: id {:?} appears twice; nothing was stored",
                file.display(),
                doc.id
            ));
        }
        docs.push(doc);
    }
    if docs.is_empty() {
        return Err(anyhow!("{} has no documents", file.display()));
    }
    Ok(docs)
}

/// `data put --dataset NAME --file docs.jsonl [--tag T]...`
pub async fn put(
    api: &str,
    dataset: &str,
    file: &Path,
    tags: Vec<String>,
    json: bool,
) -> Result<()> {
    let docs = read_documents(file)?;
    let client = ApiClient::new(api)?;
    let total = docs.len();
    let mut sent = 0usize;
    let mut batch: Vec<Document> = Vec::new();
    let mut bytes = 0usize;
    let path = format!("/v1/datasets/{dataset}/documents");
    let mut progress = std::io::stderr().lock();
    for doc in docs {
        let size = doc.text.len() + doc.id.len() + 64;
        if !batch.is_empty() && bytes + size > BATCH_BYTES {
            let _: Stored = client.send(Method::POST, &path, Some(&batch)).await?;
            sent += batch.len();
            write!(
                progress,
                "\rembedding and storing: {sent}/{total} documents"
            )?;
            batch.clear();
            bytes = 0;
        }
        bytes += size;
        batch.push(doc);
    }
    if !batch.is_empty() {
        let _: Stored = client.send(Method::POST, &path, Some(&batch)).await?;
        sent += batch.len();
        writeln!(
            progress,
            "\rembedding and storing: {sent}/{total} documents"
        )?;
    }
    let answer: serde_json::Value = client
        .send(
            Method::POST,
            &format!("/v1/datasets/{dataset}/register"),
            Some(&RegisterRequest { tags }),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!(
            "dataset {dataset}: {total} documents on this node, registered in region {} (version {})",
            answer["region"].as_str().unwrap_or("?"),
            answer["version"]
        );
    }
    Ok(())
}

/// `data list [--region R]`
pub async fn list(api: &str, region: Option<String>, json: bool) -> Result<()> {
    let client = ApiClient::new(api)?;
    let region = match region {
        Some(r) => r,
        None => {
            let health: serde_json::Value = client.get("/v1/health").await?;
            health["region"].as_str().unwrap_or_default().to_owned()
        }
    };
    let datasets: Vec<consensus::Dataset> = client
        .get(&format!("/v1/regions/{region}/datasets"))
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&datasets)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    if datasets.is_empty() {
        writeln!(out, "no datasets in region {region}; put one with `agentmesh data put --dataset NAME --file docs.jsonl`")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<10} {:>9}  {:<20} TAGS",
        "DATASET", "NODE", "DOCUMENTS", "EMBEDDING MODEL"
    )?;
    for d in &datasets {
        writeln!(
            out,
            "{:<20} {:<10} {:>9}  {:<20} {}",
            d.name,
            mesh_types::NodeId::short_str(&d.node),
            d.documents,
            d.embed_model_sha256
                .get(..16)
                .unwrap_or(&d.embed_model_sha256),
            d.tags.join(",")
        )?;
    }
    Ok(())
}
