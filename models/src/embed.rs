//! all-MiniLM-L6-v2: sentence embeddings, mean-pooled over each input's
//! tokens and L2-normalised (384 dimensions), as sentence-transformers
//! computes them. On the CPU through our BERT forward pass (`bert.rs`:
//! weights packed at load, no padding); on a GPU through
//! `candle_transformers::models::bert` with padded batches and a mask.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::bert::CpuBert;
use crate::registry::{read_verified, ModelError, ModelSpec};

/// Longest input in tokens; longer text is truncated (the model's limit is 512,
/// sentence-transformers uses 256 for this model).
pub const MAX_TOKENS: usize = 256;

/// A loaded embedding model.
pub struct Embedder {
    model: Model,
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

/// The forward pass: ours on the CPU, candle-transformers' elsewhere.
enum Model {
    Cpu(CpuBert),
    Candle(BertModel),
}

impl Model {
    fn load(vb: VarBuilder, config: &Config, device: &Device) -> candle_core::Result<Self> {
        Ok(if device.is_cpu() {
            Self::Cpu(CpuBert::load(vb, config)?)
        } else {
            Self::Candle(BertModel::load(vb, config)?)
        })
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
        let model = Model::load(vb, &config, device).map_err(|e| invalid(spec, "weights", e))?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            name: spec.name.into(),
        })
    }

    /// An embedder from weights and a tokenizer already in memory (tests
    /// build tiny random ones). The tokenizer should pad batches and
    /// return attention masks.
    pub fn from_parts(
        vb: VarBuilder,
        config: &Config,
        tokenizer: Tokenizer,
        device: &Device,
        name: &str,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            model: Model::load(vb, config, device)?,
            tokenizer,
            device: device.clone(),
            name: name.into(),
        })
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
        let model = match &self.model {
            Model::Cpu(bert) => {
                // Each input's own tokens: the padding is left out.
                let tokens: Vec<Vec<u32>> = encodings
                    .iter()
                    .map(|e| {
                        e.get_ids()
                            .iter()
                            .zip(e.get_attention_mask())
                            .filter(|(_, &m)| m == 1)
                            .map(|(&id, _)| id)
                            .collect()
                    })
                    .collect();
                // Inside candle's thread pool: the forward pass's parallel
                // sections then start on warm workers instead of waking the
                // pool from outside each time.
                return self
                    .device
                    .with_context(|| bert.embed(&tokens))
                    .map_err(|e| err("inference", &e));
            }
            Model::Candle(model) => model,
        };
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<Vec<u32>> = encodings
            .iter()
            .map(|e| e.get_attention_mask().to_vec())
            .collect();
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::new(ids, &self.device)?;
            let mask = Tensor::new(mask, &self.device)?;
            let types = ids.zeros_like()?;
            let hidden = model.forward(&ids, &types, Some(&mask))?;
            // Mean over the real tokens only.
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        run().map_err(|e| err("inference", &e))
    }
}

/// Cosine similarity of two vectors (1 for unit vectors pointing the same way).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(f32::MIN_POSITIVE)
}
