//! Who fsyncs the leader's log appends, off the Raft core task.
//!
//! ```text
//!   leader core ── append(entries) ──> LogStore: write (buffered, readable now)
//!        │                                  └──> SyncQueue ──> sync() ──> LogFlushed callback
//!        └── Replicate to followers at once          (one fsync for all queued appends)
//! ```
//!
//! openraft (patched, see vendor/README.md) lets a leader send its entries to
//! the followers while its own flush is in flight and counts the leader's copy
//! toward the quorum only once the callback reports it durable. The queue runs
//! the flushes in order, so callbacks complete in log order, and one sync
//! covers every append queued behind it.

use std::sync::Arc;
use std::time::Duration;

use mesh_store::Store;
use openraft::storage::LogFlushed;

use crate::types::TypeConfig;

/// Where the syncs of a log run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSync {
    /// A thread of its own (a node: an fsync blocks).
    Thread,
    /// A task on the current tokio runtime that waits `latency` before each
    /// sync (the simulator: deterministic under a paused clock, and the wait
    /// opens the window in which a leader has sent entries it has not synced).
    Task {
        /// Simulated fsync time.
        latency: Duration,
    },
}

/// The sending end of a log's sync queue. Dropping the last clone stops the
/// worker once it has finished what is queued, and waits for a worker thread
/// to end, so that the store is closed when the log is (a node can reopen
/// its rocksdb directory at once).
#[derive(Debug, Clone)]
pub struct SyncQueue {
    inner: Arc<Worker>,
}

#[derive(Debug)]
struct Worker {
    tx: Option<Sender>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            // At most the fsync in progress is left to wait for.
            let _ = thread.join();
        }
    }
}

#[derive(Debug, Clone)]
enum Sender {
    Thread(std::sync::mpsc::Sender<LogFlushed<TypeConfig>>),
    Task(tokio::sync::mpsc::UnboundedSender<LogFlushed<TypeConfig>>),
}

impl SyncQueue {
    /// Starts the worker for `store`.
    pub fn start(store: Arc<dyn Store>, how: LogSync) -> std::io::Result<Self> {
        let worker = match how {
            LogSync::Thread => {
                let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
                let thread = std::thread::Builder::new()
                    .name("raft-log-sync".into())
                    .spawn(move || {
                        while let Ok(first) = rx.recv() {
                            let mut batch = vec![first];
                            batch.extend(rx.try_iter());
                            complete(batch, store.sync());
                        }
                    })?;
                Worker {
                    tx: Some(Sender::Thread(tx)),
                    thread: Some(thread),
                }
            }
            LogSync::Task { latency } => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(first) = rx.recv().await {
                        tokio::time::sleep(latency).await;
                        let mut batch = vec![first];
                        while let Ok(more) = rx.try_recv() {
                            batch.push(more);
                        }
                        complete(batch, store.sync());
                    }
                });
                Worker {
                    tx: Some(Sender::Task(tx)),
                    thread: None,
                }
            }
        };
        Ok(Self {
            inner: Arc::new(worker),
        })
    }

    /// Reports `callback` once every write made before this call is durable.
    pub fn flush(&self, callback: LogFlushed<TypeConfig>) {
        let refused = match &self.inner.tx {
            Some(Sender::Thread(tx)) => tx.send(callback).err().map(|e| e.0),
            Some(Sender::Task(tx)) => tx.send(callback).err().map(|e| e.0),
            None => Some(callback),
        };
        // The worker only stops when every sender is gone, so this cannot
        // happen while `self` lives; report it as an IO error all the same.
        if let Some(callback) = refused {
            callback.log_io_completed(Err(std::io::Error::other("the log sync worker stopped")));
        }
    }
}

fn complete(batch: Vec<LogFlushed<TypeConfig>>, result: Result<(), mesh_store::StoreError>) {
    for callback in batch {
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
    }
}
