//! Node-to-node requests (`/agentmesh/forward/1`): an API request that a
//! node cannot serve itself (another region's, or a write its region's
//! leader must make) is carried to the node that can, over libp2p. The
//! answer is from the peer the Noise handshake proved, never from an
//! address a peer advertised (issue 12, finding 4).
//!
//! One stream per request. Each way: a 4-byte big-endian length, then a
//! version byte and the bincode of [`ForwardRequest`] or
//! [`ForwardResponse`]. A request is at most [`FORWARD_REQUEST_MAX`] bytes
//! and must arrive within [`FORWARD_READ_TIMEOUT`]; an answer is at most
//! [`FORWARD_RESPONSE_MAX`]. At most [`FORWARDS_READING_MAX`] streams are
//! read at once and [`FORWARDS_IN_FLIGHT_MAX`] requests served (a request
//! takes a serving slot only once read whole), [`FORWARDS_PER_PEER_MAX`]
//! streams per peer; a stream past a limit is answered `503 busy` at once.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures::StreamExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The protocol of node-to-node requests.
pub const FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/forward/1");
/// Largest request: the API's 64 KiB body limit, its path and a margin.
pub const FORWARD_REQUEST_MAX: usize = 128 * 1024;
/// Largest answer relayed (a region's status, a policy, a model's output).
pub const FORWARD_RESPONSE_MAX: usize = 4 * 1024 * 1024;
/// Inbound requests served at once, once read whole.
pub const FORWARDS_IN_FLIGHT_MAX: usize = 128;
/// Inbound streams of one peer open at once (reading or served): a
/// follower passing a burst of writes to its leader stays under it.
pub const FORWARDS_PER_PEER_MAX: usize = 32;
/// Inbound streams still being read, all peers: a request takes a serving
/// slot only once it has arrived whole, so silent streams hold none.
pub const FORWARDS_READING_MAX: usize = 256;
/// A request must arrive whole within this (a peer that opens a stream and
/// sends nothing holds a reading slot no longer).
pub const FORWARD_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Opening a stream to a peer (dialling it if need be) takes at most this:
/// a cut link drops packets silently, and the caller should hear soon.
pub const FORWARD_OPEN_TIMEOUT: Duration = Duration::from_secs(3);
/// How far ahead of a sender's clock a receiver's may be before a prompt
/// request looks late (its deadline is the sender's timeout, seconds away).
pub const FORWARD_CLOCK_SKEW_MS: u64 = 2_000;
/// Tries of a forwarded request whose stream the peer dropped unread.
pub const FORWARD_TRIES: u32 = 6;
/// A dropped stream is tried again only this soon after the first try.
pub const FORWARD_RETRY_WITHIN: Duration = Duration::from_secs(1);
/// Why a stream ended before its answer began.
const DROPPED: &str =
    "the stream ended before the answer began (the peer dropped it unread, or failed)";
/// Longest an inbound request is served before the stream is abandoned.
const SERVE_TIMEOUT_MAX: Duration = Duration::from_secs(310);

const VERSION: u8 = 2;

/// An API request carried to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// The HTTP method (`GET`, `PUT`, `POST`, `DELETE`).
    pub method: String,
    /// The path and query, e.g. `/v1/regions/eu-west/policy?consistent=true`.
    pub path: String,
    /// How many times the request was forwarded already, this one included.
    pub hops: u8,
    /// The JSON body, empty for none.
    pub body: Vec<u8>,
    /// When the sender stops waiting, in its Unix milliseconds (set by
    /// [`Forwarder::call`]; 0: no deadline). A request that arrives later
    /// (held in a dead connection across a partition, delivered after the
    /// heal) is not served: its sender was told the outcome is unknown and
    /// may have moved on.
    pub deadline_ms: u64,
}

/// The answer: an HTTP status and its JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardResponse {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl ForwardResponse {
    /// A JSON error answer in the API's `{"error", "detail"}` form.
    pub fn error(status: u16, error: &str, detail: &str) -> Self {
        let body = format!(
            "{{\"error\":{},\"detail\":{}}}",
            json_string(error),
            json_string(detail)
        );
        Self {
            status,
            body: body.into_bytes(),
        }
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Why a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No stream could be opened (the peer is gone or unreachable).
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The exchange failed or the answer was malformed or too large.
    #[error("forwarding to {peer} failed: {reason}")]
    Failed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout {
        /// The peer.
        peer: PeerId,
        /// The deadline.
        timeout: Duration,
    },
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FORWARD_RESPONSE_MAX>()
}

/// Encodes a request (version byte, then bincode).
pub fn encode_request(request: &ForwardRequest) -> Vec<u8> {
    encode(request)
}

