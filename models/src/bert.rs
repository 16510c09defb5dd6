//! Our BERT forward pass on the CPU, for the embedder: the computation of
//! `candle_transformers::models::bert` (absolute positions, post-norm
//! layers), on plain f32 buffers with the weights packed once at load
//! (`cpu-kernels`), and with the work candle spreads over many tensor passes
//! done in a few: Q, K and V in one product; bias, GELU and the residual
//! added while each tile of a product is in cache; attention per sentence
//! and head in one loop over its own tokens. Sentences are not padded to
//! the longest of the batch: each attends to its own tokens only, which is
//! what the attention mask makes of padding anyway.
//!
//! ```text
//!   tokens ─> word + position + type ─> LayerNorm ─┐
//!   ┌──────────────────────────────────────────────┘   (× layers)
//!   └> x·[Wq Wk Wv] ─> softmax(q·kᵀ/√d)·v per sentence and head ─> ·Wo + x ─> LayerNorm
//!      ─> GELU(·W1) ─> ·W2 + x ─> LayerNorm ─> mean over each sentence's tokens ─> unit vector
//! ```
//!
//! Tested against candle-transformers' BertModel on random weights (below)
//! and on the real all-MiniLM-L6-v2 weights (`tests/real_weights.rs`).

use candle_core::{Error, Result};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};
use rayon::prelude::*;

use cpu_kernels::ops::attend;
use cpu_kernels::{Epilogue, PackedLinear};

/// A BERT encoder with its weights in memory, for sentence embeddings.
pub struct CpuBert {
    hidden: usize,
    heads: usize,
    eps: f32,
    act: Activation,
    vocab: usize,
    max_positions: usize,
    /// `[vocab, hidden]`.
    word: Vec<f32>,
    /// `[max_positions, hidden]`.
    position: Vec<f32>,
    /// Token type 0's row (every input is one segment).
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for CpuBert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBert")
            .field("hidden", &self.hidden)
            .field("heads", &self.heads)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    Gelu,
    GeluTanh,
    Relu,
}

impl Activation {
    fn epilogue(self) -> Epilogue<'static> {
        match self {
            Self::Gelu => Epilogue::Gelu,
            Self::GeluTanh => Epilogue::GeluTanh,
            Self::Relu => Epilogue::Relu,
        }
    }
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    /// Q, K and V stacked: `3 × hidden` outputs.
    qkv: PackedLinear,
    attention_out: PackedLinear,
    attention_norm: Norm,
    intermediate: PackedLinear,
    output: PackedLinear,
    output_norm: Norm,
}

fn values(vb: &VarBuilder, dims: &[usize], name: &str) -> Result<Vec<f32>> {
    vb.get(dims, name)?.flatten_all()?.to_vec1::<f32>()
}

fn linear(vbs: &[VarBuilder], outputs: usize, inputs: usize) -> Result<PackedLinear> {
    let (mut weight, mut bias) = (Vec::new(), Vec::new());
    for vb in vbs {
        weight.extend(values(vb, &[outputs, inputs], "weight")?);
        bias.extend(values(vb, &[outputs], "bias")?);
    }
    Ok(PackedLinear::new(
        &weight,
        &bias,
        outputs * vbs.len(),
        inputs,
    ))
}

fn norm(vb: VarBuilder, size: usize) -> Result<Norm> {
    Ok(Norm {
        weight: values(&vb, &[size], "weight")?,
        bias: values(&vb, &[size], "bias")?,
    })
}

