//! Raft RPCs over one long-lived libp2p stream per peer (`/agentmesh/raft/2`).
//!
//! A Raft RPC is on the write path of every policy write, twice (leader to
//! follower and back), so it must cost little more than the wire. A
//! request-response behaviour opens a substream per request and passes
//! each message through the swarm task on both sides; here the caller's
//! task writes into a stream that stays open, and a reader task hands the
//! answer straight back. Measured on loopback: see BENCHMARKS.md.
//!
//! ```text
//!   call(peer, req) ─> Link { writer task ─> Stream ─────> peer: serve_stream
//!                             reader task <─ Stream <───── (InboundRpc to the node,
//!        <─ oneshot ─────────┘  matched by request id)      RpcReply back) }
//! ```
//!
//! Frames, both ways: request id (u64 BE), status (u8: 0 ok, 1 error),
//! length (u32 BE), payload. Requests carry status 0. Many requests may be
//! in flight on one link; answers come back in any order. A link that
//! fails (connection lost, peer gone) fails its pending calls at once and
//! is replaced by a new stream on the next call.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf};
use futures::StreamExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The protocol of the Raft links.
pub const RAFT_PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/raft/2");
/// Largest payload in one frame, either way.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// A call with no answer after this fails; Raft retries on its own.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames waiting for a link's writer task.
const WRITE_QUEUE: usize = 256;
/// Requests of one peer handed to the node and not answered yet; past this
/// the peer's next request is refused at once, so a flooding peer cannot
/// fill the node's queue and starve the others (a leader's heartbeats).
pub const PER_PEER_IN_FLIGHT_MAX: usize = 32;

const OK: u8 = 0;
const ERROR: u8 = 1;

type Answer = Result<Vec<u8>, String>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;
/// A peer's link, if open; locked while one is being opened.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Link>>>>;

/// A Raft RPC from a peer, for the node to answer through `reply`.
#[derive(Debug)]
pub struct InboundRpc {
    /// The sender.
    pub from: PeerId,
    /// The encoded request.
    pub request: Vec<u8>,
    /// Where the encoded answer goes.
    pub reply: RpcReply,
}

/// The answer slot of one inbound RPC. Dropping it unanswered tells the
/// caller at once that the request was not served.
#[derive(Debug)]
pub struct RpcReply {
    id: u64,
    out: Option<mpsc::Sender<Frame>>,
    /// The peer's count of requests in flight, given back on drop.
    in_flight: Option<Arc<AtomicUsize>>,
}

impl RpcReply {
    /// Sends the encoded answer back to the caller.
    pub fn send(mut self, answer: Vec<u8>) {
        if let Some(out) = self.out.take() {
            // The link may be gone (peer disconnected): nobody to answer then.
            let _ = out.try_send(Frame {
                id: self.id,
                status: OK,
                payload: answer,
            });
        }
    }
}

impl Drop for RpcReply {
    fn drop(&mut self) {
        if let Some(count) = self.in_flight.take() {
            count.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(out) = self.out.take() {
            let _ = out.try_send(Frame {
                id: self.id,
                status: ERROR,
                payload: b"the peer dropped the request unanswered".to_vec(),
            });
        }
    }
}

#[derive(Debug)]
struct Frame {
    id: u64,
    status: u8,
    payload: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Frame> {
    let mut header = [0u8; 13];
    reader.read_exact(&mut header).await?;
    let id = u64::from_be_bytes(header[..8].try_into().map_err(io::Error::other)?);
    let status = header[8];
    let len = u32::from_be_bytes(header[9..].try_into().map_err(io::Error::other)?) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    // Grows with the bytes that arrive, never with the length claimed: a
    // peer cannot make us allocate 16 MiB per stream by sending a header.
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let read = (&mut *reader)
        .take(len as u64)
        .read_to_end(&mut payload)
        .await?;
    if read != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut after {read} of {len} bytes"),
        ));
    }
    Ok(Frame {
        id,
        status,
        payload,
    })
}

