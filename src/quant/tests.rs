//! Tests: hand-computed blocks per format, scalar dots against an f64 reference built from
//! `dequantize`, SIMD dots against scalar, quantisers against ggml's rules (and the Q5 formats
//! against gguf-py's, `tests/fixtures/quant/q5.json`; the K-quants' dequantisation against
//! gguf-py's, `tests/fixtures/quant/k.json`), and an ignored timing test
//! (`cargo test --release --lib quant::tests::timing -- --ignored --nocapture`).

use super::*;
use crate::rng::Rng;
use half::{bf16, f16};

const ALL: [DType; 15] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::IQ4NL,
    DType::IQ4XS,
];

/// A vector with per-32 magnitude changes, like real activations.
fn activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut scale = 1.0;
    (0..n)
        .map(|i| {
            if i % 32 == 0 {
                scale = 0.01 + 4.0 * rng.symmetric().abs();
            }
            scale * rng.symmetric()
        })
        .collect()
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    rng.fill_bytes(&mut out);
    out
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// A random row of `n` values of `dtype`: random quants, sane random scales.
fn random_row(rng: &mut Rng, dtype: DType, n: usize) -> Vec<u8> {
    if !dtype.is_quantized() {
        let mut out = Vec::new();
        quantize(dtype, &activations(rng, n), &mut out).unwrap();
        return out;
    }
    let bb = dtype.block_bytes();
    let mut row = random_bytes(rng, n / dtype.block_len() * bb);
    for b in row.chunks_exact_mut(bb) {
        let d = 0.001 + 0.05 * rng.symmetric().abs();
        match dtype {
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4NL | DType::IQ4XS => {
                put_f16(b, 0, d)
            }
            DType::Q4_1 | DType::Q5_1 => {
                put_f16(b, 0, d);
                put_f16(b, 2, -0.4 * rng.symmetric().abs());
            }
            DType::Q4K | DType::Q5K => {
                put_f16(b, 0, d);
                put_f16(b, 2, 0.5 * d);
            }
            DType::Q2K => {
                put_f16(b, 80, d);
                put_f16(b, 82, 0.5 * d);
            }
            DType::Q3K => put_f16(b, 108, d),
            DType::Q6K => put_f16(b, 208, d),
            _ => unreachable!(),
        }
    }
    row
}

/// The activation in `act` as f32 values (what the kernels multiply by).
fn act_values(act: &ActivationBuffer) -> Vec<f64> {
    match act.activation().unwrap() {
        QuantizedActivation::F32(x) => x.iter().map(|&v| v as f64).collect(),
        QuantizedActivation::Q8_0(a) | QuantizedActivation::Q8_1(a) => {
            let d = |i: usize| a.d[i / 32] as f64;
            a.qs.iter()
                .enumerate()
                .map(|(i, &q)| q as f64 * d(i))
                .collect()
        }
        QuantizedActivation::Q8K(a) => {
            let d = |i: usize| a.d[i / 256] as f64;
            a.qs.iter()
                .enumerate()
                .map(|(i, &q)| q as f64 * d(i))
                .collect()
        }
    }
}

/// f64 reference for `vec_dot` and the sum of |terms| to scale tolerances by.
fn reference(dtype: DType, row: &[u8], act: &ActivationBuffer) -> (f64, f64) {
    let a = act_values(act);
    let mut w = vec![0.0f32; a.len()];
    dequantize(dtype, row, &mut w).unwrap();
    let mut dot: f64 = w.iter().zip(&a).map(|(&w, &a)| w as f64 * a).sum();
    let mag: f64 = w.iter().zip(&a).map(|(&w, &a)| (w as f64 * a).abs()).sum();
    if matches!(dtype, DType::Q4_1 | DType::Q5_1) {
        // The kernel uses Q8_1's f16-rounded `s` for the min term, as ggml does: swap the exact
        // min term for that one.
        let q8 = match act.activation().unwrap() {
            QuantizedActivation::Q8_1(q8) => q8,
            _ => unreachable!(),
        };
        for (i, b) in row.chunks_exact(dtype.block_bytes()).enumerate() {
            let m = f16_at(b, 2) as f64;
            let exact: f64 = a[32 * i..32 * i + 32].iter().sum::<f64>();
            dot += m * (q8.s[i] as f64 - exact);
        }
    }
    (dot, mag)
}

fn lens(dtype: DType) -> Vec<usize> {
    match dtype {
        DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K | DType::IQ4XS => {
            vec![256, 768, 2048]
        }
        // 32 and 96: one and three blocks, so IQ4_NL's odd last block is covered.
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::IQ4NL => {
            vec![32, 96, 576, 896, 2048]
        }
        _ => vec![1, 7, 33, 576, 1000],
    }
}

#[test]
fn scalar_dot_matches_dequantized_reference() {
    let mut rng = Rng::new(0x1234_5678);
    let mut act = ActivationBuffer::default();
    for dtype in ALL {
        for n in lens(dtype) {
            for _ in 0..5 {
                let row = random_row(&mut rng, dtype, n);
                act.quantize_for(dtype, &activations(&mut rng, n)).unwrap();
                let (want, mag) = reference(dtype, &row, &act);
                let got = scalar_dot(dtype, &row, &act) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-30,
                    "{dtype} n={n}: scalar {got} vs reference {want} (mag {mag})"
                );
            }
        }
    }
}

