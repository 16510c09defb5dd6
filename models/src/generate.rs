//! SmolLM2-135M-Instruct (GGUF Q4_1) through our Llama forward pass
//! ([`crate::llama`], derived from candle-transformers' `quantized_llama`),
//! with a byte-level BPE
//! tokenizer built from the GGUF's own metadata (no tokenizer.json ships),
//! the model's chat template, sampling (temperature, top-p, seed) and token
//! streaming; generation stops at `<|im_end|>`.

use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::llama::Llama;
use crate::registry::{read_verified, ModelError, ModelSpec};

/// The token that ends a turn.
pub const IM_END: &str = "<|im_end|>";
/// What the chat template puts first when the conversation has no system turn.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// How to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// 0 means greedy (always the most likely token).
    pub temperature: f64,
    /// Nucleus sampling; 1.0 keeps every token.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// New tokens at most.
    pub max_tokens: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 299_792_458,
            max_tokens: 128,
        }
    }
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>, String> {
    let value = content
        .metadata
        .get(key)
        .ok_or_else(|| format!("the GGUF has no {key}"))?;
    value
        .to_vec()
        .map_err(|e| format!("{key}: {e}"))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}")))
        .collect()
}

/// The byte-level BPE tokenizer described by a GGUF's `tokenizer.ggml.*`
/// metadata: its tokens, merges and control tokens, with SmolLM's
/// pre-tokenizer (digits one by one, then GPT-2's byte-level split).
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer, String> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model is {model:?}; only byte-level BPE (gpt2) is supported"
        ));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
            None => Err(format!("malformed merge {m:?}")),
        })
        .collect::<Result<_, _>>()?;
    let types: Vec<i64> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| match v {
                Value::I32(t) => Ok(i64::from(*t)),
                Value::U32(t) => Ok(i64::from(*t)),
                other => Err(format!("token type {other:?}")),
            })
            .collect::<Result<_, _>>()?,
        _ => vec![1; tokens.len()],
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3: <|im_start|>, <|im_end|>, ...) are never split.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, t)| **t == 3)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// Re-encodes Q4_1 tensors as Q8_0, in memory. The generator does it before
/// the model loads on a CPU where candle has no SIMD dot product for Q4_1
/// (`candle_core::quantized::q4_1_has_simd`, from our candle-core patch,
/// vendor/README.md).
///
/// There candle runs Q4_1 through a scalar loop (`vec_dot_unopt`: a third of
/// all the benchmark's time in the profile) and has a SIMD one for Q8_0.
/// Every Q4_1 value fits Q8_0's grid within 1/254 of its block's largest
/// magnitude, so outputs barely move; the weights take twice the memory
/// (about 140 MB instead of 75 for SmolLM2-135M). `None`: nothing to convert.
fn requantize_q4_1<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
) -> candle_core::Result<Option<Vec<u8>>> {
    if !content
        .tensor_infos
        .values()
        .any(|t| t.ggml_dtype == GgmlDType::Q4_1)
    {
        return Ok(None);
    }
    let cpu = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content.tensor(reader, name, &cpu)?;
        let tensor = if tensor.dtype() == GgmlDType::Q4_1 {
            QTensor::quantize(&tensor.dequantize(&cpu)?, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let metadata: Vec<(&str, &Value)> = keys
        .into_iter()
        .filter_map(|k| content.metadata.get(k).map(|v| (k.as_str(), v)))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors)?;
    Ok(Some(out.into_inner()))
}

/// The model's chat template for one user turn, ready for the assistant's answer.
pub fn chat_prompt(user: &str) -> String {
    format!(
        "<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

/// A loaded generation model.
pub struct Generator {
    weights: Llama,
    tokenizer: Tokenizer,
    device: Device,
    end: u32,
    name: String,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// Reads the GGUF, checks its hash, loads it and its tokenizer.
    pub fn load(spec: &ModelSpec, dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let gguf = read_verified(spec, dir)?
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::Invalid {
                model: spec.name.into(),
                reason: "the registry lists no GGUF file".into(),
            })?;
        Self::from_reader(spec.name, &mut std::io::Cursor::new(gguf), device)
    }

    /// Loads a GGUF from any reader (the tests build tiny ones in memory).
    pub fn from_reader<R: Read + Seek>(
        name: &str,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| ModelError::Invalid {
            model: name.into(),
            reason: format!("{what}: {e}"),
        };
        let content = Content::read(reader).map_err(|e| invalid("GGUF header", &e))?;
        let tokenizer = tokenizer_from_gguf(&content).map_err(|e| invalid("tokenizer", &e))?;
        let end = tokenizer
            .token_to_id(IM_END)
            .ok_or_else(|| invalid("tokenizer", &format!("no {IM_END} token")))?;
        let requantized = if candle_core::quantized::q4_1_has_simd() {
            None
        } else {
            requantize_q4_1(&content, reader).map_err(|e| invalid("weights", &e))?
        };
        let weights = match requantized {
            Some(bytes) => {
                let mut cursor = std::io::Cursor::new(bytes);
                let content = Content::read(&mut cursor).map_err(|e| invalid("weights", &e))?;
                Llama::from_gguf(content, &mut cursor, device)
            }
            None => Llama::from_gguf(content, reader, device),
        }
        .map_err(|e| invalid("weights", &e))?;
        Ok(Self {
            weights,
            tokenizer,
            device: device.clone(),
            end,
            name: name.into(),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Continues `prompt` (raw text: wrap it with [`chat_prompt`] for a chat
    /// turn). Every new piece of text goes to `on_text` as soon as it
    /// decodes; returning `false` from it stops generation (cancellation).
    /// Returns the generated text and the number of new tokens.
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &Params,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<(String, usize), ModelError> {
        let err = |what: &str, e: &dyn std::fmt::Display| ModelError::Invalid {
            model: self.name.clone(),
            reason: format!("{what}: {e}"),
        };
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| err("tokenize", &e))?;
        let prompt_ids = encoding.get_ids().to_vec();
        if prompt_ids.is_empty() {
            return Err(err("prompt", &"the prompt is empty"));
        }
        let context = self.weights.context_length();
        if prompt_ids.len() >= context {
            return Err(err(
                "prompt",
                &format!(
                    "{} tokens leave no room in the model's context of {context}",
                    prompt_ids.len()
                ),
            ));
        }
        // Stops at the end of the context, whatever max_tokens says.
        let max_tokens = params.max_tokens.min(context - prompt_ids.len());
        self.weights
            .start(prompt_ids.len() + max_tokens)
            .map_err(|e| err("inference", &e))?;
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else if params.top_p < 1.0 {
            Sampling::TopP {
                p: params.top_p,
                temperature: params.temperature,
            }
        } else {
            Sampling::All {
                temperature: params.temperature,
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling);
        let mut generated: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut input = prompt_ids.clone();
        let mut position = 0;
        while generated.len() < max_tokens {
            let (device, weights) = (&self.device, &mut self.weights);
            // Inside candle's thread pool, as in the embedder.
            let next = device
                .with_context(|| -> candle_core::Result<u32> {
                    let x = Tensor::new(input.as_slice(), device)?.unsqueeze(0)?;
                    let logits = weights.forward(&x, position)?.squeeze(0)?;
                    sampler.sample(&logits)
                })
                .map_err(|e| err("inference", &e))?;
            position += input.len();
            if next == self.end {
                break;
            }
            generated.push(next);
            input = vec![next];
            // Decode everything so far: a character may span several tokens.
            let all = self
                .tokenizer
                .decode(&generated, true)
                .map_err(|e| err("decode", &e))?;
            if all.len() > text.len()
                && all.is_char_boundary(text.len())
                && !all.ends_with('\u{fffd}')
            {
                let piece = all[text.len()..].to_owned();
                text = all;
                if !on_text(&piece) {
                    break;
                }
            }
        }
        let all = self
            .tokenizer
            .decode(&generated, true)
            .map_err(|e| err("decode", &e))?;
        Ok((all, generated.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback for CPUs without a SIMD Q4_1 kernel (this one may have
    /// it, so the conversion is called directly): Q4_1 tensors come back as
    /// Q8_0 with the same values to within Q8_0's step, others untouched.
    #[test]
    fn q4_1_tensors_are_re_encoded_as_q8_0_and_others_kept() -> candle_core::Result<()> {
        let cpu = Device::Cpu;
        let values: Vec<f32> = (0..64 * 32)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let w = Tensor::from_vec(values, (64, 32), &cpu)?;
        let q4 = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let f32s = QTensor::quantize(&w, GgmlDType::F32)?;
        let mut gguf = std::io::Cursor::new(Vec::new());
        let name = Value::String("tiny".into());
        gguf_file::write(
            &mut gguf,
            &[("general.name", &name)],
            &[("a", &q4), ("b", &f32s)],
        )?;
        gguf.set_position(0);
        let content = Content::read(&mut gguf)?;
        let bytes = requantize_q4_1(&content, &mut gguf)?.expect("a Q4_1 tensor to convert");
        let mut out = std::io::Cursor::new(bytes);
        let converted = Content::read(&mut out)?;
        let a = converted.tensor(&mut out, "a", &cpu)?;
        let b = converted.tensor(&mut out, "b", &cpu)?;
        assert_eq!(a.dtype(), GgmlDType::Q8_0);
        assert_eq!(b.dtype(), GgmlDType::F32);
        let before: Vec<f32> = q4.dequantize(&cpu)?.flatten_all()?.to_vec1()?;
        let after: Vec<f32> = a.dequantize(&cpu)?.flatten_all()?.to_vec1()?;
        // Q8_0's step is the block's largest magnitude (<= 2) / 127.
        for (x, y) in before.iter().zip(&after) {
            assert!((x - y).abs() <= 2.0 / 127.0, "{x} vs {y}");
        }
        // Nothing to convert: no copy.
        let mut plain = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut plain, &[("general.name", &name)], &[("b", &f32s)])?;
        plain.set_position(0);
        let content = Content::read(&mut plain)?;
        assert!(requantize_q4_1(&content, &mut plain)?.is_none());
        Ok(())
    }
}
