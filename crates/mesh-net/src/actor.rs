//! The async shell around the swarm and the membership engine.
//!
//! `NetworkActor` owns the libp2p `Swarm`, the [`Membership`] engine and the
//! [`Dialer`]; nothing else touches them. Other tasks hold a cloneable
//! [`Network`] handle and talk to the actor through a bounded channel of
//! `(request, oneshot)` pairs. The actor stops when its `CancellationToken` is
//! cancelled: it announces that it leaves, lets the swarm flush that for
//! [`LEAVE_FLUSH`], and returns.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, kad, mdns, noise, request_response, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
    Swarm,
};
use mesh_membership::{Command, Event, Membership};
use mesh_types::{MemberState, MemberView, NodeId, NodeRecord, UnixMillis};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::codec::FrameCodec;
use crate::config::{Config, GossipConfig};
use crate::dialer::Dialer;
use crate::envelope;
use crate::raft_link::{serve_links, InboundRpc, RaftLinks};
use crate::sync::{SyncEntry, SyncMessage};

/// The gossipsub topic every node's record is published on.
pub const MEMBERS_TOPIC: &str = "agentmesh/members/1";
/// identify protocol version: peers that speak another one are not ours.
pub const PROTOCOL_VERSION: &str = "/agentmesh/1.0.0";
/// Kademlia protocol name, so agentmesh's DHT never mixes with IPFS's.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/kad/1.0.0");
/// Push-pull sync of member records when two nodes connect (like Serf's
/// push-pull on join): a new node learns the whole view in one round trip
/// instead of waiting for every member's next announcement.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/members-sync/1");
/// A sync that takes longer than this is abandoned; gossip still converges.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Inbound Raft RPCs waiting for the node to take them; past this the
/// request is dropped and the sender sees a failure (backpressure).
const INBOUND_RPC_QUEUE: usize = 256;
/// How long the swarm keeps running after the leave announcement, so it
/// reaches the peers before the connections close.
pub const LEAVE_FLUSH: Duration = Duration::from_millis(500);
/// Requests waiting for the actor; callers past this wait (backpressure).
const REQUEST_QUEUE: usize = 64;

/// Why the network could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The transport or a behaviour could not be built.
    #[error("cannot set up libp2p: {0}")]
    Setup(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}; pick another --listen address or free the port")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// The transport's error.
        reason: String,
    },
    /// The actor has stopped (the node is shutting down).
    #[error("the network actor has stopped")]
    Stopped,
}

/// Sent once, when every listener has an address.
#[derive(Debug, Clone)]
pub struct Ready {
    /// This node.
    pub peer_id: PeerId,
    /// The addresses it listens on (port 0 resolved).
    pub listen: Vec<Multiaddr>,
}

/// The state of the network at one instant, for the API and metrics.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The membership view, the local node first.
    pub members: Vec<MemberView>,
    /// Remote members per state.
    pub counts: [(MemberState, usize); 4],
    /// Open connections.
    pub connections: u32,
    /// Connected peers.
    pub connected_peers: usize,
    /// gossip messages received (valid or not).
    pub gossip_in: u64,
    /// gossip messages published.
    pub gossip_out: u64,
    /// Publishes that found no subscribed peer or failed otherwise.
    pub publish_failures: u64,
    /// Records refused: bad signature, malformed, wrong signer.
    pub records_rejected: u64,
    /// Records ignored by the engine: stale or from the future.
    pub records_ignored: u64,
}

#[derive(Debug)]
enum Request {
    Snapshot(oneshot::Sender<Snapshot>),
    SetRaftRole(Option<mesh_types::RaftRole>),
}

/// What [`Network::start`] hands back.
#[derive(Debug)]
pub struct Started {
    /// The handle.
    pub network: Network,
    /// Fires once every listener has an address.
    pub ready: oneshot::Receiver<Ready>,
    /// Raft RPCs from peers; the node MUST consume them, or they are dropped.
    pub inbound_rpcs: mpsc::Receiver<InboundRpc>,
    /// The actor task; it ends after the leave announcement once shutdown is cancelled.
    pub task: JoinHandle<()>,
}

/// Cloneable handle to the running network actor.
#[derive(Debug, Clone)]
pub struct Network {
    requests: mpsc::Sender<Request>,
    raft_links: RaftLinks,
}

