//! A hostile libp2p peer, in the test process (issue 12): a rust-libp2p
//! swarm with a key made on the spot that speaks just enough of agentmesh's
//! protocols to send what a stranger could send: gossip on the members
//! topic, member-sync requests and answers, Raft frames on
//! `/agentmesh/raft/2`, and many connections and streams.
//!
//! The messages are built with the project's own encoders where they are
//! public (`mesh_net::envelope::seal`, `mesh_net::sync::SyncMessage`,
//! `consensus::codec`, `consensus::rpc::RaftRequest`) and then corrupted.
//! Two things are private and are mirrored here by hand: the envelope's
//! struct and signing domain (`mesh_net::envelope::{Envelope,
//! SIGNING_DOMAIN}`), and the gossipsub settings
//! (`mesh_net::actor::gossipsub_config`, of which only the validation mode
//! and the message id matter to a publisher).
#![allow(dead_code)] // each step uses a different part

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, Stream, StreamProtocol, Swarm};
use mesh_types::{Load, NodeId, NodeRecord, Region};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

pub use mesh_net::actor::{MEMBERS_TOPIC, SYNC_PROTOCOL};
pub use mesh_net::RAFT_PROTOCOL;

/// How long one network exchange of the hostile peer may take before it
/// gives up (a guard against hanging the test, not a timing assertion).
pub const IO_DEADLINE: Duration = Duration::from_secs(20);

/// bincode 2's varint for a length of 2^46 bytes: 0xFD, then a u64
/// little-endian. A decoder without a limit allocates that much (64 TiB)
/// before it reads a byte of it.
pub fn huge_length_prefix() -> Vec<u8> {
    let mut huge = vec![0xFD];
    huge.extend_from_slice(&(1u64 << 46).to_le_bytes());
    huge
}

/// Replaces the length prefix of the marker string `QQQQ` in `bytes`
/// (bincode: `\x04QQQQ`) by a prefix claiming 2^46 bytes; the four marker
/// bytes stay, as the start of the claimed string.
pub fn inflate_marker(bytes: &mut Vec<u8>) {
    let at = bytes
        .windows(5)
        .position(|w| w == b"\x04QQQQ")
        .expect("the marker's length prefix");
    let mut huge = huge_length_prefix();
    huge.extend_from_slice(b"QQQQ");
    bytes.splice(at..at + 5, huge);
}

/// Commands waiting for the peer's swarm task; a caller past this waits.
const COMMAND_QUEUE: usize = 64;

