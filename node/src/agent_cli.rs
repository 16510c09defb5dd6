//! `agentmesh agent ...`: thin clients of the agents routes (`agents_api`).

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use reqwest::Method;
use serde::Serialize;

use crate::agents_api::{AgentRow, Deployed, DrainRequest, Draining, MoveRequest, Moved};
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
        "{:<20} {:<10} {:<9} {:<9} {:<10} {:>5}  {:<12} {:<24} REASON",
        "NAME", "VERSION", "KIND", "REGION", "NODE", "EPOCH", "STATUS", "LAST MOVE"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<20} {:<10} {:<9} {:<9} {:<10} {:>5}  {:<12} {:<24} {}",
            r.name,
            r.version,
            r.kind,
            r.region,
            r.node.as_deref().map(short).unwrap_or("-"),
            r.epoch,
            r.status,
            r.moves.last().map(move_line).unwrap_or_else(|| "-".into()),
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
    writeln!(
        out,
        "replicas: {}",
        if row.replicas.is_empty() {
            "-".into()
        } else {
            row.replicas
                .iter()
                .map(|r| short(r))
                .collect::<Vec<_>>()
                .join(", ")
        }
    )?;
    for m in &row.moves {
        writeln!(
            out,
            "moved:    epoch {} {} (log index {})",
            m.epoch,
            move_line(m),
            m.at
        )?;
    }
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

/// A move as tables show it: `drain: 12D3..ab -> 12D3..cd`.
fn move_line(m: &consensus::Move) -> String {
    format!(
        "{}: {} -> {}",
        m.reason.as_str(),
        m.from.as_deref().map(short).unwrap_or("-"),
        short(&m.to)
    )
}

/// `agent move NAME --to PEER [--region R]`
pub async fn move_agent(
    api: &str,
    name: &str,
    to: &str,
    region: Option<String>,
    json: bool,
) -> Result<()> {
    let client = ApiClient::new(api)?;
    let region = region_or_node(&client, region).await?;
    let moved: Moved = client
        .send(
            Method::POST,
            &format!("/v1/regions/{region}/agents/{name}/move"),
            Some(&MoveRequest { to: to.to_owned() }),
        )
        .await?;
    if json {
        return print_json(&moved);
    }
    if moved.from.as_deref() == Some(moved.to.as_str()) {
        println!(
            "agent {name} is on {} already (epoch {})",
            moved.to, moved.epoch
        );
    } else {
        println!(
            "moved agent {name} from {} to {} (epoch {}); the new host restores its state from its replicas, and tasks sent meanwhile wait for it",
            moved.from.as_deref().unwrap_or("nowhere"),
            moved.to,
            moved.epoch
        );
    }
    Ok(())
}

/// What keeps a draining node from stopping: the agents it hosts and the
/// agents whose state it keeps a copy of.
fn still_on(rows: &[AgentRow], peer: &str) -> (Vec<String>, Vec<String>) {
    let hosted = rows
        .iter()
        .filter(|r| r.node.as_deref() == Some(peer))
        .map(|r| r.name.clone())
        .collect();
    let copies = rows
        .iter()
        .filter(|r| r.replicas.iter().any(|n| n == peer))
        .map(|r| r.name.clone())
        .collect();
    (hosted, copies)
}

/// `node drain [--api A] [--cancel] [--wait-s S]`: marks the node draining
/// and shows the agents leaving it until none is left.
pub async fn drain(api: &str, cancel: bool, wait: std::time::Duration) -> Result<()> {
    let client = ApiClient::new(api)?;
    let health: serde_json::Value = client.get("/v1/health").await?;
    let (Some(peer), Some(region)) = (health["peer_id"].as_str(), health["region"].as_str()) else {
        return Err(anyhow!(
            "the node at {api} did not say its peer id and region"
        ));
    };
    let answer: Draining = client
        .send(
            Method::POST,
            &format!("/v1/regions/{region}/draining"),
            Some(&DrainRequest {
                node: peer.to_owned(),
                draining: !cancel,
            }),
        )
        .await?;
    if cancel {
        println!(
            "node {peer} is not draining any more: it takes agents again (log index {})",
            answer.index
        );
        return Ok(());
    }
    println!(
        "node {peer} is draining (log index {}): its agents move to other nodes of {region}",
        answer.index
    );
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        let rows: Vec<AgentRow> = client.get(&format!("/v1/regions/{region}/agents")).await?;
        let left = still_on(&rows, peer);
        if left.0.is_empty() && left.1.is_empty() {
            println!(
                "drained in {:.1} s: no agent runs on {peer} and it keeps no copy of agent state; it may stop now",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if last.as_ref() != Some(&left) {
            println!(
                "  {} agent(s) still hosted here [{}], {} copy(ies) of agent state still kept here [{}]",
                left.0.len(),
                left.0.join(", "),
                left.1.len(),
                left.1.join(", ")
            );
            last = Some(left.clone());
        }
        if started.elapsed() >= wait {
            return Err(anyhow!(
                "node {peer} is not drained after {} s: agents hosted here: [{}]; copies kept here: [{}]. An agent stays when no other live node of {region} can hold it (its dataset or models are only here): see `agentmesh agent list`. Run the command again to keep waiting, or `agentmesh node drain --cancel` to undo",
                wait.as_secs(),
                left.0.join(", "),
                left.1.join(", ")
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