impl Network {
    /// Builds the swarm, binds every listen address (errors here are fatal
    /// and returned), and spawns the actor. `local` is this node's record
    /// template, its `seq` already carrying this start's generation.
    /// `ready` fires once every listener has an address.
    pub fn start(
        config: Config,
        keypair: Keypair,
        local: NodeRecord,
        shutdown: CancellationToken,
    ) -> Result<Started, NetworkError> {
        let mut swarm = build_swarm(&config, keypair.clone())?;
        let topic = IdentTopic::new(MEMBERS_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| NetworkError::Setup(format!("subscribe to {MEMBERS_TOPIC}: {e}")))?;
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));

        let mut pending_listeners = Vec::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| NetworkError::Listen {
                    addr: addr.clone(),
                    reason: transport_error_text(&e),
                })?;
            pending_listeners.push(id);
        }

        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_RPC_QUEUE);
        let control = swarm.behaviour().raft.new_control();
        tokio::spawn(serve_links(control.clone(), inbound_tx, shutdown.clone()));
        let (ready_tx, ready_rx) = oneshot::channel();
        let now = unix_now_ms();
        let actor = NetworkActor {
            dialer: Dialer::new(
                config.bootstrap.clone(),
                duration_ms(config.bootstrap_backoff_initial),
                duration_ms(config.bootstrap_backoff_max),
                config.target_peers,
            ),
            membership: Membership::new(config.membership.clone(), local, now),
            tick_interval: config.tick_interval,
            keypair,
            swarm,
            topic,
            requests: rx,
            shutdown,
            pending_listeners,
            ready: Some(ready_tx),
            listen_addrs: Vec::new(),
            envelopes: BTreeMap::new(),
            announce_unheard: false,
            counters: Counters::default(),
        };
        let handle = tokio::spawn(actor.run());
        Ok(Started {
            network: Network {
                requests: tx,
                raft_links: RaftLinks::new(control),
            },
            ready: ready_rx,
            inbound_rpcs: inbound_rx,
            task: handle,
        })
    }

    /// Sends one Raft RPC to `peer` and waits for its answer.
    pub async fn rpc(&self, peer: PeerId, request: Vec<u8>) -> Result<Vec<u8>, String> {
        self.raft_links.call(peer, request).await
    }

    /// Sets this node's Raft role in its gossip record (announced at once if it changed).
    pub async fn set_raft_role(
        &self,
        role: Option<mesh_types::RaftRole>,
    ) -> Result<(), NetworkError> {
        self.requests
            .send(Request::SetRaftRole(role))
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// The current view and counters.
    pub async fn snapshot(&self) -> Result<Snapshot, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Snapshot(tx))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    sync: request_response::Behaviour<FrameCodec>,
    /// Raft links: long-lived streams, see [`crate::raft_link`].
    raft: libp2p_stream::Behaviour,
}

pub(crate) fn gossipsub_config(gossip: &GossipConfig) -> Result<gossipsub::Config, NetworkError> {
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(gossip.heartbeat_interval_ms))
        .mesh_n_low(gossip.mesh_n_low)
        .mesh_n(gossip.mesh_n)
        .mesh_n_high(gossip.mesh_n_high)
        .mesh_outbound_min(gossip.mesh_outbound_min)
        // Records sign themselves (see `envelope`), so gossipsub's own
        // per-message signature is redundant: it would be checked on every
        // duplicate copy, before de-duplication, and cost most of a node's
        // idle CPU in a 30-node mesh. Messages are anonymous and identified
        // by the hash of their content; each unique record is verified once,
        // by us, before it is forwarded.
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(|message| gossipsub::MessageId::from(&Sha256::digest(&message.data)[..20]))
        .validate_messages()
        .build()
        .map_err(|e| {
            NetworkError::Setup(format!(
                "invalid [gossip] settings ({e}): need mesh_outbound_min <= mesh_n_low <= mesh_n <= mesh_n_high and mesh_outbound_min <= mesh_n / 2"
            ))
        })
}

