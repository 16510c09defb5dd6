//! Who may connect, and where members are dialled (issue 12, findings 6
//! and 13). A behaviour with no protocol of its own: the swarm asks it
//! before every connection.
//!
//! - Connection limits: in total, per peer, per remote IP (inbound), and
//!   pending inbound handshakes. A connection past a limit is refused before
//!   its handshake completes (or right after, for per-peer limits).
//! - Memory: while the process's resident memory is above a bound, new
//!   inbound connections are refused (the node keeps the ones it has).
//! - The address book: the addresses of members, from their signed
//!   records, so that a call to a member by peer id (a Raft link, a
//!   forwarded request) can dial it. At most [`ADDRS_PER_PEER_MAX`] per
//!   member, and only addresses [`DialScope`] allows.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure,
    NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Addresses dialled per member, whatever its record lists.
pub const ADDRS_PER_PEER_MAX: usize = 8;
/// How often resident memory is read (from /proc) at most.
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Connection limits. See `node/src/config.rs` `[network]` for defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Established inbound connections in all (this node's own dials are
    /// not counted: a flood of strangers must not stop it dialling members).
    pub max_connections: u32,
    /// Established connections with one peer (two nodes dialling each
    /// other at once make two).
    pub max_connections_per_peer: u32,
    /// Inbound connections (pending and established) from one IP address
    /// (an IPv6 address counts with its whole /64).
    pub max_inbound_per_ip: u32,
    /// Inbound connections still in their handshake; at most a quarter of
    /// them (and at least 2) from one IP address, so one address cannot
    /// hold every handshake slot.
    pub max_pending_inbound: u32,
    /// Resident memory above which new inbound connections are refused, in MiB.
    pub max_memory_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_peer: 4,
            max_inbound_per_ip: 64,
            max_pending_inbound: 64,
            max_memory_mb: 4096,
        }
    }
}

/// Which addresses learned from other nodes (records, identify) are
/// dialled. Addresses given by the operator (`--bootstrap`) are always
/// dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialScope {
    /// Loopback addresses: only when this node itself listens on an
    /// explicit loopback address (a local test mesh).
    pub loopback: bool,
    /// Private (RFC 1918, unique local, link-local) addresses.
    pub private: bool,
}

impl DialScope {
    /// The scope a node with these listen addresses dials: loopback only if
    /// it listens on loopback itself; private addresses unless `dial_private`
    /// says otherwise (the default allows them: edge nodes live on private
    /// networks).
    pub fn for_listen(listen: &[Multiaddr], dial_private: Option<bool>) -> Self {
        let loopback = listen.iter().filter_map(ip_of).any(|ip| ip.is_loopback());
        Self {
            loopback,
            private: dial_private.unwrap_or(true),
        }
    }

    /// True if an address learned from another node may be dialled.
    pub fn allows(&self, addr: &Multiaddr) -> bool {
        match ip_of(addr).map(unmapped) {
            // A DNS name may resolve to anything, loopback included: only
            // where private addresses may be dialled.
            None => !addr.is_empty() && self.private,
            Some(ip) if ip.is_unspecified() || ip.is_multicast() => false,
            Some(ip) if ip.is_loopback() => self.loopback,
            Some(ip) if is_private(&ip) => self.private,
            Some(_) => true,
        }
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            a.is_private()
                || a.is_link_local()
                || a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64
        }
        // fc00::/7 unique local, fe80::/10 link-local.
        IpAddr::V6(a) => {
            (a.segments()[0] & 0xfe00) == 0xfc00 || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The behaviour.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    scope: DialScope,
    pending_inbound: HashMap<ConnectionId, Option<IpAddr>>,
    established: HashMap<ConnectionId, (PeerId, Option<IpAddr>)>,
    per_peer: HashMap<PeerId, u32>,
    inbound_per_ip: HashMap<IpAddr, u32>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    memory: MemoryGauge,
    /// Connections refused, per reason, for metrics and tests.
    pub refused: HashMap<&'static str, u64>,
}

impl Admission {
    /// A behaviour with these limits and dial scope.
    pub fn new(limits: Limits, scope: DialScope) -> Self {
        Self {
            limits,
            scope,
            pending_inbound: HashMap::new(),
            established: HashMap::new(),
            per_peer: HashMap::new(),
            inbound_per_ip: HashMap::new(),
            addresses: HashMap::new(),
            memory: MemoryGauge::default(),
            refused: HashMap::new(),
        }
    }

    /// Sets a member's addresses (from its checked record), keeping the
    /// first [`ADDRS_PER_PEER_MAX`] the scope allows.
    pub fn set_addresses(&mut self, peer: PeerId, addrs: &[String]) {
        let allowed: Vec<Multiaddr> = addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter(|a| self.scope.allows(a))
            .take(ADDRS_PER_PEER_MAX)
            .collect();
        if allowed.is_empty() {
            self.addresses.remove(&peer);
        } else {
            self.addresses.insert(peer, allowed);
        }
    }

    /// Forgets a member's addresses.
    pub fn forget(&mut self, peer: &PeerId) {
        self.addresses.remove(peer);
    }

