//! openraft's storage conformance suite on both stores, and a kill-and-reopen
//! test the suite does not cover. The suite's entries name node 0 as their
//! leader, so a log of node 0 takes the leader's path (buffered write, sync
//! queue) and a log of node 1 the follower's (synced write); both are run.

use std::sync::Arc;

use mesh_store::{MemStore, RocksStore, Store};
use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, Vote};

use crate::types::{NodeId, TypeConfig};
use crate::{LogStore, LogSync, RegionStateMachine};

/// The node whose log the suite writes.
struct MemBuilder(NodeId);

fn log_of(store: &Arc<dyn Store>, node: NodeId) -> LogStore {
    LogStore::new(store.clone(), node, LogSync::Thread).expect("start the log sync thread")
}

impl StoreBuilder<TypeConfig, LogStore, RegionStateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), LogStore, RegionStateMachine), StorageError<NodeId>> {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        Ok(((), log_of(&store, self.0), RegionStateMachine::open(store)?))
    }
}

struct RocksBuilder(NodeId);

impl StoreBuilder<TypeConfig, LogStore, RegionStateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, RegionStateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(RocksStore::open(dir.path()).expect("open rocksdb"));
        Ok((
            dir,
            log_of(&store, self.0),
            RegionStateMachine::open(store)?,
        ))
    }
}

#[test]
fn mem_store_passes_the_openraft_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(MemBuilder(0))?;
    Suite::test_all(MemBuilder(1))
}

#[test]
fn rocks_store_passes_the_openraft_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RocksBuilder(0))?;
    Suite::test_all(RocksBuilder(1))
}

#[tokio::test]
async fn rocks_log_and_vote_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vote = Vote::new(3, 7);
    {
        let store: Arc<dyn Store> = Arc::new(RocksStore::open(dir.path()).expect("open"));
        let mut log = log_of(&store, 7);
        log.save_vote(&vote).await.expect("save vote");
    }
    let store: Arc<dyn Store> = Arc::new(RocksStore::open(dir.path()).expect("reopen"));
    let mut log = log_of(&store, 7);
    assert_eq!(log.read_vote().await.expect("read vote"), Some(vote));
}
