//! f32 attention on AVX-512F as PyTorch's CPU flash attention computes it
//! (`aten/src/ATen/native/cpu/FlashAttentionKernel.cpp`; Dao et al. 2022,
//! "FlashAttention"): keys in chunks, an online softmax (running maximum
//! and sum per query, earlier partial outputs rescaled when the maximum
//! grows), one division by the sum at the end. The f32 counterpart of
//! [`super::attention_bf16`], on [`super::gemm_f32`]'s micro-kernel.
//!
//! The products run transposed so that a query is a lane: for a block of
//! [`QB`] queries and a chunk of [`KB`] keys, `Sᵀ = K · Qᵀ` (`KB × QB`, `K`
//! read in place, the query block packed as one panel), the softmax runs
//! down the rows of `Sᵀ` and leaves the probabilities in place — `KB` rows
//! of `QB` f32 is the packed panel layout — and `Oᵀ += Vᵀ · Pᵀ`
//! (`d × QB`, `Vᵀ` transposed once per head). Only `KB × QB` scores exist
//! per task (128 KiB), against a full `128 × m` score block before.

use rayon::prelude::*;

use super::attention::exp_f32;
use super::gemm_f32::{self, Init};
use super::pack_f32::{pack_panel, Strided, NR};

/// Queries per block: one packed panel (of this kernel's `B`, and of the
/// bf16 one's: both are 64 wide).
pub(super) const QB: usize = NR;
/// Keys per chunk.
const KB: usize = 512;

/// `softmax(q kᵀ · scale) v` per (batch × head): `q` `(bh, n, d)`, `k`, `v`
/// `(bh, m, d)` → `(bh, n, d)`, f32. Blocks of [`QB`] queries run in
/// parallel, each over the keys in chunks of [`KB`].
///
/// Panics unless [`gemm_f32::available`], `scale > 0` (the softmax shifts
/// by the largest raw score) and `m > 0`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_flash(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    assert!(gemm_f32::available(), "attention_flash needs AVX-512F");
    assert!(
        scale > 0.0 && m > 0,
        "attention_flash: scale {scale}, {m} keys"
    );
    assert!(q.len() == bh * n * d && k.len() == bh * m * d && v.len() == bh * m * d);
    let mut out = vec![0f32; bh * n * d];
    if bh * n * d == 0 {
        return out;
    }
    let vt = values_transposed(v, bh, m, d, 0.0);
    by_query_blocks(
        &mut out,
        q,
        n,
        d,
        |head, qh, dst, scratch: &mut Scratch| {
            let (kh, vth) = (&k[head * m * d..][..m * d], &vt[head * d * m..][..d * m]);
            let rows = dst.len() / d;
            // SAFETY: the CPU has AVX-512F (asserted above).
            unsafe { scratch.block(qh, rows, kh, vth, m, d, scale, dst) };
        },
        || Scratch::new(d),
    );
    out
}

/// Each head's `v` `(m, d)` transposed to `(d, m)` row-major (the `A` of
/// `Oᵀ += Vᵀ · Pᵀ`), heads in parallel: `v` `(bh, m, d)` → `(bh, d, m)`.
pub(super) fn values_transposed<T: Copy + Send + Sync>(
    v: &[T],
    bh: usize,
    m: usize,
    d: usize,
    zero: T,
) -> Vec<T> {
    let mut vt = vec![zero; bh * d * m];
    vt.par_chunks_mut(d * m).enumerate().for_each(|(h, dst)| {
        for (j, row) in v[h * m * d..][..m * d].chunks_exact(d).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                dst[c * m + j] = x;
            }
        }
    });
    vt
}

/// `block(head, qh, dst, scratch)` for every block of [`QB`] query rows
/// of every head, in parallel: `qh` the block's rows of `q` `(bh, n, d)`,
/// `dst` the same rows of `out`, `scratch` the task's own (made by
/// `new_scratch`, reused across the blocks a rayon task runs).
pub(super) fn by_query_blocks<T: Send + Sync, S>(
    out: &mut [T],
    q: &[T],
    n: usize,
    d: usize,
    block: impl Fn(usize, &[T], &mut [T], &mut S) + Send + Sync,
    new_scratch: impl Fn() -> S + Send + Sync,
) {
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(head, head_out)| {
            head_out.par_chunks_mut(QB * d).enumerate().for_each_init(
                &new_scratch,
                |scratch, (blk, dst)| {
                    let qh = &q[head * n * d + blk * QB * d..][..dst.len()];
                    block(head, qh, dst, scratch)
                },
            );
        });
}

/// The online softmax's running state for one block of [`QB`] queries
/// (shared by this kernel and [`super::attention_bf16`]): per query the
/// largest raw score and the sum of `exp` so far, and `Oᵀ` (`d × QB`), the
/// output not yet divided by that sum.
pub(super) struct Running {
    pub(super) max: [f32; QB],
    pub(super) sum: [f32; QB],
    pub(super) acc: Vec<f32>,
}

impl Running {
    /// The state for heads `d` wide.
    pub(super) fn new(d: usize) -> Self {
        Self {
            max: [f32::MIN; QB],
            sum: [0.0; QB],
            acc: vec![0.0; d * QB],
        }
    }