/// Writes frames as they come, flushing when none is waiting.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Frame>,
    writer: W,
) -> io::Result<()> {
    let mut writer = BufWriter::new(writer);
    while let Some(mut frame) = rx.recv().await {
        loop {
            if frame.payload.len() > MAX_FRAME {
                frame = Frame {
                    id: frame.id,
                    status: ERROR,
                    payload: format!("answer of {} bytes is too large", frame.payload.len())
                        .into_bytes(),
                };
            }
            let len = u32::try_from(frame.payload.len()).map_err(io::Error::other)?;
            let mut header = [0u8; 13];
            header[..8].copy_from_slice(&frame.id.to_be_bytes());
            header[8] = frame.status;
            header[9..].copy_from_slice(&len.to_be_bytes());
            writer.write_all(&header).await?;
            writer.write_all(&frame.payload).await?;
            match rx.try_recv() {
                Ok(next) => frame = next,
                Err(_) => break,
            }
        }
        writer.flush().await?;
    }
    writer.close().await
}

/// One open stream to a peer, with its pending calls.
struct Link {
    out: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

impl Link {
    fn start(peer: PeerId, stream: Stream) -> Arc<Self> {
        let (reader, writer) = stream.split();
        let (out, rx) = mpsc::channel(WRITE_QUEUE);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let (pending, closed) = (pending.clone(), closed.clone());
            async move {
                if let Err(e) = write_frames(rx, writer).await {
                    debug!(%peer, error = %e, "Raft link write failed");
                }
                fail_all(&pending, &closed, format!("the Raft link to {peer} closed"));
            }
        });
        tokio::spawn({
            let (pending, closed) = (pending.clone(), closed.clone());
            async move {
                let reason = read_answers(reader, &pending).await;
                debug!(%peer, %reason, "Raft link read ended");
                fail_all(
                    &pending,
                    &closed,
                    format!("the Raft link to {peer} failed: {reason}"),
                );
            }
        });
        Arc::new(Self {
            out,
            pending,
            next_id: AtomicU64::new(0),
            closed,
        })
    }
}

async fn read_answers(mut reader: ReadHalf<Stream>, pending: &Pending) -> String {
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(frame) => frame,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return "closed by the peer".into()
            }
            Err(e) => return e.to_string(),
        };
        let waiter = pending.lock().ok().and_then(|mut p| p.remove(&frame.id));
        let Some(waiter) = waiter else {
            continue; // the caller gave up (timed out) meanwhile
        };
        let answer = match frame.status {
            OK => Ok(frame.payload),
            _ => Err(String::from_utf8_lossy(&frame.payload).into_owned()),
        };
        let _ = waiter.send(answer);
    }
}

fn fail_all(pending: &Pending, closed: &AtomicBool, reason: String) {
    closed.store(true, Ordering::SeqCst);
    let waiters: Vec<_> = match pending.lock() {
        Ok(mut p) => p.drain().map(|(_, w)| w).collect(),
        Err(_) => return,
    };
    for w in waiters {
        let _ = w.send(Err(reason.clone()));
    }
}

/// The link in `slot`, opened if there is none or it closed.
async fn open_link(
    slot: Slot,
    mut control: libp2p_stream::Control,
    peer: PeerId,
) -> Result<Arc<Link>, String> {
    let mut slot = slot.lock().await;
    if let Some(link) = slot.as_ref().filter(|l| !l.closed.load(Ordering::SeqCst)) {
        return Ok(link.clone());
    }
    let stream = tokio::time::timeout(CALL_TIMEOUT, control.open_stream(peer, RAFT_PROTOCOL))
        .await
        .map_err(|_| format!("no Raft link to {peer} within {CALL_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot open a Raft link to {peer}: {e}"))?;
    let link = Link::start(peer, stream);
    *slot = Some(link.clone());
    Ok(link)
}

