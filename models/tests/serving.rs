//! The serving plumbing with tiny models built in the test (no files):
//! batching, backpressure, streaming, cancellation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config, HiddenAct, PositionEmbeddingType};
use models::generate::Params;
use models::serve::{EmbedBatch, GenerateText};
use models::{cosine, EmbedService, Embedder, GenerateService, ModelError, Piece, ServeConfig};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{PaddingParams, Tokenizer};

const WORDS: &[&str] = &[
    "[PAD]", "[UNK]", "the", "cat", "sits", "on", "mat", "a", "dog", "runs",
];

/// A one-layer BERT with random weights and a word-level tokenizer.
fn tiny_embedder() -> Embedder {
    let device = Device::Cpu;
    let config = Config {
        vocab_size: WORDS.len(),
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 32,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.0,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        initializer_range: 0.02,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        position_embedding_type: PositionEmbeddingType::Absolute,
        use_cache: false,
        classifier_dropout: None,
        model_type: Some("bert".into()),
    };
    // Loading candle's BertModel makes the variables; then they get random values.
    let varmap = VarMap::new();
    BertModel::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &config,
    )
    .expect("tiny bert");
    for var in varmap.all_vars() {
        let random = Tensor::randn(0f32, 0.5, var.shape(), &device).expect("randn");
        var.set(&random).expect("set");
    }
    let vocab = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let wordlevel = WordLevel::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .expect("word level");
    let mut tokenizer = Tokenizer::new(wordlevel);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer.with_padding(Some(PaddingParams::default()));
    Embedder::from_parts(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &config,
        tokenizer,
        &device,
        "tiny-bert",
    )
    .expect("tiny embedder")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_match_single_runs() {
    let reference = tiny_embedder();
    let texts = ["the cat sits on the mat", "a dog runs", "the dog", "cat"];
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| reference.embed(&[t]).expect("embed").remove(0))
        .collect();
    let service = EmbedService::start(
        "tiny-bert",
        reference,
        ServeConfig {
            max_batch: 64,
            max_wait: Duration::from_millis(50),
            queue: 64,
        },
    );
    let mut tasks = Vec::new();
    for i in 0..20 {
        let service = service.clone();
        let text = texts[i % texts.len()].to_string();
        tasks.push(tokio::spawn(
            async move { (i, service.embed(vec![text]).await) },
        ));
    }
    for task in tasks {
        let (i, result) = task.await.expect("task");
        let v = result.expect("embedded");
        assert_eq!(v.len(), 1);
        let c = cosine(&v[0], &alone[i % texts.len()]);
        assert!(
            c > 0.999,
            "request {i}: padding changed the vector (cos {c})"
        );
    }
    let stats = service.stats();
    assert_eq!(stats.inputs, 20);
    assert!(
        stats.batches < 20,
        "20 concurrent requests ran one by one: {stats:?}"
    );
    assert!(stats.largest > 1, "{stats:?}");
}

/// Takes `delay` per batch, to fill the queue.
struct Slow(Duration);

impl EmbedBatch for Slow {
    fn embed_batch(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        std::thread::sleep(self.0);
        Ok(inputs.iter().map(|_| vec![1.0]).collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_with_a_retryable_error() {
    let service = EmbedService::start(
        "slow",
        Slow(Duration::from_millis(300)),
        ServeConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue: 2,
        },
    );
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            (service.embed(vec!["x".into()]).await, started.elapsed())
        }));
    }
    let (mut served, mut busy) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            (Ok(_), _) => served += 1,
            (Err(e), waited) => {
                assert!(e.retryable(), "{e}");
                assert!(
                    waited < Duration::from_millis(100),
                    "refusal took {waited:?}"
                );
                busy += 1;
            }
        }
    }
    assert!(busy > 0, "10 requests into a queue of 2 were all accepted");
    assert!(served >= 2, "served {served}");
}

/// Emits "t0 ", "t1 ", ... one per call of `on_text`, counting what it produced.
struct Counter(Arc<AtomicUsize>);

