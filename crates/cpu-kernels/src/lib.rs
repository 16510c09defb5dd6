//! CPU kernels for the models' forward passes. The one crate of ours with
//! unsafe code (the workspace forbids it elsewhere): SIMD intrinsics chosen
//! at run time, and parallel tasks writing disjoint parts of one output.
//!
//! Linear layers for our BERT forward pass on the CPU (`models/src/bert.rs`): the
//! weight matrix is packed once, at load, into panels of [`NR`] output
//! columns laid out input by input, so a product streams each panel straight
//! through the kernel and never re-packs it (candle's matmul re-packs the
//! weights on every call, as much work as the arithmetic at a dozen tokens:
//! BENCHMARKS.md). The bias and what follows the product (GELU, or adding
//! the residual) are applied to each tile while it is still in cache.
//!
//! ```text
//!   weight [n, k] ──pack──> panels [n/NR][k][NR]
//!   x [m, k] · panels ──12 rows × 32 columns per kernel call──> out [m, n] (+ bias, then GELU or + residual)
//! ```
//!
//! The kernel is AVX-512 where the CPU has it (chosen at run time), else
//! plain Rust that the compiler vectorises for the baseline target. Work is
//! split between the threads of the pool it runs in by panel.
//!
//! [`ops`] holds the small operations between the products: RMS norm, RoPE,
//! attention, the SiLU gate (a Llama decode step, `models/src/llama.rs`;
//! attention also for BERT, `models/src/bert.rs`).

use rayon::prelude::*;

pub mod ops;

/// Output columns per panel: two AVX-512 registers of f32.
pub const NR: usize = 32;
/// Input rows per kernel call: 12 rows × 2 registers = 24 accumulators (of
/// 32 registers; a dozen rows is also one short sentence in one pass over
/// the weights).
const MR: usize = 12;

/// What is applied to each output after the bias is added.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue<'a> {
    /// Nothing.
    None,
    /// GELU, exact (erf) form, as BERT's `hidden_act = "gelu"`.
    Gelu,
    /// GELU, tanh approximation (`gelu_new`).
    GeluTanh,
    /// ReLU.
    Relu,
    /// Adds this `[m, n]` matrix (the residual of a BERT sub-layer).
    Add(&'a [f32]),
}