/// For encoding what this peer sends (it decodes nothing from the nodes
/// with bincode; the nodes' decoders carry the limits under test).
fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Mirror of the private `mesh_net::envelope::Envelope` (same fields, same
/// order, so the same bincode).
#[derive(Serialize)]
struct EnvelopeWire {
    format: u8,
    record: Vec<u8>,
    public_key: Vec<u8>,
    signature: Vec<u8>,
}
/// Mirror of the private `mesh_net::envelope::SIGNING_DOMAIN`.
const SIGNING_DOMAIN: &[u8] = b"agentmesh/node-record/1:";

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A plausible record of the node whose key is `keypair`.
pub fn record_of(keypair: &Keypair, region: &str) -> NodeRecord {
    let now = unix_now_ms();
    NodeRecord {
        node_id: NodeId(keypair.public().to_peer_id().to_base58()),
        region: Region::parse(region).expect("valid region"),
        // Closed on loopback: a node that dials it is refused at once.
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        version: "0.1.0".into(),
        started_at_ms: now,
        seq: 1,
        sent_at_ms: now,
        leaving: false,
        models: vec![],
        datasets: vec![],
        load: Load::default(),
        api: None,
        raft: None,
    }
}

/// A validly sealed record (the project's own encoder).
pub fn sealed_record(keypair: &Keypair, region: &str) -> Vec<u8> {
    mesh_net::envelope::seal(keypair, &record_of(keypair, region)).expect("seal")
}

/// An envelope around raw record bytes, signed correctly by `keypair`.
pub fn envelope_of(keypair: &Keypair, record: Vec<u8>) -> Vec<u8> {
    let signature = keypair
        .sign(&[SIGNING_DOMAIN, &record].concat())
        .expect("sign");
    let envelope = EnvelopeWire {
        format: 1,
        record,
        public_key: keypair.public().encode_protobuf(),
        signature,
    };
    bincode::serde::encode_to_vec(&envelope, bincode_config()).expect("encode")
}

/// A record signed by a key made on the spot whose `version` string claims
/// 2^46 bytes; the signature over the record is valid.
pub fn signed_record_with_huge_string(keypair: &Keypair) -> Vec<u8> {
    let mut record = record_of(keypair, "eu-west");
    record.version = "QQQQ".into();
    let mut bytes = bincode::serde::encode_to_vec(&record, bincode_config()).expect("encode");
    inflate_marker(&mut bytes);
    envelope_of(keypair, bytes)
}

/// An envelope whose `public_key` claims 2^46 bytes (no valid signature needed).
pub fn envelope_with_huge_key() -> Vec<u8> {
    let envelope = EnvelopeWire {
        format: 1,
        record: vec![1, 2, 3],
        public_key: b"QQQQ".to_vec(),
        signature: vec![0; 64],
    };
    let mut bytes = bincode::serde::encode_to_vec(&envelope, bincode_config()).expect("encode");
    inflate_marker(&mut bytes);
    bytes
}

/// A member-sync message (the project's own encoder).
pub fn sync_message(envelopes: Vec<Vec<u8>>) -> Vec<u8> {
    mesh_net::sync::SyncMessage::new(
        envelopes
            .into_iter()
            .map(|envelope| mesh_net::sync::SyncEntry {
                envelope,
                age_ms: 0,
            })
            .collect(),
    )
    .encode()
}

/// A member-sync message whose one envelope claims 2^46 bytes.
pub fn sync_message_with_huge_envelope() -> Vec<u8> {
    let mut bytes = sync_message(vec![b"QQQQ".to_vec()]);
    inflate_marker(&mut bytes);
    bytes
}

/// The request-response frame of member sync: u32 BE length, payload.
pub fn sync_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// A Raft frame: id u64 BE, status u8, length u32 BE, payload.
pub fn raft_frame(id: u64, payload: &[u8]) -> Vec<u8> {
    raft_header(id, payload.len() as u32)
        .into_iter()
        .chain(payload.iter().copied())
        .collect()
}

/// The header of a Raft request frame claiming `len` bytes of payload.
pub fn raft_header(id: u64, len: u32) -> Vec<u8> {
    let mut header = id.to_be_bytes().to_vec();
    header.push(0);
    header.extend_from_slice(&len.to_be_bytes());
    header
}

/// Pseudo-random bytes (sha256 in counter mode): the tests need no RNG crate.
pub fn noise_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

async fn with_deadline<T>(
    what: &str,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(IO_DEADLINE, f)
        .await
        .map_err(|_| format!("{what}: nothing within {IO_DEADLINE:?}"))?
}

/// Reads a Raft frame: (id, status, payload). Refuses over 64 MiB.
pub async fn read_raft_frame(stream: &mut Stream) -> Result<(u64, u8, Vec<u8>), String> {
    let mut header = [0u8; 13];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("no Raft answer: {e}"))?;
    let id = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(header[9..].try_into().expect("4 bytes")) as usize;
    if len > 64 << 20 {
        return Err(format!("answer claims {len} bytes"));
    }
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| format!("Raft answer cut: {e}"))?;
    Ok((id, header[8], payload))
}

/// Writes one Raft request on `stream` and reads the answer frame.
pub async fn raft_call(
    stream: &mut Stream,
    id: u64,
    payload: &[u8],
) -> Result<(u8, Vec<u8>), String> {
    with_deadline("Raft call", async {
        stream
            .write_all(&raft_frame(id, payload))
            .await
            .map_err(|e| format!("write: {e}"))?;
        stream.flush().await.map_err(|e| format!("flush: {e}"))?;
        loop {
            let (got, status, answer) = read_raft_frame(stream).await?;
            if got == id {
                return Ok((status, answer));
            }
        }
    })
    .await
}

