//! `agentmesh node start`: wire the data dir, identity, network and API
//! together, print the ready line, and stop cleanly on SIGTERM/SIGINT.
//!
//! Order matters: everything that can fail because of bad input (config,
//! data dir, identity, API port, listen addresses) fails before the node
//! announces itself, with one message and a non-zero exit.

use std::io::Write;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use consensus::{LogSync, RegionGroup};
use mesh_net::{identity, Network};
use mesh_store::{RocksStore, Store};
use mesh_types::{Load, NodeId, NodeRecord, AGENTMESH_VERSION};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::config::CheckedConfig;
use crate::data_dir::{DataDir, NodeFile};
use crate::region::{self, MeshTransport};

/// How long to wait for the listeners to report their addresses.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How much longer than a Raft write a forwarded request may take.
const FORWARD_MARGIN: Duration = Duration::from_secs(3);
/// How long the network gets to announce the leave and close after a signal.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// How often the node checks that its Raft core still runs. Polled, not
/// watched: openraft publishes its metrics on nearly every write, and a
/// watcher would be woken (and read them) each time.
const RAFT_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Returns (only) once the group's Raft core has stopped, with why.
async fn raft_stopped(group: &RegionGroup) -> String {
    let mut interval = tokio::time::interval(RAFT_CHECK_INTERVAL);
    loop {
        interval.tick().await;
        if let Some(reason) = group.stopped() {
            return reason;
        }
    }
}

