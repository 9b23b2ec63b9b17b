//! Attention by blocks of query rows, and its vectorised softmax and `exp`.

use rayon::prelude::*;

use super::attention_flash::attention_flash;
use super::gemm_f32;
use super::matmul::matmul;

/// The widest head [`attention`] sends to the flash kernel: the UNets'
/// heads (40–160). The VAE's one 512-wide head stays on the blocked
/// kernel: with it on the flash kernel the VAE decode that followed ran
/// 25 % slower in its convolutions (Zen 4, alternating runs), an effect of
/// the allocations around it not yet understood.
const FLASH_MAX_HEAD_DIM: usize = 256;

/// Rows of queries handled per attention block.
const ATTENTION_BLOCK: usize = 128;

/// Scaled dot-product attention, `softmax(q kᵀ · scale) v`, per
/// (batch × head), in blocks of query rows: the score matrix of one block
/// (`block × m`) is all that exists at a time, so memory stays
/// `O(threads · block · m)` instead of `O(heads · n · m)`.
///
/// - `q`: `(bh, n, d)`, `k`, `v`: `(bh, m, d)` → `(bh, n, d)`.
///
/// Where the f32 AVX-512 kernel runs (`gemm_f32::available`), a positive
/// `scale` and at least one key, this is flash attention instead
/// (`attention_flash`: keys in chunks, an online softmax, `O(threads · 512
/// · 64)` scores).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    if gemm_f32::available() && scale > 0.0 && m > 0 && d <= FLASH_MAX_HEAD_DIM {
        return attention_flash(q, k, v, bh, n, m, d, scale);
    }
    attention_blocked(q, k, v, bh, n, m, d, scale)
}

/// [`attention`] by blocks of [`ATTENTION_BLOCK`] query rows, the whole
/// `block × m` score matrix of a block at a time (every CPU, any scale).
#[allow(clippy::too_many_arguments)]
fn attention_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; bh * n * d];
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(head, head_out)| {
            let kh = &k[head * m * d..(head + 1) * m * d];
            let vh = &v[head * m * d..(head + 1) * m * d];
            head_out
                .par_chunks_mut(ATTENTION_BLOCK * d)
                .enumerate()
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, (blk, dst)| {
                    let rows = dst.len() / d;
                    let qh = &q[head * n * d + blk * ATTENTION_BLOCK * d..][..rows * d];
                    scores.resize(rows * m, 0.0);
                    // SAFETY: qh is rows×d, kh is m×d read transposed (column
                    // stride d), scores is rows×m.
                    unsafe {
                        gemm::gemm(
                            rows,
                            m,
                            d,
                            scores.as_mut_ptr(),
                            1,
                            m as isize,
                            false,
                            qh.as_ptr(),
                            1,
                            d as isize,
                            kh.as_ptr(),
                            d as isize,
                            1,
                            1.0f32,
                            scale,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    for row in scores.chunks_mut(m) {
                        softmax_in_place(row);
                    }
                    // SAFETY: scores is rows×m, vh m×d, dst rows×d.
                    unsafe {
                        matmul(
                            rows,
                            d,
                            m,
                            dst.as_mut_ptr(),
                            d,
                            false,
                            scores.as_ptr(),
                            m,
                            vh.as_ptr(),
                            d,
                            gemm::Parallelism::None,
                        );
                    }
                });
        });
    out
}

/// `row = exp(row - max) / Σ exp(row - max)`, with [`exp_f32`] over eight
/// independent lanes so it vectorises (AVX2 + FMA when the CPU has them,
/// chosen at run time; SSE2 otherwise). The sum is taken lane-wise, so it
/// rounds differently from a sequential sum (relative 1e-7).
pub(super) fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { softmax_avx2(row) };
            return;
        }
    }
    softmax_lanes(row);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax_lanes(row)
}

#[inline(always)]
fn softmax_lanes(row: &mut [f32]) {
    const LANES: usize = 8;
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = maxes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        max = max.max(v);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = exp_f32(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `eˣ` for f32 by range reduction `x = n ln 2 + r`, `|r| ≤ ½ ln 2`, and
/// Cephes' degree-6 polynomial for `eʳ` (`expf.c`, S. Moshier), relative
/// error about 2e-7 (1–2 ulp); `x` below -87 gives 0 or a value below
/// 1e-37 (softmax inputs are ≤ 0 after subtracting the maximum), above 88
/// it saturates at about 1.6e38. Branch-free, so loops of it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    // `t`'s low mantissa bits hold the integer n: reading it from the bits
    // (not `n as i32`, whose NaN and saturation checks do not vectorise)
    // keeps the whole function in vector registers.
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, randn};
    use super::super::{tensor, with_f32};
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst:.2e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(f32::NEG_INFINITY) < 1e-37);
        // Softmax rows sum to one, also with a remainder after the lanes.
        let mut row: Vec<f32> = (0..29).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let want: Vec<f64> = {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        };
        softmax_in_place(&mut row);
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-7, "{g} vs {w}");
        }
    }

    #[test]
    fn attention_matches_naive_across_block_boundaries() {
        // n = 300 spans three blocks of 128 (five flash blocks of 64) with
        // a partial last block; m = 1100 three flash key chunks of 512,
        // the last partial (the online softmax rescales twice).
        for (bh, n, m, d) in [(3, 300, 77, 8), (2, 70, 1100, 40)] {
            compare_with_naive(bh, n, m, d);
        }
    }

    fn compare_with_naive(bh: usize, n: usize, m: usize, d: usize) {
        let q = randn(&[bh, n, d], 7);
        let k = randn(&[bh, m, d], 8);
        let v = randn(&[bh, m, d], 9);
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        // The dispatching entry point (flash where the CPU has AVX-512F)
        // and the blocked kernel every CPU runs.
        for (name, kernel) in [
            (
                "attention",
                attention as fn(&[f32], &[f32], &[f32], _, _, _, _, _) -> Vec<f32>,
            ),
            ("attention_blocked", attention_blocked),
        ] {
            let got = with_f32(&q, |qd| {
                with_f32(&k, |kd| {
                    with_f32(&v, |vd| kernel(qd, kd, vd, bh, n, m, d, scale as f32))
                })
            })
            .unwrap()
            .unwrap()
            .unwrap();
            let diff = max_diff(&tensor(got, &[bh, n, d]).unwrap(), &want);
            assert!(diff < 1e-5, "{name} {bh}x{n}x{m}x{d}: {diff}");
        }
    }
}