fn build_swarm(config: &Config, keypair: Keypair) -> Result<Swarm<Behaviour>, NetworkError> {
    config.gossip.validate().map_err(NetworkError::Setup)?;
    let gossip_config = gossipsub_config(&config.gossip)?;
    let mdns_enabled = config.mdns;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetworkError::Setup(format!("tcp transport: {e}")))?
        .with_quic()
        .with_dns()
        .map_err(|e| NetworkError::Setup(format!("dns resolver: {e}")))?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Anonymous,
                gossip_config,
            )?;
            let identify = identify::Behaviour::new(
                identify::Config::new(PROTOCOL_VERSION.to_owned(), key.public())
                    .with_agent_version(format!("agentmesh/{}", mesh_types::AGENTMESH_VERSION)),
            );
            let kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad::Config::new(KAD_PROTOCOL),
            );
            let mdns = if mdns_enabled {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            let sync = request_response::Behaviour::with_codec(
                FrameCodec,
                [(SYNC_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(SYNC_TIMEOUT),
            );
            let raft = libp2p_stream::Behaviour::new();
            Ok(Behaviour {
                gossipsub,
                identify,
                kad,
                mdns: Toggle::from(mdns),
                sync,
                raft,
            })
        })
        .map_err(|e| NetworkError::Setup(format!("behaviours: {e}")))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_connection_timeout)
                // Every peer speaks every agentmesh protocol: send a request
                // with its protocol name instead of waiting a round trip for
                // the name to be confirmed (a Raft RPC opens a substream).
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

#[derive(Debug, Default)]
struct Counters {
    gossip_in: u64,
    gossip_out: u64,
    publish_failures: u64,
    records_rejected: u64,
    records_ignored: u64,
}

struct NetworkActor {
    swarm: Swarm<Behaviour>,
    membership: Membership,
    dialer: Dialer<Multiaddr, PeerId>,
    keypair: Keypair,
    topic: IdentTopic,
    tick_interval: Duration,
    requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
    pending_listeners: Vec<libp2p::core::transport::ListenerId>,
    ready: Option<oneshot::Sender<Ready>>,
    listen_addrs: Vec<Multiaddr>,
    /// The signed bytes of the freshest record of every member (and of this
    /// node), served to peers that sync with us. Pruned with the view.
    envelopes: BTreeMap<NodeId, Vec<u8>>,
    /// The last announcement reached no subscribed peer.
    announce_unheard: bool,
    counters: Counters,
}

