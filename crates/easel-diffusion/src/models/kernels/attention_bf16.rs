//! Attention with bf16 inputs on CPUs with AVX512-BF16, as PyTorch's CPU
//! flash attention computes it for bf16 (`aten/src/ATen/native/cpu/
//! FlashAttentionKernel.cpp`; Dao et al. 2022, "FlashAttention"): keys in
//! chunks, the scores of a chunk by bf16 products with f32 accumulation,
//! an online softmax in f32 (running maximum and sum per query, earlier
//! partial outputs rescaled when the maximum grows), the chunk's
//! probabilities rounded to bf16 and multiplied with `v` in bf16 with f32
//! accumulation, and one division by the sum at the end.
//!
//! The products run transposed so that a query is a lane: for a block of
//! [`QB`] queries and a chunk of [`KB`] keys, `Sᵀ = K · Qᵀ` (`KB × QB`,
//! `K` read in place as the kernel's row-major `A`, the query block packed
//! as its `B`), the softmax then runs down the rows of `Sᵀ` 16 queries to
//! a register, writes the probabilities straight into the packed pair
//! layout of `Pᵀ`, and `Oᵀ += Vᵀ · Pᵀ` (`d × QB`, `Vᵀ` transposed once per
//! head). Only the block's `KB × QB` scores exist at a time, so memory is
//! `O(threads · KB · QB)` and the working set stays in the L2 cache.
use half::bf16;

use super::attention::exp_f32;
use super::attention_flash::{by_query_blocks, values_transposed, Running, QB};
use super::bf16::{bf16_gemm_available, gemm_block, round_into, PackedB, NR};

const _: () = assert!(QB == NR, "a query block is one packed panel of B");
/// Keys per chunk (the chunk's scores are `KB × QB` f32: 128 KiB).
const KB: usize = 512;

/// `softmax(q kᵀ · scale) v` per (batch × head), bf16 in, bf16 out
/// (rounded to nearest even from the f32 result): `q` `(bh, n, d)`, `k`,
/// `v` `(bh, m, d)` → `(bh, n, d)`. Each head's `v` is transposed once; blocks of [`QB`]
/// queries run in parallel, each over the keys in chunks of [`KB`].
///
/// `scale` must be positive (attention's `1/√d`): the softmax shifts by the
/// largest raw score.
///
/// Panics where the CPU lacks AVX512-BF16 (check [`bf16_gemm_available`]),
/// or for a `scale` that is not positive.
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
) -> Vec<bf16> {
    assert!(bf16_gemm_available(), "attention_bf16 needs AVX512-BF16");
    assert!(scale > 0.0, "attention_bf16: scale {scale} is not positive");
    assert!(q.len() == bh * n * d && k.len() == bh * m * d && v.len() == bh * m * d);
    let mut out = vec![bf16::from_bits(0); bh * n * d];
    if bh * n * d == 0 {
        return out;
    }
    if m == 0 {
        // PyTorch gives NaN for a softmax over no keys.
        out.fill(bf16::NAN);
        return out;
    }
    let vt = values_transposed(v, bh, m, d, bf16::from_bits(0));
    by_query_blocks(
        &mut out,
        q,
        n,
        d,
        |head, qh, dst, scratch: &mut Scratch| {
            let (kh, vth) = (&k[head * m * d..][..m * d], &vt[head * d * m..][..d * m]);
            let rows = dst.len() / d;
            // SAFETY: the CPU has AVX512-BF16 (asserted above).
            unsafe { scratch.block(qh, rows, kh, vth, m, d, scale, dst) };
        },
        || Scratch::new(d),
    );
    out
}

