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
        write_atomically(&path, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// Writes `node.json`.
    pub fn write_node_file(&self, node: &NodeFile<'_>) -> Result<()> {
        let json = serde_json::to_vec_pretty(node).context("encode node.json")?;
        write_atomically(&self.path.join(NODE_FILE), &json)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_counts_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(dir.path()).expect("open");
        assert_eq!(data.next_generation().expect("first"), 1);
        assert_eq!(data.next_generation().expect("second"), 2);
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
