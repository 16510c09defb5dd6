//! The simulated disk: what a node wrote, what of it is synced, and what a
//! crash keeps.
//!
//! ```text
//!   SimStore (one per process life) ── reads: everything written
//!     write(Buffered) ──> visible + pending          (in the page cache)
//!     write(Sync)     ──> visible + durable (pending first, in order)
//!     sync()          ──> pending made durable, in order
//!   SimDisk (survives crashes) ── durable, pending, fault switches
//!     process crash: pending kept (the OS still has it); the dead process's
//!                    SimStore refuses every later write and sync
//!     power loss:    pending lost
//!     failing fsync: Sync writes and syncs return an error; what was pending
//!                    is dropped (Linux marks the dirty pages clean after a
//!                    failed fsync: a later fsync that succeeds does not write
//!                    them), though this process still reads it
//!     crash at a write: armed before a start, the Nth write of the new
//!                    process fails and kills it there, mid-batch
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh_store::{Column, Durability, MemStore, Store, StoreError, WriteOp};

/// The part of a node's storage that outlives its process.
#[derive(Debug, Default)]
pub struct SimDisk {
    durable: MemStore,
    pending: Mutex<Vec<Vec<WriteOp>>>,
    failing: AtomicBool,
    /// Counts crashes: a store opened before the last crash is a dead process's.
    epoch: AtomicU64,
    /// Raft log entries a failed fsync dropped, not yet reported by a crash.
    dropped_entries: AtomicU64,
    /// Armed `crash_at_write`: writes left before the one that kills, and
    /// whether that death is a power loss.
    crash_at: Mutex<Option<(u64, bool)>>,
    /// Raft log entries lost by the last death at a write, not yet
    /// reported, and what that write was.
    lost_at_write: AtomicU64,
    killing_write: Mutex<String>,
}