    /// Start a query block: no score seen yet (`acc` is overwritten by
    /// the first chunk's product).
    pub(super) fn reset(&mut self) {
        self.max = [f32::MIN; QB];
        self.sum = [0.0; QB];
    }

    /// The first half of an online-softmax step over one chunk of `Sᵀ`
    /// (`scores`: one row of [`QB`] queries per key): raise each query's
    /// running maximum to the chunk's, and rescale its running sum and its
    /// column of `Oᵀ` by `exp(scale·(old − new))`. Returns each query's
    /// `scale·max`, the shift of the chunk's `exp(scale·s − shift)`.
    #[inline(always)]
    pub(super) fn rescale(&mut self, scores: &[f32], scale: f32) -> [f32; QB] {
        let mut chunk_max = [f32::MIN; QB];
        for row in scores.chunks_exact(QB) {
            for (mx, &s) in chunk_max.iter_mut().zip(row) {
                *mx = if s > *mx { s } else { *mx };
            }
        }
        let mut alpha = [0f32; QB];
        let mut shift = [0f32; QB];
        for j in 0..QB {
            let new = self.max[j].max(chunk_max[j]);
            alpha[j] = exp_f32((self.max[j] - new) * scale);
            self.max[j] = new;
            shift[j] = new * scale;
        }
        for (s, a) in self.sum.iter_mut().zip(&alpha) {
            *s *= a;
        }
        for row in self.acc.chunks_exact_mut(QB) {
            for (o, a) in row.iter_mut().zip(&alpha) {
                *o *= a;
            }
        }
        shift
    }

    /// Query `j`'s output (`d` values into `out`): its column of `Oᵀ`
    /// divided by its sum.
    pub(super) fn output(&self, j: usize, out: &mut [f32]) {
        let inv = 1.0 / self.sum[j];
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.acc[c * QB + j] * inv;
        }
    }
}

/// One task's buffers, reused across its query blocks.
struct Scratch {
    /// The query block as one packed panel: `d` rows of `QB`.
    queries: Vec<f32>,
    /// `Sᵀ` of one chunk, then its probabilities: `KB × QB`.
    scores: Vec<f32>,
    /// The running maxima and sums, and `Oᵀ`.
    running: Running,
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            queries: vec![0.0; d * QB],
            scores: vec![0.0; KB * QB],
            running: Running::new(d),
        }
    }

    /// Attention of `rows ≤ QB` queries `q` (`rows × d`) over the head's
    /// `m` keys `k` (`m × d`) and transposed values `vt` (`d × m`), into
    /// `dst` (`rows × d`).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block(
        &mut self,
        q: &[f32],
        rows: usize,
        k: &[f32],
        vt: &[f32],
        m: usize,
        d: usize,
        scale: f32,
        dst: &mut [f32],
    ) {
        // Qᵀ: element (c, j) is query j's value c; queries past `rows` are
        // zero columns (finite scores, outputs never read).
        let qt = Strided {
            ptr: q.as_ptr(),
            rs: 1,
            cs: d,
        };
        // SAFETY: `q` is rows × d.
        pack_panel(qt, d, 0, rows, &mut self.queries);
        self.running.reset();
        for c0 in (0..m).step_by(KB) {
            let keys = KB.min(m - c0);
            // SAFETY: `k` holds `keys` rows of `d` from key c0; `scores`
            // holds `keys × QB`; the query panel is `d × QB`.
            gemm_f32::block(
                k.as_ptr().add(c0 * d),
                d,
                d,
                keys,
                &self.queries,
                QB,
                0..1,
                self.scores.as_mut_ptr(),
                QB,
                Init::Zero,
            );
            self.softmax_chunk(keys, scale);
            // SAFETY: `vt` rows of `m`, `keys` of them from column c0; the
            // probabilities are `keys` rows of QB; `acc` is d × QB.
            gemm_f32::block(
                vt.as_ptr().add(c0),
                m,
                keys,
                d,
                &self.scores[..keys * QB],
                QB,
                0..1,
                self.running.acc.as_mut_ptr(),
                QB,
                if c0 == 0 {
                    Init::Zero
                } else {
                    Init::Accumulate
                },
            );
        }
        for (j, dst) in dst.chunks_exact_mut(d).enumerate().take(rows) {
            self.running.output(j, dst);
        }
    }

    /// The online softmax over one chunk's `keys` rows of `Sᵀ`: raise the
    /// running maxima, rescale the running sums and `Oᵀ` by
    /// `exp(scale·(old − new))`, and replace each score `s` by
    /// `exp(scale·s − scale·max)`, adding it to its query's sum.
    #[inline(always)]
    fn softmax_chunk(&mut self, keys: usize, scale: f32) {
        let shift = self.running.rescale(&self.scores[..keys * QB], scale);
        let mut sum = self.running.sum;
        for row in self.scores[..keys * QB].chunks_exact_mut(QB) {
            for j in 0..QB {
                let e = exp_f32(row[j] * scale - shift[j]);
                sum[j] += e;
                row[j] = e;
            }
        }
        self.running.sum = sum;
    }
}