/// The calling side: a link per peer, opened on first use.
#[derive(Clone)]
pub(crate) struct RaftLinks {
    control: libp2p_stream::Control,
    /// Per peer a slot, locked while a stream to that peer is being opened
    /// (so a dead peer delays only the calls to itself).
    links: Arc<Mutex<HashMap<PeerId, Slot>>>,
}

impl std::fmt::Debug for RaftLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLinks").finish_non_exhaustive()
    }
}

impl RaftLinks {
    pub(crate) fn new(control: libp2p_stream::Control) -> Self {
        Self {
            control,
            links: Arc::default(),
        }
    }

    async fn link(&self, peer: PeerId) -> Result<Arc<Link>, String> {
        let slot = {
            let mut links = self.links.lock().map_err(|_| "Raft links poisoned")?;
            links.entry(peer).or_default().clone()
        };
        // The common case: the link is up.
        if let Ok(slot) = slot.try_lock() {
            if let Some(link) = slot.as_ref().filter(|l| !l.closed.load(Ordering::SeqCst)) {
                return Ok(link.clone());
            }
        }
        // Opening runs in a task of its own. openraft gives an AppendEntries
        // only a heartbeat interval (100 ms) and drops the call when that
        // passes; were the opening part of the call, a reconnect slower than
        // that (a new dial and handshake after a partition, on a loaded
        // machine) would be cut short every time and the link would never
        // come back. A task outlives the caller that started it, and the
        // callers after it wait on the same slot and find the link.
        let control = self.control.clone();
        tokio::spawn(open_link(slot, control, peer))
            .await
            .map_err(|e| format!("opening the Raft link to {peer} failed: {e}"))?
    }

    /// Sends one request to `peer` and waits for its answer, at most [`CALL_TIMEOUT`].
    pub(crate) async fn call(&self, peer: PeerId, request: Vec<u8>) -> Answer {
        if request.len() > MAX_FRAME {
            return Err(format!(
                "Raft request of {} bytes exceeds the {MAX_FRAME}-byte limit",
                request.len()
            ));
        }
        // A link that fails at once (the peer's acceptor was busy and
        // dropped the new stream, or an old connection died) is opened again,
        // once: Raft requests are safe to repeat.
        let started = tokio::time::Instant::now();
        let first = self.call_on_link(peer, request.clone(), CALL_TIMEOUT).await;
        match first {
            Err((e, true)) if started.elapsed() < CALL_TIMEOUT / 2 => {
                debug!(%peer, error = %e, "the Raft link failed at once; opening it again");
                let left = CALL_TIMEOUT.saturating_sub(started.elapsed());
                self.call_on_link(peer, request, left)
                    .await
                    .map_err(|(e, _)| e)
            }
            other => other.map_err(|(e, _)| e),
        }
    }

    /// One exchange on the peer's current link; on failure, whether the
    /// link itself closed.
    async fn call_on_link(
        &self,
        peer: PeerId,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, (String, bool)> {
        let link = self.link(peer).await.map_err(|e| (e, false))?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending
            .lock()
            .map_err(|_| ("Raft link poisoned".to_owned(), false))?
            .insert(id, tx);
        let frame = Frame {
            id,
            status: OK,
            payload: request,
        };
        let forget = || {
            if let Ok(mut p) = link.pending.lock() {
                p.remove(&id);
            }
        };
        // The timeout covers a full write queue too.
        let exchange = async {
            if link.out.send(frame).await.is_err() {
                return Err(format!("the Raft link to {peer} closed"));
            }
            match rx.await {
                Err(_) => Err(format!("the Raft link to {peer} closed")),
                Ok(answer) => answer,
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                forget();
                Err((
                    format!("Raft RPC to {peer}: no answer within {CALL_TIMEOUT:?}"),
                    false,
                ))
            }
            Ok(Err(e)) => {
                forget();
                Err((e, link.closed.load(Ordering::SeqCst)))
            }
            Ok(Ok(answer)) => Ok(answer),
        }
    }
}

/// Accepts peers' Raft links and hands their requests to `inbound` until
/// `shutdown`. A full `inbound` queue answers the request with an error.
/// One link per peer: a peer's new link replaces its old one (a peer
/// reconnecting after a failure opens a new one; a flooding peer gains
/// nothing by opening many).
pub(crate) async fn serve_links(
    mut control: libp2p_stream::Control,
    inbound: mpsc::Sender<InboundRpc>,
    shutdown: CancellationToken,
) {
    let mut incoming = match control.accept(RAFT_PROTOCOL) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept Raft links");
            return;
        }
    };
    let mut links: HashMap<PeerId, tokio::task::AbortHandle> = HashMap::new();
    loop {
        let (peer, stream) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = incoming.next() => match next {
                Some(next) => next,
                None => return,
            },
        };
        links.retain(|_, task| !task.is_finished());
        if let Some(old) = links.remove(&peer) {
            debug!(%peer, "a new inbound Raft link replaces the peer's old one");
            old.abort();
        }
        let task = tokio::spawn(serve_stream(peer, stream, inbound.clone()));
        links.insert(peer, task.abort_handle());
    }
}

