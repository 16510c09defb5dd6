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
//!     failing fsync: Sync writes return an error and change nothing
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

    /// True while fsyncs fail.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    /// The process died: with `power_loss`, unsynced writes are gone; without,
    /// the OS writes them out.
    pub fn crash(&self, power_loss: bool) -> usize {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let pending: Vec<Vec<WriteOp>> = match self.pending.lock() {
            Ok(mut p) => p.drain(..).collect(),
            Err(_) => return 0,
        };
        let lost = if power_loss { pending.len() } else { 0 };
        if !power_loss {
            for ops in pending {
                let _ = self.durable.write(ops, Durability::Sync);
            }
        }
        lost
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
    fn alive(&self) -> Result<(), StoreError> {
        if self.disk.epoch.load(Ordering::SeqCst) == self.epoch {
            Ok(())
        } else {
            Err(io("the process that opened this disk has crashed"))
        }
    }

    /// fsync: the pending writes become durable, in order.
    fn sync_pending(&self) -> Result<(), StoreError> {
        if self.disk.failing.load(Ordering::SeqCst) {
            return Err(io("fsync failed (injected fault)"));
        }
        let pending: Vec<Vec<WriteOp>> = self
            .disk
            .pending
            .lock()
            .map_err(|_| io("poisoned"))?
            .drain(..)
            .collect();
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

    #[test]
    fn power_loss_drops_only_unsynced_writes() {
        let disk = SimDisk::new();
        let store = disk.open();
        store.write(put(b"a"), Durability::Buffered).expect("write");
        store.write(put(b"b"), Durability::Sync).expect("write");
        store.write(put(b"c"), Durability::Buffered).expect("write");
        assert!(store.get(Column::RaftMeta, b"c").expect("get").is_some());
        assert_eq!(disk.crash(true), 1);
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
        store.write(put(b"b"), Durability::Buffered).expect("write");
        assert_eq!(disk.crash(true), 1, "b was not synced");
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
