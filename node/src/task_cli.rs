//! `agentmesh task ...` and `agentmesh audit ...`: clients of the task and
//! audit routes (`tasks`).

use std::io::Write;

use anyhow::{anyhow, Result};
use reqwest::Method;
use serde::Serialize;

use crate::client::ApiClient;
use crate::tasks::{TaskAnswer, TaskRequest, Verified};

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn print_answer(answer: &TaskAnswer) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match &answer.output {
        serde_json::Value::String(text) => writeln!(out, "{text}")?,
        serde_json::Value::Object(o) if o.get("hits").is_some_and(|h| h.is_array()) => {
            for hit in o["hits"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{:.3}  {:<12} {}",
                    hit["score"].as_f64().unwrap_or(0.0),
                    hit["id"].as_str().unwrap_or("?"),
                    hit["text"].as_str().unwrap_or("")
                )?;
            }
        }
        serde_json::Value::Object(o) if o.get("cited").is_some_and(|c| c.is_array()) => {
            writeln!(out, "{}", o["answer"].as_str().unwrap_or(""))?;
            let cited: Vec<&str> = o["cited"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str())
                .collect();
            writeln!(out, "\ncited: {}", cited.join(", "))?;
            for doc in o["documents"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "  [{}] {:.3}  {}",
                    doc["id"].as_str().unwrap_or("?"),
                    doc["score"].as_f64().unwrap_or(0.0),
                    doc["text"].as_str().unwrap_or("")
                )?;
            }
        }
        other => writeln!(out, "{}", serde_json::to_string_pretty(other)?)?,
    }
    let p = &answer.provenance;
    writeln!(out)?;
    writeln!(
        out,
        "task {}{}: agent {} {} (epoch {}) on {} in {}, policy version {}, {} ms{}",
        answer.task_id,
        if answer.replayed {
            " (stored result, not run again)"
        } else {
            ""
        },
        p.record.agent,
        p.record.agent_version,
        p.record.epoch,
        p.record.node,
        p.record.region,
        p.record.policy_version,
        answer.millis,
        if answer.met_budget {
            ""
        } else {
            ", over its latency budget"
        },
    )?;
    writeln!(out, "audit record {} ({})", p.seq, p.hash)?;
    Ok(())
}

/// `task submit --stream`: generated text as it comes, then the answer.
async fn submit_streaming(api: &str, request: TaskRequest, json: bool) -> Result<()> {
    let mut response = ApiClient::with_timeout(api, crate::api::REQUEST_TIMEOUT)?
        .post_streaming("/v1/tasks", &request)
        .await?;
    let mut pending = String::new();
    let mut event = String::new();
    let mut data = String::new();
    let mut out = std::io::stdout();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| anyhow!("the stream from {api} broke: {e}"))?;
        let Some(chunk) = chunk else {
            return Err(anyhow!(
                "the stream from {api} ended before the task's answer"
            ));
        };
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line = pending[..end].trim_end_matches('\r').to_owned();
            pending.drain(..=end);
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_owned();
            } else if let Some(more) = line.strip_prefix("data:") {
                data.push_str(more.strip_prefix(' ').unwrap_or(more));
            } else if line.is_empty() && !event.is_empty() {
                let value: serde_json::Value = serde_json::from_str(&data)
                    .map_err(|e| anyhow!("a {event} event from {api} is not JSON ({e})"))?;
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({ "event": event, "data": value })
                    )?;
                }
                match event.as_str() {
                    "token" if !json => {
                        write!(out, "{}", value["text"].as_str().unwrap_or(""))?;
                        out.flush()?;
                    }
                    "result" => {
                        if !json {
                            let answer: TaskAnswer = serde_json::from_value(value)?;
                            let mut summary = answer.clone();
                            // The text came already, as it was generated.
                            if summary.output.is_string() {
                                summary.output = serde_json::Value::String(String::new());
                            }
                            writeln!(out)?;
                            print_answer(&summary)?;
                        }
                        return Ok(());
                    }
                    "error" => {
                        let detail = value["error"]["detail"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| value["error"].to_string());
                        return Err(anyhow!("the task failed ({}): {detail}", value["status"]));
                    }
                    _ => {}
                }
                event.clear();
                data.clear();
            }
        }
    }
}

/// `task submit`
pub async fn submit(api: &str, request: TaskRequest, json: bool) -> Result<()> {
    if request.stream {
        return submit_streaming(api, request, json).await;
    }
    let answer: TaskAnswer = ApiClient::with_timeout(api, crate::api::REQUEST_TIMEOUT)?
        .send(Method::POST, "/v1/tasks", Some(&request))
        .await?;
    if json {
        return print_json(&answer);
    }
    print_answer(&answer)
}

