//! bf16 matrix products with f32 accumulation on CPUs with AVX512-BF16,
//! the arithmetic oneDNN uses for PyTorch's CPU bf16 `Linear` and `Conv2d`:
//! products of bf16 pairs summed into f32 (Intel's `vdpbf16ps`, intrinsic
//! `_mm512_dpbf16_ps`: for each of the 16 f32 lanes,
//! `acc += a[2i]·b[2i] + a[2i+1]·b[2i+1]`, the products exact in f32 and
//! the sums rounded to nearest even with denormals flushed, as Intel's SDM
//! documents it).
//!
//! The product is `C (m×n, f32) [+]= A (m×k, bf16, row-major) · Bᵀ` with
//! `B` given as `(n, k)` (a PyTorch `Linear` weight) or built on the fly
//! (the 1×1 and 3×3 convolutions' im2col columns). `B` is packed into
//! panels of [`NR`] columns whose k values are interleaved in pairs
//! ([`PackedB`]); a register-blocked micro-kernel keeps an `MR × NR` tile of
//! f32 accumulators (6 rows × 4 zmm) and broadcasts one pair of `A` per row
//! and step. Work is split over rayon's pool ([`super::num_threads`]).
//!
//! Available only where the CPU reports AVX512-BF16 and AVX-512F at run
//! time ([`bf16_gemm_available`]); callers fall back to the f32 kernels
//! elsewhere.

use half::bf16;
use rayon::prelude::*;

/// Columns of one packed panel of `B` (four zmm registers of 16 f32 lanes).
pub const NR: usize = 64;
/// Rows of `A` per micro-kernel call.
const MR: usize = 6;
/// The most k pairs per cache block (a 64 KiB `B` panel block at 256);
/// a product's k is cut into equal blocks of at most this many.
const KC_PAIRS: usize = 256;
/// Rows of `A` per cache block.
const MC: usize = 96;
/// Output pixels per convolution task (4 panels).
const CONV_CHUNK: usize = 4 * NR;

/// Whether this CPU runs the bf16 kernels: AVX512-BF16 and AVX-512F,
/// detected at run time (the answer is cached by the standard library).
pub fn bf16_gemm_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `B` (`n × k`) packed for the micro-kernel: panel `p` holds columns
/// `p·NR .. p·NR+NR` as `k_pairs` rows of `NR` pairs, the pair
/// `[p][q][j] = (B[p·NR + j][2q], B[p·NR + j][2q + 1])` one u32 (low half
/// the even k), zero where `j` or the k index is past the matrix (so
/// padding contributes exact zeros).
pub struct PackedB {
    pub(super) data: Vec<u32>,
    n: usize,
    pub(super) k_pairs: usize,
}

/// `v` as f32, exactly (a 16-bit shift: plain loops of it vectorise,
/// unlike `half`'s `to_f32` with its NaN branch).
#[inline(always)]
pub(super) fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// Two bf16 as the pair `vdpbf16ps` reads from one 32-bit lane.
#[inline(always)]
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

impl PackedB {
    pub(super) fn zeroed(n: usize, k_pairs: usize) -> Self {
        Self {
            data: vec![0u32; n.div_ceil(NR) * k_pairs * NR],
            n,
            k_pairs,
        }
    }

    /// Use the first `k_pairs` pair rows of a one-panel matrix allocated
    /// with room for at least that many (a buffer reused for products of
    /// varying `k`, filled by the caller through `data`).
    pub(super) fn truncate_pairs(&mut self, k_pairs: usize) {
        assert!(self.n <= NR && k_pairs * NR <= self.data.len());
        self.k_pairs = k_pairs;
    }

    /// Pack `b`, `(n, k)` row-major (PyTorch's `Linear` weight layout).
    pub fn from_rows(b: &[bf16], n: usize, k: usize) -> Self {
        debug_assert_eq!(b.len(), n * k);
        let mut p = Self::zeroed(n, k.div_ceil(2));
        let panel_len = p.k_pairs * NR;
        let zero = bf16::from_bits(0);
        p.data
            .par_chunks_mut(panel_len.max(1))
            .enumerate()
            .for_each(|(panel, dst)| {
                for j in 0..NR.min(n - panel * NR) {
                    let row = &b[(panel * NR + j) * k..(panel * NR + j + 1) * k];
                    let mut pairs = row.chunks_exact(2);
                    for (q, two) in pairs.by_ref().enumerate() {
                        dst[q * NR + j] = pair(two[0], two[1]);
                    }
                    if let [last] = pairs.remainder() {
                        dst[(k / 2) * NR + j] = pair(*last, zero);
                    }
                }
            });
        p
    }
}

