//! Node configuration: an optional TOML file, overridden by flags, checked
//! before anything starts (ripgrep's LowArgs → HiArgs).
//!
//! [`NodeConfig`] is the file as written (every field optional, with the
//! default documented on it); [`NodeConfig::validate`] turns it into
//! [`CheckedConfig`], listing every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use mesh_net::config::GossipConfig;
use mesh_types::Region;
use serde::Deserialize;

/// Default HTTP API address; the CLI talks to it unless told `--api`.
pub const DEFAULT_API: &str = "127.0.0.1:7070";
/// Default libp2p listen addresses: TCP and QUIC on port 4001, all interfaces.
pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"];

/// The config file. Every field may be left out; flags win over the file.
///
/// ```toml
/// data_dir = "/var/lib/agentmesh"
/// region = "eu-west"
/// listen = ["/ip4/0.0.0.0/tcp/4001"]
/// bootstrap = ["/ip4/10.0.0.1/tcp/4001"]
/// api = "127.0.0.1:7070"
///
/// [membership]
/// dead_after_ms = 4000
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory for the identity, generation counter and node.json. Required (here or `--data-dir`).
    pub data_dir: Option<PathBuf>,
    /// Region of this node: lowercase letters, digits and '-'. Required (here or `--region`).
    pub region: Option<String>,
    /// libp2p listen multiaddrs. Default: TCP and QUIC on port 4001 on all interfaces.
    pub listen: Option<Vec<String>>,
    /// Multiaddrs of peers to join through. Default: none (the first node of a mesh).
    pub bootstrap: Option<Vec<String>>,
    /// HTTP API address, IP:PORT. Default 127.0.0.1:7070.
    pub api: Option<String>,
    /// The API address other people may use to reach this node, shown in
    /// `members` (IP:PORT or NAME:PORT, never 0.0.0.0). Default: none. Nodes
    /// never use it: node-to-node requests go over libp2p.
    pub advertise_api: Option<String>,
    /// Discover peers on the local network by mDNS. Default false.
    pub mdns: Option<bool>,
    /// `text` for people or `json` for machines. Default text.
    pub log_format: Option<String>,
    /// Directory of the model weights (scripts/models.sh fills
    /// ~/.cache/agentmesh/models). Unset: the node runs no models.
    pub models_dir: Option<PathBuf>,
    /// Connection and dialing settings.
    #[serde(default)]
    pub network: NetworkSection,
    /// gossipsub mesh sizes.
    #[serde(default)]
    pub gossip: GossipConfig,
    /// Failure-detector timings.
    #[serde(default)]
    pub membership: mesh_membership::Config,
    /// Region Raft group timings.
    #[serde(default)]
    pub raft: consensus::RaftSettings,
    /// Agents on this node.
    #[serde(default)]
    pub agents: AgentsSection,
}

/// `[agents]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsSection {
    /// How many other nodes of the region hold a copy of each agent's state
    /// hosted here (fewer when fewer are alive; 0: none, and an agent's
    /// state is lost with its node). Default 2.
    pub checkpoint_replicas: usize,
}

impl Default for AgentsSection {
    fn default() -> Self {
        Self {
            checkpoint_replicas: mesh_task::checkpoint::REPLICAS_DEFAULT,
        }
    }
}

/// Most checkpoint replicas an agent may have.
pub const CHECKPOINT_REPLICAS_MAX: usize = 8;

/// `[network]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Close a connection no protocol has used for this long. Default 300000 (5 min).
    pub idle_connection_timeout_ms: u64,
    /// First retry delay for an unanswered bootstrap peer, doubled per failure. Default 500.
    pub bootstrap_backoff_initial_ms: u64,
    /// Longest retry delay for bootstrap peers. Default 30000.
    pub bootstrap_backoff_max_ms: u64,
    /// Dial known members until this many peers are connected. Default 8.
    pub target_peers: usize,
    /// How often membership timers run; bounds detection precision. Default 100.
    pub tick_interval_ms: u64,
    /// Established connections in all. Default 256.
    pub max_connections: u32,
    /// Established connections with one peer. Default 4.
    pub max_connections_per_peer: u32,
    /// Inbound connections from one IP address. Default 64.
    pub max_inbound_per_ip: u32,
    /// Inbound connections still in their handshake. Default 64.
    pub max_pending_inbound: u32,
    /// Above this resident memory (MiB) new inbound connections are refused. Default 4096.
    pub max_memory_mb: u64,
    /// Dial private (10/8, 172.16/12, 192.168/16, fc00::/7, link-local)
    /// addresses that other nodes announce. Default true: edge nodes live on
    /// private networks; set false on a node that faces the internet.
    /// Loopback addresses learned from others are dialled only by a node that
    /// itself listens on a loopback address.
    pub dial_private_addrs: bool,
}