/// Encodes an answer (version byte, then bincode).
pub fn encode_response(response: &ForwardResponse) -> Vec<u8> {
    encode(response)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Encoding a struct of strings, bytes and integers into a Vec cannot fail.
    if let Ok(bytes) = bincode::serde::encode_to_vec(value, bincode::config::standard()) {
        out.extend(bytes);
    }
    out
}

/// Decodes a request from a peer: version byte, then bincode with a limit;
/// trailing bytes are an error.
pub fn decode_request(bytes: &[u8]) -> Result<ForwardRequest, String> {
    decode(bytes, FORWARD_REQUEST_MAX)
}

/// Decodes an answer from a peer, like [`decode_request`].
pub fn decode_response(bytes: &[u8]) -> Result<ForwardResponse, String> {
    decode(bytes, FORWARD_RESPONSE_MAX)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, String> {
    if bytes.len() > max {
        return Err(format!("{} bytes exceed the {max}-byte limit", bytes.len()));
    }
    match bytes.split_first() {
        None => Err("empty message".into()),
        Some((&VERSION, rest)) => {
            let (value, used) = bincode::serde::decode_from_slice(rest, bincode_config())
                .map_err(|e| format!("malformed message: {e}"))?;
            if used != rest.len() {
                return Err(format!("{} trailing bytes", rest.len() - used));
            }
            Ok(value)
        }
        Some((v, _)) => Err(format!(
            "message version {v}, this node speaks {VERSION}: upgrade the older node"
        )),
    }
}

/// Reads one length-prefixed frame of at most `max` bytes. Memory grows
/// with the bytes that arrive, never with the length a peer claims.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    let read = reader.take(len as u64).read_to_end(&mut buf).await?;
    if read != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut after {read} of {len} bytes"),
        ));
    }
    Ok(buf)
}

async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// An inbound request, for the node to serve and answer through `reply`.
/// Dropping `reply` answers `503`.
#[derive(Debug)]
pub struct InboundForward {
    /// The sender, as the Noise handshake proved it.
    pub from: PeerId,
    /// The request.
    pub request: ForwardRequest,
    /// Where the answer goes.
    pub reply: oneshot::Sender<ForwardResponse>,
}

/// The calling side.
#[derive(Clone)]
pub(crate) struct Forwarder {
    control: libp2p_stream::Control,
    /// This node's requests in flight to each peer: at most what a peer
    /// serves from one sender ([`FORWARDS_PER_PEER_MAX`]); past it a
    /// request waits here for its turn instead of being refused there.
    to_peer: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    pub(crate) fn new(control: libp2p_stream::Control) -> Self {
        Self {
            control,
            to_peer: Arc::default(),
        }
    }

    /// The turn of one request to `peer`.
    fn turns(&self, peer: PeerId) -> Arc<Semaphore> {
        let mut map = self
            .to_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= 1024 && !map.contains_key(&peer) {
            map.retain(|_, s| s.available_permits() < FORWARDS_PER_PEER_MAX);
        }
        map.entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(FORWARDS_PER_PEER_MAX)))
            .clone()
    }

    /// Sends `request` to `peer` and waits for its answer, at most `timeout`.
    pub(crate) async fn call(
        &self,
        peer: PeerId,
        request: &ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardResponse, ForwardError> {
        let mut request = request.clone();
        request.deadline_ms =
            unix_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let bytes = encode_request(&request);
        if bytes.len() > FORWARD_REQUEST_MAX {
            return Err(ForwardError::Failed {
                peer,
                reason: format!(
                    "the request of {} bytes exceeds the {FORWARD_REQUEST_MAX}-byte limit",
                    bytes.len()
                ),
            });
        }
        let started = tokio::time::Instant::now();
        let turns = self.turns(peer);
        let _turn = tokio::time::timeout(timeout, turns.acquire_owned())
            .await
            .map_err(|_| ForwardError::Timeout { peer, timeout })?
            .map_err(|_| ForwardError::Failed {
                peer,
                reason: "the forwarder stopped".into(),
            })?;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = timeout.saturating_sub(started.elapsed());
            match self.exchange(peer, &bytes, left).await {
                // The stream ended before a byte of the answer came, at
                // once: libp2p-stream drops an inbound stream that its
                // acceptor has not taken yet (a burst of streams on one
                // connection; rust-libp2p#5651), so the peer never read
                // it. A peer that died instead has no connection left, and
                // the next try fails to open. Up to FORWARD_TRIES tries,
                // a few milliseconds apart.
                Err(ForwardError::Failed { reason, .. })
                    if reason == DROPPED
                        && attempt < FORWARD_TRIES
                        && started.elapsed() < FORWARD_RETRY_WITHIN =>
                {
                    let pause = 2u64.saturating_pow(attempt).min(50)
                        + u64::from(std::process::id() % 3)
                        + (started.elapsed().subsec_nanos() % 5) as u64;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                other => return other,
            }
        }
    }

    /// One try: a new stream, the request, the answer.
    async fn exchange(
        &self,
        peer: PeerId,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<ForwardResponse, ForwardError> {
        let mut control = self.control.clone();
        let mut stream = tokio::time::timeout(
            FORWARD_OPEN_TIMEOUT.min(timeout),
            control.open_stream(peer, FORWARD_PROTOCOL),
        )
        .await
        .map_err(|_| ForwardError::Unreachable {
            peer,
            reason: format!("no connection within {FORWARD_OPEN_TIMEOUT:?}"),
        })?
        .map_err(|e| ForwardError::Unreachable {
            peer,
            reason: e.to_string(),
        })?;
        let dropped = || ForwardError::Failed {
            peer,
            reason: DROPPED.to_owned(),
        };
        let exchange = async {
            // A request the peer did not take whole was not served: it reads
            // the whole frame before it acts.
            write_frame(&mut stream, bytes)
                .await
                .map_err(|_| dropped())?;
            // An end before the answer's first byte (not a reset or any
            // other error: the peer may have served a request and then
            // failed) is a stream the peer dropped unread.
            let mut first = [0u8; 1];
            let began = stream
                .read(&mut first)
                .await
                .map_err(|e| ForwardError::Failed {
                    peer,
                    reason: e.to_string(),
                })?;
            if began == 0 {
                return Err(dropped());
            }
            let answer = read_frame(&mut (&first[..]).chain(&mut stream), FORWARD_RESPONSE_MAX)
                .await
                .map_err(|e| ForwardError::Failed {
                    peer,
                    reason: e.to_string(),
                });
            let _ = stream.close().await;
            answer
        };
        let answer = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ForwardError::Timeout { peer, timeout })??;
        decode_response(&answer).map_err(|reason| ForwardError::Failed { peer, reason })
    }
}