    /// An inbound connection failed its handshake: its IP slot comes back.
    fn release_pending(&mut self, connection_id: ConnectionId) {
        if let Some(ip) = self.pending_inbound.remove(&connection_id) {
            release_ip(&mut self.inbound_per_ip, ip);
        }
    }

    /// Connections refused so far, in all.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// True if an address learned from another node may be dialled.
    pub fn may_dial(&self, addr: &Multiaddr) -> bool {
        self.scope.allows(addr)
    }

    fn refuse(&mut self, reason: &'static str, detail: String) -> ConnectionDenied {
        *self.refused.entry(reason).or_default() += 1;
        ConnectionDenied::new(LimitReached(detail))
    }

    fn check_established(&mut self, peer: PeerId, inbound: bool) -> Result<(), ConnectionDenied> {
        let established_inbound = self
            .established
            .values()
            .filter(|(_, ip)| ip.is_some())
            .count();
        if inbound && established_inbound as u64 >= u64::from(self.limits.max_connections) {
            let limit = self.limits.max_connections;
            return Err(self.refuse("total", format!("{limit} connections open in all")));
        }
        let with_peer = self.per_peer.get(&peer).copied().unwrap_or(0);
        if with_peer >= self.limits.max_connections_per_peer {
            return Err(self.refuse(
                "per_peer",
                format!("{with_peer} connections open with {peer}"),
            ));
        }
        Ok(())
    }
}

/// Why a connection was refused.
#[derive(Debug)]
struct LimitReached(String);

impl std::fmt::Display for LimitReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection limit reached: {}", self.0)
    }
}

impl std::error::Error for LimitReached {}

/// The process's resident memory, read from /proc at most once a second.
#[derive(Debug, Default)]
struct MemoryGauge {
    read_at: Option<Instant>,
    rss_mb: u64,
}

impl MemoryGauge {
    fn rss_mb(&mut self) -> u64 {
        let now = Instant::now();
        if self
            .read_at
            .is_none_or(|t| now.duration_since(t) >= MEMORY_CHECK_EVERY)
        {
            self.read_at = Some(now);
            self.rss_mb = resident_mb().unwrap_or(0);
        }
        self.rss_mb
    }
}

/// Resident memory in MiB (`VmRSS` of /proc/self/status); None off Linux.
pub fn resident_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The address connections are counted under: an IPv4 address, or the /64
/// of an IPv6 one (one host usually holds a whole /64).
fn remote_ip(addr: &Multiaddr) -> Option<IpAddr> {
    ip_of(addr).map(|ip| match unmapped(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    })
}

/// An IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::/96) address as the
/// IPv4 address it stands for.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