fn scalar_dot(dtype: DType, row: &[u8], act: &ActivationBuffer) -> f32 {
    match dtype {
        DType::F32 => float::dot_f32_scalar(row, &act.f32),
        DType::F16 => float::dot_f16_scalar(row, &act.f32),
        DType::BF16 => float::dot_bf16_scalar(row, &act.f32),
        DType::Q4_0 => q4_0::dot_scalar(row, &act.q8),
        DType::Q4_1 => q4_1::dot_scalar(row, &act.q8),
        DType::Q5_0 => q5_0::dot_scalar(row, &act.q8),
        DType::Q5_1 => q5_1::dot_scalar(row, &act.q8),
        DType::Q8_0 => q8_0::dot_scalar(row, &act.q8),
        DType::Q2K => q2_k::dot_scalar(row, &act.q8k),
        DType::Q3K => q3_k::dot_scalar(row, &act.q8k),
        DType::Q4K => q4_k::dot_scalar(row, &act.q8k),
        DType::Q5K => q5_k::dot_scalar(row, &act.q8k),
        DType::Q6K => q6_k::dot_scalar(row, &act.q8k),
        DType::IQ4NL => iq4_nl::dot_scalar(row, &act.q8),
        DType::IQ4XS => iq4_xs::dot_scalar(row, &act.q8k),
    }
}

#[test]
fn simd_dot_matches_scalar() {
    if !use_simd() {
        eprintln!("no avx2+fma+f16c here: SIMD kernels not tested");
        return;
    }
    let mut rng = Rng::new(0xDEAD_BEEF);
    let mut act = ActivationBuffer::default();
    for dtype in ALL {
        for n in lens(dtype) {
            for _ in 0..5 {
                // Shift the row by one byte so the SIMD loads are unaligned.
                let mut buf = vec![0u8];
                buf.extend(random_row(&mut rng, dtype, n));
                let row = &buf[1..];
                act.quantize_for(dtype, &activations(&mut rng, n)).unwrap();
                let (_, mag) = reference(dtype, row, &act);
                let want = scalar_dot(dtype, row, &act) as f64;
                let got = vec_dot(dtype, row, &act) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-30,
                    "{dtype} n={n}: simd {got} vs scalar {want} (mag {mag})"
                );
            }
        }
    }
}

#[test]
fn matvec_is_one_dot_per_row() {
    let mut rng = Rng::new(7);
    let mut act = ActivationBuffer::default();
    for dtype in ALL {
        let n = 512;
        let rows = 5;
        let w: Vec<u8> = (0..rows)
            .flat_map(|_| random_row(&mut rng, dtype, n))
            .collect();
        act.quantize_for(dtype, &activations(&mut rng, n)).unwrap();
        let mut out = vec![0.0; rows];
        matvec(dtype, &w, &act, &mut out);
        let rb = w.len() / rows;
        for (r, y) in out.iter().enumerate() {
            assert_eq!(*y, vec_dot(dtype, &w[r * rb..(r + 1) * rb], &act));
        }
    }
}

#[test]
fn four_dots_at_once_are_the_single_dots() {
    let mut rng = Rng::new(11);
    for dtype in ALL {
        let n = 512;
        let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(&mut rng, dtype, n)).collect();
        let acts: Vec<ActivationBuffer> = (0..4)
            .map(|_| {
                let mut a = ActivationBuffer::default();
                a.quantize_for(dtype, &activations(&mut rng, n)).unwrap();
                a
            })
            .collect();
        let acts4 = [&acts[0], &acts[1], &acts[2], &acts[3]];
        // One row with four activations (a prefill batch), and four rows with four.
        let same = vec_dot4(dtype, [&rows[0][..]; 4], acts4);
        let each = vec_dot4(dtype, std::array::from_fn(|k| &rows[k][..]), acts4);
        for k in 0..4 {
            assert_eq!(
                same[k],
                vec_dot(dtype, &rows[0], &acts[k]),
                "{dtype} row 0, act {k}"
            );
            assert_eq!(
                each[k],
                vec_dot(dtype, &rows[k], &acts[k]),
                "{dtype} row {k}"
            );
        }
    }
}

#[test]
fn axpy_is_dequantize_then_multiply_add() {
    let mut rng = Rng::new(13);
    for dtype in ALL {
        let n = 512;
        let col = random_row(&mut rng, dtype, n);
        let start = activations(&mut rng, n);
        let mut got = start.clone();
        axpy(dtype, -0.37, &col, &mut got);
        let w = deq(dtype, &col);
        let want: Vec<f32> = start.iter().zip(&w).map(|(o, w)| o + -0.37 * w).collect();
        assert_eq!(got, want, "{dtype}");
    }
}

#[test]
fn axpy4_is_four_axpys_and_skips_zero_weights() {
    let mut rng = Rng::new(14);
    for dtype in ALL {
        let n = 512;
        let col = random_row(&mut rng, dtype, n);
        // -0.0 in an output stays -0.0 where its weight is zero (an add of 0 * w would not).
        let mut start: Vec<Vec<f32>> = (0..4).map(|_| activations(&mut rng, n)).collect();
        start[2][0] = -0.0;
        let a = [0.81, -0.37, 0.0, 2.5];
        let mut want = start.clone();
        for (a, w) in a.iter().zip(want.iter_mut()) {
            if *a != 0.0 {
                axpy(dtype, *a, &col, w);
            }
        }
        let mut got = start.clone();
        let [g0, g1, g2, g3] = &mut got[..] else {
            unreachable!()
        };
        axpy4(dtype, a, &col, [g0, g1, g2, g3]);
        for k in 0..4 {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got[k]), bits(&want[k]), "{dtype} output {k}");
        }
    }
}