/// A write's operations, in short: `put raft_meta "vote"`, `delete-range raft_log ..`.
fn describe(ops: &[WriteOp]) -> String {
    let key = |k: &[u8]| match std::str::from_utf8(k) {
        Ok(text) if text.chars().all(|c| c.is_ascii_graphic()) => format!("{text:?}"),
        _ => k.iter().map(|b| format!("{b:02x}")).collect(),
    };
    ops.iter()
        .map(|op| match op {
            WriteOp::Put { column, key: k, .. } => format!("put {} {}", column.name(), key(k)),
            WriteOp::Delete { column, key: k } => format!("delete {} {}", column.name(), key(k)),
            WriteOp::DeleteRange { column, .. } => format!("delete-range {}", column.name()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many of `batches`' writes put Raft log entries.
fn log_entries(batches: &[Vec<WriteOp>]) -> u64 {
    batches
        .iter()
        .flatten()
        .filter(|op| {
            matches!(
                op,
                WriteOp::Put {
                    column: Column::RaftLog,
                    ..
                }
            )
        })
        .count() as u64
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Makes every later fsync fail (or work again).
    pub fn fail_syncs(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// What survives a power loss now: the synced writes only.
    pub fn durable(&self) -> &MemStore {
        &self.durable
    }

    /// True while fsyncs fail.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    /// The process died: with `power_loss`, unsynced writes are gone; without,
    /// the OS writes them out. Returns the Raft log entries lost (a failed
    /// fsync's dropped ones included).
    pub fn crash(&self, power_loss: bool) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let dropped = self.dropped_entries.swap(0, Ordering::SeqCst);
        let pending: Vec<Vec<WriteOp>> = match self.pending.lock() {
            Ok(mut p) => p.drain(..).collect(),
            Err(_) => return dropped,
        };
        if power_loss {
            return dropped + log_entries(&pending);
        }
        for ops in pending {
            let _ = self.durable.write(ops, Durability::Sync);
        }
        dropped
    }

    /// Raft log entries written and not yet synced.
    pub fn unsynced_log_entries(&self) -> u64 {
        self.pending.lock().map(|p| log_entries(&p)).unwrap_or(0)
    }

    /// The next process to open this disk dies at its `after_writes`-th
    /// write (1: the first), with a power loss or not.
    pub fn crash_at_write(&self, after_writes: u64, power_loss: bool) {
        if let Ok(mut c) = self.crash_at.lock() {
            *c = Some((after_writes.max(1), power_loss));
        }
    }

    /// Forgets an armed `crash_at_write` that has not fired; true if there was one.
    pub fn disarm(&self) -> bool {
        match self.crash_at.lock() {
            Ok(mut c) => c.take().is_some(),
            Err(_) => false,
        }
    }

    /// The Raft log entries lost when the process died at a write, and
    /// what that write was (its columns and keys).
    pub fn lost_at_crash_write(&self) -> (u64, String) {
        let what = self
            .killing_write
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        (self.lost_at_write.swap(0, Ordering::SeqCst), what)
    }

    /// Counts one write against an armed crash; true when this write kills.
    fn write_kills(&self, ops: &[WriteOp]) -> bool {
        let power_loss = {
            let Ok(mut armed) = self.crash_at.lock() else {
                return false;
            };
            match armed.as_mut() {
                Some((left, power_loss)) if *left <= 1 => {
                    let p = *power_loss;
                    *armed = None;
                    p
                }
                Some((left, _)) => {
                    *left -= 1;
                    return false;
                }
                None => return false,
            }
        };
        let lost = self.crash(power_loss);
        self.lost_at_write.fetch_add(lost, Ordering::SeqCst);
        if let Ok(mut what) = self.killing_write.lock() {
            *what = describe(ops);
        }
        true
    }

    /// What a new process sees when it opens the disk.
    pub fn open(self: &Arc<Self>) -> Arc<SimStore> {
        let visible = MemStore::new();
        for column in Column::ALL {
            let rows = self.durable.range(column, &[], None).unwrap_or_default();
            let ops = rows
                .into_iter()
                .map(|(key, value)| WriteOp::Put { column, key, value })
                .collect();
            let _ = visible.write(ops, Durability::Sync);
        }
        if let Ok(pending) = self.pending.lock() {
            for ops in pending.iter() {
                let _ = visible.write(ops.clone(), Durability::Buffered);
            }
        }
        Arc::new(SimStore {
            disk: self.clone(),
            visible,
            epoch: self.epoch.load(Ordering::SeqCst),
        })
    }
}

/// A process's view of its disk.
#[derive(Debug)]
pub struct SimStore {
    disk: Arc<SimDisk>,
    visible: MemStore,
    epoch: u64,
}

fn io(reason: &str) -> StoreError {
    StoreError::Io {
        path: "simulated disk".into(),
        reason: reason.into(),
    }
}

impl SimStore {
    /// True once the process that opened this store has died.
    pub fn dead(&self) -> bool {
        self.disk.epoch.load(Ordering::SeqCst) != self.epoch
    }

    fn alive(&self) -> Result<(), StoreError> {
        if self.disk.epoch.load(Ordering::SeqCst) == self.epoch {
            Ok(())
        } else {
            Err(io("the process that opened this disk has crashed"))
        }
    }

    /// fsync: the pending writes become durable, in order.
    fn sync_pending(&self) -> Result<(), StoreError> {
        let pending: Vec<Vec<WriteOp>> = self
            .disk
            .pending
            .lock()
            .map_err(|_| io("poisoned"))?
            .drain(..)
            .collect();
        if self.disk.failing.load(Ordering::SeqCst) {
            // The kernel drops the dirty pages of a failed fsync.
            self.disk
                .dropped_entries
                .fetch_add(log_entries(&pending), Ordering::SeqCst);
            return Err(io("fsync failed (injected fault)"));
        }
        for p in pending {
            self.disk.durable.write(p, Durability::Sync)?;
        }
        Ok(())
    }
}

impl Store for SimStore {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.visible.get(column, key)
    }

    fn range(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.visible.range(column, from, to)
    }

    fn last(&self, column: Column) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.visible.last(column)
    }

    fn write(&self, ops: Vec<WriteOp>, durability: Durability) -> Result<(), StoreError> {
        self.alive()?;
        if self.disk.write_kills(&ops) {
            return Err(io("the process died at this write (injected crash)"));
        }
        match durability {
            Durability::Buffered => {
                self.disk
                    .pending
                    .lock()
                    .map_err(|_| io("poisoned"))?
                    .push(ops.clone());
                self.visible.write(ops, Durability::Buffered)
            }
            Durability::Sync => {
                self.sync_pending()?;
                self.disk.durable.write(ops.clone(), Durability::Sync)?;
                self.visible.write(ops, Durability::Sync)
            }
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.alive()?;
        self.sync_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &[u8]) -> Vec<WriteOp> {
        vec![WriteOp::Put {
            column: Column::RaftMeta,
            key: key.to_vec(),
            value: b"v".to_vec(),
        }]
    }

    fn entry(index: u64) -> Vec<WriteOp> {
        vec![WriteOp::Put {
            column: Column::RaftLog,
            key: index.to_be_bytes().to_vec(),
            value: b"e".to_vec(),
        }]
    }

    #[test]
    fn a_failed_fsync_drops_the_dirty_writes_and_a_later_fsync_does_not_bring_them_back() {
        let disk = SimDisk::new();
        let store = disk.open();
        store.write(entry(1), Durability::Buffered).expect("write");
        disk.fail_syncs(true);
        assert!(store.sync().is_err());
        disk.fail_syncs(false);
        store.sync().expect("fsyncs work again");
        // Still in this process's page cache, but not on the disk.
        assert!(store
            .get(Column::RaftLog, &1u64.to_be_bytes())
            .expect("get")
            .is_some());
        assert_eq!(
            disk.crash(false),
            1,
            "the dropped entry is reported at the crash"
        );
        assert!(disk
            .open()
            .get(Column::RaftLog, &1u64.to_be_bytes())
            .expect("get")
            .is_none());
    }

    #[test]
    fn an_armed_crash_kills_the_process_at_that_write() {
        let disk = SimDisk::new();
        disk.crash_at_write(2, true);
        let store = disk.open();
        store
            .write(entry(1), Durability::Buffered)
            .expect("first write");
        assert!(
            store.write(entry(2), Durability::Sync).is_err(),
            "the second kills"
        );
        assert!(store.dead());
        assert_eq!(disk.lost_at_crash_write().0, 1, "the first was unsynced");
        assert!(
            store.write(entry(3), Durability::Sync).is_err(),
            "dead for good"
        );
        let after = disk.open();
        assert!(!after.dead());
        after
            .write(entry(4), Durability::Sync)
            .expect("a new process writes");
    }

    #[test]
    fn power_loss_drops_only_unsynced_writes() {
        let disk = SimDisk::new();
        let store = disk.open();
        store.write(put(b"a"), Durability::Buffered).expect("write");
        store.write(put(b"b"), Durability::Sync).expect("write");
        store.write(put(b"c"), Durability::Buffered).expect("write");
        assert!(store.get(Column::RaftMeta, b"c").expect("get").is_some());
        // c is not a Raft log entry: dropped, but not counted.
        assert_eq!(disk.crash(true), 0);
        let after = disk.open();
        // a was synced by b's fsync; c was not.
        assert!(after.get(Column::RaftMeta, b"a").expect("get").is_some());
        assert!(after.get(Column::RaftMeta, b"b").expect("get").is_some());
        assert!(after.get(Column::RaftMeta, b"c").expect("get").is_none());
    }

    #[test]
    fn a_process_crash_keeps_unsynced_writes_and_a_failing_fsync_writes_nothing() {
        let disk = SimDisk::new();
        let store = disk.open();
        store.write(put(b"a"), Durability::Buffered).expect("write");
        assert_eq!(disk.crash(false), 0);
        let store = disk.open();
        assert!(store.get(Column::RaftMeta, b"a").expect("get").is_some());
        disk.fail_syncs(true);
        assert!(store.write(put(b"b"), Durability::Sync).is_err());
        assert!(store.get(Column::RaftMeta, b"b").expect("get").is_none());
    }

    #[test]
    fn sync_makes_buffered_writes_durable_and_a_dead_process_cannot_write() {
        let disk = SimDisk::new();
        let store = disk.open();
        store.write(put(b"a"), Durability::Buffered).expect("write");
        store.sync().expect("sync");
        store.write(entry(7), Durability::Buffered).expect("write");
        assert_eq!(disk.crash(true), 1, "the log entry was not synced");
        let after = disk.open();
        assert!(after.get(Column::RaftMeta, b"a").expect("get").is_some());
        assert!(
            store.sync().is_err(),
            "the crashed process's handle is dead"
        );
        assert!(store.write(put(b"c"), Durability::Buffered).is_err());
        disk.fail_syncs(true);
        after.write(put(b"d"), Durability::Buffered).expect("write");
        assert!(after.sync().is_err(), "a failing fsync is reported");
    }
}