/// Refuses a TCP or UDP listen address that another socket holds already.
/// libp2p binds with port reuse, so two nodes could share one port and
/// split the connections made to it; a plain bind here fails instead.
fn check_listen_addresses_free(listen: &[libp2p::Multiaddr]) -> Result<()> {
    use libp2p::multiaddr::Protocol;
    for addr in listen {
        let mut ip = None;
        let mut socket = None;
        for p in addr.iter() {
            match p {
                Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
                Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
                Protocol::Tcp(port) if port != 0 => socket = Some((port, true)),
                Protocol::Udp(port) if port != 0 => socket = Some((port, false)),
                _ => {}
            }
        }
        let (Some(ip), Some((port, tcp))) = (ip, socket) else {
            continue;
        };
        let at = std::net::SocketAddr::new(ip, port);
        let bound = if tcp {
            std::net::TcpListener::bind(at).map(drop)
        } else {
            std::net::UdpSocket::bind(at).map(drop)
        };
        if let Err(e) = bound {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(anyhow!(
                    "cannot listen on {addr}: the address is in use (another node or program holds it); pass another --listen or stop what uses it"
                ));
            }
        }
    }
    Ok(())
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(config: CheckedConfig) -> Result<()> {
    let data_dir = DataDir::open(&config.data_dir)?;
    let (keypair, created) = identity::load_or_create(data_dir.path())?;
    let peer_id = keypair.public().to_peer_id();
    if created {
        info!(%peer_id, dir = %data_dir.path().display(), "created a new node identity");
    }
    // Open the region store before anything else can fail: a corrupt store
    // is reported with its path and the node does not start half-way. It
    // belongs to one peer id and one region, checked (and recorded at the
    // first start) right after the identity is made, so that no failure in
    // between can leave an identity without its owner record.
    let raft_dir = data_dir.path().join("raft");
    let store: Arc<dyn Store> = Arc::new(RocksStore::open(&raft_dir)?);
    crate::data_dir::check_owner(
        &*store,
        data_dir.path(),
        &peer_id.to_base58(),
        config.region.as_str(),
        created,
    )?;
    let generation = data_dir.next_generation()?;

    let api_listener = TcpListener::bind(config.api).await.map_err(|e| {
        anyhow!(
            "cannot listen for the HTTP API on {}: {e}; pass another --api HOST:PORT or stop what uses that port",
            config.api
        )
    })?;
    let api_addr = api_listener.local_addr().context("API listener address")?;

    // Models load before the node announces itself, so its first record
    // already says which it holds. A refused model is logged; the node runs on.
    let models = match config.models_dir.clone() {
        Some(dir) => tokio::task::spawn_blocking(move || crate::models::Models::load(&dir))
            .await
            .context("loading the models")?,
        None => crate::models::Models::none(),
    };

    let started_at_ms = mesh_net::actor::unix_now_ms();
    let local = NodeRecord {
        node_id: NodeId(peer_id.to_base58()),
        region: config.region.clone(),
        addrs: Vec::new(),
        version: AGENTMESH_VERSION.to_owned(),
        started_at_ms,
        seq: u64::from(generation) << 32,
        sent_at_ms: started_at_ms,
        leaving: false,
        models: models.adverts(),
        datasets: Vec::new(),
        load: Load::default(),
        // For people only (`members`); nodes talk over libp2p.
        api: config.advertise_api.clone(),
        raft: None,
    };

    // A listen address another process holds would be shared silently
    // (libp2p reuses ports): refuse it here, as the API port is refused.
    check_listen_addresses_free(&config.network.listen)?;

    let shutdown = CancellationToken::new();
    let mesh_net::Started {
        network,
        ready,
        inbound_rpcs,
        inbound_forwards,
        task: network_task,
    } = Network::start(config.network.clone(), keypair, local, shutdown.clone())?;
    let task_store = store.clone();
    let group = RegionGroup::open(
        &config.raft,
        store,
        LogSync::Thread,
        &peer_id.to_base58(),
        MeshTransport::new(network.clone()),
    )
    .await?;
    tokio::spawn(region::serve_rpcs(
        group.clone(),
        network.clone(),
        config.region.clone(),
        inbound_rpcs,
    ));
    tokio::spawn(region::housekeeping(
        group.clone(),
        network.clone(),
        config.region.clone(),
        config.raft.clone(),
        Duration::from_millis(config.network.membership.dead_after_ms),
        shutdown.clone(),
    ));
    let ready = tokio::time::timeout(READY_TIMEOUT, ready)
        .await
        .map_err(|_| anyhow!("the listeners did not report an address within {READY_TIMEOUT:?}"))?
        .map_err(|_| anyhow!("the network stopped before it was ready"))?;

    let listen: Vec<String> = ready.listen.iter().map(ToString::to_string).collect();
    data_dir.write_node_file(&NodeFile {
        peer_id: peer_id.to_base58(),
        region: config.region.as_str(),
        api: api_addr.to_string(),
        listen: listen.clone(),
        pid: std::process::id(),
        version: AGENTMESH_VERSION,
        generation,
        started_at_ms,
    })?;

    let state = ApiState {
        network,
        peer_id: peer_id.to_base58(),
        region: config.region.clone(),
        group: group.clone(),
        // A forwarded write waits up to write_timeout on the leader; past
        // that plus a margin, the leader (or the link to it) is gone.
        forward_timeout: Duration::from_millis(config.raft.write_timeout_ms) + FORWARD_MARGIN,
        models,
        model_jobs: api::PerClient::default(),
        tasks: Arc::new(
            mesh_task::Host::open(
                task_store,
                mesh_task::Io::Blocking,
                Arc::new(mesh_net::actor::unix_now_ms),
            )
            .map_err(|e| anyhow::anyhow!("cannot open the task host: {e}"))?,
        ),
        buckets: Arc::default(),
        streams: Arc::default(),
        api_is_loopback: api_addr.ip().is_loopback(),
        checkpoint_replicas: config.checkpoint_replicas,
    };
    tokio::spawn(crate::checkpoints::keep_agents(
        state.clone(),
        shutdown.clone(),
    ));
    let network = state.network.clone();
    let router = api::router(state);
    tokio::spawn(crate::forward::serve(
        router.clone(),
        network,
        group.clone(),
        config.region.clone(),
        inbound_forwards,
    ));
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(api::serve(api_listener, router, api_shutdown));

    {
        // The one line scripts and tests wait for; stdout carries nothing else.
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready peer_id={peer_id} api={api_addr} listen={}",
            listen.join(",")
        )?;
        out.flush()?;
    }
    info!(%peer_id, region = %config.region, api = %api_addr, generation, "node ready");

    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut network_task = network_task;
    // A node whose Raft core or network task is gone must not run on, still
    // gossiping `alive` and counted as a voter: it exits non-zero.
    let failed = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM received: leaving the mesh"); None }
        _ = sigint.recv() => { info!("SIGINT received: leaving the mesh"); None }
        reason = raft_stopped(&group) => Some(format!("the region's Raft stopped: {reason}")),
        _ = &mut network_task => Some("the network task ended".to_owned()),
    };
    shutdown.cancel();
    if let Some(reason) = failed {
        tracing::error!(%reason, "exiting");
        let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, group.shutdown()).await;
        return Err(anyhow!(
            "{reason}; this node exits so that the region stops counting on it: fix the cause (see the log above; a disk error, for one) and start it again"
        ));
    }

    let stopped = async {
        group.shutdown().await;
        let _ = network_task.await;
        if let Err(e) = api_task.await {
            warn!(error = %e, "HTTP API task failed");
        }
    };
    if tokio::time::timeout(SHUTDOWN_DEADLINE, stopped)
        .await
        .is_err()
    {
        warn!("shutdown took longer than {SHUTDOWN_DEADLINE:?}; exiting anyway");
    }
    info!("stopped");
    Ok(())
}