/// `out (m×n) = a (m×k, bf16) · weightᵀ + bias`, `weight` `(n, k)`
/// bf16 and `bias` `n` f32 values or empty: `torch.nn.functional.linear`
/// in bf16 as oneDNN computes it: bf16 products accumulated in f32, the
/// bias added in f32, the result rounded to bf16 (to nearest even).
///
/// Each task computes an [`MC`] × 256 tile in an f32 buffer of its own
/// (L2-resident) and writes it out rounded, so the output is written once,
/// in bf16.
///
/// Panics where the CPU lacks AVX512-BF16 (check [`bf16_gemm_available`]).
pub fn linear_bf16(
    a: &[bf16],
    m: usize,
    k: usize,
    weight: &[bf16],
    bias: &[f32],
    n: usize,
) -> Vec<bf16> {
    assert!(bf16_gemm_available(), "linear_bf16 needs AVX512-BF16");
    assert_eq!(a.len(), m * k);
    assert!(
        bias.is_empty() || bias.len() == n,
        "linear_bf16: bias length"
    );
    let packed = PackedB::from_rows(weight, n, k);
    let mut out = vec![bf16::from_bits(0); m * n];
    if m == 0 || n == 0 {
        return out;
    }
    const GROUP: usize = 4;
    let panels = n.div_ceil(NR);
    let panel_groups = panels.div_ceil(GROUP);
    let tiles = m.div_ceil(MC) * panel_groups;
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..tiles).into_par_iter().for_each_init(
        || vec![0f32; MC * GROUP * NR],
        |tile, t| {
            let (mb, pg) = (t / panel_groups, t % panel_groups);
            let rows = mb * MC..m.min((mb + 1) * MC);
            let panels = pg * GROUP..panels.min(pg * GROUP + GROUP);
            let cols = panels.start * NR..n.min(panels.end * NR);
            let ld = GROUP * NR;
            if !bias.is_empty() {
                for row in tile.chunks_exact_mut(ld).take(rows.len()) {
                    row[..cols.len()].copy_from_slice(&bias[cols.clone()]);
                }
            }
            // SAFETY: `a` is m×k, `tile` holds rows.len() rows of `ld` f32
            // covering the panels' columns, and the CPU has AVX512-BF16
            // (asserted above).
            unsafe {
                gemm_block(
                    a.as_ptr().add(rows.start * k) as *const u16,
                    k,
                    k,
                    rows.len(),
                    &packed,
                    panels,
                    tile.as_mut_ptr(),
                    ld,
                    !bias.is_empty(),
                )
            };
            // SAFETY: rows `rows`, columns `cols` of the m×n output: this
            // task's alone.
            unsafe {
                out_ptr.store_rows(
                    tile,
                    ld,
                    rows.len(),
                    cols.len(),
                    rows.start * n + cols.start,
                    n,
                )
            };
        },
    );
    out
}

