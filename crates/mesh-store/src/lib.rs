//! Storage for a node: one [`Store`] trait, two implementations.
//!
//! ```text
//!   consensus (raft log, vote, state machine, snapshots)
//!        │  get / range / last / write(batch, durability)
//!        ▼
//!   dyn Store ──┬── RocksStore: rocksdb, one column family per Column, fsync on Durability::Sync and sync()
//!               └── MemStore:   BTreeMaps, for unit tests and the simulator
//! ```
//!
//! The store moves opaque bytes. Callers own the encoding and MUST put a
//! format version in every value they persist (see `consensus::codec`).
//! Keys sort bytewise, so callers encode numbers big-endian.

mod mem;
mod rocks;

pub use mem::MemStore;
pub use rocks::RocksStore;

/// A column family: one per concern, so each can be scanned, compacted and
/// dropped on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Column {
    /// Raft log entries, keyed by big-endian index.
    RaftLog,
    /// Raft metadata: vote, last purged log id, committed id.
    RaftMeta,
    /// The applied state machine.
    StateMachine,
    /// The current snapshot.
    Snapshot,
    /// Results of the tasks this node ran or took in, keyed by task id.
    Tasks,
    /// This node's audit log, keyed by big-endian sequence number.
    Audit,
    /// Documents of the datasets this node holds, keyed `dataset \0 id`.
    Documents,
}

impl Column {
    /// Every column, in a fixed order.
    pub const ALL: [Column; 7] = [
        Self::RaftLog,
        Self::RaftMeta,
        Self::StateMachine,
        Self::Snapshot,
        Self::Tasks,
        Self::Audit,
        Self::Documents,
    ];

    /// The column family name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Self::RaftLog => "raft_log",
            Self::RaftMeta => "raft_meta",
            Self::StateMachine => "state_machine",
            Self::Snapshot => "snapshot",
            Self::Tasks => "tasks",
            Self::Audit => "audit",
            Self::Documents => "documents",
        }
    }
}

/// One change in an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// Where.
        column: Column,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// Where.
        column: Column,
        /// Key.
        key: Vec<u8>,
    },
    /// Remove every key in `from..to` (`to` excluded).
    DeleteRange {
        /// Where.
        column: Column,
        /// First key removed.
        from: Vec<u8>,
        /// First key kept.
        to: Vec<u8>,
    },
}

/// Whether a write must be on disk before `write` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the write-ahead log: survives power loss. Raft votes and log
    /// entries MUST use this.
    Sync,
    /// Leave it to the OS: survives a process crash, not a power loss.
    Buffered,
}

/// Why a store operation failed. Every variant names the store's path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (missing permissions, corruption, a
    /// lock held by another process).
    #[error("cannot open the store at {path}: {reason}; if it is corrupt, restore the whole data dir from a backup, or remove the whole data dir (not only this store: its identity must go with it) so the node rejoins as a new member")]
    Open {
        /// The directory.
        path: String,
        /// What rocksdb said.
        reason: String,
    },
    /// A read or write failed.
    #[error("store at {path}: {reason}")]
    Io {
        /// The directory (or `memory`).
        path: String,
        /// What failed.
        reason: String,
    },
}

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Ordered key-value storage with column families and atomic batches.
///
/// Implementations MUST apply a batch atomically (all or nothing, also
/// across a crash) and MUST keep keys in bytewise order.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The value of `key`, if any.
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Pairs with `from <= key < to` (no upper bound when `to` is `None`), in key order.
    fn range(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<Pair>, StoreError>;

    /// Visits the pairs with `from <= key < to` (no upper bound when `to`
    /// is `None`) in key order, one at a time, until `visit` returns false:
    /// a scan of any length holds one pair in memory, not the range.
    /// `visit` MUST NOT call the store (an implementation may hold a lock).
    /// The default goes through [`Store::range`]; both stores here stream.
    fn scan(
        &self,
        column: Column,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for (k, v) in self.range(column, from, to)? {
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// The pair with the greatest key, if the column is not empty.
    fn last(&self, column: Column) -> Result<Option<Pair>, StoreError>;

    /// Applies `ops` atomically, in order.
    fn write(&self, ops: Vec<WriteOp>, durability: Durability) -> Result<(), StoreError>;

    /// Makes every write that returned before this call durable, as if it had
    /// been written with [`Durability::Sync`]. Safe to call from another
    /// thread while writes go on.
    fn sync(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod conformance;
