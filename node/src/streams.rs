//! Streamed tasks (`task submit --stream`): the host keeps the pieces a
//! task generates in a buffer per task id while it runs; the entry node
//! reads them with long polls (`GET /v1/regions/R/tasks/ID/tokens`, over
//! libp2p like every node-to-node call) and sends them to its client as
//! server-sent events, then the task's answer.
//!
//! ```text
//!   client ─ POST /v1/tasks {stream: true} ─> entry ── the task, as always ──> host
//!          <─ SSE: token… result ─────────── entry ── long polls (from N) ──> host's buffer
//! ```
//!
//! Buffers are bounded: at most [`STREAMS_MAX`] at once (the oldest
//! finished one goes first), [`STREAM_BYTES_MAX`] of text each (past it the
//! stream says it was cut, and the answer still carries the whole text),
//! kept [`STREAM_KEPT`] after the task ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Buffers kept at once.
pub const STREAMS_MAX: usize = 1024;
/// Text kept per buffer.
pub const STREAM_BYTES_MAX: usize = 256 * 1024;
/// How long a finished buffer is kept for late readers.
pub const STREAM_KEPT: Duration = Duration::from_secs(60);
/// How long a poll waits for new pieces.
pub const POLL_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Buffer {
    pieces: Vec<String>,
    bytes: usize,
    cut: bool,
    done_at: Option<Instant>,
}

/// One task's stream.
#[derive(Debug, Default)]
pub struct Stream {
    /// The task's entry node: the only reader (its result region was
    /// checked for it).
    pub entry: String,
    buffer: Mutex<Buffer>,
    changed: tokio::sync::Notify,
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a generated piece.
    pub fn push(&self, piece: &str) {
        {
            let mut b = self.lock();
            if b.bytes.saturating_add(piece.len()) > STREAM_BYTES_MAX {
                b.cut = true;
            } else {
                b.bytes += piece.len();
                b.pieces.push(piece.to_owned());
            }
        }
        self.changed.notify_waiters();
    }

    /// The task ended (answered or failed).
    pub fn finish(&self) {
        self.lock().done_at = Some(Instant::now());
        self.changed.notify_waiters();
    }

    /// The pieces from `from` on, waiting up to `wait` for one when there
    /// is none yet and the task still runs.
    pub async fn read(&self, from: usize, wait: Duration) -> Tokens {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            {
                let b = self.lock();
                if b.pieces.len() > from || b.done_at.is_some() {
                    return Tokens {
                        known: true,
                        pieces: b
                            .pieces
                            .get(from..)
                            .map(<[String]>::to_vec)
                            .unwrap_or_default(),
                        next: b.pieces.len().max(from),
                        done: b.done_at.is_some(),
                        cut: b.cut,
                    };
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Tokens {
                    known: true,
                    pieces: Vec::new(),
                    next: from,
                    done: false,
                    cut: false,
                };
            }
        }
    }
}

/// An answer to a poll.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tokens {
    /// False when this host has no stream of the task (not started here,
    /// or long gone).
    pub known: bool,
    /// The pieces from the one asked for.
    pub pieces: Vec<String>,
    /// The index to ask from next.
    pub next: usize,
    /// The task ended: no more pieces will come.
    pub done: bool,
    /// The text passed the buffer's limit; the answer has all of it.
    pub cut: bool,
}

/// The streams of the tasks this node runs.
#[derive(Debug, Default)]
pub struct Streams(Mutex<HashMap<String, Arc<Stream>>>);

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Stream>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream of `task_id` entered at `entry`, made when there is none.
    pub fn open(&self, task_id: &str, entry: &str) -> Arc<Stream> {
        let mut streams = self.lock();
        streams.retain(|_, s| s.lock().done_at.is_none_or(|at| at.elapsed() < STREAM_KEPT));
        if streams.len() >= STREAMS_MAX && !streams.contains_key(task_id) {
            // The oldest finished one, else any finished one, else the
            // first: a full table never refuses a new task.
            let victim = streams
                .iter()
                .filter_map(|(id, s)| s.lock().done_at.map(|at| (at, id.clone())))
                .min()
                .map(|(_, id)| id)
                .or_else(|| streams.keys().next().cloned());
            if let Some(id) = victim {
                streams.remove(&id);
            }
        }
        streams
            .entry(task_id.to_owned())
            .or_insert_with(|| {
                Arc::new(Stream {
                    entry: entry.to_owned(),
                    ..Stream::default()
                })
            })
            .clone()
    }

    /// The stream of `task_id`, if this node has one.
    pub fn get(&self, task_id: &str) -> Option<Arc<Stream>> {
        self.lock().get(task_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_gets_pieces_as_they_come_then_the_end() {
        let streams = Streams::default();
        let s = streams.open("t1", "e");
        let reader = {
            let s = s.clone();
            tokio::spawn(async move { s.read(0, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        s.push("Hel");
        let first = reader.await.expect("read");
        assert_eq!(
            (first.pieces.clone(), first.next, first.done),
            (vec!["Hel".to_owned()], 1, false)
        );
        s.push("lo");
        s.finish();
        let rest = s.read(1, Duration::from_secs(5)).await;
        assert_eq!(
            (rest.pieces, rest.next, rest.done),
            (vec!["lo".to_owned()], 2, true)
        );
        let idle = streams
            .open("t2", "e")
            .read(0, Duration::from_millis(10))
            .await;
        assert!(idle.pieces.is_empty() && !idle.done);
    }

    #[test]
    fn buffers_are_bounded() {
        let streams = Streams::default();
        for i in 0..STREAMS_MAX + 10 {
            streams.open(&format!("t{i}"), "e");
        }
        assert_eq!(streams.lock().len(), STREAMS_MAX);
        let s = streams.open("big", "e");
        let piece = "x".repeat(64 * 1024);
        for _ in 0..5 {
            s.push(&piece);
        }
        let b = s.lock();
        assert!(b.cut && b.bytes <= STREAM_BYTES_MAX);
    }
}