fn deq(dtype: DType, b: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; b.len() / dtype.block_bytes() * dtype.block_len()];
    dequantize(dtype, b, &mut out).unwrap();
    out
}

#[test]
fn dequantize_known_q8_0_block() {
    let mut b = vec![0u8; 34];
    put_f16(&mut b, 0, 0.5);
    b[2..6].copy_from_slice(&[1, (-2i8) as u8, 127, 0x80]);
    let y = deq(DType::Q8_0, &b);
    assert_eq!(&y[..5], &[0.5, -1.0, 63.5, -64.0, 0.0]);
}

#[test]
fn dequantize_known_q4_0_block() {
    let mut b = vec![0x88u8; 18]; // nibble 8 = value 0
    put_f16(&mut b, 0, 2.0);
    b[2] = 0x9F;
    b[3] = 0x08;
    let y = deq(DType::Q4_0, &b);
    assert_eq!(
        (y[0], y[16], y[1], y[17], y[2]),
        (14.0, 2.0, 0.0, -16.0, 0.0)
    );
}

#[test]
fn dequantize_known_q4_1_block() {
    let mut b = vec![0u8; 20];
    put_f16(&mut b, 0, 0.5);
    put_f16(&mut b, 2, -1.0);
    b[4] = 0x3A;
    let y = deq(DType::Q4_1, &b);
    assert_eq!((y[0], y[16], y[1]), (4.0, 0.5, -1.0));
}

#[test]
fn dequantize_known_q4_k_block() {
    let mut b = vec![0u8; 144];
    put_f16(&mut b, 0, 1.0);
    put_f16(&mut b, 2, 0.5);
    // Sub-block 0: scale 2, min 3. Sub-block 4: scale 1 | 3 << 4 = 49, min 2 | 1 << 4 = 18.
    b[4] = 0xC2;
    b[4 + 4] = 0x43;
    b[4 + 8] = 0x21;
    b[16] = 0x75; // value 0 (sub-block 0) = 5, value 32 (sub-block 1) = 7
    b[16 + 64] = 0x03; // value 128 (sub-block 4) = 3
    let y = deq(DType::Q4K, &b);
    assert_eq!(y[0], 2.0 * 5.0 - 0.5 * 3.0);
    assert_eq!(y[1], -1.5);
    assert_eq!(y[32], 0.0); // sub-block 1 has scale 0 and min 0
    assert_eq!(y[128], 49.0 * 3.0 - 0.5 * 18.0);
    assert_eq!(y[129], -9.0);
}

#[test]
fn dequantize_known_q6_k_block() {
    let mut b = vec![0u8; 210];
    put_f16(&mut b, 208, 0.5);
    let sc = |b: &mut Vec<u8>, g: usize, v: i8| b[192 + g] = v as u8;
    sc(&mut b, 0, 2);
    sc(&mut b, 2, -3);
    sc(&mut b, 4, 4);
    sc(&mut b, 8, 1);
    b[0] = 0x21; // low bits of values 0 (1) and 64 (2)
    b[128] = 0x9C; // high bits: value 0 -> 0, 32 -> 3, 64 -> 1, 96 -> 2
    let y = deq(DType::Q6K, &b);
    assert_eq!(y[0], 0.5 * 2.0 * (1.0 - 32.0));
    assert_eq!(y[32], 0.5 * -3.0 * (48.0 - 32.0));
    assert_eq!(y[64], 0.5 * 4.0 * (18.0 - 32.0));
    assert_eq!(y[96], 0.0); // group 6 has scale 0
    assert_eq!(y[1], 0.5 * 2.0 * -32.0);
    assert_eq!(y[128], 0.5 * 1.0 * -32.0);
}

#[test]
fn dequantize_known_float_rows() {
    let x = [1.5f32, -2.25, 1e-3];
    let mut b = Vec::new();
    quantize(DType::F32, &x, &mut b).unwrap();
    assert_eq!(deq(DType::F32, &b), x);
    let h: Vec<u8> = [0x3E00u16, 0xC000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(deq(DType::F16, &h), [1.5, -2.0]);
    let h: Vec<u8> = [0x3FC0u16, 0xC010]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(deq(DType::BF16, &h), [1.5, -2.25]);
    assert_eq!(bf16::from_f32(1.5).to_bits(), 0x3FC0);
}

#[test]
fn quantize_round_trips_within_half_a_step() {
    let mut rng = Rng::new(99);
    for dtype in [
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
    ] {
        let x = activations(&mut rng, 32 * 20);
        let mut b = Vec::new();
        quantize(dtype, &x, &mut b).unwrap();
        assert_eq!(b.len(), 20 * dtype.block_bytes());
        let y = deq(dtype, &b);
        for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let d = f16_at(&b, blk * dtype.block_bytes()).abs();
            // Q4_0 and Q5_0 clamp the top level (the largest magnitude maps to -8 or -16, its
            // opposite can only reach +7 or +15), so allow a whole step there; f16 scales add
            // a little.
            let step = if matches!(dtype, DType::Q4_0 | DType::Q5_0) {
                1.0
            } else {
                0.5
            };
            let tol = step * d * 1.01 + 1e-3 * d.max(1.0);
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= tol, "{dtype}: {a} -> {b}, step {d}");
            }
        }
    }
}