/// A linear layer `y = x · Wᵀ + b` with `W` packed for [`PackedLinear::forward`].
pub struct PackedLinear {
    /// Inputs per row.
    k: usize,
    /// Outputs per row.
    n: usize,
    /// `[ceil(n / NR)][k][NR]`, the columns past `n` zero.
    panels: Vec<f32>,
    /// `ceil(n / NR) * NR` values, zero past `n`.
    bias: Vec<f32>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("k", &self.k)
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl PackedLinear {
    /// Packs `weight` (`[n, k]`, row-major: PyTorch's `Linear` layout) and `bias` (`n`).
    pub fn new(weight: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        assert!(
            n > 0 && k > 0,
            "a [{n}, {k}] weight has nothing to multiply"
        );
        assert_eq!(weight.len(), n * k, "weight is not [{n}, {k}]");
        assert_eq!(bias.len(), n, "bias is not [{n}]");
        let count = n.div_ceil(NR);
        let mut panels = vec![0f32; count * k * NR];
        for (col, row) in weight.chunks_exact(k).enumerate() {
            let (panel, lane) = (col / NR, col % NR);
            let base = panel * k * NR;
            for (p, w) in row.iter().enumerate() {
                panels[base + p * NR + lane] = *w;
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(count * NR, 0.0);
        Self {
            k,
            n,
            panels,
            bias: padded,
        }
    }

    /// Outputs per row.
    pub fn outputs(&self) -> usize {
        self.n
    }

    /// `out[m, n] = x[m, k] · Wᵀ + b`, then `epilogue`, split by panel over
    /// the threads of the current rayon pool.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue<'_>) {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), m * k, "input is not [{m}, {k}]");
        assert_eq!(out.len(), m * n, "output is not [{m}, {n}]");
        if let Epilogue::Add(r) = epilogue {
            assert_eq!(r.len(), m * n, "residual is not [{m}, {n}]");
        }
        let out = SharedOut(out.as_mut_ptr());
        let panels = n.div_ceil(NR);
        // Enough panels per task that a task is worth a thread hand-off.
        let min_len = (16_384 / (m * k).max(1)).clamp(1, panels);
        (0..panels)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each(|panel| {
                // SAFETY: `out` holds m * n floats and outlives the parallel
                // loop; each task writes only its own panel's columns.
                unsafe { self.panel(x, m, panel, out.get(), epilogue) }
            });
    }

    /// Every row block of one panel.
    ///
    /// # Safety
    /// `out` points to `m * n` floats, and no other thread writes this panel's columns.
    unsafe fn panel(
        &self,
        x: &[f32],
        m: usize,
        panel: usize,
        out: *mut f32,
        epilogue: Epilogue<'_>,
    ) {
        let (k, n) = (self.k, self.n);
        let b = &self.panels[panel * k * NR..(panel + 1) * k * NR];
        let bias = &self.bias[panel * NR..(panel + 1) * NR];
        let col0 = panel * NR;
        let cols = NR.min(n - col0);
        let mut tile = [0f32; MR * NR];
        for row0 in (0..m).step_by(MR) {
            let rows = MR.min(m - row0);
            let a = &x[row0 * k..(row0 + rows) * k];
            tile_product(a, rows, k, b, bias, &mut tile);
            for r in 0..rows {
                // SAFETY: row row0 + r < m, columns col0..col0 + cols ≤ n of
                // `out`, which only this task writes (the caller's contract).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.add((row0 + r) * n + col0), cols) };
                let src = &tile[r * NR..r * NR + cols];
                match epilogue {
                    Epilogue::Add(res) => {
                        let res = &res[(row0 + r) * n + col0..][..cols];
                        apply_add(dst, src, res);
                    }
                    _ => apply(dst, src, epilogue),
                }
            }
        }
    }
}

/// A raw output pointer shared by the tasks of one product (each writes its own columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `SharedOut`).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: see `PackedLinear::forward`: the tasks' writes are disjoint.
unsafe impl Send for SharedOut {}
// SAFETY: as for Send: no two tasks touch the same output.
unsafe impl Sync for SharedOut {}

/// `tile[r][c] = Σ_p a[r][p] · b[p][c] + bias[c]` for `rows` ≤ MR rows of `a` (`[rows, k]`)
/// and one packed panel `b` (`[k][NR]`).
fn tile_product(
    a: &[f32],
    rows: usize,
    k: usize,
    b: &[f32],
    bias: &[f32],
    tile: &mut [f32; MR * NR],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked); the slices hold what the kernel reads.
        unsafe {
            match rows {
                12 => avx512::tile::<12>(a, k, b, bias, tile),
                11 => avx512::tile::<11>(a, k, b, bias, tile),
                10 => avx512::tile::<10>(a, k, b, bias, tile),
                9 => avx512::tile::<9>(a, k, b, bias, tile),
                8 => avx512::tile::<8>(a, k, b, bias, tile),
                7 => avx512::tile::<7>(a, k, b, bias, tile),
                6 => avx512::tile::<6>(a, k, b, bias, tile),
                5 => avx512::tile::<5>(a, k, b, bias, tile),
                4 => avx512::tile::<4>(a, k, b, bias, tile),
                3 => avx512::tile::<3>(a, k, b, bias, tile),
                2 => avx512::tile::<2>(a, k, b, bias, tile),
                _ => avx512::tile::<1>(a, k, b, bias, tile),
            }
        }
        return;
    }
    portable_tile(a, rows, k, b, bias, tile);
}

