//! The node's ed25519 identity, kept in its data dir so that a restart keeps
//! the same peer id.
//!
//! File format (`identity.key`, mode 0600): the 4 magic bytes `AMID`, one
//! format version byte (1), then the libp2p protobuf encoding of the keypair.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the identity inside the data dir.
pub const IDENTITY_FILE: &str = "identity.key";
const MAGIC: &[u8; 4] = b"AMID";
const FORMAT_VERSION: u8 = 1;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but cannot be read.
    #[error("cannot read identity file {path}: {source}; check its permissions")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file exists but is not a valid identity.
    #[error("identity file {path} is corrupt ({reason}); restore it from a backup to keep this node's peer id, or delete it to start as a new node")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A new identity could not be written.
    #[error("cannot write identity file {path}: {source}; check that the data dir is writable")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
}

/// Loads the identity from `data_dir`, or creates and stores a new one.
/// Returns the keypair and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> Result<(Keypair, bool), IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    match fs::read(&path) {
        Ok(bytes) => decode(&bytes)
            .map(|k| (k, false))
            .map_err(|reason| IdentityError::Corrupt { path, reason }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            write_new(&path, &keypair).map_err(|source| IdentityError::Write { path, source })?;
            Ok((keypair, true))
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

fn decode(bytes: &[u8]) -> Result<Keypair, String> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("it does not start with the agentmesh identity magic bytes")?;
    let (&version, key) = rest.split_first().ok_or("it is truncated")?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported by this build (it reads version {FORMAT_VERSION})"
        ));
    }
    Keypair::from_protobuf_encoding(key).map_err(|e| format!("the key does not decode: {e}"))
}

fn write_new(path: &Path, keypair: &Keypair) -> std::io::Result<()> {
    let encoded = keypair
        .to_protobuf_encoding()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Write to a temporary file and rename, so a crash never leaves half a key.
    let tmp = path.with_extension("key.tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(MAGIC)?;
    file.write_all(&[FORMAT_VERSION])?;
    file.write_all(&encoded)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is (issue 12, finding
    // 11): a power loss could otherwise leave no key, and a new identity.
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_load_returns_the_same_peer_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, created) = load_or_create(dir.path()).expect("create");
        assert!(created);
        let (second, created) = load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(IDENTITY_FILE);
        for garbage in [&b"hello"[..], b"AMID", b"AMID\x09xx", b"AMID\x01not-a-key"] {
            fs::write(&path, garbage).expect("write");
            let err = load_or_create(dir.path()).expect_err("corrupt");
            let msg = err.to_string();
            assert!(matches!(err, IdentityError::Corrupt { .. }), "{msg}");
            assert!(msg.contains(IDENTITY_FILE), "{msg}");
        }
    }
}
