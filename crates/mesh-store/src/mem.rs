//! The in-memory store: the same contract as rocksdb, for tests and the
//! simulator. Nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;

use crate::{Column, Durability, Store, StoreError, WriteOp};

type Columns = BTreeMap<Column, BTreeMap<Vec<u8>, Vec<u8>>>;

/// BTreeMaps behind one std mutex (never held across an await).
#[derive(Debug, Default)]
pub struct MemStore {
    columns: Mutex<Columns>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Columns>, StoreError> {
        self.columns.lock().map_err(|_| StoreError::Io {
            path: "memory".into(),
            reason: "a writer panicked while holding the store".into(),
        })
    }
}

impl Store for MemStore {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.get(&column).and_then(|c| c.get(key)).cloned())
    }

    fn range(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let columns = self.lock()?;
        let Some(c) = columns.get(&column) else {
            return Ok(Vec::new());
        };
        let upper = to.map_or(Bound::Unbounded, |t| Bound::Excluded(t.to_vec()));
        Ok(c.range((Bound::Included(from.to_vec()), upper))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let columns = self.lock()?;
        let Some(c) = columns.get(&column) else {
            return Ok(());
        };
        let upper = to.map_or(Bound::Unbounded, |t| Bound::Excluded(t.to_vec()));
        for (k, v) in c.range((Bound::Included(from.to_vec()), upper)) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, column: Column) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()?
            .get(&column)
            .and_then(|c| c.last_key_value())
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn write(&self, ops: Vec<WriteOp>, _durability: Durability) -> Result<(), StoreError> {
        // One lock for the whole batch: readers see all of it or none.
        let mut columns = self.lock()?;
        for op in ops {
            match op {
                WriteOp::Put { column, key, value } => {
                    columns.entry(column).or_default().insert(key, value);
                }
                WriteOp::Delete { column, key } => {
                    if let Some(c) = columns.get_mut(&column) {
                        c.remove(&key);
                    }
                }
                WriteOp::DeleteRange { column, from, to } => {
                    if let Some(c) = columns.get_mut(&column) {
                        let doomed: Vec<Vec<u8>> =
                            c.range(from..to).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            c.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        // Nothing outlives the process: every write is as durable as it gets.
        Ok(())
    }
}
