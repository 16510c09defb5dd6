//! The generation plumbing on a tiny random-weight llama written as a GGUF
//! in memory (no files): the real loader, tokenizer-from-metadata, sampling
//! loop and serving thread; streaming, cancellation and a bounded queue.

mod common;

use std::io::Cursor;
use std::time::Duration;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use models::generate::Params;
use models::{GenerateService, Generator, Piece, ServeConfig};

const HIDDEN: usize = 16;
const HEADS: usize = 4;
/// Two query heads per key/value head, as in SmolLM2 (three there).
const KV_HEADS: usize = 2;
const BLOCKS: usize = 2;
const FFN: usize = 32;

fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    v.extend(('a'..='z').map(String::from));
    v.push("Ġ".into()); // byte-level space
    v.push("Ċ".into()); // byte-level newline
    v.push("ab".into()); // the one merge
    v
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: &mut u64) -> QTensor {
    let n = shape.iter().product();
    let t = Tensor::from_vec(values(n, seed), shape, &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, GgmlDType::F32).expect("quantize")
}

fn ones(n: usize) -> QTensor {
    let t = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).expect("ones");
    QTensor::quantize(&t, GgmlDType::F32).expect("quantize")
}

/// A two-block llama with a 32-token vocabulary and f32 weights, as GGUF bytes.
fn tiny_gguf() -> Vec<u8> {
    let vocab = vocab();
    let mut seed = 7u64;
    let mut output = values(vocab.len() * HIDDEN, &mut seed);
    // Control tokens never win the argmax: generation runs to max_tokens.
    for x in &mut output[..3 * HIDDEN] {
        *x = -10.0;
    }
    let output = QTensor::quantize(
        &Tensor::from_vec(output, (vocab.len(), HIDDEN), &Device::Cpu).expect("tensor"),
        GgmlDType::F32,
    )
    .expect("quantize");
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            tensor(&[vocab.len(), HIDDEN], &mut seed),
        ),
        ("output_norm.weight".into(), ones(HIDDEN)),
        ("output.weight".into(), output),
    ];
    let kv = KV_HEADS * HIDDEN / HEADS;
    for block in 0..BLOCKS {
        let mut add =
            |name: &str, t: QTensor| tensors.push((format!("blk.{block}.{name}.weight"), t));
        add("attn_q", tensor(&[HIDDEN, HIDDEN], &mut seed));
        add("attn_k", tensor(&[kv, HIDDEN], &mut seed));
        add("attn_v", tensor(&[kv, HIDDEN], &mut seed));
        add("attn_output", tensor(&[HIDDEN, HIDDEN], &mut seed));
        add("ffn_gate", tensor(&[FFN, HIDDEN], &mut seed));
        add("ffn_up", tensor(&[FFN, HIDDEN], &mut seed));
        add("ffn_down", tensor(&[HIDDEN, FFN], &mut seed));
        add("attn_norm", ones(HIDDEN));
        add("ffn_norm", ones(HIDDEN));
    }

    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let types = Value::Array(
        (0..vocab.len())
            .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
            .collect(),
    );
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.block_count", Value::U32(BLOCKS as u32)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        (
            "llama.rope.dimension_count",
            Value::U32((HIDDEN / HEADS) as u32),
        ),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.context_length", Value::U32(512)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&vocab)),
        ("tokenizer.ggml.merges", strings(&["a b".to_string()])),
        ("tokenizer.ggml.token_type", types),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).expect("write gguf");
    out.into_inner()
}

fn tiny_generator() -> Generator {
    Generator::from_reader("tiny-llama", &mut Cursor::new(tiny_gguf()), &Device::Cpu)
        .expect("load tiny gguf")
}

#[test]
fn the_tokenizer_comes_from_the_metadata_and_generation_is_deterministic() {
    let mut g = tiny_generator();
    let ids = g
        .tokenizer()
        .encode("<|im_start|>ab cd<|im_end|>", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    let params = Params {
        max_tokens: 12,
        ..Params::default()
    };
    let (a, n) = g.generate("abc", &params, |_| true).expect("generate");
    let (b, _) = g.generate("abc", &params, |_| true).expect("generate");
    assert_eq!(n, 12);
    assert_eq!(a, b, "greedy decoding is deterministic");
    let sampled = Params {
        temperature: 1.0,
        top_p: 0.9,
        seed: 5,
        max_tokens: 12,
    };
    let (c, _) = g.generate("abc", &sampled, |_| true).expect("sample");
    let (d, _) = g.generate("abc", &sampled, |_| true).expect("sample");
    assert_eq!(c, d, "the same seed samples the same text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_generator_streams_cancels_and_refuses_when_full() {
    let service = GenerateService::start(
        "tiny-llama",
        tiny_generator(),
        ServeConfig {
            queue: 1,
            ..ServeConfig::default()
        },
    );
    let mut stream = service
        .generate(
            "abc".into(),
            Params {
                max_tokens: 10,
                ..Params::default()
            },
        )
        .expect("queued");
    let mut pieces = String::new();
    let (text, tokens) = loop {
        match stream.recv().await.expect("piece") {
            Piece::Text(t) => pieces.push_str(&t),
            Piece::Done { text, tokens } => break (text, tokens),
            Piece::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(tokens, 10);
    assert_eq!(pieces, text);

    // A long request, cancelled by dropping its stream after a few pieces.
    let mut long = service
        .generate(
            "abc".into(),
            Params {
                max_tokens: 100_000,
                ..Params::default()
            },
        )
        .expect("queued");
    for _ in 0..3 {
        long.recv().await.expect("piece");
    }
    // While it runs, the queue of one takes one more and refuses the next.
    let queued = service.generate(
        "b".into(),
        Params {
            max_tokens: 1,
            ..Params::default()
        },
    );
    let refused = service.generate(
        "c".into(),
        Params {
            max_tokens: 1,
            ..Params::default()
        },
    );
    assert!(queued.is_ok());
    let e = refused.expect_err("the queue is full");
    assert!(e.retryable(), "{e}");
    drop(long);
    // The cancelled request ends soon and the queued one is answered.
    let mut next = queued.expect("queued");
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(p) = next.recv().await {
            if matches!(p, Piece::Done { .. }) {
                return true;
            }
        }
        false
    })
    .await
    .expect("the cancelled request stopped and the next one ran");
    assert!(answered);
}

/// Our forward pass (with its own decode step on the CPU) against
/// candle-transformers' on the same f32 weights: a prompt, then single
/// tokens. With f32 weights no activation is quantized, so the two agree
/// to rounding (the real Q4_1 model is checked in tests/real_weights.rs).
#[test]
fn our_llama_gives_candle_transformers_logits_on_f32_weights() {
    let next = |step: usize| 3 + (step as u32 * 7) % 26;
    common::llama_side_by_side(
        &tiny_gguf(),
        &[1, 5, 9, 12, 30],
        7,
        Some(&next),
        |step, a, b| {
            let (worst, _) = common::differences(a, b);
            assert!(worst < 1e-4, "step {step}: logits differ by up to {worst}");
        },
    );
}