#[test]
fn q4_0_quantize_matches_ggml_rules() {
    // Largest magnitude -4 -> d = 0.5, maps to nibble 0; 3.5 -> 15; 0 -> 8; 0.26 -> 8.52 -> 9.
    let mut x = [0.0f32; 32];
    x[0] = -4.0;
    x[1] = 3.5;
    x[2] = 0.26;
    let mut b = Vec::new();
    quantize(DType::Q4_0, &x, &mut b).unwrap();
    assert_eq!(f16_at(&b, 0), 0.5);
    assert_eq!(&b[2..5], &[0x80, 0x8F, 0x89]);
}

#[test]
fn q8_activations_follow_ggml() {
    // ggml's AVX2 quantize_row_q8_1: id = 127 / amax, round half to even
    // (_mm256_round_ps with _MM_ROUND_NEAREST), d = amax / 127 stored as f16,
    // s = d * sum(q) stored as f16. With amax = 127, id = d = 1 exactly.
    let mut x = vec![0.0f32; 64];
    x[0] = 127.0;
    x[1] = -0.5; // ties to even: 0, where roundf would give -1
    x[2] = 63.5; // ties to even: 64
    x[3] = 2.5; // ties to even: 2
    let mut act = ActivationBuffer::default();
    act.quantize_for(DType::Q4_1, &x).unwrap();
    let Some(QuantizedActivation::Q8_1(a)) = act.activation() else {
        panic!("not Q8_1")
    };
    assert_eq!(&a.qs[..4], &[127, 0, 64, 2]);
    assert_eq!(a.d[0], 1.0);
    assert_eq!(a.s[0], (127 + 64 + 2) as f32);
    assert_eq!((a.d[1], a.s[1]), (0.0, 0.0));
}

#[test]
fn q8_k_activations_follow_ggml() {
    let mut rng = Rng::new(5);
    let mut x = activations(&mut rng, 512);
    // Block 1's signed max is -127, so iscale = -127 / max = 1 exactly and q = x: the max maps
    // to -127 and halves round to even (ggml's nearest_int), unlike roundf.
    x[300] = -127.0;
    x[301] = 63.5;
    x[302] = 62.5;
    let mut act = ActivationBuffer::default();
    act.quantize_for(DType::Q6K, &x).unwrap();
    let Some(QuantizedActivation::Q8K(a)) = act.activation() else {
        panic!("not Q8K")
    };
    assert_eq!(a.d[1], 1.0);
    assert_eq!((a.qs[300], a.qs[301], a.qs[302]), (-127, 64, 62));
    for (g, s) in a.bsums.iter().enumerate() {
        let want: i32 = a.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
        assert_eq!(*s as i32, want);
    }
    for (i, (&xi, &q)) in x.iter().zip(&a.qs).enumerate() {
        assert!((q as f32 * a.d[i / 256] - xi).abs() <= a.d[i / 256].abs() * 0.5001);
    }
    act.quantize_for(DType::Q4K, &[0.0; 256]).unwrap();
    assert_eq!(act.len(), 256);
    assert_eq!(
        vec_dot(DType::Q4K, &random_row(&mut rng, DType::Q4K, 256), &act),
        0.0
    );
}

#[test]
fn bad_lengths_are_errors() {
    let mut act = ActivationBuffer::default();
    assert!(matches!(
        act.quantize_for(DType::Q4K, &[0.0; 255]),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        dequantize(DType::Q8_0, &[0; 33], &mut [0.0; 32]),
        Err(QuantError::PartialBytes { .. })
    ));
    assert!(matches!(
        dequantize(DType::Q8_0, &[0; 34], &mut [0.0; 31]),
        Err(QuantError::OutputLength { .. })
    ));
    assert!(matches!(
        quantize(DType::Q6K, &[0.0; 256], &mut Vec::new()),
        Err(QuantError::Unsupported(DType::Q6K))
    ));
}

#[test]
#[should_panic(expected = "not quantised for")]
fn vec_dot_rejects_the_wrong_activation() {
    let mut act = ActivationBuffer::default();
    act.quantize_for(DType::Q8_0, &[0.0; 256]).unwrap();
    vec_dot(DType::Q4K, &[0; 144], &act);
}

