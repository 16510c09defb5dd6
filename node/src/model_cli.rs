//! `agentmesh model list` and `agentmesh model run`.

use std::io::Write;

use anyhow::Result;
use reqwest::Method;

use crate::client::ApiClient;
use crate::models::{ModelRow, RunAnswer, RunRequest};

/// Prints the node's models as a table or JSON.
pub async fn list(api: &str, json: bool) -> Result<()> {
    let rows: Vec<ModelRow> = ApiClient::new(api)?.get("/v1/models").await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<28} {:<11} {:<16} {:>9}  STATUS",
        "NAME", "KIND", "SHA256", "SIZE"
    )?;
    for r in &rows {
        let kind = serde_json::to_value(r.kind)?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let status = match (&r.loaded, &r.error) {
            (true, _) => "loaded".to_owned(),
            (false, Some(why)) => format!("not loaded: {why}"),
            (false, None) => "not loaded".to_owned(),
        };
        writeln!(
            out,
            "{:<28} {:<11} {:<16} {:>6} MB  {status}",
            r.name,
            kind,
            &r.sha256[..16.min(r.sha256.len())],
            r.size / 1_000_000
        )?;
    }
    Ok(())
}

/// Runs a model once on the node and prints what it gave.
pub async fn run(
    api: &str,
    name: &str,
    input: &str,
    max_tokens: usize,
    raw: bool,
    json: bool,
) -> Result<()> {
    let request = RunRequest {
        input: input.to_owned(),
        max_tokens: Some(max_tokens),
        raw,
    };
    let answer: RunAnswer = ApiClient::new(api)?
        .send(
            Method::POST,
            &format!("/v1/models/{name}/run"),
            Some(&request),
        )
        .await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &answer)?;
        writeln!(out)?;
        return Ok(());
    }
    if let (Some(dims), Some(norm), Some(first)) = (answer.dims, answer.norm, &answer.first) {
        let first: Vec<String> = first.iter().map(|x| format!("{x:+.4}")).collect();
        writeln!(
            out,
            "{name}: {dims} dimensions, norm {norm:.4}, first values [{} …] ({} ms)",
            first.join(", "),
            answer.millis
        )?;
    }
    if let Some(text) = &answer.text {
        writeln!(out, "{text}")?;
        writeln!(
            out,
            "({name}: {} tokens in {} ms)",
            answer.tokens.unwrap_or(0),
            answer.millis
        )?;
    }
    Ok(())
}