/// Counts the requests in flight per peer; a slot is given back on drop.
#[derive(Debug, Default, Clone)]
struct PerPeer(Arc<Mutex<HashMap<PeerId, usize>>>);

struct PeerSlot {
    counts: PerPeer,
    peer: PeerId,
}

impl PerPeer {
    fn take(&self, peer: PeerId) -> Option<PeerSlot> {
        let mut counts = self.0.lock().ok()?;
        let count = counts.entry(peer).or_insert(0);
        if *count >= FORWARDS_PER_PEER_MAX {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.0.lock() {
            if let Some(count) = counts.get_mut(&self.peer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&self.peer);
                }
            }
        }
    }
}

/// Accepts peers' forwarded requests and hands them to `inbound` until
/// `shutdown`.
pub(crate) async fn serve_forwards(
    mut control: libp2p_stream::Control,
    inbound: mpsc::Sender<InboundForward>,
    shutdown: CancellationToken,
) {
    let mut incoming = match control.accept(FORWARD_PROTOCOL) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept forwarded requests");
            return;
        }
    };
    let in_flight = Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT_MAX));
    let reading = Arc::new(Semaphore::new(FORWARDS_READING_MAX));
    let per_peer = PerPeer::default();
    loop {
        let (peer, stream) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = incoming.next() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let read_permit = reading.clone().try_acquire_owned().ok();
        let slot = per_peer.take(peer);
        let inbound = inbound.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let busy = match (&read_permit, &slot) {
                (None, _) => Some(format!(
                    "{FORWARDS_READING_MAX} forwarded requests are arriving at this node"
                )),
                (_, None) => Some(format!(
                    "{FORWARDS_PER_PEER_MAX} requests from this peer are in flight"
                )),
                _ => None,
            };
            serve_stream(peer, stream, inbound, busy, read_permit, in_flight).await;
            drop(slot);
        });
    }
}

async fn serve_stream(
    peer: PeerId,
    mut stream: Stream,
    inbound: mpsc::Sender<InboundForward>,
    busy: Option<String>,
    read_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    in_flight: Arc<Semaphore>,
) {
    let answer = match busy {
        Some(why) => ForwardResponse::error(503, "busy", &format!("{why}; retry shortly")),
        None => serve_one(peer, &mut stream, inbound, read_permit, in_flight).await,
    };
    let mut bytes = encode_response(&answer);
    if bytes.len() > FORWARD_RESPONSE_MAX {
        bytes = encode_response(&ForwardResponse::error(
            502,
            "answer_too_large",
            &format!("the answer exceeds the {FORWARD_RESPONSE_MAX}-byte forwarding limit"),
        ));
    }
    let write = async {
        write_frame(&mut stream, &bytes).await?;
        stream.close().await
    };
    if let Err(e) = tokio::time::timeout(FORWARD_READ_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(io::Error::other("timed out")))
    {
        debug!(%peer, error = %e, "cannot send the answer to a forwarded request");
    }
}