/// Single-threaded matvec timings; run with `--ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    let mut rng = Rng::new(42);
    let mut act = ActivationBuffer::default();
    let cases = [
        (DType::Q4_1, 1536, 576),
        (DType::Q4_1, 1536, 576),
        (DType::Q8_0, 49152, 576),
        (DType::Q4_0, 1536, 576),
        (DType::Q5_0, 896, 896),
        (DType::Q5_0, 4864, 896),
        (DType::Q5_1, 4864, 896),
        (DType::Q4_1, 96, 9216),
        (DType::Q2K, 1536, 2048),
        (DType::Q3K, 1536, 2048),
        (DType::Q4K, 1536, 2048),
        (DType::Q5K, 1536, 2048),
        (DType::Q6K, 1536, 2048),
        (DType::F16, 1536, 576),
        (DType::F32, 1536, 576),
    ];
    for (dtype, rows, cols) in cases {
        let w: Vec<u8> = (0..rows)
            .flat_map(|_| random_row(&mut rng, dtype, cols))
            .collect();
        let x = activations(&mut rng, cols);
        let mut out = vec![0.0; rows];
        let iters = (400_000_000 / w.len()).clamp(3, 400);
        act.quantize_for(dtype, &x).unwrap();
        matvec(dtype, &w, &act, &mut out);
        // Best of 5 rounds: the machine is shared, so the minimum is the least disturbed.
        let (mut quant, mut per) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..iters {
                act.quantize_for(dtype, &x).unwrap();
            }
            quant = quant.min(t.elapsed().as_secs_f64() / iters as f64);
            let t = std::time::Instant::now();
            for _ in 0..iters {
                matvec(dtype, &w, &act, &mut out);
            }
            per = per.min(t.elapsed().as_secs_f64() / iters as f64);
        }
        let t = std::time::Instant::now();
        for r in 0..rows.min(2000) {
            let rb = w.len() / rows;
            out[r] = scalar_dot(dtype, &w[r * rb..(r + 1) * rb], &act);
        }
        let scalar = t.elapsed().as_secs_f64() / rows.min(2000) as f64 * rows as f64;
        println!(
            "{dtype} {rows}x{cols}: {:.1} us/matvec ({:.2} GB/s) + {:.1} us quantising x, scalar {:.1} us (simd={})",
            per * 1e6,
            w.len() as f64 / per / 1e9,
            quant * 1e6,
            scalar * 1e6,
            use_simd()
        );
    }
}

/// `--activations f32`: a quantised row dotted with f32 activations is the dequantised row's
/// dot, to f32 rounding (the kernel; `each_buffer_keeps_its_own_arithmetic` goes through the
/// buffers).
#[test]
fn f32_activations_dot_the_dequantised_row() {
    let mut rng = Rng::new(0x5eed_f32a);
    for dtype in [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::IQ4NL,
        DType::IQ4XS,
    ] {
        for n in lens(dtype) {
            let row = random_row(&mut rng, dtype, n);
            let x = activations(&mut rng, n);
            let w = deq(dtype, &row);
            let want: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = w
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            for simd in [false, use_simd()] {
                let got = dot_dequantized(dtype, &row, &x, simd) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-30,
                    "{dtype} n={n} simd {simd}: {got} vs {want} (mag {mag})"
                );
            }
        }
    }
}

/// The Q5, Q2_K/Q3_K/Q5_K and IQ4 kernels sum in the same lanes and order in scalar and AVX2 code
/// (ggml's AVX2 order), so the two agree to the bit, not just within rounding: a model's
/// outputs do not depend on the CPU it runs on.
#[test]
fn lane_ordered_simd_dots_equal_scalar_to_the_bit() {
    if !use_simd() {
        eprintln!("no avx2+fma+f16c here: SIMD kernels not tested");
        return;
    }
    let mut rng = Rng::new(0x0005_0005);
    let mut act = ActivationBuffer::default();
    for dtype in [
        DType::Q5_0,
        DType::Q5_1,
        DType::Q2K,
        DType::Q3K,
        DType::Q5K,
        DType::IQ4NL,
        DType::IQ4XS,
    ] {
        for n in lens(dtype) {
            for _ in 0..20 {
                let mut buf = vec![0u8];
                buf.extend(random_row(&mut rng, dtype, n));
                let row = &buf[1..];
                act.quantize_for(dtype, &activations(&mut rng, n)).unwrap();
                let (want, got) = (scalar_dot(dtype, row, &act), vec_dot(dtype, row, &act));
                assert_eq!(
                    want.to_bits(),
                    got.to_bits(),
                    "{dtype} n={n}: {got} vs {want}"
                );
            }
        }
    }
}

/// Against f32 activations (not quantised), the Q5 dots are off by no more than what
/// quantising the activations to Q8 costs: per value, half a Q8 step plus the f16 rounding of
/// the block's scale (127 steps of 2^-11 relative), and for Q5_1 the f16 rounding of Q8_1's
/// `s` in the min term.
#[test]
fn q5_dots_are_within_q8_error_of_the_float_dot() {
    let mut rng = Rng::new(0x0005_f10a);
    let mut act = ActivationBuffer::default();
    for dtype in [DType::Q5_0, DType::Q5_1] {
        for n in lens(dtype) {
            for _ in 0..5 {
                let row = random_row(&mut rng, dtype, n);
                let x = activations(&mut rng, n);
                act.quantize_for(dtype, &x).unwrap();
                let w = deq(dtype, &row);
                let exact: f64 = w.iter().zip(&x).map(|(&w, &x)| w as f64 * x as f64).sum();
                let mut bound = 0.0f64;
                for (blk, (wb, xb)) in w.chunks(32).zip(x.chunks(32)).enumerate() {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                    let step = amax / 127.0;
                    let per_value = step / 2.0 + 127.0 * step * 2f64.powi(-11);
                    bound += wb.iter().map(|&w| w.abs() as f64).sum::<f64>() * per_value;
                    if dtype == DType::Q5_1 {
                        let m = f16_at(&row, blk * 24 + 2).abs() as f64;
                        bound += m * (32.0 * amax) * 2f64.powi(-10);
                    }
                }
                let got = vec_dot(dtype, &row, &act) as f64;
                let err = (got - exact).abs();
                assert!(
                    err <= bound * 1.01 + 1e-6,
                    "{dtype} n={n}: {got} vs float {exact}: error {err} over bound {bound}"
                );
                // Rounding errors mostly cancel: far inside the worst case.
                assert!(err <= bound / 4.0 + 1e-6, "{dtype} n={n}: {err} vs {bound}");
            }
        }
    }
}