impl NetworkActor {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(request) = self.requests.recv() => self.on_request(request),
                _ = tick.tick() => self.on_tick(),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
        self.leave().await;
    }

    async fn leave(&mut self) {
        info!("leaving the mesh: announcing it to peers");
        let commands = self.membership.handle(Event::Leave, unix_now_ms());
        self.execute(commands);
        let flush = tokio::time::sleep(LEAVE_FLUSH);
        tokio::pin!(flush);
        loop {
            tokio::select! {
                _ = &mut flush => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Snapshot(reply) => {
                let info = self.swarm.network_info();
                let snapshot = Snapshot {
                    members: self.membership.view(unix_now_ms()),
                    counts: self.membership.counts(),
                    connections: info.connection_counters().num_established(),
                    connected_peers: info.num_peers(),
                    gossip_in: self.counters.gossip_in,
                    gossip_out: self.counters.gossip_out,
                    publish_failures: self.counters.publish_failures,
                    records_rejected: self.counters.records_rejected,
                    records_ignored: self.counters.records_ignored,
                };
                // The caller may have given up; nothing to do then.
                let _ = reply.send(snapshot);
            }
            Request::SetRaftRole(role) => {
                let commands = self
                    .membership
                    .handle(Event::LocalRaftRole(role), unix_now_ms());
                self.execute(commands);
            }
        }
    }

    fn on_tick(&mut self) {
        let now = unix_now_ms();
        let commands = self.membership.handle(Event::Tick, now);
        self.execute(commands);

        let connected = self.swarm.network_info().num_peers();
        for dial in self.dialer.poll_bootstrap(now, connected) {
            if dial.attempt > 1 {
                warn!(
                    addr = %dial.addr,
                    attempt = dial.attempt,
                    retry_in_ms = dial.retry_in_ms,
                    "no peer has answered yet; dialing bootstrap peer again"
                );
            } else {
                info!(addr = %dial.addr, "dialing bootstrap peer");
            }
            if let Err(e) = self.swarm.dial(dial.addr.clone()) {
                warn!(addr = %dial.addr, error = %e, "cannot dial bootstrap peer");
            }
        }

        let candidates: Vec<PeerId> = self
            .membership
            .view(now)
            .into_iter()
            .filter(|m| !m.is_self && m.state == MemberState::Alive)
            .filter_map(|m| m.peer_id.0.parse::<PeerId>().ok())
            .filter(|p| !self.swarm.is_connected(p))
            .collect();
        for peer in self.dialer.poll_top_up(now, connected, candidates) {
            self.dial_member(peer);
        }
    }

    fn dial_member(&mut self, peer: PeerId) {
        let addrs: Vec<Multiaddr> = self
            .membership
            .record(&mesh_types::NodeId(peer.to_base58()))
            .map(|r| r.addrs.iter().filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default();
        if addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "top-up dial not started");
        }
    }

    fn execute(&mut self, commands: Vec<Command>) {
        for command in commands {
            match command {
                Command::Announce(record) => self.publish(&record),
                Command::StateChanged { node, from, to } => {
                    let region = self
                        .membership
                        .record(&node)
                        .map(|r| r.region.to_string())
                        .unwrap_or_default();
                    let from = from.map(|s| s.as_str()).unwrap_or("unknown");
                    match to {
                        MemberState::Alive | MemberState::Left => {
                            info!(peer = %node, %region, from, to = to.as_str(), "member state changed")
                        }
                        MemberState::Suspect | MemberState::Dead => {
                            warn!(peer = %node, %region, from, to = to.as_str(), "member state changed")
                        }
                    }
                }
                Command::RecordIgnored { node, reason } => {
                    self.counters.records_ignored += 1;
                    debug!(peer = %node, ?reason, "record ignored");
                }
                Command::Forgot(node) => {
                    self.envelopes.remove(&node);
                    debug!(peer = %node, "forgot member");
                }
            }
        }
    }

    fn publish(&mut self, record: &NodeRecord) {
        let sealed = match envelope::seal(&self.keypair, record) {
            Ok(bytes) => bytes,
            Err(e) => {
                error!(error = %e, "cannot sign the local record");
                return;
            }
        };
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), sealed)
        {
            Ok(_) => {
                self.counters.gossip_out += 1;
                self.announce_unheard = false;
            }
            // Normal while alone: the next announcement sends the record
            // again, and a peer that connects gets it by member sync.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                self.counters.publish_failures += 1;
                self.announce_unheard = true;
                debug!("no subscribed peer yet; record will be sent on the next announcement");
            }
            Err(e) => {
                self.counters.publish_failures += 1;
                warn!(error = %e, "cannot publish the local record");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != PROTOCOL_VERSION {
                    debug!(%peer_id, version = %info.protocol_version, "peer speaks another protocol");
                    return;
                }
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer_id, addr) in found {
                    debug!(%peer_id, %addr, "found by mDNS");
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                    if !self.swarm.is_connected(&peer_id) {
                        let opts = DialOpts::peer_id(peer_id)
                            .addresses(vec![addr])
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync(event),
            SwarmEvent::Behaviour(BehaviourEvent::Raft(())) => {}
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                self.listen_addrs.push(address);
                self.pending_listeners.retain(|id| *id != listener_id);
                self.announce_addrs();
                if self.pending_listeners.is_empty() {
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Ready {
                            peer_id: *self.swarm.local_peer_id(),
                            listen: self.listen_addrs.clone(),
                        });
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.announce_addrs();
            }
            SwarmEvent::ListenerClosed {
                addresses,
                reason: Err(e),
                ..
            } => error!(?addresses, error = %e, "listener closed"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                debug!(%peer_id, addr = %endpoint.get_remote_address(), num_established, "connected");
                if num_established.get() == 1 {
                    // Push our record, pull theirs: both sides do this, so each learns the other's view.
                    let push = self.sync_message(true);
                    self.swarm.behaviour_mut().sync.send_request(&peer_id, push);
                }
                if let ConnectedPoint::Dialer { address, .. } = endpoint {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(%peer_id, num_established, ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, error = %error, "dial failed");
            }
            _ => {}
        }
    }

    fn announce_addrs(&mut self) {
        let addrs = self.listen_addrs.iter().map(|a| a.to_string()).collect();
        let commands = self
            .membership
            .handle(Event::LocalAddrs(addrs), unix_now_ms());
        self.execute(commands);
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                self.counters.gossip_in += 1;
                // Records are self-signed: who forwarded or published the
                // message does not matter, only that the record verifies.
                let verdict = envelope::open(&message.data)
                    .map(|(record, _)| record)
                    .map_err(|e| e.to_string());
                let acceptance = match verdict {
                    Ok(record) => {
                        self.apply_record(Event::Record(record), &message.data);
                        MessageAcceptance::Accept
                    }
                    Err(reason) => {
                        self.counters.records_rejected += 1;
                        warn!(from = %propagation_source, %reason, "refused a node record");
                        MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            gossipsub::Event::Subscribed { peer_id, .. } if self.announce_unheard => {
                // The first peer that can hear us: announce now, not at the
                // next interval, so the whole mesh learns of a new node fast.
                debug!(%peer_id, "first subscribed peer: announcing now");
                let commands = self.membership.handle(Event::AnnounceNow, unix_now_ms());
                self.execute(commands);
            }
            _ => {}
        }
    }
}