/// `task get ID`
pub async fn get(api: &str, task_id: &str, json: bool) -> Result<()> {
    let answer: TaskAnswer = ApiClient::new(api)?
        .get(&format!("/v1/tasks/{task_id}"))
        .await?;
    if json {
        return print_json(&answer);
    }
    print_answer(&answer)
}

/// `audit [--agent A] [--since MS]`
pub async fn audit(api: &str, agent: Option<String>, since: Option<u64>, json: bool) -> Result<()> {
    let mut query = Vec::new();
    if let Some(a) = agent {
        query.push(format!("agent={a}"));
    }
    if let Some(s) = since {
        query.push(format!("since={s}"));
    }
    let path = if query.is_empty() {
        "/v1/audit".to_owned()
    } else {
        format!("/v1/audit?{}", query.join("&"))
    };
    let records: Vec<mesh_agent::SealedRecord> = ApiClient::new(api)?.get(&path).await?;
    if json {
        return print_json(&records);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>5}  {:<34} {:<16} {:>5}  {:<10} {:<16}",
        "SEQ", "TASK", "AGENT", "EPOCH", "REGION", "HASH"
    )?;
    for r in &records {
        writeln!(
            out,
            "{:>5}  {:<34} {:<16} {:>5}  {:<10} {:<16}",
            r.seq,
            r.record.task_id,
            r.record.agent,
            r.record.epoch,
            r.record.region,
            r.hash.get(..16).unwrap_or(&r.hash)
        )?;
    }
    Ok(())
}

/// `audit verify`: this node's chain; non-zero exit when it does not hold.
pub async fn verify(api: &str, json: bool) -> Result<()> {
    let verdict: Verified = ApiClient::new(api)?.get("/v1/audit/verify").await?;
    if json {
        print_json(&verdict)?;
    } else if verdict.problem.is_none() {
        println!(
            "the audit log of {} holds: {} records, each chained to the one before",
            verdict.node, verdict.records
        );
    }
    match verdict.problem {
        None => Ok(()),
        Some(p) => Err(anyhow!(
            "the audit log of {} does not hold: {p}",
            verdict.node
        )),
    }
}

/// `audit verify --all`: every live node's chain, read through this node,
/// and no task id executed twice across the mesh.
pub async fn verify_all(api: &str, json: bool) -> Result<()> {
    let client = ApiClient::new(api)?;
    let members: Vec<mesh_types::MemberView> = client.get("/v1/members").await?;
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    let mut problems = Vec::new();
    let mut report = Vec::new();
    for m in members
        .iter()
        .filter(|m| m.state == mesh_types::MemberState::Alive)
    {
        // Page by page (a forwarded answer is at most 4 MiB).
        let mut records: Vec<mesh_agent::SealedRecord> = Vec::new();
        let mut failed = None;
        loop {
            let from = records.last().map_or(0, |r| r.seq.saturating_add(1));
            let path = format!("/v1/regions/{}/audit/{}?from={from}", m.region, m.peer_id.0);
            match client.get::<Vec<mesh_agent::SealedRecord>>(&path).await {
                Ok(page) if page.is_empty() => break,
                Ok(page) if page[0].seq < from => {
                    failed = Some(format!(
                        "its audit log answered record {} when asked from {from}",
                        page[0].seq
                    ));
                    break;
                }
                Ok(page) => records.extend(page),
                Err(e) => {
                    failed = Some(format!("cannot read its audit log: {e}"));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            problems.push(format!("{}: {e}", m.peer_id.0));
            continue;
        }
        match mesh_agent::audit::verify(&records) {
            Ok(n) => report.push(serde_json::json!({"node": m.peer_id.0, "records": n})),
            Err(e) => problems.push(format!("{}: {e}", m.peer_id.0)),
        }
        for r in &records {
            if let Some(other) = seen.insert(r.record.task_id.clone(), m.peer_id.0.clone()) {
                problems.push(format!(
                    "task {} was executed twice: on {other} and on {}",
                    r.record.task_id, m.peer_id.0
                ));
            }
        }
    }
    if json {
        print_json(&serde_json::json!({"nodes": report, "problems": problems}))?;
    } else {
        for r in &report {
            println!(
                "{}: {} records, chained",
                r["node"].as_str().unwrap_or("?"),
                r["records"]
            );
        }
    }
    if problems.is_empty() {
        if !json {
            println!(
                "every node's audit log holds, and no task ran twice ({} tasks)",
                seen.len()
            );
        }
        Ok(())
    } else {
        Err(anyhow!(
            "the audit does not hold:\n  - {}",
            problems.join("\n  - ")
        ))
    }
}