#[test]
fn dequantize_known_q5_0_block() {
    let mut b = vec![0u8; 22];
    put_f16(&mut b, 0, 0.5);
    // Fifth bits: values 0 and 17.
    b[2..6].copy_from_slice(&(1u32 | 1 << 17).to_le_bytes());
    b[6] = 0x3F; // value 0: 15 | 16 = 31, value 16: 3
    b[7] = 0x20; // value 1: 0, value 17: 2 | 16 = 18
    let y = deq(DType::Q5_0, &b);
    assert_eq!(
        (y[0], y[16], y[1], y[17], y[2]),
        (7.5, -6.5, -8.0, 1.0, -8.0)
    );
}

#[test]
fn dequantize_known_q5_1_block() {
    let mut b = vec![0u8; 24];
    put_f16(&mut b, 0, 0.5);
    put_f16(&mut b, 2, -1.0);
    b[4..8].copy_from_slice(&(1u32 << 31).to_le_bytes()); // fifth bit of value 31
    b[8] = 0x3A; // value 0: 10, value 16: 3
    b[23] = 0xF0; // value 15: 0, value 31: 15 | 16 = 31
    let y = deq(DType::Q5_1, &b);
    assert_eq!(
        (y[0], y[16], y[1], y[15], y[31]),
        (4.0, 0.5, -1.0, -1.0, 14.5)
    );
}

#[test]
fn q5_dtypes_are_ggml_types_6_and_7() {
    for (id, dtype, bytes) in [(6, DType::Q5_0, 22), (7, DType::Q5_1, 24)] {
        assert_eq!(DType::from_ggml(id), Some(dtype));
        assert_eq!(dtype.ggml_id(), id);
        assert_eq!((dtype.block_len(), dtype.block_bytes()), (32, bytes));
    }
}

/// `tests/fixtures/quant/q5.json`, written by `tools/make_quant_fixtures.py` with the `gguf`
/// package: our quantisers and dequantisers give its bytes and values exactly.
#[test]
fn q5_formats_match_gguf_py() {
    let fx: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/quant/q5.json"
    )))
    .unwrap();
    let hex = |v: &serde_json::Value| -> Vec<u8> {
        let s = v.as_str().unwrap().as_bytes();
        s.chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    };
    let f32s = |v: &serde_json::Value| -> Vec<u32> {
        hex(v)
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let x: Vec<f32> = f32s(&fx["input_f32"])
        .into_iter()
        .map(f32::from_bits)
        .collect();
    assert!(x.len() >= 32 * 8, "fixture has {} values", x.len());
    for (dtype, key) in [(DType::Q5_0, "q5_0"), (DType::Q5_1, "q5_1")] {
        let blocks = hex(&fx[key]["blocks"]);
        let want = f32s(&fx[key]["dequantized_f32"]);
        let got: Vec<u32> = deq(dtype, &blocks).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{dtype}: dequantised values");
        let mut ours = Vec::new();
        quantize(dtype, &x, &mut ours).unwrap();
        for (i, (o, g)) in ours
            .chunks(dtype.block_bytes())
            .zip(blocks.chunks(dtype.block_bytes()))
            .enumerate()
        {
            assert_eq!(
                o, g,
                "{dtype}: block {i} quantised differently from gguf-py"
            );
        }
    }
}

#[test]
fn k_quant_dtypes_are_ggml_types_10_to_14() {
    for (id, dtype, bytes) in [
        (10, DType::Q2K, 84),
        (11, DType::Q3K, 110),
        (12, DType::Q4K, 144),
        (13, DType::Q5K, 176),
        (14, DType::Q6K, 210),
    ] {
        assert_eq!(DType::from_ggml(id), Some(dtype));
        assert_eq!(dtype.ggml_id(), id);
        assert_eq!((dtype.block_len(), dtype.block_bytes()), (256, bytes));
    }
}

#[test]
fn dequantize_known_q5_k_block() {
    let mut b = vec![0u8; 176];
    put_f16(&mut b, 0, 1.0);
    put_f16(&mut b, 2, 0.5);
    // Scales and mins packed as Q4_K's: sub-block 0 scale 2, min 3; sub-block 5 scale 4, min 1
    // (low 4 bits in byte 8 + 1, top 2 bits zero).
    b[4] = 2;
    b[8] = 3;
    b[4 + 9] = 0x14;
    // Fifth bits: value 0 (sub-block 0, bit 0), value 32 + 2 (sub-block 1, bit 1) and value
    // 160 + 1 (sub-block 5, bit 5).
    b[16] = 0b0000_0001;
    b[16 + 2] = 0b0000_0010;
    b[16 + 1] = 0b0010_0000;
    b[48] = 0x97; // value 0: 7 | 16 = 23; value 32: 9
    b[48 + 64 + 1] = 0xA0; // value 128 + 1: 0; value 160 + 1: 10 | 16 = 26
    let y = deq(DType::Q5K, &b);
    assert_eq!(y[0], 2.0 * 23.0 - 0.5 * 3.0);
    assert_eq!(y[1], -1.5);
    assert_eq!(y[34], 0.0); // sub-block 1: scale 0 and min 0, so its fifth bit counts for 0
    assert_eq!(y[129], 0.0);
    assert_eq!(y[161], 4.0 * 26.0 - 0.5);
    assert_eq!(y[160], -0.5);
}