impl NetworkActor {
    /// Feeds a checked record to the engine and keeps its signed bytes if
    /// the engine took it as the member's freshest.
    fn apply_record(&mut self, event: Event, sealed: &[u8]) {
        let (node, seq) = match &event {
            Event::Record(r) | Event::SyncedRecord { record: r, .. } => (r.node_id.clone(), r.seq),
            _ => return,
        };
        let commands = self.membership.handle(event, unix_now_ms());
        self.execute(commands);
        if self.membership.record(&node).is_some_and(|r| r.seq == seq) {
            self.envelopes.insert(node, sealed.to_vec());
        }
    }

    /// Our side of a sync: our own record only (`own_only`, in a request), or
    /// our record and every member we see alive, with how long ago we heard
    /// from it (in a response).
    fn sync_message(&mut self, own_only: bool) -> Vec<u8> {
        let local_id = self.membership.local().node_id.clone();
        if !self.envelopes.contains_key(&local_id) {
            let record = self.membership.local().clone();
            match envelope::seal(&self.keypair, &record) {
                Ok(sealed) => {
                    self.envelopes.insert(local_id.clone(), sealed);
                }
                Err(e) => error!(error = %e, "cannot sign the local record"),
            }
        }
        let mut entries: Vec<SyncEntry> = self
            .envelopes
            .get(&local_id)
            .map(|e| SyncEntry {
                envelope: e.clone(),
                age_ms: 0,
            })
            .into_iter()
            .collect();
        if !own_only {
            for member in self.membership.view(unix_now_ms()) {
                if member.is_self || member.state != MemberState::Alive {
                    continue;
                }
                if let Some(e) = self.envelopes.get(&member.peer_id) {
                    entries.push(SyncEntry {
                        envelope: e.clone(),
                        age_ms: member.last_seen_ms,
                    });
                }
            }
        }
        SyncMessage::new(entries).encode()
    }

    fn apply_sync(&mut self, from: PeerId, bytes: &[u8]) {
        let message = match SyncMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.counters.records_rejected += 1;
                warn!(%from, error = %e, "refused a member sync");
                return;
            }
        };
        for entry in message.entries {
            match envelope::open(&entry.envelope) {
                Ok((record, _)) => {
                    let event = Event::SyncedRecord {
                        record,
                        age_ms: entry.age_ms,
                    };
                    self.apply_record(event, &entry.envelope);
                }
                Err(e) => {
                    self.counters.records_rejected += 1;
                    warn!(%from, error = %e, "refused a synced node record");
                }
            }
        }
    }

    fn on_sync(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.apply_sync(peer, &request);
                    let reply = self.sync_message(false);
                    if self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, reply)
                        .is_err()
                    {
                        debug!(%peer, "sync peer went away before our answer");
                    }
                }
                request_response::Message::Response { response, .. } => {
                    self.apply_sync(peer, &response)
                }
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "member sync failed; gossip will converge instead");
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound member sync failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

fn transport_error_text(e: &libp2p::TransportError<std::io::Error>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(addr) => {
            format!("no transport supports {addr} (use /ip4/../tcp/.. or /ip4/../udp/../quic-v1)")
        }
        libp2p::TransportError::Other(io) => io.to_string(),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wall clock in milliseconds. The only clock read of the network layer;
/// the engines get time from here.
pub fn unix_now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}