/// The kernel in plain Rust (any CPU; also the reference the tests check the
/// AVX-512 one against).
fn portable_tile(
    a: &[f32],
    rows: usize,
    k: usize,
    b: &[f32],
    bias: &[f32],
    tile: &mut [f32; MR * NR],
) {
    for (acc, row) in tile.chunks_exact_mut(NR).zip(a.chunks_exact(k)).take(rows) {
        acc.copy_from_slice(bias);
        for (&v, bp) in row.iter().zip(b.chunks_exact(NR)) {
            for (c, w) in acc.iter_mut().zip(bp) {
                *c += v * w;
            }
        }
    }
}

/// Whether the AVX-512 kernel runs: the CPU has AVX-512F (checked once) and
/// `AGENTMESH_NO_AVX512` is not set (to measure or test the plain kernel).
#[cfg(target_arch = "x86_64")]
pub fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("AGENTMESH_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn avx512() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// R rows × 32 columns, all of `k`, in 2R AVX-512 accumulators.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` holds R rows of `k`, `b` `k` rows of NR, `bias` NR.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(
        a: &[f32],
        k: usize,
        b: &[f32],
        bias: &[f32],
        tile: &mut [f32; MR * NR],
    ) {
        debug_assert!(a.len() >= R * k && b.len() >= k * NR && bias.len() >= NR);
        let (a, b, t) = (a.as_ptr(), b.as_ptr(), tile.as_mut_ptr());
        // SAFETY: every load and store is inside the slices: `a` holds R
        // rows of k, `b` k rows of NR, `bias` NR and `tile` MR ≥ R rows of NR
        // (the caller's contract, checked above in debug builds).
        unsafe {
            let mut lo = [_mm512_loadu_ps(bias.as_ptr()); R];
            let mut hi = [_mm512_loadu_ps(bias.as_ptr().add(16)); R];
            for p in 0..k {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                for r in 0..R {
                    let v = _mm512_set1_ps(*a.add(r * k + p));
                    lo[r] = _mm512_fmadd_ps(v, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(v, b1, hi[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(t.add(r * NR), lo[r]);
                _mm512_storeu_ps(t.add(r * NR + 16), hi[r]);
            }
        }
    }
}

/// `dst = f(src)` for the epilogues that need only the product.
fn apply(dst: &mut [f32], src: &[f32], epilogue: Epilogue<'_>) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked).
        unsafe { apply_avx512(dst, src, epilogue) };
        return;
    }
    apply_portable(dst, src, epilogue)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_avx512(dst: &mut [f32], src: &[f32], epilogue: Epilogue<'_>) {
    apply_portable(dst, src, epilogue)
}

#[inline(always)]
fn apply_portable(dst: &mut [f32], src: &[f32], epilogue: Epilogue<'_>) {
    match epilogue {
        Epilogue::Gelu => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = gelu_erf(s)),
        Epilogue::GeluTanh => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = gelu_tanh(s)),
        Epilogue::Relu => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.max(0.0)),
        Epilogue::None | Epilogue::Add(_) => dst.copy_from_slice(src),
    }
}

fn apply_add(dst: &mut [f32], src: &[f32], res: &[f32]) {
    for ((d, &s), &r) in dst.iter_mut().zip(src).zip(res) {
        *d = s + r;
    }
}

/// `exp(x)` without branches or calls, so loops over it vectorise: Cephes'
/// `expf` (range reduction by ln 2, degree-5 polynomial), relative error
/// about 2e-7 over f32's range; inputs are clamped to [-87.3, 88.3] (results
/// from about 1e-38 to 2e38), where the power of two stays a normal float.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_66)
        * r
        + 0.5;
    let y = p * r2 + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `erf(x)`, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the
