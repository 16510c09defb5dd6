//! `agentmesh region ...` and `agentmesh policy ...`: thin clients of the
//! node API (see `regions_api`), with tables for people and `--json`.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Result};
use mesh_types::policy::Policy;
use reqwest::Method;
use serde::Serialize;

use crate::client::ApiClient;
use crate::regions_api::{
    BootstrapAnswer, BootstrapRequest, PolicyRead, PolicyWritten, StatusAnswer,
};

fn short(peer: &str) -> &str {
    mesh_types::NodeId::short_str(peer)
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn check_region(region: &str) -> Result<()> {
    mesh_types::Region::parse(region)
        .map(|_| ())
        .map_err(|e| anyhow!("{e}"))
}

/// `region bootstrap`
pub async fn bootstrap(
    api: &str,
    region: &str,
    voters: usize,
    allow_fewer: bool,
    json: bool,
) -> Result<()> {
    check_region(region)?;
    let body = BootstrapRequest {
        voters,
        allow_fewer,
        voter_set: None,
    };
    let answer: BootstrapAnswer = ApiClient::new(api)?
        .send(
            Method::POST,
            &format!("/v1/regions/{region}/bootstrap"),
            Some(&body),
        )
        .await?;
    if json {
        return print_json(&answer);
    }
    let mut out = std::io::stdout().lock();
    if answer.already_bootstrapped {
        writeln!(
            out,
            "region {region} is already bootstrapped; nothing changed"
        )?;
    } else {
        writeln!(out, "region {region} bootstrapped")?;
    }
    writeln!(
        out,
        "leader:   {}",
        answer.leader.as_deref().unwrap_or("(election running)")
    )?;
    writeln!(out, "voters:   {}", answer.voters.join(", "))?;
    writeln!(
        out,
        "learners: {}",
        if answer.learners.is_empty() {
            "-".to_owned()
        } else {
            answer.learners.join(", ")
        }
    )?;
    Ok(())
}

/// `region status`
pub async fn status(api: &str, region: &str, json: bool) -> Result<()> {
    check_region(region)?;
    let answer: StatusAnswer = ApiClient::new(api)?
        .get(&format!("/v1/regions/{region}/status"))
        .await?;
    if json {
        return print_json(&answer);
    }
    let mut out = std::io::stdout().lock();
    let s = &answer.status;
    if !s.bootstrapped {
        writeln!(out, "region {region} is not bootstrapped; run `agentmesh region bootstrap --region {region}`")?;
        return Ok(());
    }
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    writeln!(
        out,
        "region {region}  leader {}  term {}  last log {}  applied {}  policy version {}  (as seen by {})",
        s.leader.as_deref().map_or("-", short),
        s.term,
        opt(s.last_log_index),
        opt(s.last_applied),
        s.policy_version,
        short(&s.node),
    )?;
    writeln!(
        out,
        "{:<10}  {:<8}  {:<7}  {:>8}  {:>5}",
        "PEER", "ROLE", "STATE", "MATCHED", "LAG"
    )?;
    for m in &s.members {
        let leader_mark = if Some(&m.peer_id) == s.leader.as_ref() {
            "*"
        } else {
            ""
        };
        writeln!(
            out,
            "{:<10}  {:<8}  {:<7}  {:>8}  {:>5}",
            format!("{}{leader_mark}", short(&m.peer_id)),
            m.role,
            m.state.as_deref().unwrap_or("-"),
            opt(m.matched),
            opt(m.lag)
        )?;
    }
    Ok(())
}

/// `policy apply -f FILE`: validated here first, so every problem is listed
/// before anything is sent.
pub async fn apply_policy(api: &str, region: &str, file: &Path) -> Result<()> {
    check_region(region)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow!("cannot read policy file {}: {e}", file.display()))?;
    let policy: Policy = toml::from_str(&text)
        .map_err(|e| anyhow!("invalid policy file {}: {e}", file.display()))?;
    if let Err(problems) = policy.validate() {
        return Err(anyhow!(
            "the policy in {} is invalid:\n  - {}",
            file.display(),
            problems.join("\n  - ")
        ));
    }
    let written: PolicyWritten = ApiClient::new(api)?
        .send(
            Method::PUT,
            &format!("/v1/regions/{region}/policy"),
            Some(&policy),
        )
        .await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "policy applied to region {}: version {}{}",
        written.region,
        written.version,
        if written.superseded {
            " (a concurrent write committed with it replaced it at the same version)"
        } else {
            ""
        }
    )?;
    Ok(())
}

/// `region remove-node`
pub async fn remove_node(api: &str, region: &str, peer: &str) -> Result<()> {
    check_region(region)?;
    if peer.is_empty() || peer.len() > 128 || !peer.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(anyhow!(
            "{peer:?} is not a peer id (base58, as `agentmesh region status` lists them)"
        ));
    }
    let removed: crate::regions_api::MemberRemoved = ApiClient::new(api)?
        .send(
            Method::DELETE,
            &format!("/v1/regions/{region}/members/{peer}"),
            None::<&()>,
        )
        .await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "removed {} from region {}; voters {}, learners {}",
        removed.removed,
        removed.region,
        removed.voters.len(),
        removed.learners.len()
    )?;
    Ok(())
}

/// `policy get`
pub async fn get_policy(api: &str, region: &str, consistent: bool, json: bool) -> Result<()> {
    check_region(region)?;
    let query = if consistent { "?consistent=true" } else { "" };
    let read: PolicyRead = ApiClient::new(api)?
        .get(&format!("/v1/regions/{region}/policy{query}"))
        .await?;
    if json {
        return print_json(&read);
    }
    let mut out = std::io::stdout().lock();
    let behind = match read.behind_leader {
        Some(0) => "up to date with the leader".to_owned(),
        Some(n) => format!("{n} entries behind the leader"),
        None => "lag unknown (leader unreachable)".to_owned(),
    };
    let how = if read.consistent {
        "linearizable read through the leader"
    } else {
        "local replica"
    };
    writeln!(
        out,
        "region {}  policy version {}  ({how} {}, {behind})",
        read.region,
        read.version,
        short(&read.served_by)
    )?;
    match &read.policy {
        None => writeln!(out, "no policy applied yet")?,
        Some(policy) => {
            let text = toml::to_string_pretty(policy)
                .map_err(|e| anyhow!("cannot render the policy: {e}"))?;
            write!(out, "{text}")?;
        }
    }
    Ok(())
}
