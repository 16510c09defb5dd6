//! The Llama forward pass that SmolLM2 runs on: GGUF weights, quantized
//! matmuls, interleaved RoPE, grouped-query attention.
//!
//! Derived from candle-transformers 0.11.1 `models::quantized_llama`
//! (Apache-2.0 OR MIT), which computes the same function, with two changes
//! for decoding, where each new token used to copy the whole context:
//! - the KV cache is allocated once per generation, sized for the prompt and
//!   the new tokens (`candle_nn::kv_cache::KvCache`), and each token is
//!   written into it in place (the original concatenated the whole cache
//!   with each new token);
//! - a single query token attends per key/value head group: the query heads
//!   that share a KV head are one matrix against that head's keys, instead
//!   of the keys and values being copied once per query head
//!   (`repeat_kv`; SmolLM2 has 9 query heads on 3 KV heads).
//!
//! The prompt (many query tokens at once) takes the original path. And the
//! projections that read the same input run as one matmul (Q, K and V; the
//! MLP's gate and up), their weights stacked at load: fewer passes over the
//! activations and fewer hand-offs to the matmul threads.
//!
//! On the CPU a decode step (one new token) leaves tensors for everything
//! but the matmuls (`decode_on_cpu`): RMS norm, RoPE, the attention over the
//! cache and the SiLU gate run on plain slices (`cpu_kernels::ops`).
//! They are too small to split between threads, and as tensor operations
//! (about 20 a layer, each allocating) they kept the matmul threads waiting
//! on the calling one.
//! `tests/real_weights.rs` checks the logits against candle-transformers'
//! model on the real weights.

use std::borrow::Cow;
use std::io::{Read, Seek};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Storage, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::{build_causal_mask, repeat_kv};

/// Projections of one input: one matmul over their stacked weights when
/// they share a quantization, else one each.
enum Projections {
    Stacked { matmul: QMatMul, widths: Vec<usize> },
    Separate(Vec<QMatMul>),
}