async fn serve_one(
    peer: PeerId,
    stream: &mut Stream,
    inbound: mpsc::Sender<InboundForward>,
    read_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    in_flight: Arc<Semaphore>,
) -> ForwardResponse {
    let read = tokio::time::timeout(
        FORWARD_READ_TIMEOUT,
        read_frame(stream, FORWARD_REQUEST_MAX),
    )
    .await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "refused a forwarded request");
            return ForwardResponse::error(400, "bad_request", &e.to_string());
        }
        Err(_) => {
            return ForwardResponse::error(
                408,
                "timeout",
                &format!("the request did not arrive within {FORWARD_READ_TIMEOUT:?}"),
            )
        }
    };
    drop(read_permit);
    let request = match decode_request(&bytes) {
        Ok(request) => request,
        Err(e) => {
            debug!(%peer, error = %e, "refused a forwarded request");
            return ForwardResponse::error(400, "bad_request", &e);
        }
    };
    if request.deadline_ms != 0
        && unix_ms() > request.deadline_ms.saturating_add(FORWARD_CLOCK_SKEW_MS)
    {
        debug!(%peer, path = %request.path, "a forwarded request arrived after its deadline");
        return ForwardResponse::error(
            504,
            "too_late",
            "the request arrived after its sender stopped waiting; it was not served",
        );
    }
    let Ok(_serving) = in_flight.try_acquire_owned() else {
        return ForwardResponse::error(
            503,
            "busy",
            &format!("{FORWARDS_IN_FLIGHT_MAX} forwarded requests are in flight on this node; retry shortly"),
        );
    };
    let (reply, answer) = oneshot::channel();
    let forwarded = InboundForward {
        from: peer,
        request,
        reply,
    };
    if inbound.try_send(forwarded).is_err() {
        return ForwardResponse::error(
            503,
            "busy",
            "the node's queue of forwarded requests is full; retry shortly",
        );
    }
    match tokio::time::timeout(SERVE_TIMEOUT_MAX, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => ForwardResponse::error(
            503,
            "unavailable",
            "the node dropped the request unanswered (it may be shutting down)",
        ),
        Err(_) => ForwardResponse::error(
            504,
            "timeout",
            &format!("not answered within {SERVE_TIMEOUT_MAX:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;

    use super::*;

    #[test]
    fn requests_and_answers_round_trip_and_bad_bytes_are_errors() {
        let request = ForwardRequest {
            method: "PUT".into(),
            path: "/v1/regions/eu-west/policy".into(),
            hops: 1,
            body: b"{\"a\":1}".to_vec(),
            deadline_ms: 0,
        };
        assert_eq!(decode_request(&encode_request(&request)), Ok(request));
        let answer = ForwardResponse::error(503, "busy", "a \"quoted\"\nline");
        let text = String::from_utf8(answer.body.clone()).expect("utf8");
        assert_eq!(
            text,
            "{\"error\":\"busy\",\"detail\":\"a \\\"quoted\\\"\\u000aline\"}"
        );
        assert_eq!(decode_response(&encode_response(&answer)), Ok(answer));

        assert!(decode_request(&[]).is_err());
        assert!(decode_request(&[9, 0]).unwrap_err().contains("version 9"));
        // A path claiming 2^46 bytes: an error, not an allocation.
        let mut huge = vec![VERSION, 3];
        huge.push(253);
        huge.extend(&(1u64 << 46).to_le_bytes());
        assert!(decode_request(&huge).is_err());
        let mut trailing = encode_request(&ForwardRequest {
            method: "GET".into(),
            path: "/".into(),
            hops: 0,
            body: vec![],
            deadline_ms: 0,
        });
        trailing.push(0);
        assert!(decode_request(&trailing).unwrap_err().contains("trailing"));
    }

    #[test]
    fn a_frame_is_read_as_it_arrives_never_as_long_as_it_claims() {
        futures::executor::block_on(async {
            let mut claims_more = Cursor::new({
                let mut v = 1000u32.to_be_bytes().to_vec();
                v.extend([7u8; 10]);
                v
            });
            let e = read_frame(&mut claims_more, 4096).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            let mut too_long = Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let e = read_frame(&mut too_long, 4096).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let mut wire = Cursor::new(Vec::new());
            write_frame(&mut wire, b"hello").await.expect("write");
            let mut read = Cursor::new(wire.into_inner());
            assert_eq!(read_frame(&mut read, 5).await.expect("read"), b"hello");
        });
    }
}
