//! The Raft log and vote on a [`Store`]: entries in `Column::RaftLog` keyed
//! by big-endian index, the vote, the committed id and the last purged id in
//! `Column::RaftMeta`. Every write that Raft's safety relies on (entries,
//! vote, truncation, purge) is synced before Raft relies on it; the committed
//! id is not. Entries this node appends as leader are written buffered and
//! synced by the log's [`SyncQueue`] while the core replicates them; entries
//! from another leader are synced before `append` returns, as a follower
//! answers the leader only once they are durable (see `log_sync`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use mesh_store::{Column, Durability, Store, WriteOp};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use crate::codec;
use crate::log_sync::{LogSync, SyncQueue};
use crate::types::{NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
/// Must be persisted: after a purge the log alone cannot say where it starts.
const LAST_PURGED: &[u8] = b"last_purged";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn index_key(index: u64) -> Vec<u8> {
    index.to_be_bytes().to_vec()
}

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

/// The log of one region group. Cheap to clone: clones share the store.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<dyn Store>,
    node_id: NodeId,
    sync: SyncQueue,
    /// Where writes that fsync run.
    io: LogSync,
}

impl LogStore {
    /// The log of node `node_id` on `store`, resuming whatever it already
    /// holds, with its syncs run as `sync` says.
    pub fn new(store: Arc<dyn Store>, node_id: NodeId, sync: LogSync) -> std::io::Result<Self> {
        Ok(Self {
            sync: SyncQueue::start(store.clone(), sync)?,
            store,
            node_id,
            io: sync,
        })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.store.get(Column::RaftMeta, key).map_err(read_err)? {
            Some(bytes) => codec::decode(&bytes).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        durability: Durability,
    ) -> StorageResult<()> {
        let op = WriteOp::Put {
            column: Column::RaftMeta,
            key: key.to_vec(),
            value: codec::encode(value).map_err(write_err)?,
        };
        self.store.write(vec![op], durability).map_err(write_err)
    }

    /// A synced write, off the async runtime (see [`LogSync::run`]).
    async fn write_synced(&self, ops: Vec<WriteOp>) -> Result<(), mesh_store::StoreError> {
        let store = self.store.clone();
        self.io
            .run(move || store.write(ops, Durability::Sync))
            .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        // Indexes may come from a peer (issue 12): checked, never wrapped.
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(next) => next,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            // Past u64::MAX: no upper bound (the key of u64::MAX is included).
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let to_key = to.map(index_key);
        // Decoded as they are read: the raw range is never held whole.
        let mut entries = Vec::new();
        let mut failed = None;
        self.store
            .scan(
                Column::RaftLog,
                &index_key(from),
                to_key.as_deref(),
                &mut |_, v| match codec::decode(v) {
                    Ok(entry) => {
                        entries.push(entry);
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                },
            )
            .map_err(read_err)?;
        match failed {
            Some(e) => Err(read_err(e)),
            None => Ok(entries),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(LAST_PURGED)?;
        let last_log_id = match self.store.last(Column::RaftLog).map_err(read_err)? {
            Some((_, bytes)) => Some(
                codec::decode::<Entry<TypeConfig>>(&bytes)
                    .map_err(read_err)?
                    .log_id,
            ),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let vote_err = |e: String| StorageIOError::write_vote(AnyError::error(e)).into();
        let op = WriteOp::Put {
            column: Column::RaftMeta,
            key: VOTE.to_vec(),
            value: codec::encode(vote).map_err(|e| vote_err(e.to_string()))?,
        };
        self.write_synced(vec![op])
            .await
            .map_err(|e| vote_err(e.to_string()))
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced: openraft awaits this before every apply, so an fsync
        // here would sit on the path of every write (0.2 ms on this disk).
        // Losing it in a crash is safe: the committed id is an optimisation
        // (openraft re-learns it from the leader), and rocksdb's single WAL
        // keeps it ordered after the synced entries it points at.
        self.put_meta(COMMITTED, &committed, Durability::Buffered)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut ops = Vec::new();
        let mut own = false;
        for entry in entries {
            own = entry.log_id.leader_id.node_id == self.node_id;
            ops.push(WriteOp::Put {
                column: Column::RaftLog,
                key: index_key(entry.log_id.index),
                value: codec::encode(&entry).map_err(write_err)?,
            });
        }
        // The callback fires only once the entries are durable: Raft may then
        // count them toward a quorum.
        if own {
            // Our own entries, as leader: readable now, so they can be
            // replicated, and synced in the background.
            self.store
                .write(ops, Durability::Buffered)
                .map_err(write_err)?;
            self.sync
                .flush(Box::new(move |result| callback.log_io_completed(result)));
            return Ok(());
        }
        let result = self.write_synced(ops).await;
        let io_result = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io_result);
        result.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let op = WriteOp::DeleteRange {
            column: Column::RaftLog,
            from: index_key(log_id.index),
            to: index_key(u64::MAX),
        };
        // DeleteRange excludes its end: remove a (theoretical) entry at u64::MAX too.
        let last = WriteOp::Delete {
            column: Column::RaftLog,
            key: index_key(u64::MAX),
        };
        self.write_synced(vec![op, last]).await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point and drop the entries in one atomic batch.
        let ops = vec![
            WriteOp::Put {
                column: Column::RaftMeta,
                key: LAST_PURGED.to_vec(),
                value: codec::encode(&log_id).map_err(write_err)?,
            },
            WriteOp::DeleteRange {
                column: Column::RaftLog,
                from: index_key(0),
                to: index_key(log_id.index.saturating_add(1)),
            },
        ];
        self.write_synced(ops).await.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use mesh_store::MemStore;

    use super::*;

    /// Regression (issue 12, finding 12): ranges at the ends of u64, as a
    /// peer's AppendEntries or a crafted request may name them, neither
    /// wrap nor panic.
    #[tokio::test]
    async fn ranges_at_the_end_of_u64_neither_wrap_nor_panic() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let mut log = LogStore::new(store, 1, LogSync::Thread).expect("log");
        let after_max = (Bound::Excluded(u64::MAX), Bound::Unbounded);
        assert!(log
            .try_get_log_entries(after_max)
            .await
            .expect("read")
            .is_empty());
        assert!(log
            .try_get_log_entries(0..=u64::MAX)
            .await
            .expect("read")
            .is_empty());
        assert!(log
            .try_get_log_entries(u64::MAX..)
            .await
            .expect("read")
            .is_empty());
    }

    /// A disk whose synced writes block until someone on the async runtime
    /// answers: they succeed only if the runtime keeps running while the
    /// write waits on the disk.
    #[derive(Debug)]
    struct SlowDisk {
        inner: MemStore,
        started: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
        answered: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Store for SlowDisk {
        fn get(&self, c: Column, k: &[u8]) -> Result<Option<Vec<u8>>, mesh_store::StoreError> {
            self.inner.get(c, k)
        }
        fn range(
            &self,
            c: Column,
            f: &[u8],
            t: Option<&[u8]>,
        ) -> Result<Vec<mesh_store::Pair>, mesh_store::StoreError> {
            self.inner.range(c, f, t)
        }
        fn last(&self, c: Column) -> Result<Option<mesh_store::Pair>, mesh_store::StoreError> {
            self.inner.last(c)
        }
        fn write(&self, ops: Vec<WriteOp>, d: Durability) -> Result<(), mesh_store::StoreError> {
            if d == Durability::Sync {
                if let Some(started) = self.started.lock().expect("lock").take() {
                    let _ = started.send(());
                }
                let answered = self.answered.lock().expect("lock");
                answered
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .map_err(|_| mesh_store::StoreError::Io {
                        path: "slow disk".into(),
                        reason: "the runtime did not run while the fsync blocked".into(),
                    })?;
            }
            self.inner.write(ops, d)
        }
        fn sync(&self) -> Result<(), mesh_store::StoreError> {
            Ok(())
        }
    }

    /// Regression (issue 12, finding 10): a vote save that blocks on the
    /// disk does not block the runtime (on one thread, as the simulator's,
    /// inline IO would deadlock here until the disk gives up).
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_fsync_does_not_stop_the_runtime() {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (answer_tx, answer_rx) = std::sync::mpsc::channel();
        let store: Arc<dyn Store> = Arc::new(SlowDisk {
            inner: MemStore::new(),
            started: std::sync::Mutex::new(Some(started_tx)),
            answered: std::sync::Mutex::new(answer_rx),
        });
        let mut log = LogStore::new(store, 1, LogSync::Thread).expect("log");
        // Another task of the runtime (in a node: the network, the Raft core).
        let other_task = tokio::spawn(async move {
            started_rx.await.expect("the write started");
            answer_tx.send(()).expect("answer");
        });
        let vote = Vote::new(3, 1);
        log.save_vote(&vote)
            .await
            .expect("saved while the runtime ran");
        other_task.await.expect("task");
        assert_eq!(log.read_vote().await.expect("read"), Some(vote));
    }
}
