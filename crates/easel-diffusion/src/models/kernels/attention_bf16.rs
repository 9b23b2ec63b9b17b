//! Attention with bf16 inputs on CPUs with AVX512-BF16: the scores
//! `q kᵀ` on the bf16 kernel of [`super::bf16`] (bf16 products, f32
//! accumulation: the numbers of the widening path, at bf16 speed), the
//! scaling and softmax in f32, and `p v` in f32 on `v` widened (exactly),
//! the probabilities kept in f32. Rounding them to bf16 for a bf16 `p v`
//! (as PyTorch's CPU flash attention does for bf16) moved the tiny
//! fixtures' SD 1.5 DDIM parity case past its bf16 bound, so that product
//! stays f32.
use half::bf16;
use rayon::prelude::*;

use super::attention::softmax_in_place;
use super::bf16::{bf16_gemm_available, gemm_block, PackedB};
use super::matmul::matmul;

/// Rows of queries handled per block (the block's `rows × m` f32 scores
/// are all that exist at a time per task).
const BLOCK: usize = 128;

/// `softmax(q kᵀ · scale) v` per (batch × head), bf16 in, f32 out (the
/// caller rounds to bf16): `q` `(bh, n, d)`, `k`, `v` `(bh, m, d)` →
/// `(bh, n, d)`. Each head's `k` is packed and its `v` widened once; query
/// blocks of [`BLOCK`] rows run in parallel.
///
/// Panics where the CPU lacks AVX512-BF16 (check [`bf16_gemm_available`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_bf16(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    assert!(bf16_gemm_available(), "attention_bf16 needs AVX512-BF16");
    assert!(q.len() == bh * n * d && k.len() == bh * m * d && v.len() == bh * m * d);
    let mut out = vec![0f32; bh * n * d];
    if bh * n * d == 0 {
        return out;
    }
    let packed: Vec<(PackedB, Vec<f32>)> = (0..bh)
        .into_par_iter()
        .map(|h| {
            let (kh, vh) = (&k[h * m * d..][..m * d], &v[h * m * d..][..m * d]);
            let wide = vh.iter().map(|x| x.to_f32()).collect();
            (PackedB::from_rows(kh, m, d), wide)
        })
        .collect();
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(head, head_out)| {
            let (kp, vp) = &packed[head];
            head_out
                .par_chunks_mut(BLOCK * d)
                .enumerate()
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, (blk, dst)| {
                    let rows = dst.len() / d;
                    let qh = &q[head * n * d + blk * BLOCK * d..][..rows * d];
                    scores.clear();
                    scores.resize(rows * m, 0.0);
                    // SAFETY: qh is rows×d, kp packs m×d, scores is rows×m;
                    // the CPU has AVX512-BF16 (asserted above).
                    unsafe {
                        gemm_block(
                            qh.as_ptr() as *const u16,
                            d,
                            d,
                            rows,
                            kp,
                            0..kp.panels(),
                            scores.as_mut_ptr(),
                            m,
                        );
                    }
                    for row in scores.chunks_mut(m) {
                        row.iter_mut().for_each(|s| *s *= scale);
                        softmax_in_place(row);
                    }
                    // SAFETY: scores is rows×m, vp m×d, dst rows×d.
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
                            vp.as_ptr(),
                            d,
                            gemm::Parallelism::None,
                        );
                    }
                });
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_matches_an_f64_reference() {
        if !bf16_gemm_available() {
            eprintln!(
                "SKIPPED attention_matches_an_f64_reference: this CPU has no AVX512-BF16 \
                 (vdpbf16ps), the bf16 kernels cannot run here"
            );
            return;
        }
        let val = |i: usize, s: usize| {
            bf16::from_f32((((i * 7919 + s * 104729) % 1000) as f32 / 500.0 - 1.0) * 1.5)
        };
        for &(bh, n, m, d) in &[(2, 3, 5, 8), (3, 130, 77, 40), (1, 200, 131, 33)] {
            let q: Vec<bf16> = (0..bh * n * d).map(|i| val(i, 1)).collect();
            let k: Vec<bf16> = (0..bh * m * d).map(|i| val(i, 2)).collect();
            let v: Vec<bf16> = (0..bh * m * d).map(|i| val(i, 3)).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let got = attention_bf16(&q, &k, &v, bh, n, m, d, scale);
            for h in 0..bh {
                for i in 0..n {
                    let s: Vec<f64> = (0..m)
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    q[(h * n + i) * d + c].to_f64()
                                        * k[(h * m + j) * d + c].to_f64()
                                })
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..m)
                            .map(|j| e[j] / sum * v[(h * m + j) * d + c].to_f64())
                            .sum();
                        let g = got[(h * n + i) * d + c] as f64;
                        // f32 accumulation of exact products, |v| ≤ 1.5.
                        assert!(
                            (g - want).abs() <= 1e-4,
                            "{bh}x{n}x{m}x{d} [{h},{i},{c}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
