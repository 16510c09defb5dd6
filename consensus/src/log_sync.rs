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
//!
//! The first failed sync stops the queue for good: every flush after it
//! fails too. After a failed fsync Linux marks the dirty pages clean, so a
//! later fsync that succeeds does not write what the failed one should have:
//! reporting it as success would let the leader count entries that are not
//! on its disk. Latching also makes the order in which openraft receives the
//! reports harmless (each is awaited in a task of its own): a success can
//! only be reported while no earlier sync has failed.

use std::sync::Arc;
use std::time::Duration;

use mesh_store::Store;

/// What to call once a flush is done (or failed): in a node, openraft's
/// `LogFlushed` callback.
pub type Done = Box<dyn FnOnce(std::io::Result<()>) + Send>;

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

impl LogSync {
    /// Runs a store call that may block on the disk (an fsync): for
    /// `Thread` (a node) on tokio's blocking pool, so the Raft core and the
    /// network tasks go on while it waits (issue 12, finding 10); for
    /// `Task` (the simulator) inline, which keeps it deterministic. The
    /// caller awaits it, so calls stay in order.
    pub async fn run(
        self,
        call: impl FnOnce() -> Result<(), mesh_store::StoreError> + Send + 'static,
    ) -> Result<(), mesh_store::StoreError> {
        match self {
            LogSync::Thread => match tokio::task::spawn_blocking(call).await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(mesh_store::StoreError::Io {
                    path: "(blocking pool)".into(),
                    reason: format!("the store call was cancelled: {e}"),
                }),
            },
            LogSync::Task { .. } => call(),
        }
    }
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
    Thread(std::sync::mpsc::Sender<Done>),
    Task(tokio::sync::mpsc::UnboundedSender<Done>),
}

impl SyncQueue {
    /// Starts the worker for `store`.
    pub fn start(store: Arc<dyn Store>, how: LogSync) -> std::io::Result<Self> {
        let worker = match how {
            LogSync::Thread => {
                let (tx, rx) = std::sync::mpsc::channel::<Done>();
                let thread = std::thread::Builder::new()
                    .name("raft-log-sync".into())
                    .spawn(move || {
                        let mut failed = None;
                        while let Ok(first) = rx.recv() {
                            let mut batch = vec![first];
                            batch.extend(rx.try_iter());
                            complete(batch, sync_once(&*store, &mut failed));
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
                    let mut failed = None;
                    while let Some(first) = rx.recv().await {
                        tokio::time::sleep(latency).await;
                        let mut batch = vec![first];
                        while let Ok(more) = rx.try_recv() {
                            batch.push(more);
                        }
                        complete(batch, sync_once(&*store, &mut failed));
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

    /// Calls `callback` once every write made before this call is durable.
    pub fn flush(&self, callback: Done) {
        let refused = match &self.inner.tx {
            Some(Sender::Thread(tx)) => tx.send(callback).err().map(|e| e.0),
            Some(Sender::Task(tx)) => tx.send(callback).err().map(|e| e.0),
            None => Some(callback),
        };
        // The worker only stops when every sender is gone, so this cannot
        // happen while `self` lives; report it as an IO error all the same.
        if let Some(callback) = refused {
            callback(Err(std::io::Error::other("the log sync worker stopped")));
        }
    }
}

/// One sync, unless an earlier one failed: then that failure, for good.
fn sync_once(store: &dyn Store, failed: &mut Option<String>) -> Result<(), String> {
    if let Some(first) = failed {
        return Err(format!(
            "an earlier fsync of the Raft log failed ({first}); nothing written since is durable: restart the node"
        ));
    }
    store.sync().map_err(|e| {
        let reason = e.to_string();
        tracing::error!(error = %reason, "fsync of the Raft log failed; this node's Raft stops");
        *failed = Some(reason.clone());
        reason
    })
}

fn complete(batch: Vec<Done>, result: Result<(), String>) {
    for callback in batch {
        callback(result.clone().map_err(std::io::Error::other));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use mesh_store::{Column, Durability, MemStore, Store, StoreError, WriteOp};

    use super::*;

    /// A store whose fsyncs fail while `failing` is set, and which then
    /// drops what was written since the last good sync, as Linux drops the
    /// dirty pages of a failed fsync.
    #[derive(Debug, Default)]
    struct FlakyDisk {
        visible: MemStore,
        failing: AtomicBool,
        durable: std::sync::Mutex<Vec<u64>>,
        unsynced: std::sync::Mutex<Vec<u64>>,
    }

    impl Store for FlakyDisk {
        fn get(&self, c: Column, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.visible.get(c, k)
        }
        fn range(
            &self,
            c: Column,
            f: &[u8],
            t: Option<&[u8]>,
        ) -> Result<Vec<mesh_store::Pair>, StoreError> {
            self.visible.range(c, f, t)
        }
        fn last(&self, c: Column) -> Result<Option<mesh_store::Pair>, StoreError> {
            self.visible.last(c)
        }
        fn write(&self, ops: Vec<WriteOp>, d: Durability) -> Result<(), StoreError> {
            for op in &ops {
                if let WriteOp::Put { key, .. } = op {
                    let mut index = [0u8; 8];
                    index.copy_from_slice(&key[..8]);
                    self.unsynced
                        .lock()
                        .expect("lock")
                        .push(u64::from_be_bytes(index));
                }
            }
            self.visible.write(ops, d)
        }
        fn sync(&self) -> Result<(), StoreError> {
            let pending: Vec<u64> = self.unsynced.lock().expect("lock").drain(..).collect();
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Io {
                    path: "flaky".into(),
                    reason: "fsync failed".into(),
                });
            }
            self.durable.lock().expect("lock").extend(pending);
            Ok(())
        }
    }

    fn put(store: &FlakyDisk, index: u64) {
        let op = WriteOp::Put {
            column: Column::RaftLog,
            key: index.to_be_bytes().to_vec(),
            value: vec![1],
        };
        store.write(vec![op], Durability::Buffered).expect("write");
    }

    async fn flush(queue: &SyncQueue) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        queue.flush(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.expect("the queue answers")
    }

    /// Regression (issue 11, bug 4): after a failed fsync, a later fsync
    /// that succeeds does not make the earlier writes durable (their dirty
    /// pages are gone), so the queue must never again report success: the
    /// leader would count entries that are not on its disk.
    #[tokio::test]
    async fn a_failed_sync_is_latched_and_no_later_flush_reports_success() {
        let disk = Arc::new(FlakyDisk::default());
        let queue = SyncQueue::start(disk.clone(), LogSync::Thread).expect("start");
        put(&disk, 1);
        flush(&queue).await.expect("a good sync");
        put(&disk, 2);
        disk.failing.store(true, Ordering::SeqCst);
        assert!(flush(&queue).await.is_err(), "the failed sync is reported");
        disk.failing.store(false, Ordering::SeqCst);
        put(&disk, 3);
        let later = flush(&queue).await;
        assert!(
            !disk.durable.lock().expect("lock").contains(&2),
            "entry 2's dirty pages were dropped"
        );
        assert!(
            later.is_err(),
            "a flush after a failed one must fail too: entry 2 is not durable"
        );
        // And for good, on the task worker too.
        let queue = SyncQueue::start(
            disk.clone(),
            LogSync::Task {
                latency: Duration::ZERO,
            },
        )
        .expect("start");
        disk.failing.store(true, Ordering::SeqCst);
        put(&disk, 4);
        assert!(flush(&queue).await.is_err());
        disk.failing.store(false, Ordering::SeqCst);
        assert!(flush(&queue).await.is_err());
    }
}