#[test]
fn dequantize_known_q3_k_block() {
    let mut b = vec![0u8; 110];
    put_f16(&mut b, 108, 0.5);
    // Scale 0: low nibble 1 (byte 96), top bits 2 (byte 104, bits 0..2) -> 33 - 32 = 1.
    // Scale 9: high nibble of byte 97 = 3, top bits from byte 105 bits 4..6 = 1 -> 19 - 32.
    b[96] = 0x01;
    b[104] = 0x02;
    b[97] = 0x30;
    b[105] = 0x10;
    // Run 0 (values 0..31): bits 0..2 of qs[0..32]; run 4 (values 128..159): bits 0..2 of
    // qs[32..64]; high bits from hmask bit 0 and bit 4.
    b[32] = 0b11; // value 0: low 3
    b[0] = 0b1; // value 0: high bit set, so no offset: 3
    b[32 + 1] = 0b10; // value 1: low 2, high bit clear: 2 - 4
    b[64 + 16] = 0b01; // value 128 + 16 (group 9): low 1
    b[16] = 0b1_0000; // ... high bit (bit 4) set: 1
    let y = deq(DType::Q3K, &b);
    assert_eq!(y[0], 0.5 * 1.0 * 3.0);
    assert_eq!(y[1], 0.5 * 1.0 * -2.0);
    assert_eq!(y[2], 0.5 * 1.0 * -4.0);
    assert_eq!(y[144], 0.5 * -13.0 * 1.0);
    assert_eq!(y[145], 0.5 * -13.0 * -4.0);
    assert_eq!(y[16], 0.5 * -32.0 * -4.0); // group 1's scale is 0 - 32
}

#[test]
fn dequantize_known_q2_k_block() {
    let mut b = vec![0u8; 84];
    put_f16(&mut b, 80, 0.5);
    put_f16(&mut b, 82, 0.25);
    b[0] = 0x32; // group 0: scale 2, min 3
    b[3] = 0x05; // group 3: scale 5, min 0
    b[16] = 0b1110_0011; // value 0: 3 (run 0); value 96: 3 (run 3, bits 6..8), value 32: 0
    b[16 + 17] = 0b0000_1000; // value 32 + 17 (run 1, group 3): bits 2..4 = 2
    let y = deq(DType::Q2K, &b);
    assert_eq!(y[0], 0.5 * 2.0 * 3.0 - 0.25 * 3.0);
    assert_eq!(y[1], -0.75);
    assert_eq!(y[32], 0.0);
    assert_eq!(y[49], 0.5 * 5.0 * 2.0);
    assert_eq!(y[96], 0.0); // group 6: scale 0, min 0
}

/// A fixture file of gguf-py dequantisations (`tools/make_quant_fixtures.py`): each type's
/// blocks dequantise to gguf-py's values exactly; and on those blocks (which, being random, use
/// every scale and quant bit), the SIMD dot equals the scalar one to the bit (lane-ordered
/// types) and both are the dot of the dequantised values within f32 rounding.
fn check_gguf_py_dequantisation(fixture: &str, types: &[(DType, &str)]) {
    let fx: serde_json::Value = serde_json::from_str(fixture).unwrap();
    let hex = |v: &serde_json::Value| -> Vec<u8> {
        let s = v.as_str().unwrap().as_bytes();
        s.chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    };
    let mut rng = Rng::new(0x6767_7566);
    let mut act = ActivationBuffer::default();
    for &(dtype, key) in types {
        let t = &fx[key];
        assert_eq!(
            t["ggml_type"].as_u64(),
            Some(dtype.ggml_id() as u64),
            "{key}"
        );
        let blocks = hex(&t["blocks"]);
        let want: Vec<u32> = hex(&t["dequantized_f32"])
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert!(
            blocks.len() >= 4 * dtype.block_bytes(),
            "{key}: {} bytes",
            blocks.len()
        );
        let got: Vec<u32> = deq(dtype, &blocks).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got.len(), want.len(), "{dtype}: value count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{dtype}: value {i} (block {}): {} vs gguf-py {}",
                i / dtype.block_len(),
                f32::from_bits(*g),
                f32::from_bits(*w)
            );
        }
        let n = want.len();
        for _ in 0..5 {
            act.quantize_for(dtype, &activations(&mut rng, n)).unwrap();
            let (exact, mag) = reference(dtype, &blocks, &act);
            let scalar = scalar_dot(dtype, &blocks, &act);
            let simd = vec_dot(dtype, &blocks, &act);
            // Integer sums are exact; what is left is a few f32 roundings per block (the scale
            // product, one fused add per lane, the final pairwise sum): far below 1e-5 of the
            // sum of |terms|, and a wrong scale or quant is off by far more.
            for (what, v) in [("scalar", scalar), ("simd", simd)] {
                let err = (v as f64 - exact).abs();
                assert!(
                    err <= 1e-5 * mag,
                    "{dtype} {what}: {v} vs {exact} (mag {mag})"
                );
            }
            if dtype != DType::Q4K && dtype != DType::Q6K {
                assert_eq!(
                    scalar.to_bits(),
                    simd.to_bits(),
                    "{dtype}: {simd} vs {scalar}"
                );
            }
        }
    }
}

