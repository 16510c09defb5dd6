//! `agentmesh members`: the membership view of one node, as a table or JSON.

use std::io::Write;

use anyhow::Result;
use mesh_types::MemberView;

use crate::client::ApiClient;

/// Prints the view of the node at `api`.
pub async fn run(api: &str, json: bool) -> Result<()> {
    let members: Vec<MemberView> = ApiClient::new(api)?.get("/v1/members").await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &members)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", table(&members))?;
    }
    Ok(())
}

/// The table for people: one row per member, the answering node marked `*`.
pub fn table(members: &[MemberView]) -> String {
    let rows: Vec<[String; 7]> = members
        .iter()
        .map(|m| {
            let seen = if m.is_self {
                "self".to_owned()
            } else {
                format!("{:.1}s ago", m.last_seen_ms as f64 / 1000.0)
            };
            [
                format!("{}{}", m.peer_id.short(), if m.is_self { "*" } else { "" }),
                m.region.to_string(),
                m.state.to_string(),
                m.raft.map_or("-", |r| r.as_str()).to_owned(),
                preferred_addr(&m.addrs).unwrap_or("-").to_owned(),
                if m.models.is_empty() {
                    "-".to_owned()
                } else {
                    m.models.join(",")
                },
                seen,
            ]
        })
        .collect();
    let header = [
        "PEER",
        "REGION",
        "STATE",
        "RAFT",
        "ADDRESS",
        "MODELS",
        "LAST SEEN",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let alive = members
        .iter()
        .filter(|m| m.state == mesh_types::MemberState::Alive)
        .count();
    out.push_str(&format!("{} members, {alive} alive\n", members.len()));
    out
}

/// TCP before QUIC, so the address shown is the one most tools can use.
fn preferred_addr(addrs: &[String]) -> Option<&str> {
    addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .or_else(|| addrs.first())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use mesh_types::{MemberState, NodeId, Region};

    use super::*;

    #[test]
    fn table_aligns_columns_and_marks_self() {
        let member = |id: &str, state, is_self| MemberView {
            peer_id: NodeId(format!("12D3KooW{id}")),
            region: Region::parse("eu-west").expect("valid"),
            state,
            addrs: vec![
                "/ip4/127.0.0.1/udp/1/quic-v1".into(),
                "/ip4/127.0.0.1/tcp/1".into(),
            ],
            last_seen_ms: 1_250,
            version: "0.1.0".into(),
            is_self,
            api: None,
            raft: is_self.then_some(mesh_types::RaftRole::Voter),
            models: if is_self {
                vec!["all-minilm-l6-v2".into()]
            } else {
                vec![]
            },
        };
        let text = table(&[
            member("AAAAAAAAAA", MemberState::Alive, true),
            member("BBBBBBBBBB", MemberState::Dead, false),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("PEER"));
        assert!(lines[1].starts_with("AAAAAAAA*"));
        assert!(lines[1].contains(" voter "));
        assert!(lines[1].contains("/ip4/127.0.0.1/tcp/1"));
        assert!(lines[1].contains(" all-minilm-l6-v2 "));
        assert!(lines[1].ends_with("self"));
        assert!(lines[2].contains("dead") && lines[2].ends_with("1.2s ago"));
        assert_eq!(lines[0].find("STATE"), lines[2].find("dead"));
        assert_eq!(lines[3], "2 members, 1 alive");
    }
}
