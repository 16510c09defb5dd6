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
