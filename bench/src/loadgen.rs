//! `loadgen`: N closed-loop HTTP clients for D seconds against one URL,
//! each sending the same JSON body with keep-alive; prints one JSON line
//! with the throughput and latency percentiles. Used by `scripts/bench.sh
//! policy` for agentmesh and etcd alike, so the clients are identical.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Parser;

/// Drive one HTTP endpoint with closed-loop clients.
#[derive(Debug, Parser)]
struct Args {
    /// Target URL.
    #[arg(long)]
    url: String,
    /// HTTP method (PUT or POST).
    #[arg(long, default_value = "PUT")]
    method: String,
    /// JSON body file sent with every request.
    #[arg(long)]
    body: std::path::PathBuf,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let body = std::fs::read(&args.body)
        .map_err(|e| anyhow!("cannot read {}: {e}", args.body.display()))?;
    let method: reqwest::Method = args
        .method
        .parse()
        .map_err(|_| anyhow!("bad method {}", args.method))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (http, url, method, body) =
            (http.clone(), args.url.clone(), method.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end {
                let sent = Instant::now();
                let ok = match http
                    .request(method.clone(), &url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) => {
                        let good = r.status().is_success();
                        let _ = r.bytes().await;
                        good
                    }
                    Err(_) => false,
                };
                if sent >= measure_from && Instant::now() <= end {
                    if ok {
                        latencies.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    all.sort();
    println!(
        "{}",
        serde_json::json!({
            "clients": args.clients,
            "requests": all.len(),
            "errors": errors,
            "per_second": all.len() as f64 / args.seconds as f64,
            "p50_ms": percentile(&all, 0.50),
            "p99_ms": percentile(&all, 0.99),
        })
    );
    Ok(())
}