async fn serve_stream(peer: PeerId, stream: Stream, inbound: mpsc::Sender<InboundRpc>) {
    let (mut reader, writer) = stream.split();
    let (out, rx) = mpsc::channel(WRITE_QUEUE);
    // Aborted with this task when a newer link replaces it.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let writer = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = write_frames(rx, writer).await {
            debug!(%peer, error = %e, "Raft link answer write failed");
        }
    }));
    let in_flight = Arc::new(AtomicUsize::new(0));
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(frame) => frame,
            Err(e) => {
                debug!(%peer, error = %e, "inbound Raft link ended");
                break;
            }
        };
        let count = in_flight.fetch_add(1, Ordering::SeqCst);
        let reply = RpcReply {
            id: frame.id,
            out: Some(out.clone()),
            in_flight: Some(in_flight.clone()),
        };
        if count >= PER_PEER_IN_FLIGHT_MAX {
            // Dropped: answers with an error and gives the slot back.
            debug!(%peer, "too many Raft requests of this peer in flight; refusing one");
            drop(reply);
            continue;
        }
        let rpc = InboundRpc {
            from: peer,
            request: frame.payload,
            reply,
        };
        if let Err(e) = inbound.try_send(rpc) {
            // Backpressure: the RpcReply inside is dropped and answers with an error.
            debug!(%peer, "inbound Raft RPC queue is full or closed; refusing a request");
            drop(e);
        }
    }
    drop(out);
    let mut writer = writer;
    let _ = (&mut writer.0).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64, status: u8, payload: &[u8]) -> Frame {
        Frame {
            id,
            status,
            payload: payload.to_vec(),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (tx, rx) = mpsc::channel(8);
        tx.send(frame(7, OK, b"request")).await.expect("send");
        tx.send(frame(u64::MAX, ERROR, "réponse".as_bytes()))
            .await
            .expect("send");
        tx.send(frame(0, OK, b"")).await.expect("send");
        drop(tx);
        let mut wire = futures::io::Cursor::new(Vec::new());
        write_frames(rx, &mut wire).await.expect("write");
        let mut reader = futures::io::Cursor::new(wire.into_inner());
        for (id, status, payload) in [
            (7, OK, b"request".to_vec()),
            (u64::MAX, ERROR, "réponse".as_bytes().to_vec()),
            (0, OK, Vec::new()),
        ] {
            let f = read_frame(&mut reader).await.expect("read");
            assert_eq!((f.id, f.status, f.payload), (id, status, payload));
        }
        let end = read_frame(&mut reader).await.map(|_| ()).expect_err("end");
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut header = [0u8; 13];
        header[9..].copy_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        let mut reader = futures::io::Cursor::new(header.to_vec());
        let e = read_frame(&mut reader)
            .await
            .map(|_| ())
            .expect_err("too big");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("exceeds"), "{e}");
    }
}
