//! The kernels our vendored patches add (vendor/README.md), on this CPU:
//! - the Q4_1 matmul that generation runs on (with AVX2: the kernel of our
//!   candle-core patch) against the scalar loop and against the same weights
//!   dequantized to f32, for one row (decode) and many (prompt), with widths
//!   that leave a tail after the column quads;
//! - the Q8_1 quantisation of its activations (with AVX2: our patch's)
//!   against its definition, bit for bit, ties and an all-zero block included;
//! - f32 matmuls on both sides of the size at which our gemm-common patch
//!   switches from the AVX2 to the AVX-512 kernels, against a plain loop.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn values(seed: u32, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn q4_1_matmul_matches_the_dequantized_weights() {
    let cpu = Device::Cpu;
    let (k, n) = (576, 38); // SmolLM2's width; 38 columns = 9 quads + 2
    let w = Tensor::from_vec(values(1, n * k), (n, k), &cpu).expect("weights");
    let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
    let dequantized = q.dequantize(&cpu).expect("dequantize");
    let matmul = QMatMul::from_qtensor(q).expect("qmatmul");
    for rows in [1, 7] {
        let x = Tensor::from_vec(values(2 + rows as u32, rows * k), (rows, k), &cpu).expect("x");
        let got: Vec<Vec<f32>> = matmul.forward(&x).expect("forward").to_vec2().expect("vec");
        // The kernel multiplies by the activations quantized to Q8_1: so does the reference.
        let x8 = QTensor::quantize(&x, GgmlDType::Q8_1)
            .expect("quantize x")
            .dequantize(&cpu)
            .expect("dequantize x");
        let want: Vec<Vec<f32>> = x8
            .matmul(&dequantized.t().expect("t"))
            .expect("matmul")
            .to_vec2()
            .expect("vec");
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            // Left: Q8_1 keeps each block's sum in f16 (as ggml does), which
            // the reference does not round; 18 blocks of such error.
            assert!((g - w).abs() < 1e-2 + 1e-2 * w.abs(), "{g} vs {w}");
        }
    }
}

#[test]
fn q4_1_dot_products_match_the_scalar_loop() {
    // SmolLM2's two widths: 18 and 48 blocks (Q4_1 rows hold an even
    // number of blocks, as ggml requires).
    for k in [576, 1536] {
        let blocks = |seed: u32| {
            let mut xs = vec![BlockQ4_1::zeros(); k / 32];
            BlockQ4_1::from_float(&values(seed, k), &mut xs);
            xs
        };
        let (x0, x1, x2, x3) = (blocks(10), blocks(11), blocks(12), blocks(13));
        let mut ys = vec![BlockQ8_1::zeros(); k / 32];
        BlockQ8_1::from_float(&values(20, k), &mut ys);
        let close = |got: f32, want: f32| {
            // The same integer sums, added in another order in f32.
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "k = {k}: {got} vs {want}"
            );
        };
        close(
            BlockQ4_1::vec_dot(k, &x0, &ys),
            BlockQ4_1::vec_dot_unopt(k, &x0, &ys),
        );
        let (d0, d1, d2, d3) = BlockQ4_1::vec_dot_4(k, &x0, &x1, &x2, &x3, &ys);
        for (got, x) in [(d0, &x0), (d1, &x1), (d2, &x2), (d3, &x3)] {
            close(got, BlockQ4_1::vec_dot_unopt(k, x, &ys));
        }
    }
}

#[test]
fn f32_matmuls_match_a_plain_loop_on_both_sides_of_the_avx512_switch() {
    let cpu = Device::Cpu;
    // (rows, inner, columns): small (AVX2), large (AVX-512 on such CPUs),
    // and one of each kind of edge.
    for (m, k, n) in [
        (12, 40, 200),
        (80, 40, 96),
        (200, 33, 12),
        (64, 64, 64),
        (63, 70, 130),
    ] {
        let a = values(m as u32, m * k);
        let b = values(n as u32 + 100, k * n);
        let got: Vec<Vec<f32>> = Tensor::from_vec(a.clone(), (m, k), &cpu)
            .expect("a")
            .matmul(&Tensor::from_vec(b.clone(), (k, n), &cpu).expect("b"))
            .expect("matmul")
            .to_vec2()
            .expect("vec");
        for (i, row) in got.iter().enumerate() {
            for (j, &g) in row.iter().enumerate() {
                let want: f64 = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j]))
                    .sum();
                assert!(
                    (f64::from(g) - want).abs() < 1e-4,
                    "({m}x{k})·({k}x{n}) at ({i}, {j}): {g} vs {want}"
                );
            }
        }
    }
}

#[test]
fn q8_1_quantisation_equals_its_definition_bit_for_bit() {
    let cpu = Device::Cpu;
    // Random blocks; a block whose scale is exactly 1 (amax 127) with values
    // on the halves, where rounding goes away from zero; an all-zero block.
    let mut x = values(9, 32 * 6);
    let ties: Vec<f32> = (0..32)
        .map(|i| if i == 0 { 127.0 } else { i as f32 * 1.5 - 23.5 })
        .collect();
    x.extend(&ties);
    x.extend([0f32; 32]);
    x.extend(values(10, 32).iter().map(|v| v * 1e-3));
    let blocks = x.len() / 32;
    let q = QTensor::quantize(
        &Tensor::from_vec(x.clone(), (blocks, 32), &cpu).expect("x"),
        GgmlDType::Q8_1,
    )
    .expect("quantize");
    let bytes = q.data().expect("bytes");
    assert_eq!(bytes.len(), blocks * 36);
    for (b, (got, x)) in bytes.chunks_exact(36).zip(x.chunks_exact(32)).enumerate() {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let qs: Vec<i8> = x.iter().map(|v| (v * id).round() as i8).collect();
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        let d16 = half::f16::from_f32(d);
        let s16 = half::f16::from_f32(sum as f32) * d16;
        let mut want = Vec::with_capacity(36);
        want.extend(d16.to_bits().to_le_bytes());
        want.extend(s16.to_bits().to_le_bytes());
        want.extend(qs.iter().map(|&q| q as u8));
        assert_eq!(got, &want[..], "block {b}");
    }
}
