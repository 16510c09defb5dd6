//! With the real weights (scripts/models.sh puts them in place; scripts/test.sh
//! runs it): the numbers the issue asks for.

mod common;

use models::{
    chat_prompt, cosine, default_models_dir, Embedder, Generator, Params, MINILM, SMOLLM2,
};

fn dir() -> std::path::PathBuf {
    let dir = default_models_dir();
    assert!(
        dir.join(MINILM.files[0].path).exists(),
        "no model weights in {}: run scripts/models.sh first",
        dir.display()
    );
    dir
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let embedder = Embedder::load(&MINILM, &dir(), &models::device()).expect("load");
    let v = embedder
        .embed(&[
            "The cat sits on the mat.",
            "A kitten is resting on a rug.",
            "Stock markets fell sharply today.",
        ])
        .expect("embed");
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|e| e.len() == 384));
    for e in &v {
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let similar = cosine(&v[0], &v[1]);
    let unrelated = cosine(&v[0], &v[2]);
    println!("cos(cat, kitten) = {similar:.4} (Python: 0.641); cos(cat, stocks) = {unrelated:.4} (Python: 0.046)");
    assert!((similar - 0.64).abs() <= 0.02, "{similar}");
    assert!((unrelated - 0.05).abs() <= 0.05, "{unrelated}");
    // Batching does not change a vector.
    let alone = embedder
        .embed(&["The cat sits on the mat."])
        .expect("embed");
    assert!(cosine(&alone[0], &v[0]) > 0.9999);
}

#[test]
fn smollm2_continues_the_capital_of_france_with_paris() {
    let mut generator = Generator::load(&SMOLLM2, &dir(), &models::device()).expect("load");
    let greedy = Params {
        max_tokens: 8,
        ..Params::default()
    };
    let mut streamed = String::new();
    let (text, n) = generator
        .generate("The capital of France is", &greedy, |piece| {
            streamed.push_str(piece);
            true
        })
        .expect("generate");
    println!("'The capital of France is' → {text:?} ({n} tokens)");
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(streamed, text, "the streamed pieces add up to the text");
    let chat = Params {
        max_tokens: 24,
        ..Params::default()
    };
    let (answer, _) = generator
        .generate(
            &chat_prompt("What is the capital of France?"),
            &chat,
            |_| true,
        )
        .expect("chat");
    println!("chat 'What is the capital of France?' → {answer:?} (printed, not asserted: a near tie for this 4-bit 135M model)");
}

#[test]
fn the_gguf_tokenizer_round_trips_text_and_keeps_control_tokens_whole() {
    let generator = Generator::load(&SMOLLM2, &dir(), &models::device()).expect("load");
    let tokenizer = generator.tokenizer();
    for text in [
        "The capital of France is Paris.",
        "naïve café, Zürich — 東京 🚀 12345",
        "  leading spaces\tand\ttabs\n",
    ] {
        let ids = tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec();
        let back = tokenizer.decode(&ids, false).expect("decode");
        assert_eq!(back, text);
    }
    let ids = tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1), "<|im_start|> is token 1: {ids:?}");
    assert_eq!(ids.last(), Some(&2), "<|im_end|> is token 2: {ids:?}");
}

#[test]
fn our_llama_gives_candle_transformers_logits() {
    let gguf = models::registry::read_verified(&SMOLLM2, &dir())
        .expect("read")
        .remove(0);
    // A prompt (the masked path), then single tokens (the decode step).
    let prompt = [504, 3575, 282, 4649, 314];
    common::llama_side_by_side(&gguf, &prompt, 5, None, |step, a, b| {
        let (worst, mean) = common::differences(a, b);
        let best = |v: &[f32]| -> (usize, f32, f32) {
            let mut sorted: Vec<(usize, f32)> = v.iter().copied().enumerate().collect();
            sorted.sort_by(|x, y| y.1.total_cmp(&x.1));
            (sorted[0].0, sorted[0].1, sorted[1].1)
        };
        let ((next, _, _), (their_next, top, second)) = (best(a), best(b));
        if step == 0 {
            // The prompt runs the same tensor operations as candle-transformers.
            assert!(worst < 1e-3, "prompt: logits differ by up to {worst}");
        } else {
            // A decode step runs on plain slices (decode_on_cpu), which rounds
            // differently; before each matmul the activations are quantized
            // to 8 bits, which turns rounding into differences of this size:
            // scaling the input embedding by 1 + 1e-6 in candle-transformers'
            // own path moves these logits by up to 0.7 (0.06–0.26 on average).
            // A wrong computation moves them by their own size (2–17 here).
            // Exactness is checked on f32 weights in tests/tiny_gguf.rs.
            assert!(
                mean < 0.15 && worst < 1.5,
                "step {step}: logits differ by {mean} on average, up to {worst}"
            );
            if top - second > 0.5 {
                assert_eq!(next, their_next, "step {step}: a different greedy token");
            }
        }
    });
}

#[test]
fn our_bert_gives_candle_transformers_embeddings() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::{BertModel, Config};
    use models::bert::CpuBert;

    let [weights, tokenizer, config]: [Vec<u8>; 3] =
        models::registry::read_verified(&MINILM, &dir())
            .expect("read")
            .try_into()
            .expect("weights, tokenizer, config");
    let config: Config = serde_json::from_slice(&config).expect("config");
    let tokenizer = tokenizers::Tokenizer::from_bytes(&tokenizer).expect("tokenizer");
    let cpu = Device::Cpu;
    let vb =
        || VarBuilder::from_buffered_safetensors(weights.clone(), DType::F32, &cpu).expect("vb");
    let theirs = BertModel::load(vb(), &config).expect("theirs");
    let ours = CpuBert::load(vb(), &config).expect("ours");

    // Sentences of different lengths, each through both alone.
    for text in [
        "The cat sits on the mat.",
        "Stock markets fell sharply today, and nobody was surprised at all.",
        "Hi",
    ] {
        let ids = tokenizer
            .encode(text, true)
            .expect("encode")
            .get_ids()
            .to_vec();
        let input = Tensor::new(ids.as_slice(), &cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let hidden = theirs
            .forward(&input, &input.zeros_like().expect("types"), None)
            .expect("forward");
        let mean = hidden.mean(1).expect("mean");
        let mean = mean
            .broadcast_div(
                &mean
                    .sqr()
                    .and_then(|s| s.sum_keepdim(1))
                    .and_then(|s| s.sqrt())
                    .expect("norm"),
            )
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("unit");
        let got = ours.embed(&[ids]).expect("ours").remove(0);
        let worst = got
            .iter()
            .zip(&mean)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{text:?}: largest difference {worst}");
    }
}