fn build_swarm<B: NetworkBehaviour>(
    keypair: Keypair,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Swarm<B> {
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(behaviour)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build()
}

#[derive(NetworkBehaviour)]
struct Hostile {
    gossipsub: gossipsub::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// What the hostile peer's swarm task has seen.
#[derive(Debug, Default)]
pub struct Seen {
    pub connected: HashSet<PeerId>,
    /// Peers whose subscription to the members topic arrived.
    pub subscribed: HashSet<PeerId>,
    /// Peers whose member-sync request got our (hostile) answer.
    pub sync_answered: HashSet<PeerId>,
}

enum Command {
    Dial(PeerId, Multiaddr),
    Publish(Vec<u8>, oneshot::Sender<Result<(), String>>),
}

/// One hostile identity: a swarm with gossipsub and raw streams, on a
/// runtime of its own. Dropping it closes every connection.
pub struct HostilePeer {
    pub keypair: Keypair,
    pub peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    pub seen: Arc<Mutex<Seen>>,
    // Last: dropped after the handles above.
    rt: Runtime,
}

impl HostilePeer {
    /// A peer with a fresh key. With `sync_answer`, every member-sync
    /// request a node sends it (nodes do when they connect) is answered
    /// with those raw bytes (frame header included).
    pub fn start(sync_answer: Option<Vec<u8>>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let keypair = Keypair::generate_ed25519();
        let peer_id = keypair.public().to_peer_id();
        let _guard = rt.enter();
        let swarm = build_swarm(keypair.clone(), |_| {
            // What a publisher must share with the nodes (see
            // mesh_net::actor::gossipsub_config): anonymous messages,
            // identified by the first 20 bytes of the sha256 of their data.
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(ValidationMode::Anonymous)
                .message_id_fn(|m| gossipsub::MessageId::from(&Sha256::digest(&m.data)[..20]))
                .build()
                .expect("gossipsub config");
            Hostile {
                gossipsub: gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, config)
                    .expect("gossipsub"),
                stream: libp2p_stream::Behaviour::new(),
            }
        });
        let mut control = swarm.behaviour().stream.new_control();
        let seen = Arc::new(Mutex::new(Seen::default()));
        if let Some(answer) = sync_answer {
            let incoming = control.accept(SYNC_PROTOCOL).expect("accept sync");
            rt.spawn(answer_syncs(incoming, answer, seen.clone()));
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        rt.spawn(drive(swarm, rx, seen.clone()));
        drop(_guard);
        Self {
            keypair,
            peer_id,
            control,
            commands: tx,
            seen,
            rt,
        }
    }

    /// Runs `f` on this peer's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Dials every node and waits until connected to all.
    pub fn connect(&self, nodes: &[(PeerId, Multiaddr)]) {
        for (peer, addr) in nodes {
            self.commands
                .blocking_send(Command::Dial(*peer, addr.clone()))
                .expect("swarm task runs");
        }
        self.wait("connected to every node", |s| {
            nodes.iter().all(|(p, _)| s.connected.contains(p))
        });
    }

    /// Waits until `check` holds of what the swarm has seen.
    pub fn wait(&self, what: &str, check: impl Fn(&Seen) -> bool) {
        let deadline = std::time::Instant::now() + IO_DEADLINE;
        loop {
            if check(&self.seen.lock().expect("seen")) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hostile peer: not {what} within {IO_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Publishes `data` on the members topic, once: gossipsub remembers a
    /// message id even when its queues were full and refuses the same
    /// bytes again, so a caller that publishes many paces itself (see
    /// `publish_paced`) instead of retrying.
    pub fn publish(&self, data: Vec<u8>) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .blocking_send(Command::Publish(data, tx))
            .expect("swarm task runs");
        rx.blocking_recv().expect("an answer")
    }

    /// Publishes every message, `batch` at a time, calling `settle` after
    /// each batch with the number sent so far (it waits until the nodes
    /// took them). Returns how many gossipsub refused (queues full).
    pub fn publish_paced(
        &self,
        messages: impl IntoIterator<Item = Vec<u8>>,
        batch: usize,
        mut settle: impl FnMut(u64),
    ) -> u64 {
        let (mut sent, mut refused, mut in_batch) = (0u64, 0u64, 0usize);
        for message in messages {
            match self.publish(message) {
                Ok(()) => sent += 1,
                Err(e) if e.contains("Duplicate") => panic!("published the same message twice"),
                Err(_) => refused += 1,
            }
            in_batch += 1;
            if in_batch == batch {
                settle(sent);
                in_batch = 0;
            }
        }
        if in_batch > 0 {
            settle(sent);
        }
        refused
    }

    /// Opens a stream of `protocol` to `peer` (connected already).
    pub async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, String> {
        let mut control = self.control.clone();
        with_deadline("open a stream", async move {
            control
                .open_stream(peer, protocol)
                .await
                .map_err(|e| format!("cannot open a stream: {e}"))
        })
        .await
    }

    /// Sends raw bytes (frame header included) as a member-sync request to
    /// `peer`; returns its answer's payload, or why there was none.
    pub fn sync_request(&self, peer: PeerId, raw: &[u8]) -> Result<Vec<u8>, String> {
        self.block_on(async {
            let mut stream = self.open(peer, SYNC_PROTOCOL).await?;
            with_deadline("member sync", async {
                stream
                    .write_all(raw)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                stream.close().await.map_err(|e| format!("close: {e}"))?;
                let mut len = [0u8; 4];
                stream
                    .read_exact(&mut len)
                    .await
                    .map_err(|e| format!("no answer: {e}"))?;
                let len = u32::from_be_bytes(len) as usize;
                let mut answer = vec![0u8; len.min(64 << 20)];
                stream
                    .read_exact(&mut answer)
                    .await
                    .map_err(|e| format!("answer cut: {e}"))?;
                Ok(answer)
            })
            .await
        })
    }
}

async fn drive(
    mut swarm: Swarm<Hostile>,
    mut commands: mpsc::Receiver<Command>,
    seen: Arc<Mutex<Seen>>,
) {
    let topic = IdentTopic::new(MEMBERS_TOPIC);
    let hash = topic.hash();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Dial(peer, addr)) => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![addr])
                        .condition(PeerCondition::Always)
                        .build();
                    if let Err(e) = swarm.dial(opts) {
                        eprintln!("hostile peer: dial {peer}: {e}");
                    }
                }
                Some(Command::Publish(data, answer)) => {
                    let result = swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(topic.clone(), data)
                        .map(|_| ())
                        .map_err(|e| format!("{e:?}"));
                    let _ = answer.send(result);
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    seen.lock().expect("seen").connected.insert(peer_id);
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    seen.lock().expect("seen").connected.remove(&peer_id);
                }
                SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
                    peer_id,
                    topic,
                })) if topic == hash => {
                    seen.lock().expect("seen").subscribed.insert(peer_id);
                }
                _ => {}
            },
        }
    }
}