/// One task's buffers, reused across its query blocks.
struct Scratch {
    /// `Sᵀ` of one chunk, `KB × QB` f32.
    scores: Vec<f32>,
    /// `Pᵀ` of one chunk as the kernel's packed `B` (`QB` columns, `KB / 2` pairs).
    probs: PackedB,
    /// The running maxima and sums, and `Oᵀ` (f32).
    running: Running,
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            scores: vec![0.0; KB * QB],
            probs: PackedB::zeroed(QB, KB / 2),
            running: Running::new(d),
        }
    }

    /// Attention of `rows ≤ QB` queries `q` (`rows × d`) over the head's
    /// `m` keys `k` (`m × d`) and transposed values `vt` (`d × m`), into
    /// `dst` (`rows × d`).
    ///
    /// # Safety
    /// The CPU has AVX512-BF16 and AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512bf16,avx512f")]
    unsafe fn block(
        &mut self,
        q: &[bf16],
        rows: usize,
        k: &[bf16],
        vt: &[bf16],
        m: usize,
        d: usize,
        scale: f32,
        dst: &mut [bf16],
    ) {
        // Queries past `rows` are zero columns: finite scores, outputs unread.
        let qp = PackedB::from_rows(q, rows, d);
        self.running.reset();
        for c0 in (0..m).step_by(KB) {
            let keys = KB.min(m - c0);
            // SAFETY: `k` holds `keys` rows of `d` from key c0; `scores`
            // holds `keys × QB`; one panel (QB columns).
            gemm_block(
                k.as_ptr().add(c0 * d) as *const u16,
                d,
                d,
                keys,
                &qp,
                0..1,
                self.scores.as_mut_ptr(),
                QB,
                false,
            );
            self.softmax_chunk(keys, scale);
            // SAFETY: `vt` rows of `m` bf16, `keys` of them from column c0;
            // `probs` packs `keys` k values for QB columns; `acc` is d × QB.
            gemm_block(
                vt.as_ptr().add(c0) as *const u16,
                m,
                keys,
                d,
                &self.probs,
                0..1,
                self.running.acc.as_mut_ptr(),
                QB,
                c0 > 0,
            );
        }
        let mut row = vec![0f32; d];
        for (j, dst) in dst.chunks_exact_mut(d).enumerate().take(rows) {
            self.running.output(j, &mut row);
            round_into(&row, dst);
        }
    }

    /// The online softmax over one chunk's `keys` rows of `Sᵀ`: raise the
    /// running maxima, rescale the running sums and `Oᵀ` by
    /// `exp(scale·(old − new))`, and write `exp(scale·(s − max))` rounded
    /// to bf16 into `probs` (key pairs interleaved, a zero partner for an
    /// odd last key) while summing the unrounded values, as PyTorch does.
    #[inline(always)]
    fn softmax_chunk(&mut self, keys: usize, scale: f32) {
        let shift = self.running.rescale(&self.scores[..keys * QB], scale);
        self.probs.truncate_pairs(keys.div_ceil(2));
        let probs = &mut self.probs.data[..keys.div_ceil(2) * QB];
        let (pairs, last) = self.scores[..keys * QB].split_at(keys / 2 * 2 * QB);
        for (two, out) in pairs.chunks_exact(2 * QB).zip(probs.chunks_exact_mut(QB)) {
            let (lo, hi) = two.split_at(QB);
            for j in 0..QB {
                let e0 = exp_f32(lo[j] * scale - shift[j]);
                let e1 = exp_f32(hi[j] * scale - shift[j]);
                self.running.sum[j] += e0 + e1;
                out[j] = round_bf16(e0) | (round_bf16(e1) << 16);
            }
        }
        if !last.is_empty() {
            // An odd last key: its partner in the pair is zero.
            let out = &mut probs[keys / 2 * QB..][..QB];
            for j in 0..QB {
                let e0 = exp_f32(last[j] * scale - shift[j]);
                self.running.sum[j] += e0;
                out[j] = round_bf16(e0);
            }
        }
    }
}

/// `x` rounded to bf16 (to nearest, ties to even), as its 16 bits in the
/// low half; `x` finite.
#[inline(always)]
fn round_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
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
        // Partial query blocks, one and several key chunks with an odd
        // last key, odd head sizes.
        for &(bh, n, m, d) in &[
            (2, 3, 5, 8),
            (3, 130, 77, 40),
            (1, 200, 131, 33),
            (2, 70, 1101, 40),
            (1, 65, 1024, 80),
        ] {
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
                        let vj = |j: usize| v[(h * m + j) * d + c].to_f64();
                        let want: f64 = (0..m).map(|j| e[j] / sum * vj(j)).sum();
                        // Each probability is rounded to bf16 (relative
                        // 2⁻⁹) before its product with v, the rest is f32.
                        let spread: f64 = (0..m).map(|j| e[j] / sum * vj(j).abs()).sum();
                        // The output is rounded to bf16 too (2⁻⁸ relative).
                        let tol = spread * 2f64.powi(-8) + want.abs() * 2f64.powi(-8) + 2e-5;
                        let g = got[(h * n + i) * d + c].to_f64();
                        assert!(
                            (g - want).abs() <= tol,
                            "{bh}x{n}x{m}x{d} [{h},{i},{c}]: {g} vs {want} (tolerance {tol:.2e})"
                        );
                    }
                }
            }
        }
    }
}