impl Projections {
    fn new(parts: Vec<QTensor>) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| candle_core::Error::Msg("no projection".into()))?;
        let (dtype, (_, k)) = (first.dtype(), first.shape().dims2()?);
        let mut widths = Vec::with_capacity(parts.len());
        for p in &parts {
            let (n, pk) = p.shape().dims2()?;
            if p.dtype() != dtype || pk != k {
                return Ok(Self::Separate(
                    parts
                        .into_iter()
                        .map(QMatMul::from_qtensor)
                        .collect::<Result<_>>()?,
                ));
            }
            widths.push(n);
        }
        // Rows are stored one after another, so stacking rows is
        // concatenating the bytes.
        let mut bytes = Vec::new();
        for p in &parts {
            bytes.extend_from_slice(&p.data()?);
        }
        let device = first.device();
        let storage = QStorage::from_data(Cow::Owned(bytes), &device, dtype)?;
        let stacked = QTensor::new(storage, (widths.iter().sum::<usize>(), k))?;
        Ok(Self::Stacked {
            matmul: QMatMul::from_qtensor(stacked)?,
            widths,
        })
    }

    /// All outputs side by side, as one vector (`x` is one row).
    fn forward_row(&self, x: &Tensor) -> Result<Vec<f32>> {
        match self {
            Self::Stacked { matmul, .. } => matmul.forward(x)?.flatten_all()?.to_vec1(),
            Self::Separate(ms) => {
                let mut out = Vec::new();
                for m in ms {
                    out.extend(m.forward(x)?.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(out)
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(ms) => ms.iter().map(|m| m.forward(x)).collect(),
            Self::Stacked { matmul, widths } => {
                let y = matmul.forward(x)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(widths.len());
                for &w in widths {
                    out.push(y.narrow(D::Minus1, start, w)?);
                    start += w;
                }
                Ok(out)
            }
        }
    }
}

struct Layer {
    qkv: Projections,
    wo: QMatMul,
    attention_norm: RmsNorm,
    gate_up: Projections,
    down: QMatMul,
    ffn_norm: RmsNorm,
    /// The two norms' weights as plain vectors, for `decode_on_cpu`.
    attention_norm_weight: Vec<f32>,
    ffn_norm_weight: Vec<f32>,
    cache: KvCache,
}

/// A Llama model read from GGUF.
pub struct Llama {
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    norm_weight: Vec<f32>,
    eps: f32,
    output: QMatMul,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    /// cos and sin as plain `[context, rope_dim / 2]` vectors, for `decode_on_cpu`.
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
    neg_inf: Tensor,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("layers", &self.layers.len())
            .field("n_head", &self.n_head)
            .field("n_kv_head", &self.n_kv_head)
            .field("head_dim", &self.head_dim)
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// The longest sequence (prompt and new tokens) the model is run on.
    pub fn context_length(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Reads the model from GGUF. Only the `llama` architecture (interleaved
    /// RoPE, no mixture of experts) is accepted.
    pub fn from_gguf<R: Read + Seek>(
        content: Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let md = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata lacks {key}")))
        };
        let arch = md("general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            candle_core::bail!("architecture {arch:?} is not supported (only llama)");
        }
        if content
            .metadata
            .get("llama.expert_count")
            .and_then(|v| v.to_u32().ok())
            .is_some_and(|n| n > 1)
        {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        let n_head = md("llama.attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("llama.attention.head_count_kv")?.to_u32()? as usize;
        let n_layer = md("llama.block_count")?.to_u32()? as usize;
        let n_embd = md("llama.embedding_length")?.to_u32()? as usize;
        let rope_dim = md("llama.rope.dimension_count")?.to_u32()? as usize;
        let eps = md("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let context = md("llama.context_length")?.to_u32()? as usize;
        let freq_base = content
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        if n_head == 0
            || n_kv_head == 0
            || !n_head.is_multiple_of(n_kv_head)
            || !n_embd.is_multiple_of(n_head)
        {
            candle_core::bail!(
                "inconsistent heads: {n_head} query heads, {n_kv_head} KV heads, width {n_embd}"
            );
        }
        let (cos, sin) = rope_tables(rope_dim, freq_base, context, device)?;

        let embeddings_q = content.tensor(reader, "token_embd.weight", device)?;
        let embeddings = Embedding::new(embeddings_q.dequantize(device)?, n_embd);
        // A norm's weights, read once: as candle's RmsNorm (the tensor path)
        // and as a plain vector (the CPU decode step).
        let norm_of = |t: QTensor| -> Result<(RmsNorm, Vec<f32>)> {
            let weight = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            Ok((RmsNorm::from_qtensor(t, eps)?, weight))
        };
        let (norm, norm_weight) = norm_of(content.tensor(reader, "output_norm.weight", device)?)?;
        // Tied embeddings when the file has no output matrix.
        let output = match content.tensor(reader, "output.weight", device) {
            Ok(t) => t,
            Err(_) => embeddings_q,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut w =
                |name: &str| content.tensor(reader, &format!("blk.{i}.{name}.weight"), device);
            let (attention_norm, attention_norm_weight) = norm_of(w("attn_norm")?)?;
            let (ffn_norm, ffn_norm_weight) = norm_of(w("ffn_norm")?)?;
            layers.push(Layer {
                qkv: Projections::new(vec![w("attn_q")?, w("attn_k")?, w("attn_v")?])?,
                wo: QMatMul::from_qtensor(w("attn_output")?)?,
                attention_norm,
                gate_up: Projections::new(vec![w("ffn_gate")?, w("ffn_up")?])?,
                down: QMatMul::from_qtensor(w("ffn_down")?)?,
                ffn_norm,
                attention_norm_weight,
                ffn_norm_weight,
                cache: KvCache::new(2, 1),
            });
        }
        Ok(Self {
            embeddings,
            layers,
            norm,
            norm_weight,
            eps: eps as f32,
            output: QMatMul::from_qtensor(output)?,
            n_head,
            n_kv_head,
            head_dim: n_embd / n_head,
            cos_values: cos.flatten_all()?.to_vec1()?,
            sin_values: sin.flatten_all()?.to_vec1()?,
            cos,
            sin,
            neg_inf: Tensor::new(f32::NEG_INFINITY, device)?,
        })
    }

    /// Starts a new sequence of up to `tokens` tokens (prompt and new ones):
    /// the caches forget the last one and are allocated once for this one.
    pub fn start(&mut self, tokens: usize) -> Result<()> {
        if tokens > self.context_length() {
            candle_core::bail!(
                "{tokens} tokens do not fit the model's context of {}",
                self.context_length()
            );
        }
        for layer in &mut self.layers {
            layer.cache = KvCache::new(2, tokens.max(1));
        }
        Ok(())
    }

    /// Logits of the next token after `x` (`(batch, tokens)` of ids), the
    /// first of which sits at `index_pos` in the sequence.
    pub fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_, seq_len) = x.dims2()?;
        if index_pos + seq_len > self.context_length() {
            candle_core::bail!(
                "position {} is past the model's context of {}",
                index_pos + seq_len,
                self.context_length()
            );
        }
        if seq_len == 1 && x.device().is_cpu() {
            return self.decode_on_cpu(x, index_pos);
        }
        let mask = if seq_len == 1 {
            None
        } else {
            Some(build_causal_mask(seq_len, index_pos, x.device())?)
        };
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        let shape = Shape {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        };
        let mut h = self.embeddings.forward(x)?;
        for layer in &mut self.layers {
            let a = layer.attention_norm.forward(&h)?;
            let a = layer.attention(&a, mask.as_ref(), &cos, &sin, &self.neg_inf, shape)?;
            h = (a + h)?;
            let f = layer.ffn_norm.forward(&h)?;
            let [gate, up]: [Tensor; 2] = layer
                .gate_up
                .forward(&f)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate and up".into()))?;
            let f = layer.down.forward(&(gate.silu()? * up)?)?;
            h = (f + h)?;
        }
        let h = self.norm.forward(&h)?;
        self.output.forward(&h.i((.., seq_len - 1, ..))?)
    }
}

impl Llama {
    /// One new token on the CPU: the matmuls through candle (its quantized
    /// kernels and threads), everything between them on plain slices.
    fn decode_on_cpu(&mut self, x: &Tensor, position: usize) -> Result<Tensor> {
        use cpu_kernels::ops::{attend, rms_norm, rope_interleaved, silu_mul};
        let device = x.device().clone();
        let token = x.flatten_all()?.to_vec1::<u32>()?[0] as usize;
        let (n_head, n_kv_head, d) = (self.n_head, self.n_kv_head, self.head_dim);
        let (n_embd, n_rep) = (n_head * d, n_head / n_kv_head);
        let half = self.cos_values.len() / self.context_length();
        if half * 2 != d {
            candle_core::bail!(
                "RoPE over {} of a head's {d} dimensions is not supported",
                half * 2
            );
        }
        let cos = &self.cos_values[position * half..(position + 1) * half];
        let sin = &self.sin_values[position * half..(position + 1) * half];
        let scale = 1.0 / (d as f32).sqrt();
        let row = |v: &[f32]| Tensor::from_slice(v, (1, v.len()), &device);
        let matmul = |m: &QMatMul, v: &[f32]| -> Result<Vec<f32>> {
            m.forward(&row(v)?)?.flatten_all()?.to_vec1()
        };

        let mut h: Vec<f32> = self.embeddings.embeddings().get(token)?.to_vec1()?;
        let (mut normed, mut y, mut scores) = (vec![0f32; n_embd], vec![0f32; n_embd], Vec::new());
        for layer in &mut self.layers {
            rms_norm(&h, &layer.attention_norm_weight, self.eps, &mut normed);
            let mut qkv = layer.qkv.forward_row(&row(&normed)?)?;
            let (q, kv) = qkv.split_at_mut(n_embd);
            let (k, v) = kv.split_at_mut(n_kv_head * d);
            rope_interleaved(q, d, cos, sin);
            rope_interleaved(k, d, cos, sin);
            let k = Tensor::from_slice(k, (1, n_kv_head, 1, d), &device)?;
            let v = Tensor::from_slice(v, (1, n_kv_head, 1, d), &device)?;
            let (keys, values) = layer.cache.append(&k, &v)?;
            let positions = keys.dim(2)?;
            {
                // The cache's views: (1, n_kv_head, positions, d), rows contiguous.
                let (ks, kl) = keys.storage_and_layout();
                let (vs, vl) = values.storage_and_layout();
                let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&*ks, &*vs) else {
                    candle_core::bail!("the KV cache is not in CPU memory");
                };
                let (ks, vs) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
                if kl.stride()[2..] != [d, 1] || vl.stride()[2..] != [d, 1] {
                    candle_core::bail!("the KV cache's rows are not contiguous");
                }
                for g in 0..n_kv_head {
                    let k0 = kl.start_offset() + g * kl.stride()[1];
                    let v0 = vl.start_offset() + g * vl.stride()[1];
                    let heads = g * n_rep * d..(g + 1) * n_rep * d;
                    attend(
                        &q[heads.clone()],
                        d,
                        &ks[k0..k0 + positions * d],
                        &vs[v0..v0 + positions * d],
                        scale,
                        &mut scores,
                        &mut y[heads],
                    );
                }
            }
            let o = matmul(&layer.wo, &y)?;
            h.iter_mut().zip(&o).for_each(|(h, o)| *h += o);
            rms_norm(&h, &layer.ffn_norm_weight, self.eps, &mut normed);
            let gate_up = layer.gate_up.forward_row(&row(&normed)?)?;
            let (gate, up) = gate_up.split_at(gate_up.len() / 2);
            let mut act = vec![0f32; gate.len()];
            silu_mul(gate, up, &mut act);
            let down = matmul(&layer.down, &act)?;
            h.iter_mut().zip(&down).for_each(|(h, d)| *h += d);
        }
        rms_norm(&h, &self.norm_weight, self.eps, &mut normed);
        self.output.forward(&row(&normed)?)
    }
}

#[derive(Clone, Copy)]
struct Shape {
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Layer {
    fn attention(
        &mut self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        neg_inf: &Tensor,
        s: Shape,
    ) -> Result<Tensor> {
        let (b, seq_len, n_embd) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, seq_len, n, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q, k and v".into()))?;
        let q = heads(q, s.n_head)?;
        let k = heads(k, s.n_kv_head)?;
        let v = heads(v, s.n_kv_head)?;
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        // Views of the cache: (b, n_kv_head, tokens so far, head_dim).
        let (k, v) = self.cache.append(&k, &v)?;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let n_rep = s.n_head / s.n_kv_head;
        let y = if seq_len == 1 {
            // Query heads g*n_rep .. g*n_rep+n_rep share KV head g: one
            // (n_rep, head_dim) matrix per group, no copy of the cache.
            let q = q.reshape((b, s.n_kv_head, n_rep, s.head_dim))?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            att.matmul(&v)?.reshape((b, 1, n_embd))?
        } else {
            let k = repeat_kv(k.contiguous()?, n_rep)?;
            let v = repeat_kv(v.contiguous()?, n_rep)?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match mask {
                None => att,
                Some(mask) => {
                    let mask = mask.broadcast_as(att.shape())?;
                    mask.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?
                }
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            att.matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, seq_len, n_embd))?
        };
        self.wo.forward(&y)
    }
}

/// cos and sin of RoPE's angles for every position of the context.
fn rope_tables(dim: usize, base: f32, context: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let angles = Tensor::arange(0, context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn weights(rows: usize, seed: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * 64)
            .map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        Tensor::from_vec(v, (rows, 64), &Device::Cpu).expect("tensor")
    }

    /// Stacked (same quantization) and separate (mixed) projections give what
    /// each matrix gives alone.
    #[test]
    fn projections_match_their_matrices_stacked_or_not() -> Result<()> {
        let x = weights(3, 7).reshape((1, 3, 64))?;
        let parts = [weights(32, 1), weights(8, 2), weights(8, 3)];
        for dtypes in [
            [GgmlDType::Q8_0; 3],
            [GgmlDType::Q8_0, GgmlDType::F32, GgmlDType::Q8_0],
        ] {
            let quantize = || -> Result<Vec<QTensor>> {
                parts
                    .iter()
                    .zip(dtypes)
                    .map(|(w, d)| QTensor::quantize(w, d))
                    .collect()
            };
            let alone: Vec<Tensor> = quantize()?
                .into_iter()
                .map(|t| QMatMul::from_qtensor(t)?.forward(&x))
                .collect::<Result<_>>()?;
            let p = Projections::new(quantize()?)?;
            let stacked = matches!(p, Projections::Stacked { .. });
            assert_eq!(stacked, dtypes[0] == dtypes[1], "{dtypes:?}");
            for (got, want) in p.forward(&x)?.iter().zip(&alone) {
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{dtypes:?}: differs by {diff}");
            }
        }
        Ok(())
    }
}