/// Answers every member-sync request with `answer` (raw: frame header
/// included) after reading the request.
async fn answer_syncs(
    mut incoming: libp2p_stream::IncomingStreams,
    answer: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let answer = answer.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            if stream.read_exact(&mut len).await.is_err() {
                return;
            }
            let len = (u32::from_be_bytes(len) as usize).min(16 << 20);
            let mut request = vec![0u8; len];
            if stream.read_exact(&mut request).await.is_err() {
                return;
            }
            if stream.write_all(&answer).await.is_ok() && stream.close().await.is_ok() {
                seen.lock().expect("seen").sync_answered.insert(peer);
            }
        });
    }
}

/// Many identities, each with one connection to every node and many Raft
/// streams on it, each stream holding a frame that never completes (issue
/// 12, finding 6). Dropping it closes everything.
pub struct StreamFlood {
    /// Streams the nodes accepted (our side opened and wrote them).
    pub opened: Arc<AtomicUsize>,
    /// Streams that could not be opened or written.
    pub failed: Arc<AtomicUsize>,
    /// Connections established.
    pub connections: Arc<AtomicUsize>,
    /// Identities that have finished opening their streams.
    pub done: Arc<AtomicUsize>,
    pub identities: usize,
    rt: Runtime,
}

impl StreamFlood {
    /// `identities` swarms, each with a fresh key, one connection to each
    /// node, and `streams` Raft streams per connection; on each stream a
    /// frame header claiming `held + 1` bytes and then `held` bytes of it,
    /// so each stream pins `held` bytes on the node until it is closed.
    /// The total the nodes can be made to hold is bounded by
    /// identities × nodes × streams × held.
    pub fn start(
        nodes: &[(PeerId, Multiaddr)],
        identities: usize,
        streams: usize,
        held: usize,
    ) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let flood = Self {
            opened: Arc::default(),
            failed: Arc::default(),
            connections: Arc::default(),
            done: Arc::default(),
            identities,
            rt,
        };
        let payload: Arc<Vec<u8>> = Arc::new(noise_bytes(7, held));
        for _ in 0..identities {
            let nodes = nodes.to_vec();
            let (opened, failed, connections, done) = (
                flood.opened.clone(),
                flood.failed.clone(),
                flood.connections.clone(),
                flood.done.clone(),
            );
            let payload = payload.clone();
            flood.rt.spawn(async move {
                let mut swarm = build_swarm(Keypair::generate_ed25519(), |_| {
                    libp2p_stream::Behaviour::new()
                });
                let control = swarm.behaviour().new_control();
                for (peer, addr) in &nodes {
                    let opts = DialOpts::peer_id(*peer)
                        .addresses(vec![addr.clone()])
                        .condition(PeerCondition::Always)
                        .build();
                    let _ = swarm.dial(opts);
                }
                // Drive the swarm until every node is connected (or failed).
                let mut pending: HashSet<PeerId> = nodes.iter().map(|(p, _)| *p).collect();
                let mut up = Vec::new();
                let wait = async {
                    while !pending.is_empty() {
                        match swarm.select_next_some().await {
                            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                                pending.remove(&peer_id);
                                up.push(peer_id);
                                connections.fetch_add(1, Ordering::SeqCst);
                            }
                            SwarmEvent::OutgoingConnectionError {
                                peer_id: Some(p), ..
                            } => {
                                pending.remove(&p);
                            }
                            _ => {}
                        }
                    }
                };
                let _ = tokio::time::timeout(IO_DEADLINE, wait).await;
                tokio::spawn(async move {
                    loop {
                        swarm.select_next_some().await;
                    }
                });
                let mut held_streams = Vec::new();
                for peer in &up {
                    for _ in 0..streams {
                        let mut control = control.clone();
                        let attempt = with_deadline("open a flood stream", async {
                            let mut stream = control
                                .open_stream(*peer, RAFT_PROTOCOL)
                                .await
                                .map_err(|e| e.to_string())?;
                            stream
                                .write_all(&raft_header(1, payload.len() as u32 + 1))
                                .await
                                .map_err(|e| e.to_string())?;
                            stream
                                .write_all(&payload)
                                .await
                                .map_err(|e| e.to_string())?;
                            stream.flush().await.map_err(|e| e.to_string())?;
                            Ok(stream)
                        })
                        .await;
                        match attempt {
                            Ok(stream) => {
                                opened.fetch_add(1, Ordering::SeqCst);
                                held_streams.push(stream);
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }
                let unreachable = nodes.len() - up.len();
                failed.fetch_add(unreachable * streams, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                // Hold every stream until the runtime is dropped.
                let _held = held_streams;
                std::future::pending::<()>().await;
            });
        }
        flood
    }
}