impl Default for NetworkSection {
    fn default() -> Self {
        let limits = mesh_net::admission::Limits::default();
        Self {
            idle_connection_timeout_ms: 300_000,
            bootstrap_backoff_initial_ms: 500,
            bootstrap_backoff_max_ms: 30_000,
            target_peers: 8,
            tick_interval_ms: 100,
            max_connections: limits.max_connections,
            max_connections_per_peer: limits.max_connections_per_peer,
            max_inbound_per_ip: limits.max_inbound_per_ip,
            max_pending_inbound: limits.max_pending_inbound,
            max_memory_mb: limits.max_memory_mb,
            dial_private_addrs: true,
        }
    }
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// The checked configuration the node runs with.
#[derive(Debug, Clone)]
pub struct CheckedConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Region.
    pub region: Region,
    /// HTTP API address.
    pub api: SocketAddr,
    /// The API address this node advertises to people, if any.
    pub advertise_api: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Network settings.
    pub network: mesh_net::Config,
    /// Region Raft group settings.
    pub raft: consensus::RaftSettings,
    /// Where the model weights are, if the node runs models.
    pub models_dir: Option<PathBuf>,
    /// Copies of each hosted agent's state on other nodes.
    pub checkpoint_replicas: usize,
}

/// Flags of `node start` that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--region`
    pub region: Option<String>,
    /// `--listen` (replaces the file's list when given)
    pub listen: Vec<String>,
    /// `--bootstrap` (replaces the file's list when given)
    pub bootstrap: Vec<String>,
    /// `--api`
    pub api: Option<String>,
    /// `--advertise-api`
    pub advertise_api: Option<String>,
    /// `--mdns`
    pub mdns: bool,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
    /// `--models-dir`
    pub models_dir: Option<PathBuf>,
}

