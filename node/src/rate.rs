//! Token buckets for the region policy's rate limits (`rate_limits` in
//! policy.toml): per agent on its host, per client on the entry node. A
//! task past its bucket is answered 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_types::policy::Rate;

/// Buckets kept at most; past this the idle ones are dropped (a full
/// bucket and a dropped one are the same).
const BUCKETS_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets by key (an agent's name, a client's address).
#[derive(Debug, Default)]
pub struct Buckets(Mutex<HashMap<String, Bucket>>);

impl Buckets {
    /// Takes one token for `key` under `rate`: `Ok` or the seconds until one is there.
    pub fn take(&self, key: &str, rate: &Rate, now: Instant) -> Result<(), u64> {
        let mut buckets = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let per_second = f64::from(rate.per_second.max(1));
        let burst = f64::from(rate.burst.max(1));
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * per_second < burst
            });
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refilled = bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * per_second;
        bucket.tokens = refilled.min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / per_second).ceil().max(1.0) as u64)
        }
    }
}

/// The 429 answer: `Retry-After` and the same in the body (a forwarded
/// answer carries only its body; the entry node puts the header back).
pub fn too_many(what: String, retry_after_s: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, retry_after_s.to_string())],
        Json(serde_json::json!({
            "error": "rate_limited",
            "detail": format!("{what}; retry in {retry_after_s} s"),
            "retry_after_s": retry_after_s,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let buckets = Buckets::default();
        let rate = Rate {
            per_second: 2,
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(buckets.take("a", &rate, t0), Ok(()));
        }
        assert_eq!(buckets.take("a", &rate, t0), Err(1), "the burst is spent");
        assert_eq!(
            buckets.take("b", &rate, t0),
            Ok(()),
            "another key has its own"
        );
        assert_eq!(
            buckets.take("a", &rate, t0 + Duration::from_millis(500)),
            Ok(()),
            "one token per half second"
        );
        assert!(buckets
            .take("a", &rate, t0 + Duration::from_millis(500))
            .is_err());
        for _ in 0..3 {
            assert_eq!(
                buckets.take("a", &rate, t0 + Duration::from_secs(10)),
                Ok(())
            );
        }
    }
}