impl GenerateText for Counter {
    fn generate_text(
        &mut self,
        _prompt: &str,
        params: &Params,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(String, usize), ModelError> {
        let mut text = String::new();
        for i in 0..params.max_tokens {
            std::thread::sleep(Duration::from_millis(5));
            let piece = format!("t{i} ");
            text.push_str(&piece);
            self.0.fetch_add(1, Ordering::SeqCst);
            if !on_text(&piece) {
                return Ok((text, i + 1));
            }
        }
        Ok((text, params.max_tokens))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stream_piece_by_piece_and_a_dropped_stream_cancels() {
    let produced = Arc::new(AtomicUsize::new(0));
    let service =
        GenerateService::start("counter", Counter(produced.clone()), ServeConfig::default());
    let params = Params {
        max_tokens: 5,
        ..Params::default()
    };
    let mut stream = service.generate("hi".into(), params).expect("queued");
    let mut pieces = Vec::new();
    let done = loop {
        match stream.recv().await.expect("a piece") {
            Piece::Text(t) => pieces.push(t),
            Piece::Done { text, tokens } => break (text, tokens),
            Piece::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(pieces.len(), 5);
    assert_eq!(pieces.concat(), done.0);
    assert_eq!(done.1, 5);

    produced.store(0, Ordering::SeqCst);
    let long = Params {
        max_tokens: 10_000,
        ..Params::default()
    };
    let mut stream = service.generate("hi".into(), long).expect("queued");
    for _ in 0..3 {
        stream.recv().await.expect("a piece");
    }
    drop(stream);
    // The worker notices at its next piece and takes the next request.
    let mut next = service
        .generate(
            "again".into(),
            Params {
                max_tokens: 1,
                ..Params::default()
            },
        )
        .expect("queued");
    while let Some(p) = next.recv().await {
        if matches!(p, Piece::Done { .. }) {
            break;
        }
    }
    let n = produced.load(Ordering::SeqCst);
    assert!(n < 100, "the cancelled request went on: {n} pieces");
}

/// Issue 12, finding 9: a model that panics on an input fails that request
/// only; the worker goes on and serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_model_fails_one_request_and_keeps_serving() {
    struct Fragile;
    impl EmbedBatch for Fragile {
        fn embed_batch(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
            if inputs.contains(&"boom") {
                panic!("planted: the model panics on boom");
            }
            Ok(inputs.iter().map(|_| vec![1.0]).collect())
        }
    }
    let embed = EmbedService::start("fragile", Fragile, ServeConfig::default());
    let e = embed
        .embed(vec!["boom".into()])
        .await
        .expect_err("the panicking input fails");
    assert!(e.to_string().contains("panicked"), "{e}");
    assert_eq!(
        embed.embed(vec!["fine".into()]).await.expect("next works"),
        vec![vec![1.0]]
    );

    struct FragileWriter;
    impl GenerateText for FragileWriter {
        fn generate_text(
            &mut self,
            prompt: &str,
            _: &Params,
            _: &mut dyn FnMut(&str) -> bool,
        ) -> Result<(String, usize), ModelError> {
            if prompt == "boom" {
                panic!("planted: the model panics on boom");
            }
            Ok(("ok".into(), 1))
        }
    }
    let generate = GenerateService::start("fragile", FragileWriter, ServeConfig::default());
    let mut pieces = generate
        .generate("boom".into(), Params::default())
        .expect("queued");
    assert!(matches!(pieces.recv().await, Some(Piece::Failed(r)) if r.contains("panicked")));
    let mut pieces = generate
        .generate("fine".into(), Params::default())
        .expect("queued");
    assert!(matches!(pieces.recv().await, Some(Piece::Done { .. })));
}

/// Issue 12, finding 9: a queued request whose caller went away is skipped,
/// not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_whose_caller_left_is_not_run() {
    struct Slow(Arc<AtomicUsize>, std::sync::mpsc::Receiver<()>);
    impl GenerateText for Slow {
        fn generate_text(
            &mut self,
            _: &str,
            _: &Params,
            _: &mut dyn FnMut(&str) -> bool,
        ) -> Result<(String, usize), ModelError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            // The first request holds the worker until the test lets it go.
            let _ = self.1.recv_timeout(Duration::from_secs(10));
            Ok(("done".into(), 1))
        }
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let (release, gate) = std::sync::mpsc::channel();
    let generate = GenerateService::start("slow", Slow(runs.clone(), gate), ServeConfig::default());
    let mut first = generate
        .generate("a".into(), Params::default())
        .expect("queued");
    for _ in 0..100 {
        if runs.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let abandoned = generate
        .generate("b".into(), Params::default())
        .expect("queued");
    drop(abandoned);
    let mut third = generate
        .generate("c".into(), Params::default())
        .expect("queued");
    release.send(()).expect("release the first");
    release.send(()).expect("release the third");
    assert!(matches!(first.recv().await, Some(Piece::Done { .. })));
    assert!(matches!(third.recv().await, Some(Piece::Done { .. })));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the abandoned request did not run"
    );
}