impl NodeConfig {
    /// Reads a config file; the error says which file and what is wrong.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))
    }

    /// Applies the flags and checks everything, reporting all problems at once.
    pub fn validate(self, flags: Overrides) -> Result<CheckedConfig, Vec<String>> {
        let mut problems = Vec::new();

        let data_dir = flags.data_dir.or(self.data_dir);
        if data_dir.is_none() {
            problems.push(
                "no data dir: pass --data-dir DIR or set data_dir in the config file".to_owned(),
            );
        }
        let region = match flags.region.or(self.region) {
            Some(name) => Region::parse(&name)
                .map_err(|e| problems.push(e.to_string()))
                .ok(),
            None => {
                problems.push("no region: pass --region NAME (for example eu-west) or set region in the config file".to_owned());
                None
            }
        };

        let listen_given = if flags.listen.is_empty() {
            self.listen
                .unwrap_or_else(|| DEFAULT_LISTEN.iter().map(|s| s.to_string()).collect())
        } else {
            flags.listen
        };
        if listen_given.is_empty() {
            problems.push("no listen address: give at least one --listen MULTIADDR".to_owned());
        }
        let listen = parse_multiaddrs("--listen", &listen_given, &mut problems);
        let bootstrap_given = if flags.bootstrap.is_empty() {
            self.bootstrap.unwrap_or_default()
        } else {
            flags.bootstrap
        };
        let bootstrap = parse_multiaddrs("--bootstrap", &bootstrap_given, &mut problems);

        let api_text = flags
            .api
            .or(self.api)
            .unwrap_or_else(|| DEFAULT_API.to_owned());
        let api = api_text
            .parse::<SocketAddr>()
            .map_err(|_| problems.push(format!("invalid --api address {api_text:?}: expected IP:PORT, for example 127.0.0.1:7070")))
            .ok();

        let advertise_api = flags.advertise_api.or(self.advertise_api);
        if let Some(text) = &advertise_api {
            if let Err(e) = check_advertise_api(text) {
                problems.push(e);
            }
        }

        let log_format = match (flags.log_format, self.log_format.as_deref()) {
            (Some(f), _) => f,
            (None, None | Some("text")) => LogFormat::Text,
            (None, Some("json")) => LogFormat::Json,
            (None, Some(other)) => {
                problems.push(format!(
                    "invalid log_format {other:?}: expected \"text\" or \"json\""
                ));
                LogFormat::Text
            }
        };

        if let Err(e) = self.membership.validate() {
            problems.push(e.to_string());
        } else if let Err(e) = mesh_task::lease::check_timings(
            self.membership.announce_interval_ms,
            self.membership.suspect_after_ms,
            self.membership.dead_after_ms,
        ) {
            problems.push(e);
        }
        if let Err(e) = self.gossip.validate() {
            problems.push(e);
        }
        if let Err(e) = self.raft.validate() {
            problems.push(e);
        }
        let net = &self.network;
        if net.tick_interval_ms == 0 {
            problems.push("network.tick_interval_ms must be greater than 0".to_owned());
        }
        if net.tick_interval_ms >= self.membership.announce_interval_ms.max(1) {
            problems.push(format!(
                "network.tick_interval_ms ({}) must be less than membership.announce_interval_ms ({}), or announcements are late",
                net.tick_interval_ms, self.membership.announce_interval_ms
            ));
        }
        if net.bootstrap_backoff_initial_ms == 0 {
            problems.push("network.bootstrap_backoff_initial_ms must be greater than 0".to_owned());
        }
        if net.bootstrap_backoff_max_ms < net.bootstrap_backoff_initial_ms {
            problems.push(
                "network.bootstrap_backoff_max_ms must be at least bootstrap_backoff_initial_ms"
                    .to_owned(),
            );
        }
        for (name, value) in [
            ("max_connections", u64::from(net.max_connections)),
            (
                "max_connections_per_peer",
                u64::from(net.max_connections_per_peer),
            ),
            ("max_inbound_per_ip", u64::from(net.max_inbound_per_ip)),
            ("max_pending_inbound", u64::from(net.max_pending_inbound)),
            ("max_memory_mb", net.max_memory_mb),
        ] {
            if value == 0 {
                problems.push(format!(
                    "network.{name} must be greater than 0, or the node accepts no connection"
                ));
            }
        }
        if net.idle_connection_timeout_ms < self.membership.announce_interval_ms {
            problems.push("network.idle_connection_timeout_ms must be at least membership.announce_interval_ms".to_owned());
        }

        let models_dir = flags.models_dir.or(self.models_dir);
        if let Some(dir) = models_dir.as_ref().filter(|d| !d.is_dir()) {
            problems.push(format!(
                "models dir {} is not a directory: run scripts/models.sh (it fills ~/.cache/agentmesh/models) or fix --models-dir",
                dir.display()
            ));
        }

        if self.agents.checkpoint_replicas > CHECKPOINT_REPLICAS_MAX {
            problems.push(format!(
                "agents.checkpoint_replicas ({}) is more than {CHECKPOINT_REPLICAS_MAX}: every task of an agent waits for each copy",
                self.agents.checkpoint_replicas
            ));
        }
        match (data_dir, region, api) {
            (Some(data_dir), Some(region), Some(api)) if problems.is_empty() => Ok(CheckedConfig {
                checkpoint_replicas: self.agents.checkpoint_replicas,
                data_dir,
                region,
                api,
                advertise_api,
                log_format,
                network: mesh_net::Config {
                    listen,
                    bootstrap,
                    mdns: flags.mdns || self.mdns.unwrap_or(false),
                    idle_connection_timeout: Duration::from_millis(net.idle_connection_timeout_ms),
                    bootstrap_backoff_initial: Duration::from_millis(
                        net.bootstrap_backoff_initial_ms,
                    ),
                    bootstrap_backoff_max: Duration::from_millis(net.bootstrap_backoff_max_ms),
                    target_peers: net.target_peers,
                    tick_interval: Duration::from_millis(net.tick_interval_ms),
                    gossip: self.gossip,
                    membership: self.membership,
                    limits: mesh_net::admission::Limits {
                        max_connections: net.max_connections,
                        max_connections_per_peer: net.max_connections_per_peer,
                        max_inbound_per_ip: net.max_inbound_per_ip,
                        max_pending_inbound: net.max_pending_inbound,
                        max_memory_mb: net.max_memory_mb,
                    },
                    dial_private_addrs: Some(net.dial_private_addrs),
                },
                raft: self.raft,
                models_dir,
            }),
            _ => Err(problems),
        }
    }
}

/// An advertised API address is `HOST:PORT` with a real host: not the
/// unspecified address (0.0.0.0 or ::), which reaches nobody.
fn check_advertise_api(text: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "invalid --advertise-api {text:?}: {why}; expected HOST:PORT that people can reach, for example 192.0.2.10:7070 or node1.example:7070"
        ))
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.ip().is_unspecified() {
            return bad("the unspecified address reaches nobody");
        }
        if addr.port() == 0 {
            return bad("port 0");
        }
        return Ok(());
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return bad("no port");
    };
    if !port.parse::<u16>().is_ok_and(|p| p != 0) {
        return bad("bad port");
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !name_ok {
        return bad("not a host name");
    }
    Ok(())
}

