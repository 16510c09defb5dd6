//! `tasks-bench`: `loadgen` for `scripts/bench.sh tasks`: N closed-loop
//! clients for D seconds, each with one `POST /v1/tasks` in flight on a
//! keep-alive connection, the same JSON body every time (no task id, so the
//! node gives each task a new one). Prints one JSON line like `loadgen`'s,
//! plus what each failed task got (`statuses`: HTTP status, or `timeout`,
//! `connect`, `io`, by count) and the first few error bodies, so that a
//! 429 or a forwarding error in the figures can be told apart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Parser;

/// Drive `POST /v1/tasks` on one node with closed-loop clients.
#[derive(Debug, Parser)]
struct Args {
    /// Target URL (`http://HOST:PORT/v1/tasks`).
    #[arg(long)]
    url: String,
    /// JSON body file sent with every request.
    #[arg(long)]
    body: std::path::PathBuf,
    /// Concurrent clients, each with one task in flight.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Error bodies kept as samples (the first ones, across clients).
    #[arg(long, default_value_t = 5)]
    samples: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// What one client saw: latencies of answered tasks, failures by kind, a
/// few error bodies.
#[derive(Default)]
struct Seen {
    latencies: Vec<Duration>,
    statuses: BTreeMap<String, u64>,
    samples: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let body = std::fs::read(&args.body)
        .map_err(|e| anyhow!("cannot read {}: {e}", args.body.display()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (http, url, body, samples) =
            (http.clone(), args.url.clone(), body.clone(), args.samples);
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            while Instant::now() < end {
                let sent = Instant::now();
                let failure = match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await;
                        match (status.is_success(), text) {
                            (true, Ok(_)) => None,
                            (_, Ok(t)) => Some((status.as_u16().to_string(), t)),
                            (_, Err(e)) => Some(("io".to_owned(), e.to_string())),
                        }
                    }
                    Err(e) if e.is_timeout() => Some(("timeout".to_owned(), e.to_string())),
                    Err(e) if e.is_connect() => Some(("connect".to_owned(), e.to_string())),
                    Err(e) => Some(("io".to_owned(), e.to_string())),
                };
                if sent >= measure_from && Instant::now() <= end {
                    match failure {
                        None => seen.latencies.push(sent.elapsed()),
                        Some((kind, text)) => {
                            *seen.statuses.entry(kind.clone()).or_default() += 1;
                            if seen.samples.len() < samples {
                                let text: String = text.chars().take(300).collect();
                                seen.samples.push(format!("{kind}: {text}"));
                            }
                        }
                    }
                }
            }
            seen
        }));
    }
    let mut all = Vec::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = Vec::new();
    for t in tasks {
        let seen = t.await?;
        all.extend(seen.latencies);
        for (k, n) in seen.statuses {
            *statuses.entry(k).or_default() += n;
        }
        samples.extend(seen.samples);
    }
    samples.truncate(args.samples);
    all.sort();
    println!(
        "{}",
        serde_json::json!({
            "clients": args.clients,
            "requests": all.len(),
            "errors": statuses.values().sum::<u64>(),
            "per_second": all.len() as f64 / args.seconds as f64,
            "p50_ms": percentile(&all, 0.50),
            "p99_ms": percentile(&all, 0.99),
            "statuses": statuses,
            "error_samples": samples,
        })
    );
    Ok(())
}
