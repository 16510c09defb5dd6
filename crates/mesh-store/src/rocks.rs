//! The rocksdb store: one column family per [`Column`], batches through
//! `WriteBatch`, fsync of the WAL for [`Durability::Sync`] and [`Store::sync`].

use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use crate::{Column, Durability, Store, StoreError, WriteOp};

/// A rocksdb database in one directory.
#[derive(Debug)]
pub struct RocksStore {
    db: DB,
    path: PathBuf,
}

impl RocksStore {
    /// Opens (or creates) the store in `path`. A corrupt or locked
    /// directory is an error that names the path; nothing is repaired or
    /// deleted silently.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Refuse to open a database whose files fail their checksums.
        options.set_paranoid_checks(true);
        let families =
            Column::ALL.map(|c| ColumnFamilyDescriptor::new(c.name(), Options::default()));
        let db =
            DB::open_cf_descriptors(&options, path, families).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: e.into_string(),
            })?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn cf(&self, column: Column) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(column.name())
            .ok_or_else(|| self.io(format!("column family {} is missing", column.name())))
    }

    fn io(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }
}

impl Store for RocksStore {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(column)?, key)
            .map_err(|e| self.io(format!("read {}: {e}", column.name())))
    }

    fn range(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.scan(column, from, to, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(out)
    }

    fn scan(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for item in self.db.iterator_cf(
            self.cf(column)?,
            IteratorMode::From(from, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| self.io(format!("scan {}: {e}", column.name())))?;
            if to.is_some_and(|t| k.as_ref() >= t) || !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, column: Column) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        match self
            .db
            .iterator_cf(self.cf(column)?, IteratorMode::End)
            .next()
        {
            None => Ok(None),
            Some(Ok((k, v))) => Ok(Some((k.to_vec(), v.to_vec()))),
            Some(Err(e)) => Err(self.io(format!("scan {}: {e}", column.name()))),
        }
    }

    fn write(&self, ops: Vec<WriteOp>, durability: Durability) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for op in &ops {
            match op {
                WriteOp::Put { column, key, value } => batch.put_cf(self.cf(*column)?, key, value),
                WriteOp::Delete { column, key } => batch.delete_cf(self.cf(*column)?, key),
                WriteOp::DeleteRange { column, from, to } => {
                    batch.delete_range_cf(self.cf(*column)?, from, to)
                }
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(durability == Durability::Sync);
        self.db
            .write_opt(batch, &options)
            .map_err(|e| self.io(format!("write: {e}")))
    }

    fn sync(&self) -> Result<(), StoreError> {
        // Every write reaches the WAL file before it returns (no manual WAL
        // flush), so syncing the WAL covers them all.
        self.db
            .flush_wal(true)
            .map_err(|e| self.io(format!("sync the write-ahead log: {e}")))
    }
}