fn parse_multiaddrs(flag: &str, given: &[String], problems: &mut Vec<String>) -> Vec<Multiaddr> {
    given
        .iter()
        .filter_map(|text| match text.parse::<Multiaddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.push(format!(
                    "malformed multiaddr for {flag}: {text:?} ({e}); expected for example /ip4/127.0.0.1/tcp/4001"
                ));
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Overrides {
        Overrides {
            data_dir: Some("/tmp/x".into()),
            region: Some("eu-west".into()),
            ..Overrides::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        let checked = NodeConfig::default().validate(flags()).expect("valid");
        assert_eq!(checked.api.to_string(), DEFAULT_API);
        assert_eq!(checked.network.listen.len(), 2);
        assert!(checked.network.bootstrap.is_empty());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: NodeConfig = toml::from_str(
            r#"
            region = "us-east"
            api = "127.0.0.1:9000"
            listen = ["/ip4/127.0.0.1/tcp/1"]
            [membership]
            dead_after_ms = 9000
            "#,
        )
        .expect("parse");
        let checked = file
            .validate(Overrides {
                api: Some("127.0.0.1:9001".into()),
                listen: vec!["/ip4/127.0.0.1/tcp/2".into()],
                ..flags()
            })
            .expect("valid");
        assert_eq!(checked.region.as_str(), "eu-west");
        assert_eq!(checked.api.port(), 9001);
        assert_eq!(
            checked.network.listen[0].to_string(),
            "/ip4/127.0.0.1/tcp/2"
        );
        assert_eq!(checked.network.membership.dead_after_ms, 9000);
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let problems = NodeConfig::default()
            .validate(Overrides {
                data_dir: None,
                region: Some("Bad_Region".into()),
                bootstrap: vec!["not-a-multiaddr".into()],
                api: Some("localhost".into()),
                ..Overrides::default()
            })
            .expect_err("invalid");
        let all = problems.join("\n");
        assert_eq!(problems.len(), 4, "{all}");
        for needle in [
            "data dir",
            "invalid region name",
            "malformed multiaddr",
            "--api",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
    }

    #[test]
    fn the_advertised_api_is_a_reachable_host_and_port() {
        for ok in [
            "192.0.2.10:7070",
            "[2001:db8::1]:7070",
            "node1.example:7070",
            "localhost:1",
        ] {
            let checked = NodeConfig::default()
                .validate(Overrides {
                    advertise_api: Some(ok.into()),
                    ..flags()
                })
                .unwrap_or_else(|p| panic!("{ok}: {p:?}"));
            assert_eq!(checked.advertise_api.as_deref(), Some(ok));
        }
        for bad in [
            "0.0.0.0:7070",
            "[::]:7070",
            "host",
            "host:0",
            "a..b:1",
            ":80",
            "x y:80",
        ] {
            let problems = NodeConfig::default()
                .validate(Overrides {
                    advertise_api: Some(bad.into()),
                    ..flags()
                })
                .expect_err(bad);
            assert!(
                problems[0].contains("--advertise-api"),
                "{bad}: {problems:?}"
            );
        }
        let defaults = NodeConfig::default().validate(flags()).expect("valid");
        assert_eq!(
            defaults.advertise_api, None,
            "never the bind address by default"
        );
    }

    #[test]
    fn unknown_fields_in_the_file_are_refused() {
        let err = toml::from_str::<NodeConfig>("regoin = \"eu\"").expect_err("unknown field");
        assert!(err.to_string().contains("regoin"), "{err}");
        let err = toml::from_str::<NodeConfig>("[membership]\ndead_after = 1")
            .expect_err("unknown field");
        assert!(err.to_string().contains("dead_after"), "{err}");
    }

    #[test]
    fn impossible_timings_are_refused() {
        let file: NodeConfig =
            toml::from_str("[membership]\nsuspect_after_ms = 5000\ndead_after_ms = 100")
                .expect("parse");
        let problems = file.validate(flags()).expect_err("invalid");
        assert!(problems[0].contains("dead_after_ms"), "{problems:?}");
        // Valid for the detector, but a cut-off host would not stop its
        // agents before the majority moves them (mesh_task::lease).
        let file: NodeConfig =
            toml::from_str("[membership]\nsuspect_after_ms = 2000\ndead_after_ms = 2600")
                .expect("parse");
        let problems = file.validate(flags()).expect_err("invalid");
        assert!(problems[0].contains("raise dead_after_ms"), "{problems:?}");
        let file: NodeConfig = toml::from_str("[gossip]\nmesh_n_low = 9").expect("parse");
        assert!(file.validate(flags()).is_err());
    }
}
