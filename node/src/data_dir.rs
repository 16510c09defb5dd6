//! The node's data directory: checked writable, locked against a second
//! process, and holding the identity, the start generation and node.json.
//!
//! ```text
//! D/
//!   LOCK          held (flock) while the node runs
//!   identity.key  ed25519 keypair (mesh_net::identity)
//!   generation    start counter; the high 32 bits of every record seq
//!   node.json     what the ready line says, for scripts
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

const GENERATION_FILE: &str = "generation";
const NODE_FILE: &str = "node.json";
const LOCK_FILE: &str = "LOCK";

/// An open, locked data dir. The lock is released when this is dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

/// What `node.json` holds: the facts of the ready line.
#[derive(Debug, Serialize)]
pub struct NodeFile<'a> {
    /// Base58 peer id.
    pub peer_id: String,
    /// Region.
    pub region: &'a str,
    /// HTTP API address.
    pub api: String,
    /// libp2p listen addresses.
    pub listen: Vec<String>,
    /// Process id.
    pub pid: u32,
    /// agentmesh version.
    pub version: &'a str,
    /// Start generation of this process.
    pub generation: u32,
    /// Wall clock at start.
    pub started_at_ms: u64,
}

impl DataDir {
    /// Creates the directory if needed, checks it is writable and takes its lock.
    pub fn open(path: &Path) -> Result<Self> {
        let hint = "choose a directory this user can write, with --data-dir";
        if path.exists() && !path.is_dir() {
            bail!("data dir {} is not a directory; {hint}", path.display());
        }
        fs::create_dir_all(path)
            .map_err(|e| anyhow!("cannot create data dir {}: {e}; {hint}", path.display()))?;
        let probe = path.join(".write-probe");
        fs::write(&probe, b"ok")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|e| anyhow!("data dir {} cannot be written: {e}; {hint}", path.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(|e| anyhow!("cannot open {}: {e}", path.join(LOCK_FILE).display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => bail!(
                "data dir {} is in use by another agentmesh node; stop it first or pick another --data-dir",
                path.display()
            ),
            Err(fs::TryLockError::Error(e)) => bail!("cannot lock data dir {}: {e}", path.display()),
        }
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the previous start generation, adds one, stores it durably and
    /// returns it. A restarted node's records thus always outrank its old ones.
    pub fn next_generation(&self) -> Result<u32> {
        let path = self.path.join(GENERATION_FILE);
        let previous = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u32>().map_err(|_| {
                anyhow!(
                    "{} is corrupt (expected a number, found {:?}); delete it to restart the count (peers may then ignore this node until their view of it expires)",
                    path.display(),
                    text.trim()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
        };
        let next = previous.checked_add(1).ok_or_else(|| {
            anyhow!(
                "{} reached its maximum; delete it to restart the count",
                path.display()
            )
        })?;
        // Never below the wall clock in seconds: a data dir restored from a
        // backup (an older count) still outranks the records its node sent
        // since, which peers remember (issue 12, finding 11).
        let next = next.max(unix_seconds());
        write_atomically(&path, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// Writes `node.json`.
    pub fn write_node_file(&self, node: &NodeFile<'_>) -> Result<()> {
        let json = serde_json::to_vec_pretty(node).context("encode node.json")?;
        write_atomically(&self.path.join(NODE_FILE), &json)
    }
}

/// Where the Raft store records whom it belongs to (`Column::RaftMeta`).
const OWNER_KEY: &[u8] = b"owner";

/// Whom a Raft store belongs to: written at the first start, checked at every one.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
struct Owner {
    /// Format of this record.
    format: u32,
    /// Base58 peer id of the node.
    peer_id: String,
    /// Its region.
    region: String,
}

/// Checks that the Raft store in `dir/raft` belongs to this peer id and this
/// region, and records them at the first start. Refuses, naming what to do:
/// a store of another region (a data dir restarted with another --region), a
/// store of another peer id (an identity file copied or replaced), and an
/// empty store under an identity that has run before (its `raft/` removed
/// or replaced: the node would vote again with an empty log under an id the
/// group knows, and could elect a leader without committed entries).
pub fn check_owner(
    store: &dyn mesh_store::Store,
    dir: &Path,
    peer_id: &str,
    region: &str,
    identity_created: bool,
) -> Result<()> {
    use mesh_store::{Column, Durability, WriteOp};
    let raft = dir.join("raft");
    if let Some(bytes) = store
        .get(Column::RaftMeta, OWNER_KEY)
        .map_err(|e| anyhow!("{e}"))?
    {
        let owner: Owner = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!(
                "{} holds an unreadable owner record ({e}); restore the data dir from a backup, or remove the whole data dir {} to start as a new node",
                raft.display(),
                dir.display()
            )
        })?;
        if owner.peer_id != peer_id {
            bail!(
                "the Raft store {} belongs to peer {}, but this data dir's identity is {peer_id}: the identity file was replaced; put the original identity.key back, or remove the whole data dir {} to start as a new node",
                raft.display(),
                owner.peer_id,
                dir.display()
            );
        }
        if owner.region != region {
            bail!(
                "data dir {} belongs to region {} (its Raft store holds that region's group), not {region}: start it with --region {}, or use another --data-dir for a node of {region}",
                dir.display(),
                owner.region,
                owner.region
            );
        }
        return Ok(());
    }
    let empty = store
        .last(Column::RaftLog)
        .map_err(|e| anyhow!("{e}"))?
        .is_none()
        && store
            .get(Column::RaftMeta, b"vote")
            .map_err(|e| anyhow!("{e}"))?
            .is_none()
        && store
            .last(Column::StateMachine)
            .map_err(|e| anyhow!("{e}"))?
            .is_none();
    if empty && !identity_created && started_before(dir) {
        bail!(
            "data dir {} has the identity of a node that ran before ({peer_id}) but an empty Raft store ({} was removed or replaced): under the same id it could vote again with an empty log. Remove the whole data dir {} so the node rejoins as a new member, or restore it from a backup",
            dir.display(),
            raft.display(),
            dir.display()
        );
    }
    let owner = Owner {
        format: 1,
        peer_id: peer_id.to_owned(),
        region: region.to_owned(),
    };
    let op = WriteOp::Put {
        column: Column::RaftMeta,
        key: OWNER_KEY.to_vec(),
        value: serde_json::to_vec(&owner).context("encode the owner record")?,
    };
    store
        .write(vec![op], Durability::Sync)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// True when the generation file says the node started before (it is
/// counted after the owner check, so a first start finds none).
fn started_before(dir: &Path) -> bool {
    let text = fs::read_to_string(dir.join(GENERATION_FILE)).unwrap_or_default();
    text.trim().parse::<u32>().is_ok_and(|g| g >= 1)
}

/// Seconds since the Unix epoch, as a u32 (until 2106); 0 if the clock is
/// before 1970.
fn unix_seconds() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is.
        match path.parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    })();
    result.map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raft_store_belongs_to_one_peer_and_one_region() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = mesh_store::MemStore::new();
        check_owner(&store, dir.path(), "12D3A", "eu-west", true).expect("first start records");
        check_owner(&store, dir.path(), "12D3A", "eu-west", false).expect("same owner");
        let e = check_owner(&store, dir.path(), "12D3A", "us-east", false).expect_err("region");
        assert!(
            e.to_string().contains("belongs to region eu-west")
                && e.to_string().contains("not us-east"),
            "{e}"
        );
        let e = check_owner(&store, dir.path(), "12D3B", "eu-west", false).expect_err("peer");
        assert!(e.to_string().contains("belongs to peer 12D3A"), "{e}");
    }

    #[test]
    fn a_known_identity_on_an_empty_raft_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(GENERATION_FILE), b"3\n").expect("write");
        let empty = mesh_store::MemStore::new();
        let e = check_owner(&empty, dir.path(), "12D3A", "eu-west", false).expect_err("amnesia");
        assert!(e.to_string().contains("Remove the whole data dir"), "{e}");
        // A new identity on an empty store is a new node: fine.
        check_owner(&empty, dir.path(), "12D3A", "eu-west", true).expect("new node");
    }

    #[test]
    fn generation_counts_starts_and_never_goes_back_after_a_restored_backup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(dir.path()).expect("open");
        let first = data.next_generation().expect("first");
        let second = data.next_generation().expect("second");
        assert!(
            second > first && first >= unix_seconds() - 5,
            "{first} {second}"
        );
        // A backup with an old count is restored: the next start is still
        // counted from the clock, above anything sent before the backup's
        // time (starts are seconds apart, not within one second).
        fs::write(dir.path().join(GENERATION_FILE), b"1\n").expect("restore");
        let after = data.next_generation().expect("after restore");
        assert!(after >= unix_seconds() - 5, "{after}");
    }

    #[test]
    fn a_second_process_cannot_take_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = DataDir::open(dir.path()).expect("open");
        let err = DataDir::open(dir.path()).expect_err("locked");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        fs::write(&file, b"x").expect("write");
        let err = DataDir::open(&file).expect_err("file");
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn a_corrupt_generation_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(GENERATION_FILE), b"banana").expect("write");
        let data = DataDir::open(dir.path()).expect("open");
        assert!(data
            .next_generation()
            .expect_err("corrupt")
            .to_string()
            .contains("corrupt"));
    }
}
