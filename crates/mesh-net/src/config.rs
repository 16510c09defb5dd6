//! Settings of the network layer, already checked. The node turns its TOML
//! and flags into this type; see `node/src/config.rs` for the documented file.

use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Everything the [`crate::Network`] needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on (port 0 picks a free port).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start; any one of them is enough to find the rest.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// How long a connection with no protocol using it stays open.
    pub idle_connection_timeout: Duration,
    /// Bootstrap retry: first delay, doubled after each failure up to `bootstrap_backoff_max`.
    pub bootstrap_backoff_initial: Duration,
    /// Bootstrap retry: longest delay.
    pub bootstrap_backoff_max: Duration,
    /// Keep dialing known members until this many peers are connected.
    pub target_peers: usize,
    /// How often the membership engine runs its timers.
    pub tick_interval: Duration,
    /// gossipsub mesh sizes.
    pub gossip: GossipConfig,
    /// Failure-detector timings.
    pub membership: mesh_membership::Config,
    /// Connection and memory limits.
    pub limits: crate::admission::Limits,
    /// Dial private addresses learned from other nodes (None: yes; see
    /// [`crate::admission::DialScope`]).
    pub dial_private_addrs: Option<bool>,
}

/// gossipsub mesh parameters, tuned so that both a 2-node and a 300-node mesh
/// work: libp2p's defaults (`mesh_n_low` 5, `mesh_outbound_min` 2) can never
/// be met by a small region. Every record is also flood-published to all
/// subscribed peers, so a small mesh still gets every record in one hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// Fewest mesh peers before grafting more. Default 2.
    pub mesh_n_low: usize,
    /// Target mesh degree. Default 6.
    pub mesh_n: usize,
    /// Most mesh peers before pruning. Default 12.
    pub mesh_n_high: usize,
    /// Outbound peers kept in the mesh; at most `mesh_n / 2` and at most `mesh_n_low`. Default 1.
    pub mesh_outbound_min: usize,
    /// gossipsub heartbeat (mesh maintenance and gossip emission). Default 500.
    pub heartbeat_interval_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            mesh_n_low: 2,
            mesh_n: 6,
            mesh_n_high: 12,
            mesh_outbound_min: 1,
            heartbeat_interval_ms: 500,
        }
    }
}

impl GossipConfig {
    /// Checks the mesh sizes the way gossipsub will, so a bad `[gossip]`
    /// section is reported before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 {
            return Err("gossip.heartbeat_interval_ms must be greater than 0".into());
        }
        // gossipsub's builder checks these only for per-topic settings, so check them here.
        let ok = self.mesh_outbound_min <= self.mesh_n_low
            && self.mesh_n_low <= self.mesh_n
            && self.mesh_n <= self.mesh_n_high
            && self.mesh_outbound_min * 2 <= self.mesh_n
            && self.mesh_n_low > 0;
        if !ok {
            return Err(format!(
                "invalid [gossip] mesh sizes (mesh_outbound_min {}, mesh_n_low {}, mesh_n {}, mesh_n_high {}): need 1 <= mesh_n_low, mesh_outbound_min <= mesh_n_low <= mesh_n <= mesh_n_high and mesh_outbound_min <= mesh_n / 2",
                self.mesh_outbound_min, self.mesh_n_low, self.mesh_n, self.mesh_n_high
            ));
        }
        crate::actor::gossipsub_config(self)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