impl NetworkBehaviour for Admission {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.pending_inbound.len() as u64 >= u64::from(self.limits.max_pending_inbound) {
            let limit = self.limits.max_pending_inbound;
            return Err(self.refuse("pending", format!("{limit} inbound handshakes in progress")));
        }
        let ip = remote_ip(remote_addr);
        if let Some(ip) = ip {
            let from_ip = self.inbound_per_ip.get(&ip).copied().unwrap_or(0);
            if from_ip >= self.limits.max_inbound_per_ip {
                return Err(
                    self.refuse("per_ip", format!("{from_ip} inbound connections from {ip}"))
                );
            }
            let pending_max = (self.limits.max_pending_inbound / 4).max(2) as usize;
            let pending_from_ip = self
                .pending_inbound
                .values()
                .filter(|p| **p == Some(ip))
                .count();
            if pending_from_ip >= pending_max {
                return Err(self.refuse(
                    "pending_per_ip",
                    format!("{pending_from_ip} handshakes in progress from {ip}"),
                ));
            }
        }
        let rss = self.memory.rss_mb();
        if rss > self.limits.max_memory_mb {
            let limit = self.limits.max_memory_mb;
            return Err(self.refuse(
                "memory",
                format!("resident memory {rss} MiB is above the {limit} MiB limit"),
            ));
        }
        if let Some(ip) = ip {
            *self.inbound_per_ip.entry(ip).or_default() += 1;
        }
        self.pending_inbound.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let ip = self.pending_inbound.remove(&connection_id).flatten();
        if let Err(denied) = self.check_established(peer, true) {
            release_ip(&mut self.inbound_per_ip, ip);
            return Err(denied);
        }
        // Counted from here on under `established` (see on_swarm_event).
        self.established.insert(connection_id, (peer, ip));
        *self.per_peer.entry(peer).or_default() += 1;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        _addresses: &[Multiaddr],
        _effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(maybe_peer
            .and_then(|p| self.addresses.get(&p).cloned())
            .unwrap_or_default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check_established(peer, false)?;
        self.established.insert(connection_id, (peer, None));
        *self.per_peer.entry(peer).or_default() += 1;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                if let Some((peer, ip)) = self.established.remove(&connection_id) {
                    if let Some(n) = self.per_peer.get_mut(&peer) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            self.per_peer.remove(&peer);
                        }
                    }
                    release_ip(&mut self.inbound_per_ip, ip);
                }
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.release_pending(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

fn release_ip(counts: &mut HashMap<IpAddr, u32>, ip: Option<IpAddr>) {
    if let Some(ip) = ip {
        if let Some(n) = counts.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Multiaddr {
        text.parse().expect("multiaddr")
    }

    #[test]
    fn learned_addresses_are_dialled_within_the_scope_only() {
        let local = DialScope::for_listen(&[addr("/ip4/127.0.0.1/tcp/1")], None);
        assert!(local.allows(&addr("/ip4/127.0.0.1/tcp/2")));
        assert!(local.allows(&addr("/ip4/10.0.0.1/tcp/2")));
        assert!(local.allows(&addr("/ip4/203.0.113.9/tcp/2")));
        assert!(!local.allows(&addr("/ip4/0.0.0.0/tcp/2")));

        let public = DialScope::for_listen(&[addr("/ip4/0.0.0.0/tcp/4001")], Some(false));
        assert!(
            !public.allows(&addr("/ip4/127.0.0.1/tcp/22")),
            "loopback of a node listening on all interfaces"
        );
        assert!(!public.allows(&addr("/ip6/::1/tcp/22")));
        assert!(!public.allows(&addr("/ip4/192.168.1.1/tcp/80")));
        assert!(
            !public.allows(&addr("/ip4/169.254.169.254/tcp/80")),
            "link-local (cloud metadata)"
        );
        assert!(!public.allows(&addr("/ip6/fd00::1/tcp/80")));
        assert!(public.allows(&addr("/ip4/203.0.113.9/tcp/4001")));
        assert!(
            !public.allows(&addr("/dns4/localhost/tcp/4001")),
            "a name may resolve to loopback"
        );
        assert!(local.allows(&addr("/dns4/node1.example/tcp/4001")));
        for mapped in [
            "/ip6/::ffff:127.0.0.1/tcp/22",
            "/ip6/::ffff:169.254.169.254/tcp/80",
            "/ip6/::ffff:10.0.0.1/tcp/80",
            "/ip6/64:ff9b::7f00:1/tcp/22",
        ] {
            assert!(!public.allows(&addr(mapped)), "{mapped}");
        }

        let mut admission = Admission::new(Limits::default(), public);
        let peer = PeerId::random();
        let many: Vec<String> = (0..100)
            .map(|i| format!("/ip4/203.0.113.{i}/tcp/4001"))
            .chain(["/ip4/127.0.0.1/tcp/1".to_owned()])
            .collect();
        admission.set_addresses(peer, &many);
        assert_eq!(admission.addresses[&peer].len(), ADDRS_PER_PEER_MAX);
        admission.set_addresses(peer, &["/ip4/127.0.0.1/tcp/1".to_owned()]);
        assert!(!admission.addresses.contains_key(&peer));
    }

    #[test]
    fn inbound_connections_are_limited_per_ip_and_released_on_close() {
        let limits = Limits {
            max_inbound_per_ip: 2,
            max_pending_inbound: 64,
            ..Limits::default()
        };
        let mut admission = Admission::new(limits, DialScope::for_listen(&[], None));
        let local = addr("/ip4/127.0.0.1/tcp/1");
        let remote = addr("/ip4/192.0.2.1/tcp/5");
        let (a, b, c) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
        );
        admission
            .handle_pending_inbound_connection(a, &local, &remote)
            .expect("first");
        admission
            .handle_pending_inbound_connection(b, &local, &remote)
            .expect("second");
        assert!(admission
            .handle_pending_inbound_connection(c, &local, &remote)
            .is_err());
        assert_eq!(admission.refused["per_ip"], 1);
        let other = addr("/ip4/192.0.2.2/tcp/5");
        admission
            .handle_pending_inbound_connection(c, &local, &other)
            .expect("another IP");
        // One of the first two fails its handshake: its slot comes back.
        admission.release_pending(a);
        admission
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(4), &local, &remote)
            .expect("a slot was released");
    }
}

#[cfg(test)]
mod pending_tests {
    use super::*;

    #[test]
    fn one_address_cannot_hold_every_handshake_slot_and_ipv6_counts_by_64() {
        let limits = Limits {
            max_pending_inbound: 8,
            ..Limits::default()
        };
        let mut admission = Admission::new(limits, DialScope::for_listen(&[], None));
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        let a: Multiaddr = "/ip6/2001:db8::1/tcp/5".parse().expect("addr");
        let b: Multiaddr = "/ip6/2001:db8::ffff/tcp/5".parse().expect("addr");
        let other: Multiaddr = "/ip4/192.0.2.7/tcp/5".parse().expect("addr");
        admission
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(1), &local, &a)
            .expect("first");
        admission
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(2), &local, &b)
            .expect("second, same /64");
        assert!(
            admission
                .handle_pending_inbound_connection(ConnectionId::new_unchecked(3), &local, &b)
                .is_err(),
            "a third handshake from the same /64"
        );
        assert_eq!(admission.refused["pending_per_ip"], 1);
        admission
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(4), &local, &other)
            .expect("another address is not held up");
    }
}
