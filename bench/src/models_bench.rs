//! The agentmesh side of `scripts/bench.sh models`: embedding sentences per
//! second at batch 1 and batch 32 on the same sentences the Python peer
//! gets, and generation tokens per second (prompt, then new tokens, greedy)
//! on the same GGUF. Each measure is taken `--runs` times; prints one JSON
//! object with every run and the median.

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
    /// Times each measure is taken (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The median of `xs` (not empty).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = models::device();
    let device_name = if device.is_cuda() { "cuda" } else { "cpu" };
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
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    // per_second[0]: batch 1, per_second[1]: batch 32; one value per run.
    let mut per_second = [Vec::new(), Vec::new()];
    for _ in 0..args.runs {
        for (i, batch) in [1usize, 32].into_iter().enumerate() {
            let started = Instant::now();
            for chunk in sentences.chunks(batch) {
                embedder.embed(chunk).map_err(|e| anyhow!("{e}"))?;
            }
            per_second[i].push(sentences.len() as f64 / started.elapsed().as_secs_f64());
        }
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
    let params = Params {
        max_tokens: args.new_tokens,
        ..Params::default()
    };
    // Warm-up: on a GPU the first run also loads the kernels.
    generator
        .generate(&prompt, &one, |_| true)
        .map_err(|e| anyhow!("{e}"))?;
    let (mut prompt_rates, mut gen_rates, mut generated) = (Vec::new(), Vec::new(), 0);
    for _ in 0..args.runs {
        let started = Instant::now();
        generator
            .generate(&prompt, &one, |_| true)
            .map_err(|e| anyhow!("{e}"))?;
        prompt_rates.push(prompt_tokens as f64 / started.elapsed().as_secs_f64());
        // Generation: the tokens after the first, timed from the first one
        // (which ends the prompt's processing) to the last.
        let mut first = None;
        let (_, n) = generator
            .generate(&prompt, &params, |_| {
                first.get_or_insert_with(Instant::now);
                true
            })
            .map_err(|e| anyhow!("{e}"))?;
        let first = first.ok_or_else(|| anyhow!("the model generated no text"))?;
        generated = n;
        gen_rates.push(n.saturating_sub(1) as f64 / first.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "device": device_name,
            "sentences": sentences.len(),
            "embed_per_second_batch1": median(&per_second[0]),
            "embed_per_second_batch32": median(&per_second[1]),
            "prompt_tokens": prompt_tokens,
            "prompt_tokens_per_second": median(&prompt_rates),
            "new_tokens": generated,
            "generate_tokens_per_second": median(&gen_rates),
            "runs": {
                "embed_per_second_batch1": per_second[0],
                "embed_per_second_batch32": per_second[1],
                "prompt_tokens_per_second": prompt_rates,
                "generate_tokens_per_second": gen_rates,
            },
        })
    );
    Ok(())
}
