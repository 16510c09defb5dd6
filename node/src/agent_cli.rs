//! `agentmesh agent ...`: thin clients of the agents routes (`agents_api`).

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use reqwest::Method;
use serde::Serialize;

use crate::agents_api::{AgentRow, Deployed};
use crate::client::ApiClient;

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The region of the node at `api`, when the user named none.
async fn node_region(client: &ApiClient) -> Result<String> {
    let health: serde_json::Value = client.get("/v1/health").await?;
    health["region"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the node did not say its region; pass --region"))
}

async fn region_or_node(client: &ApiClient, region: Option<String>) -> Result<String> {
    match region {
        Some(r) => {
            mesh_types::Region::parse(&r).map_err(|e| anyhow!("{e}"))?;
            Ok(r)
        }
        None => node_region(client).await,
    }
}

/// `agent deploy -f FILE [--region R]`: to R, or to every region the
/// manifest lists.
pub async fn deploy(api: &str, file: &Path, region: Option<String>, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the manifest {}", file.display()))?;
    let manifest =
        mesh_agent::manifest::parse(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let regions: Vec<String> = match region {
        Some(r) => vec![r],
        None => manifest.regions.iter().map(|r| r.to_string()).collect(),
    };
    if regions.is_empty() {
        return Err(anyhow!(
            "{}: the manifest lists no regions; add regions = [\"eu-west\"] or pass --region",
            file.display()
        ));
    }
    let client = ApiClient::new(api)?;
    let mut answers = Vec::new();
    let mut failed = Vec::new();
    for region in &regions {
        let path = format!("/v1/regions/{region}/agents");
        match client
            .send::<Deployed, _>(Method::POST, &path, Some(&manifest))
            .await
        {
            Ok(answer) => answers.push(answer),
            Err(e) => failed.push(format!("region {region}: {e}")),
        }
    }
    if json {
        print_json(&answers)?;
    } else {
        let mut out = std::io::stdout().lock();
        for a in &answers {
            writeln!(
                out,
                "deployed {} to region {} (version {}); it is placed on a node of the region next",
                a.name, a.region, a.version
            )?;
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "not deployed to every region:\n  - {}",
            failed.join("\n  - ")
        ))
    }
}

fn short(peer: &str) -> &str {
    mesh_types::NodeId::short_str(peer)
}

/// `agent list [--region R]`
pub async fn list(api: &str, region: Option<String>, json: bool) -> Result<()> {
    let client = ApiClient::new(api)?;
    let region = region_or_node(&client, region).await?;
    let rows: Vec<AgentRow> = client.get(&format!("/v1/regions/{region}/agents")).await?;
    if json {
        return print_json(&rows);
    }
    let mut out = std::io::stdout().lock();
    if rows.is_empty() {
        writeln!(
            out,
            "no agents in region {region}; deploy one with `agentmesh agent deploy -f examples/agents/echo.toml`"
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<10} {:<9} {:<9} {:<10} {:>5}  {:<12} REASON",
        "NAME", "VERSION", "KIND", "REGION", "NODE", "EPOCH", "STATUS"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<20} {:<10} {:<9} {:<9} {:<10} {:>5}  {:<12} {}",
            r.name,
            r.version,
            r.kind,
            r.region,
            r.node.as_deref().map(short).unwrap_or("-"),
            r.epoch,
            r.status,
            r.reason.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

/// `agent get NAME [--region R]`
pub async fn get(api: &str, name: &str, region: Option<String>, json: bool) -> Result<()> {
    let client = ApiClient::new(api)?;
    let region = region_or_node(&client, region).await?;
    let row: AgentRow = client
        .get(&format!("/v1/regions/{region}/agents/{name}"))
        .await?;
    if json {
        return print_json(&row);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "name:     {}", row.name)?;
    writeln!(out, "version:  {}", row.version)?;
    writeln!(out, "kind:     {}", row.kind)?;
    writeln!(out, "region:   {}", row.region)?;
    writeln!(out, "node:     {}", row.node.as_deref().unwrap_or("-"))?;
    writeln!(out, "epoch:    {}", row.epoch)?;
    writeln!(
        out,
        "status:   {}{}",
        row.status,
        row.reason.map(|r| format!(" ({r})")).unwrap_or_default()
    )?;
    if let Some(m) = row.manifest {
        let models: Vec<String> = m.models.iter().map(|m| m.name.clone()).collect();
        writeln!(
            out,
            "models:   {}",
            if models.is_empty() {
                "-".into()
            } else {
                models.join(", ")
            }
        )?;
        writeln!(out, "dataset:  {}", m.dataset.as_deref().unwrap_or("-"))?;
        writeln!(
            out,
            "budget:   {} ms, {} at once",
            m.latency_budget_ms, m.concurrency
        )?;
    }
    Ok(())
}

/// `agent remove NAME [--region R]`
pub async fn remove(api: &str, name: &str, region: Option<String>) -> Result<()> {
    let client = ApiClient::new(api)?;
    let region = region_or_node(&client, region).await?;
    let _: serde_json::Value = client
        .send(
            Method::DELETE,
            &format!("/v1/regions/{region}/agents/{name}"),
            None::<&()>,
        )
        .await?;
    println!("removed agent {name} from region {region}");
    Ok(())
}
