//! The same contract checked on both stores.

use crate::{Column, Durability, MemStore, RocksStore, Store, WriteOp};

fn put(column: Column, key: &[u8], value: &[u8]) -> WriteOp {
    WriteOp::Put {
        column,
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

fn contract(store: &dyn Store) {
    let log = Column::RaftLog;
    assert_eq!(store.last(log).expect("last"), None);
    store
        .write(
            vec![
                put(log, b"\x00\x02", b"b"),
                put(log, b"\x00\x01", b"a"),
                put(log, b"\x00\x03", b"c"),
                put(Column::RaftMeta, b"vote", b"v"),
            ],
            Durability::Sync,
        )
        .expect("write");
    assert_eq!(
        store.get(log, b"\x00\x02").expect("get"),
        Some(b"b".to_vec())
    );
    assert_eq!(store.get(log, b"\x00\x09").expect("get"), None);
    assert_eq!(
        store.get(Column::StateMachine, b"vote").expect("get"),
        None,
        "columns are separate"
    );
    let keys: Vec<Vec<u8>> = store
        .range(log, b"\x00\x02", None)
        .expect("range")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![b"\x00\x02".to_vec(), b"\x00\x03".to_vec()]);
    assert_eq!(
        store
            .range(log, b"\x00\x01", Some(b"\x00\x03"))
            .expect("range")
            .len(),
        2,
        "upper bound excluded"
    );
    assert_eq!(
        store.last(log).expect("last").map(|(k, _)| k),
        Some(b"\x00\x03".to_vec())
    );
    // A scan visits in order, honours the upper bound and stops when asked.
    let mut seen = Vec::new();
    store
        .scan(log, b"\x00\x01", Some(b"\x00\x03"), &mut |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            true
        })
        .expect("scan");
    assert_eq!(
        seen,
        vec![
            (b"\x00\x01".to_vec(), b"a".to_vec()),
            (b"\x00\x02".to_vec(), b"b".to_vec())
        ]
    );
    let mut visits = 0;
    store
        .scan(log, b"", None, &mut |_, _| {
            visits += 1;
            false
        })
        .expect("scan");
    assert_eq!(visits, 1, "stops when the visitor says so");
    store
        .write(
            vec![
                WriteOp::DeleteRange {
                    column: log,
                    from: b"\x00\x02".to_vec(),
                    to: b"\x00\x04".to_vec(),
                },
                WriteOp::Delete {
                    column: Column::RaftMeta,
                    key: b"vote".to_vec(),
                },
            ],
            Durability::Buffered,
        )
        .expect("delete");
    assert_eq!(
        store.last(log).expect("last").map(|(k, _)| k),
        Some(b"\x00\x01".to_vec())
    );
    assert_eq!(store.get(Column::RaftMeta, b"vote").expect("get"), None);
    store
        .write(vec![put(log, b"\x00\x05", b"e")], Durability::Buffered)
        .expect("buffered write");
    store.sync().expect("sync");
    assert_eq!(
        store.get(log, b"\x00\x05").expect("get"),
        Some(b"e".to_vec())
    );
}

#[test]
fn mem_store_keeps_the_contract() {
    contract(&MemStore::new());
}

#[test]
fn rocks_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    contract(&RocksStore::open(dir.path()).expect("open"));
}

#[test]
fn rocks_store_keeps_synced_writes_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = RocksStore::open(dir.path()).expect("open");
        store
            .write(
                vec![put(Column::RaftMeta, b"vote", b"term-7")],
                Durability::Sync,
            )
            .expect("write");
        store
            .write(
                vec![put(Column::RaftLog, b"\x00\x01", b"entry")],
                Durability::Buffered,
            )
            .expect("write");
        store.sync().expect("sync");
    }
    let store = RocksStore::open(dir.path()).expect("reopen");
    assert_eq!(
        store.get(Column::RaftMeta, b"vote").expect("get"),
        Some(b"term-7".to_vec())
    );
    assert_eq!(
        store.get(Column::RaftLog, b"\x00\x01").expect("get"),
        Some(b"entry".to_vec())
    );
}

#[test]
fn a_corrupt_rocks_directory_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = RocksStore::open(dir.path()).expect("open");
        store
            .write(vec![put(Column::RaftLog, b"k", b"v")], Durability::Sync)
            .expect("write");
    }
    // Garble the manifest list: rocksdb cannot find its manifest any more.
    std::fs::write(dir.path().join("CURRENT"), b"MANIFEST-999999\n").expect("corrupt");
    let err = RocksStore::open(dir.path()).expect_err("corrupt store must not open");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("cannot open the store"), "{msg}");
}
