//! agentmesh patch: an AVX2 dot product for Q4_1 blocks, chosen at run time.
//!
//! candle 0.11 picks its AVX2 kernels (`avx.rs`) at run time, but it has
//! none for Q4_1: every CPU ran Q4_1 through the scalar loop of
//! `vec_dot_unopt`. These kernels are compiled for AVX2, FMA and F16C with
//! `#[target_feature]` and used when the CPU has them
//! (`is_x86_feature_detected!`), whatever the build flags. A port of ggml's
//! `ggml_vec_dot_q4_1_q8_1` (AVX2 branch), with each block's two f16 scales
//! converted in one instruction, and a four-row variant that loads the
//! activations once per block.

use std::arch::x86_64::*;

use super::k_quants::{BlockQ4_1, BlockQ8_1};

/// True when the CPU runs the kernels of this module.
#[inline]
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Two f16 as f32 in one instruction (`half` calls out of line for each):
/// `[a, b, 0, 0]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair(a: half::f16, b: half::f16) -> __m128 {
    let bits = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// 16 bytes of nibbles as 32 bytes: the low nibbles (elements 0..16) in the
/// low lane, the high nibbles (elements 16..32) in the high lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let tmp = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let bytes = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// One block of x against one block of y (`y_ds`: `[y.d, y.s, 0, 0]`):
/// adds `x.d * y.d * (x · y)` to `acc`, and `x.m * y.s` to lane 1 of `mins`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block(acc: __m256, mins: &mut __m128, x: &BlockQ4_1, qy: __m256i, y_ds: __m128) -> __m256 {
    // [x.d * y.d, x.m * y.s, 0, 0]
    let scales = _mm_mul_ps(pair(x.d, x.m), y_ds);
    *mins = _mm_add_ps(*mins, scales);
    // u8 * i8 pairs summed to i16: at most 2 * 15 * 127, no saturation.
    let pairs = _mm256_maddubs_epi16(nibbles(&x.qs), qy);
    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), pairs));
    _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), sums, acc)
}

/// Lane 1 of `mins`: the sum of the `x.m * y.s` terms.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane1(mins: __m128) -> f32 {
    _mm_cvtss_f32(_mm_shuffle_ps(mins, mins, 0b01))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `sum(x * y)` over `xs.len().min(ys.len())` blocks.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q4_1_q8_1(xs: &[BlockQ4_1], ys: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = _mm_setzero_ps();
    for (x, y) in xs.iter().zip(ys) {
        let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
        acc = block(acc, &mut mins, x, qy, pair(y.d, y.s));
    }
    hsum(acc) + lane1(mins)
}

/// Four dot products against one `ys`, which is loaded once per block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_4_q4_1_q8_1(
    xs: [&[BlockQ4_1]; 4],
    ys: &[BlockQ8_1],
) -> (f32, f32, f32, f32) {
    let [x0, x1, x2, x3] = xs;
    let n = ys
        .len()
        .min(x0.len())
        .min(x1.len())
        .min(x2.len())
        .min(x3.len());
    let (x0, x1, x2, x3, ys) = (&x0[..n], &x1[..n], &x2[..n], &x3[..n], &ys[..n]);
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let (mut m0, mut m1, mut m2, mut m3) = (
        _mm_setzero_ps(),
        _mm_setzero_ps(),
        _mm_setzero_ps(),
        _mm_setzero_ps(),
    );
    for i in 0..n {
        let y = &ys[i];
        let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
        let y_ds = pair(y.d, y.s);
        a0 = block(a0, &mut m0, &x0[i], qy, y_ds);
        a1 = block(a1, &mut m1, &x1[i], qy, y_ds);
        a2 = block(a2, &mut m2, &x2[i], qy, y_ds);
        a3 = block(a3, &mut m3, &x3[i], qy, y_ds);
    }
    (
        hsum(a0) + lane1(m0),
        hsum(a1) + lane1(m1),
        hsum(a2) + lane1(m2),
        hsum(a3) + lane1(m3),
    )
}

/// agentmesh patch: `BlockQ8_1::from_float` with AVX2 (the activations of
/// every Q4_1 matmul are quantized by it, on the calling thread, before the
/// work is split: the scalar loop calls `roundf` out of line for each
/// value). The same result as the scalar loop, bit for bit: the same scale
/// (`amax / 127`, its inverse), the same rounding (half away from zero), the
/// same f16 arithmetic for `s`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]); `xs.len()` is
/// `ys.len() * 32`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_1(xs: &[f32], ys: &mut [BlockQ8_1]) {
    debug_assert_eq!(xs.len(), ys.len() * 32);
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    for (x, y) in xs.chunks_exact(32).zip(ys.iter_mut()) {
        let p = x.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let abs = |v: __m256| _mm256_andnot_ps(sign, v);
        let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / ((1 << 7) - 1) as f32;
        let id = _mm256_set1_ps(if d != 0f32 { 1. / d } else { 0. });
        let mut q = [_mm256_setzero_si256(); 4];
        for i in 0..4 {
            let x = _mm256_mul_ps(v[i], id);
            // Half away from zero, as f32::round: truncate, then step away
            // from zero when the dropped fraction is at least one half.
            let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = abs(_mm256_sub_ps(x, t));
            let step = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), _mm256_or_ps(one, _mm256_and_ps(sign, x)));
            q[i] = _mm256_cvtps_epi32(_mm256_add_ps(t, step));
        }
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
        // i32 -> i16 -> i8 (|q| ≤ 127: no saturation); the packs work per
        // 128-bit lane, the permutation puts the 32 values back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(y.qs.as_mut_ptr() as *mut __m256i, bytes);
        y.d = half::f16::from_f32(d);
        y.s = half::f16::from_f32(sum as f32) * y.d;
    }
}
