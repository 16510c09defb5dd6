//! openraft's storage conformance suite on both stores, and a kill-and-reopen
//! test the suite does not cover.

use std::sync::Arc;

use mesh_store::{MemStore, RocksStore, Store};
use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, Vote};

use crate::types::{NodeId, TypeConfig};
use crate::{LogStore, RegionStateMachine};

struct MemBuilder;

impl StoreBuilder<TypeConfig, LogStore, RegionStateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), LogStore, RegionStateMachine), StorageError<NodeId>> {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        Ok((
            (),
            LogStore::new(store.clone()),
            RegionStateMachine::open(store)?,
        ))
    }
}

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, RegionStateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, RegionStateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(RocksStore::open(dir.path()).expect("open rocksdb"));
        Ok((
            dir,
            LogStore::new(store.clone()),
            RegionStateMachine::open(store)?,
        ))
    }
}

#[test]
fn mem_store_passes_the_openraft_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(MemBuilder)
}

#[test]
fn rocks_store_passes_the_openraft_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RocksBuilder)
}

#[tokio::test]
async fn rocks_log_and_vote_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vote = Vote::new(3, 7);
    {
        let store: Arc<dyn Store> = Arc::new(RocksStore::open(dir.path()).expect("open"));
        let mut log = LogStore::new(store);
        log.save_vote(&vote).await.expect("save vote");
    }
    let store: Arc<dyn Store> = Arc::new(RocksStore::open(dir.path()).expect("reopen"));
    let mut log = LogStore::new(store);
    assert_eq!(log.read_vote().await.expect("read vote"), Some(vote));
}