/// A 1×1 or 3×3 (stride 1, zero padding 1) convolution in bf16 as oneDNN
/// computes it (bf16 products, f32 accumulation, bias added in f32, the
/// output rounded to bf16): `x` `(batch, ci, h, w)` bf16, `weight`
/// PyTorch's `(co, ci, ks, ks)` bf16, `bias` `co` f32 values →
/// `(batch, co, h, w)` bf16.
///
/// The output of each image is `W · cols`, with `cols` the im2col matrix
/// (`ci·ks²` × pixels) built straight into packed panels, [`CONV_CHUNK`]
/// pixels per task, so no whole im2col copy is held (at 512² the VAE's
/// would take over 1 GiB); a task accumulates [`MC`] output channels at a
/// time in an f32 tile of its own and writes them out rounded.
///
/// Panics where the CPU lacks AVX512-BF16, or for a kernel size other
/// than 1 or 3.
#[allow(clippy::too_many_arguments)]
pub fn conv_bf16(
    x: &[bf16],
    batch: usize,
    ci: usize,
    h: usize,
    w: usize,
    weight: &[bf16],
    bias: &[f32],
    co: usize,
    ks: usize,
) -> Vec<bf16> {
    assert!(bf16_gemm_available(), "conv_bf16 needs AVX512-BF16");
    assert!(ks == 1 || ks == 3, "conv_bf16: kernel size {ks}");
    let k = ci * ks * ks;
    assert_eq!(weight.len(), co * k);
    assert_eq!(x.len(), batch * ci * h * w);
    assert_eq!(bias.len(), co);
    let hw = h * w;
    let mut out = vec![bf16::from_bits(0); batch * co * hw];
    if hw == 0 || co == 0 {
        return out;
    }
    let (wt, kt) = tap_major(weight, co, ci, ks * ks);
    let chunks = hw.div_ceil(CONV_CHUNK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * chunks).into_par_iter().for_each_init(
        || vec![0f32; MC * CONV_CHUNK],
        |tile, t| {
            let (b, c) = (t / chunks, t % chunks);
            let p0 = c * CONV_CHUNK;
            let np = CONV_CHUNK.min(hw - p0);
            let image = &x[b * ci * hw..(b + 1) * ci * hw];
            let cols = pack_im2col(image, ci, h, w, ks, p0, np);
            for r0 in (0..co).step_by(MC) {
                let rows = MC.min(co - r0);
                for (i, row) in tile.chunks_exact_mut(CONV_CHUNK).take(rows).enumerate() {
                    row[..np].fill(bias[r0 + i]);
                }
                // SAFETY: `wt` is co×kt; `tile` holds `rows` rows of
                // CONV_CHUNK ≥ np f32.
                unsafe {
                    gemm_block(
                        wt.as_ptr().add(r0 * kt) as *const u16,
                        kt,
                        kt,
                        rows,
                        &cols,
                        0..np.div_ceil(NR),
                        tile.as_mut_ptr(),
                        CONV_CHUNK,
                        true,
                    )
                };
                // SAFETY: pixels p0..p0+np of channels r0..r0+rows of image
                // b: this task's alone.
                unsafe {
                    out_ptr.store_rows(tile, CONV_CHUNK, rows, np, (b * co + r0) * hw + p0, hw)
                };
            }
        },
    );
    out
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even (NaN kept NaN), with
/// AVX512-BF16's `vcvtneps2bf16` 16 values at a time where the CPU has it.
pub fn round_into(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if bf16_gemm_available() {
        // SAFETY: the CPU has AVX512-BF16 and AVX-512F.
        unsafe { x86::round_into(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// The convolution weight `(co, ci, taps)` re-ordered tap-major,
/// `(co, taps, ci')` with `ci'` = `ci` rounded up to even (the extra
/// channel's weights zero), so that each k pair of the product is two
/// channels of one tap: returns it and its row length `taps · ci'`.
fn tap_major(weight: &[bf16], co: usize, ci: usize, taps: usize) -> (Vec<bf16>, usize) {
    let cp = ci.next_multiple_of(2);
    let kt = taps * cp;
    let mut out = vec![bf16::from_bits(0); co * kt];
    out.par_chunks_mut(kt.max(1))
        .zip(weight.par_chunks(ci * taps))
        .for_each(|(dst, src)| {
            for c in 0..ci {
                for t in 0..taps {
                    dst[t * cp + c] = src[c * taps + t];
                }
            }
        });
    (out, kt)
}

/// The im2col columns of output pixels `p0 .. p0+np` of one image
/// (`(ci, h, w)`), packed in the k order of [`tap_major`]: pair
/// `q = t·ci'/2 + c/2` of pixel `p0 + j = (y, x)` holds channels `c, c+1` of
/// `x[·][y+ky-o][x+kx-o]` for tap `t = ky·ks + kx` (`o = ks / 2`; zero
/// outside the image and for the padding channel). Each (tap, channel
/// pair) is copied as runs of one image row that stay in one panel:
/// contiguous on both sides.
fn pack_im2col(
    x: &[bf16],
    ci: usize,
    h: usize,
    w: usize,
    ks: usize,
    p0: usize,
    np: usize,
) -> PackedB {
    let taps = ks * ks;
    let cp = ci.div_ceil(2);
    let mut p = PackedB::zeroed(np, taps * cp);
    let k_pairs = p.k_pairs;
    let o = (ks / 2) as isize;
    let zeros = vec![bf16::from_bits(0); w];
    for t in 0..taps {
        let (dy, dx) = ((t / ks) as isize - o, (t % ks) as isize - o);
        for c2 in 0..cp {
            let q = t * cp + c2;
            let plane = |c: usize| (c < ci).then(|| &x[c * h * w..(c + 1) * h * w]);
            let (lo, hi) = (plane(2 * c2).expect("c < ci"), plane(2 * c2 + 1));
            let mut j = 0;
            while j < np {
                let (y, x0) = ((p0 + j) / w, (p0 + j) % w);
                // One image row, cut at the panel's end.
                let seg = (w - x0).min(np - j).min(NR - j % NR);
                let sy = y as isize + dy;
                if sy >= 0 && (sy as usize) < h {
                    let row = sy as usize * w;
                    // Output columns s whose source column x0 + s + dx is inside.
                    let s0 = (-(x0 as isize + dx)).max(0) as usize;
                    let s1 = ((w as isize - x0 as isize - dx).max(0) as usize).min(seg);
                    if s0 < s1 {
                        // The first source column read, x0 + s0 + dx >= 0
                        // (s0 was chosen so), in isize: x0 + dx alone may
                        // be -1 at the left edge.
                        let start = (row as isize + x0 as isize + dx + s0 as isize) as usize;
                        let len = s1 - s0;
                        let lo = &lo[start..start + len];
                        let hi = match hi {
                            Some(hi) => &hi[start..start + len],
                            None => &zeros[..len],
                        };
                        let d = (j / NR) * k_pairs * NR + q * NR + j % NR;
                        for ((dst, &a), &b) in p.data[d + s0..d + s1].iter_mut().zip(lo).zip(hi) {
                            *dst = pair(a, b);
                        }
                    }
                }
                j += seg;
            }
        }
    }
    p
}

/// The bf16 output the parallel tasks share (each writes a disjoint part).
#[derive(Clone, Copy)]
struct SendPtr(*mut bf16);
// SAFETY: the tasks that share it write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// Write the first `width` values of the first `rows` rows of `tile`
    /// (row stride `ld` f32), rounded to bf16 ([`round_into`]), as the
    /// output rows at elements `first + i·stride` (`i` < `rows`).
    ///
    /// # Safety
    /// Those output rows exist and no other task writes them.
    unsafe fn store_rows(
        self,
        tile: &[f32],
        ld: usize,
        rows: usize,
        width: usize,
        first: usize,
        stride: usize,
    ) {
        for (i, row) in tile.chunks_exact(ld).take(rows).enumerate() {
            let dst = std::slice::from_raw_parts_mut(self.0.add(first + i * stride), width);
            round_into(&row[..width], dst);
        }
    }
}

/// `C (rows × cols of panels) += A (rows × k) · Bᵀ` on one thread (or
/// `C = A · Bᵀ` when `accumulate` is false: `C` is then only written), for
/// `B`'s panels `panels` (`C`'s first column is panel `panels.start`'s
/// first): blocked by [`MC`] rows and [`KC_PAIRS`] k pairs.
///
/// # Safety
/// `a` is valid for `rows` rows of `k` bf16 values at row stride `lda`;
/// `c` for `rows` rows at row stride `ldc` covering the panels' valid
/// columns; the CPU has AVX512-BF16 and AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_block(
    a: *const u16,
    lda: usize,
    k: usize,
    rows: usize,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let full_pairs = k / 2;
        let first = panels.start;
        for r0 in (0..rows).step_by(MC) {
            let mr_block = MC.min(rows - r0);
            let kc = b
                .k_pairs
                .div_ceil(b.k_pairs.div_ceil(KC_PAIRS).max(1))
                .max(1);
            for q0 in (0..b.k_pairs).step_by(kc) {
                let q1 = b.k_pairs.min(q0 + kc);
                // Pairs of A read whole; the last one is half a pair when k is odd.
                let whole = full_pairs.min(q1) - q0;
                let half = q1 > full_pairs;
                let load = accumulate || q0 > 0;
                for panel in panels.clone() {
                    let bp = b.data.as_ptr().add(panel * b.k_pairs * NR + q0 * NR) as *const u16;
                    let cols = NR.min(b.n - panel * NR);
                    let cp = c.add((panel - first) * NR);
                    let mut r = 0;
                    while r < mr_block {
                        let ap = a.add((r0 + r) * lda + 2 * q0);
                        let cr = cp.add((r0 + r) * ldc);
                        let n_rows = MR.min(mr_block - r);
                        x86::micro(n_rows, ap, lda, whole, half, load, bp, cr, ldc, cols);
                        r += n_rows;
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, lda, k, rows, b, panels, c, ldc, accumulate);
        unreachable!("the bf16 kernels run on x86-64 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Dispatch [`tile`] on the row count (1..=MR).
    ///
    /// # Safety
    /// As [`tile`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn micro(
        rows: usize,
        a: *const u16,
        lda: usize,
        whole: usize,
        half: bool,
        load: bool,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        match rows {
            6 => tile::<6>(a, lda, whole, half, load, b, c, ldc, cols),
            5 => tile::<5>(a, lda, whole, half, load, b, c, ldc, cols),
            4 => tile::<4>(a, lda, whole, half, load, b, c, ldc, cols),
            3 => tile::<3>(a, lda, whole, half, load, b, c, ldc, cols),
            2 => tile::<2>(a, lda, whole, half, load, b, c, ldc, cols),
            _ => tile::<1>(a, lda, whole, half, load, b, c, ldc, cols),
        }
        const _: () = assert!(MR == 6);
    }

    /// `C[R × cols] += A[R × (2·whole (+1 if half))] · B-panel` (`=`
    /// when `load` is false), the accumulators `R × 4` zmm registers of
    /// f32, one `vdpbf16ps` per register and k pair.
    ///
    /// # Safety
    /// `a` valid for `R` rows (stride `lda`) of `2·whole + half` bf16;
    /// `b` for `whole + half` packed pair rows of `NR` pairs; `c` for `R`
    /// rows (stride `ldc`) of `cols ≤ NR` f32; AVX512-BF16 present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512bf16,avx512f")]
    unsafe fn tile<const R: usize>(
        a: *const u16,
        lda: usize,
        whole: usize,
        half: bool,
        load: bool,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let masks: [__mmask16; 4] =
            std::array::from_fn(|v| mask_for(cols.saturating_sub(16 * v).min(16)));
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, reg) in row.iter_mut().enumerate() {
                    *reg = _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + 16 * v));
                }
            }
        }
        for q in 0..whole {
            let pairs: [i32; R] =
                std::array::from_fn(|r| (a.add(r * lda + 2 * q) as *const i32).read_unaligned());
            step(&mut acc, b.add(q * 2 * NR), pairs);
        }
        if half {
            // Odd k: the last pair is (a[k-1], 0), B's partner is zero-padded.
            let pairs: [i32; R] = std::array::from_fn(|r| *a.add(r * lda + 2 * whole) as i32);
            step(&mut acc, b.add(whole * 2 * NR), pairs);
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, reg) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *reg);
            }
        }
    }

    /// One k pair: `acc[r][v] += pair(a_r) · b[v]` by `vdpbf16ps`, `b` the
    /// packed pair row of the panel, `pairs[r]` row `r`'s two bf16 of `A`.
    #[target_feature(enable = "avx512bf16,avx512f")]
    #[inline]
    unsafe fn step<const R: usize>(acc: &mut [[__m512; 4]; R], b: *const u16, pairs: [i32; R]) {
        let bv: [__m512bh; 4] = std::array::from_fn(|v| {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                b.add(32 * v) as *const __m512i
            ))
        });
        for (row, &pair) in acc.iter_mut().zip(&pairs) {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
            for v in 0..4 {
                row[v] = _mm512_dpbf16_ps(row[v], av, bv[v]);
            }
        }
    }

    /// [`super::round_into`] with `vcvtneps2bf16`.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16 and AVX-512F; equal lengths.
    #[target_feature(enable = "avx512bf16,avx512f")]
    pub(super) unsafe fn round_into(src: &[f32], dst: &mut [half::bf16]) {
        let whole = src.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let r: __m256bh = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(r),
            );
        }
        for (d, &s) in dst[whole..].iter_mut().zip(&src[whole..]) {
            *d = half::bf16::from_f32(s);
        }
    }

    #[inline(always)]
    fn mask_for(valid: usize) -> __mmask16 {
        if valid >= 16 {
            0xffff
        } else {
            ((1u32 << valid) - 1) as __mmask16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-2, 2), rounded to bf16.
    fn values(len: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
            })
            .collect()
    }

    fn skipped(test: &str) -> bool {
        if bf16_gemm_available() {
            return false;
        }
        eprintln!(
            "SKIPPED {test}: this CPU has no AVX512-BF16 (vdpbf16ps), the bf16 kernels cannot run here"
        );
        true
    }

    /// `Σ a·b` in f64 of bf16 values, and the bound on an f32 accumulation
    /// of `terms` products of magnitude ≤ `abs_sum`.
    fn check(got: bf16, want: f64, abs_sum: f64, terms: usize, what: &str) {
        let got = got.to_f32();
        // f32 accumulation, then one rounding to bf16 (half an ulp: at
        // most 2⁻⁸ of the value).
        let tol = abs_sum * (terms as f64 + 2.0) * f32::EPSILON as f64
            + want.abs() * 2f64.powi(-8)
            + 1e-6;
        assert!(
            ((got as f64) - want).abs() <= tol,
            "{what}: got {got}, want {want} (tolerance {tol})"
        );
    }

    #[test]
    fn linear_matches_an_f64_reference_on_odd_shapes() {
        if skipped("linear_matches_an_f64_reference_on_odd_shapes") {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 33, 5),
            (13, 1031, 67),
            (97, 40, 130),
            (5, 2, 64),
            (200, 515, 129),
            (9, 64, 300),
            (3, 17, 520),
        ] {
            let a = values(m * k, 1 + m as u64);
            let w = values(n * k, 2 + n as u64);
            let bias: Vec<f32> = values(n, 3).iter().map(|v| v.to_f32()).collect();
            for b in [&bias[..], &[][..]] {
                let got = linear_bf16(&a, m, k, &w, b, n);
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut abs) = (b.get(j).copied().unwrap_or(0.0) as f64, 0.0);
                        for kk in 0..k {
                            let p = a[i * k + kk].to_f64() * w[j * k + kk].to_f64();
                            want += p;
                            abs += p.abs();
                        }
                        check(
                            got[i * n + j],
                            want,
                            abs,
                            k,
                            &format!("{m}x{k}x{n} [{i},{j}]"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn convolutions_match_an_f64_reference() {
        if skipped("convolutions_match_an_f64_reference") {
            return;
        }
        for &(batch, ci, co, h, w, ks) in &[
            (1, 3, 5, 7, 9, 3),
            (2, 4, 70, 17, 19, 3),
            (2, 9, 13, 11, 30, 1),
            (1, 1, 1, 1, 1, 3),
        ] {
            let x = values(batch * ci * h * w, 7);
            let wt = values(co * ci * ks * ks, 8);
            let bias: Vec<f32> = values(co, 9).iter().map(|v| v.to_f32()).collect();
            let got = conv_bf16(&x, batch, ci, h, w, &wt, &bias, co, ks);
            let o = (ks / 2) as isize;
            for b in 0..batch {
                for oc in 0..co {
                    for y in 0..h {
                        for xx in 0..w {
                            let (mut want, mut abs) = (bias[oc] as f64, 0.0);
                            for c in 0..ci {
                                for t in 0..ks * ks {
                                    let sy = y as isize + (t / ks) as isize - o;
                                    let sx = xx as isize + (t % ks) as isize - o;
                                    if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((b * ci + c) * h + sy as usize) * w + sx as usize];
                                    let p = xv.to_f64() * wt[(oc * ci + c) * ks * ks + t].to_f64();
                                    want += p;
                                    abs += p.abs();
                                }
                            }
                            let g = got[((b * co + oc) * h + y) * w + xx];
                            check(
                                g,
                                want,
                                abs,
                                ci * 9,
                                &format!("conv {ks}x{ks} ci {ci} co {co}"),
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn availability_matches_the_cpu_flags() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            bf16_gemm_available(),
            std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512f")
        );
        eprintln!("bf16 GEMM available on this CPU: {}", bf16_gemm_available());
    }
}
