//! all-MiniLM-L6-v2: sentence embeddings through
//! `candle_transformers::models::bert`, mean-pooled over the attention mask
//! and L2-normalised (384 dimensions), as sentence-transformers computes them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::registry::{read_verified, ModelError, ModelSpec};

/// Longest input in tokens; longer text is truncated (the model's limit is 512,
/// sentence-transformers uses 256 for this model).
pub const MAX_TOKENS: usize = 256;

/// A loaded embedding model.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    name: String,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn invalid(spec: &ModelSpec, what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid {
        model: spec.name.into(),
        reason: format!("{what}: {e}"),
    }
}

impl Embedder {
    /// Reads weights, config and tokenizer from `dir`, checks their hashes, loads them.
    pub fn load(spec: &ModelSpec, dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let [weights, tokenizer, config]: [Vec<u8>; 3] = read_verified(spec, dir)?
            .try_into()
            .map_err(|_| invalid(spec, "registry", "expected weights, tokenizer and config"))?;
        let config: Config =
            serde_json::from_slice(&config).map_err(|e| invalid(spec, "config.json", e))?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tokenizer).map_err(|e| invalid(spec, "tokenizer.json", e))?;
        // The shipped tokenizer pads every input to 128 tokens: pad each batch
        // to its longest input instead; the attention mask hides the padding.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| invalid(spec, "tokenizer truncation", e))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)
            .map_err(|e| invalid(spec, "weights", e))?;
        let model = BertModel::load(vb, &config).map_err(|e| invalid(spec, "weights", e))?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            name: spec.name.into(),
        })
    }

    /// An embedder from a model and a tokenizer already in memory (tests
    /// build tiny random ones). The tokenizer should pad batches and
    /// return attention masks.
    pub fn from_parts(model: BertModel, tokenizer: Tokenizer, device: &Device, name: &str) -> Self {
        Self {
            model,
            tokenizer,
            device: device.clone(),
            name: name.into(),
        }
    }

    /// One 384-d unit vector per input, in order.
    pub fn embed(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let err = |what: &str, e: &dyn std::fmt::Display| ModelError::Invalid {
            model: self.name.clone(),
            reason: format!("{what}: {e}"),
        };
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| err("tokenize", &e))?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<Vec<u32>> = encodings
            .iter()
            .map(|e| e.get_attention_mask().to_vec())
            .collect();
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::new(ids, &self.device)?;
            let mask = Tensor::new(mask, &self.device)?;
            let types = ids.zeros_like()?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            // Mean over the real tokens only.
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        // Inside candle's thread pool: the forward pass's many short parallel
        // sections then start on warm workers instead of waking the pool
        // from outside each time.
        self.device
            .with_context(run)
            .map_err(|e| err("inference", &e))
    }
}

/// Cosine similarity of two vectors (1 for unit vectors pointing the same way).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(f32::MIN_POSITIVE)
}