/// `tests/fixtures/quant/k.json`: the K-quants against gguf-py.
#[test]
fn k_quants_match_gguf_py() {
    check_gguf_py_dequantisation(
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quant/k.json"
        )),
        &[
            (DType::Q2K, "q2_k"),
            (DType::Q3K, "q3_k"),
            (DType::Q4K, "q4_k"),
            (DType::Q5K, "q5_k"),
            (DType::Q6K, "q6_k"),
        ],
    );
}

/// `tests/fixtures/quant/iq4.json`: IQ4_NL and IQ4_XS against gguf-py.
#[test]
fn iq4_formats_match_gguf_py() {
    check_gguf_py_dequantisation(
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quant/iq4.json"
        )),
        &[(DType::IQ4NL, "iq4_nl"), (DType::IQ4XS, "iq4_xs")],
    );
}

#[test]
fn iq4_dtypes_are_ggml_types_20_and_23() {
    for (id, dtype, len, bytes) in [(20, DType::IQ4NL, 32, 18), (23, DType::IQ4XS, 256, 136)] {
        assert_eq!(DType::from_ggml(id), Some(dtype));
        assert_eq!(dtype.ggml_id(), id);
        assert_eq!((dtype.block_len(), dtype.block_bytes()), (len, bytes));
    }
}

#[test]
fn dequantize_known_iq4_blocks() {
    let mut b = vec![0x88u8; 18]; // nibble 8 = level 1
    put_f16(&mut b, 0, 0.5);
    b[2] = 0xF0; // value 0: level -127, value 16: level 113
    let y = deq(DType::IQ4NL, &b);
    assert_eq!((y[0], y[16], y[1], y[31]), (-63.5, 56.5, 0.5, 0.5));

    let mut b = vec![0x88u8; 136];
    put_f16(&mut b, 0, 0.25);
    // Sub-block 0: 33 - 32 = 1 (low 1, top bits 2); sub-block 3: 0xF | 1 << 4 = 31 -> -1.
    b[2..4].copy_from_slice(&(0b10u16 | 0b01 << 6).to_le_bytes());
    b[4] = 0x01;
    b[5] = 0xF0;
    b[8] = 0x87; // value 0: level -10; value 16: level 1
    b[8 + 48] = 0x8E; // value 96 (sub-block 3): level 89
    let y = deq(DType::IQ4XS, &b);
    assert_eq!((y[0], y[16], y[1]), (0.25 * -10.0, 0.25, 0.25));
    assert_eq!(y[96], -0.25 * 89.0); // d times scale -1 times level 89
    assert_eq!(y[32], 0.25 * -32.0); // sub-block 1: scale 0 - 32, level 1
}

/// The dispatch maps each dtype to its own format, and the block sizes the formats declare
/// are ggml's (a sample: the plain floats, one 32-value and one 256-value format).
#[test]
fn every_dtype_dispatches_to_its_own_format() {
    for dtype in ALL {
        assert_eq!(format_dtype(dtype), dtype);
    }
    let geometry = |d: DType| (d.block_len(), d.block_bytes());
    assert_eq!(geometry(DType::F32), (1, 4));
    assert_eq!(geometry(DType::BF16), (1, 2));
    assert_eq!(geometry(DType::Q4_0), (32, 18));
    assert_eq!(geometry(DType::Q6K), (256, 210));
}

/// The arithmetic is a property of each buffer, not of the process: buffers of both kinds
/// dot the same row side by side, the f32 one as the dequantised row's f32 dot product, the
/// Q8 one through its rounded blocks.
#[test]
fn each_buffer_keeps_its_own_arithmetic() {
    let mut rng = Rng::new(0xac7);
    for dtype in [DType::Q4K, DType::Q8_0, DType::Q4_1, DType::Q6K] {
        let n = 512;
        let row = random_row(&mut rng, dtype, n);
        let x = activations(&mut rng, n);
        let mut w = vec![0f32; n];
        dequantize(dtype, &row, &mut w).unwrap();
        let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        let scale: f64 = w
            .iter()
            .zip(&x)
            .map(|(a, b)| (*a as f64 * *b as f64).abs())
            .sum();
        let mut f = ActivationBuffer::new(Activations::F32);
        let mut q = ActivationBuffer::new(Activations::Q8);
        f.quantize_for(dtype, &x).unwrap();
        q.quantize_for(dtype, &x).unwrap();
        let (df, dq) = (vec_dot(dtype, &row, &f), vec_dot(dtype, &row, &q));
        assert!(
            (df as f64 - exact).abs() <= 1e-5 * scale.max(1.0),
            "{dtype}: f32 arithmetic gave {df}, the f32 dot product is {exact}"
        );
        assert_ne!(
            df, dq,
            "{dtype}: Q8 activations round, so they differ from f32"
        );
        assert!(
            (dq as f64 - exact).abs() <= 2e-2 * scale.max(1.0),
            "{dtype}: Q8 arithmetic gave {dq}, far from {exact}"
        );
    }
}