impl CpuBert {
    /// Reads the weights of a BERT checkpoint (the names candle-transformers' `BertModel` reads).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        if config.position_embedding_type != PositionEmbeddingType::Absolute {
            return Err(Error::Msg(
                "only absolute position embeddings are supported".into(),
            ));
        }
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || h % heads != 0 {
            return Err(Error::Msg(format!(
                "hidden size {h} is not a multiple of {heads} heads"
            )));
        }
        let word_name = "embeddings.word_embeddings.weight";
        let prefix = ["bert".to_string()]
            .into_iter()
            .chain(config.model_type.clone())
            .find(|p| vb.contains_tensor(&format!("{p}.{word_name}")));
        let vb = match prefix {
            Some(p) => vb.pp(p),
            None => vb,
        };
        let e = vb.pp("embeddings");
        let token_types = values(
            &e,
            &[config.type_vocab_size, h],
            "token_type_embeddings.weight",
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let s = a.pp("self");
            layers.push(Layer {
                qkv: linear(&[s.pp("query"), s.pp("key"), s.pp("value")], h, h)?,
                attention_out: linear(&[a.pp("output.dense")], h, h)?,
                attention_norm: norm(a.pp("output.LayerNorm"), h)?,
                intermediate: linear(&[l.pp("intermediate.dense")], config.intermediate_size, h)?,
                output: linear(&[l.pp("output.dense")], h, config.intermediate_size)?,
                output_norm: norm(l.pp("output.LayerNorm"), h)?,
            });
        }
        Ok(Self {
            hidden: h,
            heads,
            eps: config.layer_norm_eps as f32,
            act: match config.hidden_act {
                HiddenAct::Gelu => Activation::Gelu,
                HiddenAct::GeluApproximate => Activation::GeluTanh,
                HiddenAct::Relu => Activation::Relu,
            },
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            word: values(&e, &[config.vocab_size, h], "word_embeddings.weight")?,
            position: values(
                &e,
                &[config.max_position_embeddings, h],
                "position_embeddings.weight",
            )?,
            token_type: token_types[..h].to_vec(),
            embed_norm: norm(e.pp("LayerNorm"), h)?,
            layers,
        })
    }

    /// Each sentence's token ids (no padding) to its embedding: the mean of
    /// the last layer over its tokens, scaled to unit length.
    pub fn embed(&self, sentences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        // A batch of several sentences per thread: each thread runs the
        // whole forward pass for its share (about equal in tokens), so the
        // threads meet once instead of at every operation (each product,
        // norm and attention splits its work and joins). The operations
        // still split inside a share, which lets a thread that finishes
        // early help the other. One sentence, or a few, split by operation.
        let threads = rayon::current_num_threads();
        if threads > 1 && sentences.len() >= 4 * threads {
            let total: usize = sentences.iter().map(Vec::len).sum();
            let mut shares: Vec<&[Vec<u32>]> = Vec::with_capacity(threads);
            let (mut start, mut tokens) = (0, 0);
            for (i, ids) in sentences.iter().enumerate() {
                tokens += ids.len();
                if tokens * threads >= total * (shares.len() + 1) && shares.len() + 1 < threads {
                    shares.push(&sentences[start..=i]);
                    start = i + 1;
                }
            }
            shares.push(&sentences[start..]);
            let parts = shares
                .into_par_iter()
                .map(|share| self.embed_share(share))
                .collect::<Result<Vec<_>>>()?;
            return Ok(parts.concat());
        }
        self.embed_share(sentences)
    }

    /// [`CpuBert::embed`] for one thread's share of a batch.
    fn embed_share(&self, sentences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let h = self.hidden;
        let mut starts = Vec::with_capacity(sentences.len());
        let mut m = 0;
        for ids in sentences {
            if ids.is_empty() {
                return Err(Error::Msg("an input has no tokens".into()));
            }
            if ids.len() > self.max_positions {
                return Err(Error::Msg(format!(
                    "an input has {} tokens, more than the model's {} positions",
                    ids.len(),
                    self.max_positions
                )));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(Error::Msg(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
            starts.push(m);
            m += ids.len();
        }

        // Embeddings: word + position + token type, then LayerNorm.
        let mut x = vec![0f32; m * h];
        for (ids, &start) in sentences.iter().zip(&starts) {
            for (pos, &id) in ids.iter().enumerate() {
                let row = &mut x[(start + pos) * h..(start + pos + 1) * h];
                let word = &self.word[id as usize * h..(id as usize + 1) * h];
                let position = &self.position[pos * h..(pos + 1) * h];
                for (((o, w), p), t) in row.iter_mut().zip(word).zip(position).zip(&self.token_type)
                {
                    *o = w + p + t;
                }
            }
        }
        layer_norm(&mut x, &self.embed_norm, self.eps);

        let inter = self.layers.first().map_or(0, |l| l.intermediate.outputs());
        let (mut qkv, mut ctx, mut y) =
            (vec![0f32; m * 3 * h], vec![0f32; m * h], vec![0f32; m * h]);
        let mut hidden = vec![0f32; m * inter];
        for layer in &self.layers {
            layer.qkv.forward(&x, m, &mut qkv, Epilogue::None);
            self.attention(&qkv, sentences, &starts, &mut ctx);
            layer
                .attention_out
                .forward(&ctx, m, &mut y, Epilogue::Add(&x));
            std::mem::swap(&mut x, &mut y);
            layer_norm(&mut x, &layer.attention_norm, self.eps);
            layer
                .intermediate
                .forward(&x, m, &mut hidden, self.act.epilogue());
            layer.output.forward(&hidden, m, &mut y, Epilogue::Add(&x));
            std::mem::swap(&mut x, &mut y);
            layer_norm(&mut x, &layer.output_norm, self.eps);
        }

        // Mean over each sentence's tokens, then unit length.
        Ok(sentences
            .iter()
            .zip(&starts)
            .map(|(ids, &start)| {
                let mut mean = vec![0f32; h];
                for row in x[start * h..(start + ids.len()) * h].chunks_exact(h) {
                    mean.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                let n = ids.len() as f32;
                mean.iter_mut().for_each(|v| *v /= n);
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|v| *v /= norm);
                mean
            })
            .collect())
    }

    /// Self-attention of each sentence over its own tokens: `ctx` gets
    /// `softmax(q·kᵀ/√d)·v` for every head, side by side (`[m, hidden]`).
    fn attention(&self, qkv: &[f32], sentences: &[Vec<u32>], starts: &[usize], ctx: &mut [f32]) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        // Each sentence's rows of ctx, to fill in parallel.
        let mut parts = Vec::with_capacity(sentences.len());
        let mut rest = ctx;
        for (ids, &start) in sentences.iter().zip(starts) {
            let (mine, after) = rest.split_at_mut(ids.len() * h);
            parts.push((start, ids.len(), mine));
            rest = after;
        }
        parts.into_par_iter().for_each(|(start, len, out)| {
            // One head's queries, keys and values of this sentence, each
            // `len × d` (they sit `3 × h` apart in qkv), then its context
            // back into the sentence's rows.
            let rows = &qkv[start * 3 * h..(start + len) * 3 * h];
            let gather = |at: usize, into: &mut Vec<f32>| {
                into.clear();
                for r in rows.chunks_exact(3 * h) {
                    into.extend_from_slice(&r[at..at + d]);
                }
            };
            let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
            let (mut scores, mut context) = (Vec::new(), vec![0f32; len * d]);
            for head in 0..heads {
                let at = head * d;
                gather(at, &mut q);
                gather(h + at, &mut k);
                gather(2 * h + at, &mut v);
                attend(&q, d, &k, &v, scale, &mut scores, &mut context);
                for (o, c) in out.chunks_exact_mut(h).zip(context.chunks_exact(d)) {
                    o[at..at + d].copy_from_slice(c);
                }
            }
        });
    }
}

/// LayerNorm of each row of `x` (`[rows, weight.len()]`), in place.
fn layer_norm(x: &mut [f32], norm: &Norm, eps: f32) {
    let h = norm.weight.len();
    x.par_chunks_mut(h).with_min_len(64).for_each(|row| {
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use candle_transformers::models::bert::BertModel;

    fn config(act: HiddenAct) -> Config {
        Config {
            vocab_size: 50,
            hidden_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            intermediate_size: 80,
            hidden_act: act,
            hidden_dropout_prob: 0.0,
            max_position_embeddings: 32,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: PositionEmbeddingType::Absolute,
            use_cache: false,
            classifier_dropout: None,
            model_type: Some("bert".into()),
        }
    }

    /// candle-transformers' BertModel, padded batch and mask, mean-pooled and normalised.
    fn candle_embeddings(model: &BertModel, sentences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let device = Device::Cpu;
        let longest = sentences.iter().map(Vec::len).max().unwrap_or(0);
        let pad = |s: &Vec<u32>, fill: Option<u32>| -> Vec<u32> {
            let mut v: Vec<u32> = s.iter().map(|&t| fill.unwrap_or(t)).collect();
            v.resize(longest, 0);
            v
        };
        let ids = Tensor::new(
            sentences.iter().map(|s| pad(s, None)).collect::<Vec<_>>(),
            &device,
        )?;
        let mask = Tensor::new(
            sentences
                .iter()
                .map(|s| pad(s, Some(1)))
                .collect::<Vec<_>>(),
            &device,
        )?;
        let hidden = model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let mean = hidden
            .broadcast_mul(&mask)?
            .sum(1)?
            .broadcast_div(&mask.sum(1)?)?;
        mean.broadcast_div(&mean.sqr()?.sum_keepdim(1)?.sqrt()?)?
            .to_vec2()
    }

    /// candle-transformers' model and ours on the same random weights.
    fn both(act: HiddenAct) -> Result<(BertModel, CpuBert)> {
        let device = Device::Cpu;
        let config = config(act);
        let varmap = VarMap::new();
        let vb = || VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let theirs = BertModel::load(vb(), &config)?;
        for var in varmap.all_vars() {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &device)?)?;
        }
        Ok((theirs, CpuBert::load(vb(), &config)?))
    }

    #[test]
    fn ours_equals_candle_transformers_on_random_weights() -> Result<()> {
        let sentences: Vec<Vec<u32>> = vec![
            vec![1, 5, 9, 2],
            vec![1, 7, 2],
            vec![1, 3, 4, 8, 11, 13, 40, 2],
            vec![6],
        ];
        for act in [HiddenAct::Gelu, HiddenAct::GeluApproximate, HiddenAct::Relu] {
            let (theirs, ours) = both(act)?;
            let want = candle_embeddings(&theirs, &sentences)?;
            let got = ours.embed(&sentences)?;
            // Alone or in a batch, a sentence gets the same vector.
            let alone = ours.embed(&sentences[1..2])?;
            for (g, w) in got.iter().zip(&want) {
                for (a, b) in g.iter().zip(w) {
                    assert!((a - b).abs() < 1e-4, "{act:?}: {a} vs {b}");
                }
            }
            for (a, b) in alone[0].iter().zip(&got[1]) {
                assert!((a - b).abs() < 1e-5, "{act:?} alone: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_batch_split_between_threads_gives_each_sentence_its_own_vector() -> Result<()> {
        let (_, ours) = both(HiddenAct::Gelu)?;
        // Enough sentences to be split by thread (on two or more threads),
        // of uneven lengths.
        let n = 4 * rayon::current_num_threads() + 3;
        let sentences: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                (0..1 + (i * 7) % 13)
                    .map(|t| ((i * 5 + t * 3) % 49) as u32 + 1)
                    .collect()
            })
            .collect();
        let batch = ours.embed(&sentences)?;
        assert_eq!(batch.len(), n);
        for (i, s) in sentences.iter().enumerate() {
            let alone = ours.embed(std::slice::from_ref(s))?.remove(0);
            for (a, b) in alone.iter().zip(&batch[i]) {
                assert!((a - b).abs() < 1e-5, "sentence {i}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let (_, ours) = both(HiddenAct::Gelu)?;
        let e = ours
            .embed(&[vec![1, 50]])
            .expect_err("id 50 is past the vocabulary");
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
        let e = ours
            .embed(&[vec![1; 33]])
            .expect_err("33 tokens, 32 positions");
        assert!(e.to_string().contains("positions"), "{e}");
        assert!(ours.embed(&[vec![]]).is_err());
        assert!(ours.embed(&[])?.is_empty());
        Ok(())
    }
}
