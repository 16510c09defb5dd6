//! The agentmesh side of `scripts/bench.sh models`: embedding sentences per
//! second at batch 1 and batch 32 on the same sentences the Python peer
//! gets, and generation tokens per second (prompt, then new tokens, greedy)
//! on the same GGUF. Prints one JSON object.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Parser;
use models::generate::Params;
use models::{Embedder, Generator, MINILM, SMOLLM2};

#[derive(Parser)]
struct Args {
    /// The models directory (scripts/models.sh).
    #[arg(long)]
    models_dir: PathBuf,
    /// One sentence per line.
    #[arg(long)]
    sentences: PathBuf,
    /// The generation prompt (raw text, about 128 tokens).
    #[arg(long)]
    prompt: PathBuf,
    /// New tokens to generate.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = models::device();
    let text = std::fs::read_to_string(&args.sentences)?;
    let sentences: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if sentences.is_empty() {
        anyhow::bail!(
            "{} holds no sentences (one per line)",
            args.sentences.display()
        );
    }
    let prompt = std::fs::read_to_string(&args.prompt)?;

    let embedder =
        Embedder::load(&MINILM, &args.models_dir, &device).map_err(|e| anyhow!("{e}"))?;
    embedder
        .embed(&sentences[..sentences.len().min(8)])
        .map_err(|e| anyhow!("{e}"))?; // warm-up
    let mut per_second = Vec::new();
    for batch in [1usize, 32] {
        let started = Instant::now();
        for chunk in sentences.chunks(batch) {
            embedder.embed(chunk).map_err(|e| anyhow!("{e}"))?;
        }
        per_second.push(sentences.len() as f64 / started.elapsed().as_secs_f64());
    }

    let mut generator =
        Generator::load(&SMOLLM2, &args.models_dir, &device).map_err(|e| anyhow!("{e}"))?;
    let prompt_tokens = generator
        .tokenizer()
        .encode(prompt.as_str(), false)
        .map_err(|e| anyhow!("{e}"))?
        .get_ids()
        .len();
    // Prompt processing alone: one new token.
    let one = Params {
        max_tokens: 1,
        ..Params::default()
    };
    let started = Instant::now();
    generator
        .generate(&prompt, &one, |_| true)
        .map_err(|e| anyhow!("{e}"))?;
    let prompt_secs = started.elapsed().as_secs_f64();
    let params = Params {
        max_tokens: args.new_tokens,
        ..Params::default()
    };
    // Greedy generation never stops early here: the end token is ignored
    // only if it comes; count what was generated.
    let started = Instant::now();
    let (_, generated) = generator
        .generate(&prompt, &params, |_| true)
        .map_err(|e| anyhow!("{e}"))?;
    let total = started.elapsed().as_secs_f64();
    let gen_secs = (total - prompt_secs).max(1e-9);
    println!(
        "{}",
        serde_json::json!({
            "sentences": sentences.len(),
            "embed_per_second_batch1": per_second[0],
            "embed_per_second_batch32": per_second[1],
            "prompt_tokens": prompt_tokens,
            "prompt_tokens_per_second": prompt_tokens as f64 / prompt_secs,
            "new_tokens": generated,
            "generate_tokens_per_second": (generated.saturating_sub(1)) as f64 / gen_secs,
        })
    );
    Ok(())
}