/// form PyTorch's vectorised CPU `erf` uses.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// GELU, exact form: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU, tanh approximation: `x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    // tanh(u) = 1 - 2 / (exp(2u) + 1)
    let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, k: usize, seed: u32) -> (Vec<f32>, Vec<f32>) {
        // A small deterministic generator: values in [-1, 1).
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        let w = (0..n * k).map(|_| next()).collect();
        let b = (0..n).map(|_| next()).collect();
        (w, b)
    }

    fn reference(x: &[f32], m: usize, w: &[f32], b: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                out[i * n + j] = dot as f32 + b[j];
            }
        }
        out
    }

    #[test]
    fn products_match_a_plain_loop_for_every_shape_edge() {
        // Rows below, at and past a kernel block; columns below, at and past a panel.
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 20, 7),
            (12, 32, 16),
            (13, 70, 33),
            (29, 96, 384),
        ] {
            let (w, b) = weights(n, k, (m * n * k) as u32);
            let (x, _) = weights(m, k, 7 + m as u32);
            let linear = PackedLinear::new(&w, &b, n, k);
            let mut out = vec![f32::NAN; m * n];
            linear.forward(&x, m, &mut out, Epilogue::None);
            let want = reference(&x, m, &w, &b, n, k);
            for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{m}x{n}x{k} [{i}]: {got} vs {want}"
                );
            }
            // The residual epilogue adds its matrix.
            let res: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
            linear.forward(&x, m, &mut out, Epilogue::Add(&res));
            for i in 0..m * n {
                assert!(
                    (out[i] - want[i] - res[i]).abs() <= 1e-3 * (1.0 + res[i]),
                    "{m}x{n}x{k} residual [{i}]"
                );
            }
        }
    }

    #[test]
    fn the_avx512_kernel_equals_the_portable_one() {
        if !avx512() {
            println!("SKIPPED: cpu_kernels::the_avx512_kernel_equals_the_portable_one: this CPU has no AVX-512 (only the portable kernel runs, tested elsewhere)");
            return;
        }
        let (k, rows) = (384, MR);
        let (b, bias) = weights(NR, k, 3);
        let (a, _) = weights(rows, k, 4);
        let linear = PackedLinear::new(&b, &bias, NR, k);
        for r in 1..=rows {
            let (mut fast, mut plain) = ([0f32; MR * NR], [0f32; MR * NR]);
            // (tile_product picks the AVX-512 kernel here.)
            tile_product(&a[..r * k], r, k, &linear.panels, &linear.bias, &mut fast);
            portable_tile(&a[..r * k], r, k, &linear.panels, &linear.bias, &mut plain);
            for i in 0..r * NR {
                assert!(
                    (fast[i] - plain[i]).abs() <= 1e-4 * (1.0 + plain[i].abs()),
                    "{r} rows [{i}]"
                );
            }
        }
    }

    #[test]
    fn activations_match_the_standard_library() {
        for i in -4000..=4000 {
            let x = i as f32 / 500.0; // [-8, 8]
            let e = (x as f64).exp() as f32;
            assert!(
                (exp(x) - e).abs() <= 4e-7 * e,
                "exp({x}) = {} vs {e}",
                exp(x)
            );
            let gelu = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            assert!(
                (gelu_erf(x) as f64 - gelu).abs() < 1e-6 * (1.0 + x.abs() as f64),
                "gelu({x})"
            );
            let tanh = 0.5
                * x as f64
                * (1.0 + (0.797_884_560_8 * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            assert!(
                (gelu_tanh(x) as f64 - tanh).abs() < 2e-6 * (1.0 + x.abs() as f64),
                "gelu_tanh({x})"
            );
        }
        assert!(exp(-200.0) < 1e-37 && exp(200.0).is_finite());
        assert_eq!(gelu_erf(-30.0), -0.0);
    }

    /// erf in f64 by its Taylor series (|x| ≤ 3) or continued fraction: the reference.
    fn erf_f64(x: f64) -> f64 {
        if x.abs() > 3.0 {
            // erfc by continued fraction (Lentz), accurate to ~1e-15 here.
            let a = x.abs();
            let mut f = a;
            for n in (1..60).rev() {
                f = a + n as f64 / 2.0 / f;
            }
            let erfc = (-a * a).exp() / (f * std::f64::consts::PI.sqrt());
            return (1.0 - erfc).copysign(x);
        }
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..200 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
