//! The small operations between the products of a forward pass, on plain
//! slices: RMS norm, interleaved RoPE, attention of query rows over keys
//! and values, SiLU-gated product (a Llama decode step; attention also for
//! BERT). In a tensor library each is a pass of its own with an
//! allocation; at one token they are too small to split between threads,
//! so the thread that runs them should run them fast. Each is written once
//! in plain Rust and compiled twice: for the baseline target, and with
//! AVX-512 enabled (chosen at run time, like the linear kernel), which
//! lets the compiler vectorise the loops 16 wide.

use crate::{avx512, exp};

/// `out = x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        x.len() == weight.len() && x.len() == out.len(),
        "equal lengths"
    );
    rms_norm_fast(x, weight, eps, out)
}

/// RoPE on consecutive pairs (`x[2i]`, `x[2i+1]`) of each `dim`-wide head of
/// `x`, with the angles' `cos` and `sin` for this position (`dim / 2` each).
pub fn rope_interleaved(x: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    assert_eq!(cos.len() * 2, dim, "cos holds dim / 2 angles");
    assert_eq!(sin.len() * 2, dim, "sin holds dim / 2 angles");
    rope_fast(x, dim, cos, sin)
}

/// `out = silu(gate) · up`, with `silu(x) = x / (1 + e^-x)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "equal lengths"
    );
    silu_mul_fast(gate, up, out)
}

/// Attention of the query rows of `q` (`rows × dim`: the query heads that
/// share one key/value head at a decode step, or one head's queries of a
/// sentence) over `keys` and `values` (`positions × dim` each): `out`
/// (`rows × dim`) gets `softmax(q·kᵀ · scale) · v` per row. `scores` is
/// scratch space.
pub fn attend(
    q: &[f32],
    dim: usize,
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let positions = keys.len() / dim;
    let heads = q.len() / dim;
    assert_eq!(q.len(), heads * dim, "q is rows × dim");
    assert_eq!(out.len(), heads * dim, "out is rows × dim");
    assert!(
        keys.len() == positions * dim && values.len() == keys.len(),
        "keys and values are positions × dim"
    );
    scores.clear();
    scores.resize(heads * positions, 0.0);
    attend_fast(q, dim, keys, values, scale, scores, out)
}

/// Defines `$name`, which runs `$body` (an `#[inline(always)]` function)
/// compiled with AVX-512 enabled where the CPU has it, else as compiled for
/// the baseline target.
macro_rules! twice {
    ($name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn fast($($arg: $ty),*) {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked by `avx512`).
                unsafe { fast($($arg),*) };
                return;
            }
            $body($($arg),*)
        }
    };
}

twice!(rms_norm_fast => rms_norm_body(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]));
twice!(rope_fast => rope_body(x: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]));
twice!(silu_mul_fast => silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]));
twice!(attend_fast => attend_body(q: &[f32], dim: usize, keys: &[f32], values: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]));

#[inline(always)]
fn rope_body(x: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(dim) {
        for (pair, (c, s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[inline(always)]
fn rms_norm_body(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        x.len() == weight.len() && x.len() == out.len(),
        "equal lengths"
    );
    let mean = sum_of_products(x, x) / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// `Σ a·b` in 16 independent lanes (so the loop vectorises without
/// reordering any lane's sum), then the lanes added.
#[inline(always)]
fn sum_of_products(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn attend_body(
    q: &[f32],
    dim: usize,
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let positions = keys.len() / dim;
    for (h, (qh, sh)) in q
        .chunks_exact(dim)
        .zip(scores.chunks_exact_mut(positions))
        .enumerate()
    {
        for (s, k) in sh.iter_mut().zip(keys.chunks_exact(dim)) {
            *s = sum_of_products(qh, k) * scale;
        }
        let max = sh.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in sh.iter_mut() {
            *s = exp(*s - max);
            total += *s;
        }
        let o = &mut out[h * dim..(h + 1) * dim];
        o.fill(0.0);
        for (&s, v) in sh.iter().zip(values.chunks_exact(dim)) {
            let p = s / total;
            for (o, &v) in o.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 25.0)
            .collect()
    }

    #[test]
    fn rms_norm_rope_and_silu_match_their_definitions() {
        let (x, w) = (values(37, 1), values(37, 2));
        let mut out = vec![0f32; 37];
        rms_norm(&x, &w, 1e-5, &mut out);
        let rms = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / 37.0 + 1e-5).sqrt();
        for i in 0..37 {
            assert!(
                (out[i] as f64 - x[i] as f64 / rms * w[i] as f64).abs() < 1e-5,
                "rms_norm [{i}]"
            );
        }

        let (cos, sin) = (values(4, 3), values(4, 4));
        let mut y = values(16, 5);
        let x = y.clone();
        rope_interleaved(&mut y, 8, &cos, &sin);
        for head in 0..2 {
            for i in 0..4 {
                let (a, b) = (x[head * 8 + 2 * i], x[head * 8 + 2 * i + 1]);
                assert!((y[head * 8 + 2 * i] - (a * cos[i] - b * sin[i])).abs() < 1e-6);
                assert!((y[head * 8 + 2 * i + 1] - (a * sin[i] + b * cos[i])).abs() < 1e-6);
            }
        }

        let (g, u) = (values(40, 6), values(40, 7));
        let mut out = vec![0f32; 40];
        silu_mul(&g, &u, &mut out);
        for i in 0..40 {
            let want = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "silu [{i}]"
            );
        }
    }

    #[test]
    fn attention_matches_a_plain_softmax() {
        let (heads, dim, positions) = (3, 24, 7);
        let (q, k, v) = (
            values(heads * dim, 1),
            values(positions * dim, 2),
            values(positions * dim, 3),
        );
        let scale = 1.0 / (dim as f32).sqrt();
        let (mut scores, mut out) = (Vec::new(), vec![0f32; heads * dim]);
        attend(&q, dim, &k, &v, scale, &mut scores, &mut out);
        for h in 0..heads {
            let s: Vec<f64> = (0..positions)
                .map(|t| {
                    (0..dim)
                        .map(|i| (q[h * dim + i] * k[t * dim + i]) as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for i in 0..dim {
                let want: f64 = (0..positions)
                    .map(|t| e[t] / total * v[t * dim + i] as f64)
                    .sum();
                let got = out[h * dim + i] as f64;
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "head {h} [{i}]: {got} vs {want}"
                );
            }
        }
    }
}
