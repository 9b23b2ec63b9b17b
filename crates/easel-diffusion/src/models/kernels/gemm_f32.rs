//! f32 matrix products on AVX-512F: `C (m×n) [+]= A (m×k) · B (k×n)`, the
//! f32 counterpart of [`super::bf16`]'s kernel and blocked the same way
//! (the BLIS scheme, Van Zee & van de Geijn, "BLIS: A Framework for
//! Rapidly Instantiating BLAS Functionality", 2015):
//!
//! - `B` is packed into panels of [`NR`] columns, k rows each (one 256-byte
//!   row per k step; [`super::pack_f32`]), [`NC_PANELS`] panels at a time, so a product over
//!   many columns (a VAE 1×1 convolution at 512²) never packs all of `B`;
//! - a register-blocked micro-kernel keeps an `MR × NR` tile of `C` in
//!   24 zmm accumulators, loads a panel row (four zmm) per k step and
//!   broadcasts one `A` value per row into `vfmadd231ps`;
//! - k is cut into equal blocks of at most [`KC`] (a 64 KiB panel block
//!   stays in L2 while [`MC`] rows of `A` stream past it);
//! - tasks are at most `MC` rows × [`GROUP`] panels, over rayon's pool.
//!
//! Each element of `C` is summed over k in order, in f32 with fused
//! multiply-adds, so results equal a sequential dot product's.
//!
//! On this project's Zen 4 machine the `gemm` crate's AVX-512 path runs
//! the UNet's linear shapes at 90–190 GFLOP/s; this kernel keeps them near
//! the machine's f32 peak (docs/PERFORMANCE.md). Used where the CPU has
//! AVX-512F ([`available`]) and `EASEL_F32_GEMM` is not `portable`;
//! elsewhere the callers keep the `gemm` crate.

use rayon::prelude::*;

use super::pack_f32::{cpu_has_avx512f, Source, Strided, NR};

/// Rows of `A` per micro-kernel call.
const MR: usize = 6;
/// The most k rows per cache block; a product's k is cut into equal
/// blocks of at most this many.
const KC: usize = 256;
/// Rows of `A` per task.
const MC: usize = 96;
/// Panels per task.
const GROUP: usize = 4;
/// Panels of `B` packed at a time (4096 columns).
const NC_PANELS: usize = 64;

/// Whether products run on this kernel: the CPU has AVX-512F (detected at
/// run time) and `EASEL_F32_GEMM=portable` (the `gemm` crate, for
/// comparison and tests) is not set.
pub(super) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let portable =
            std::env::var("EASEL_F32_GEMM").is_ok_and(|v| v.eq_ignore_ascii_case("portable"));
        !portable && cpu_has_avx512f()
    })
}

/// Whether a product with `n` columns runs here: [`available`], and `n`
/// fills at least [`MIN_COLUMNS`] of a panel's 64 lanes (the 2×1280
/// Winograd products at 8×8 have 32; the `gemm` crate's narrower tiles
/// suit them better).
pub(super) fn runs(n: usize) -> bool {
    n >= MIN_COLUMNS && available()
}

/// The fewest columns a product needs to run on this kernel.
const MIN_COLUMNS: usize = 48;

/// What `C` starts from before the product is added.
#[derive(Clone, Copy)]
pub(super) enum Init {
    /// Zero: `C = A · B`.
    Zero,
    /// `C`'s values: `C += A · B`.
    Accumulate,
    /// A bias per column, `n` values: `C = bias[j] + A · B`.
    ColumnBias(*const f32),
}
// SAFETY: the bias pointers are only read.
unsafe impl Send for Init {}
unsafe impl Sync for Init {}

impl Init {
    /// The same start for the tile whose first column is `col`.
    fn at(self, col: usize) -> Self {
        match self {
            // SAFETY: the tile lies inside C, so its first column lies
            // inside the bias (the caller's contract for `gemm`).
            Init::ColumnBias(p) => Init::ColumnBias(unsafe { p.add(col) }),
            other => other,
        }
    }
}

/// The output the tasks share (each writes its own tiles).
#[derive(Clone, Copy)]
struct SendMut(*mut f32);
// SAFETY: tasks write disjoint tiles; the inputs are only read.
unsafe impl Send for SendMut {}
unsafe impl Sync for SendMut {}
impl SendMut {
    /// The pointer (a method, so closures capture the `Sync` wrapper and
    /// not the raw pointer field).
    fn get(self) -> *mut f32 {
        self.0
    }
}
impl Strided {
    /// The pointer, as [`SendMut::get`].
    fn start(self) -> *const f32 {
        self.ptr
    }
}

/// `C = init + A · B`, `C` `m × n` at row stride `ldc`, `A` `m × k`
/// row-major at row stride `lda`, `B` `k × n` ([`Source`]: f32 strided,
/// row-major or a `(n, k)` weight read transposed, or a `(n, k)` weight's
/// rows in a [`RowFormat`]). Split over rayon's pool when
/// `parallel`, on the calling thread otherwise. Unless `init` is
/// [`Init::Accumulate`], `C` is only written (the bias is added by the
/// tasks, so a fresh output is first touched in parallel).
///
/// # Safety
/// The pointers are valid for those shapes and strides (a bias for `n`
/// or `m` values), `C` aliases no input, and [`available`] is true.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    init: Init,
    a: *const f32,
    lda: usize,
    b: Source,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
            match init {
                Init::Accumulate => {}
                Init::Zero => row.fill(0.0),
                Init::ColumnBias(p) => row.copy_from_slice(std::slice::from_raw_parts(p, n)),
            }
        }
        return;
    }
    let chunk_cols = NC_PANELS * NR;
    // The calling thread's packing buffer, taken out while in use (a task
    // stolen by this thread meanwhile finds it empty and allocates), never
    // zeroed: `pack_panel` writes every element it covers.
    let mut packed = PACKED.with(|p| p.take());
    packed.resize(
        packed.len().max(n.min(chunk_cols).div_ceil(NR) * NR * k),
        0.0,
    );
    // Equal row blocks of at most MC, whole micro-tiles where possible, so
    // the tasks of a few rows' product weigh the same.
    let mc = m.div_ceil(m.div_ceil(MC)).next_multiple_of(MR).min(m);
    let a = Strided {
        ptr: a,
        rs: lda,
        cs: 1,
    };
    let c = SendMut(c);
    for n0 in (0..n).step_by(chunk_cols) {
        let cols = chunk_cols.min(n - n0);
        let panels = cols.div_ceil(NR);
        let chunk_b = b.columns_from(n0);
        // SAFETY: this chunk of B is k × cols (the contract above).
        let pack = |(p, dst): (usize, &mut [f32])| unsafe { chunk_b.pack(k, p * NR, cols, dst) };
        let panel_slices = &mut packed[..panels * NR * k];
        if parallel {
            panel_slices
                .par_chunks_mut(NR * k)
                .enumerate()
                .for_each(pack);
        } else {
            panel_slices.chunks_mut(NR * k).enumerate().for_each(pack);
        }
        // Panels per task: GROUP, fewer where that leaves under three
        // tasks per thread (a 77-row product over 12 panels would run
        // as 3 tasks on 2 threads).
        let row_blocks = m.div_ceil(mc);
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let group = [GROUP, 2, 1]
            .into_iter()
            .find(|&g| row_blocks * panels.div_ceil(g) >= 3 * threads)
            .unwrap_or(1);
        let groups = panels.div_ceil(group);
        let tiles = row_blocks * groups;
        let packed = &packed[..];
        // Consecutive tasks share their panels (kept in L2) and stream A.
        let task = |t: usize| {
            let (g, mb) = (t / row_blocks, t % row_blocks);
            let rows = mb * mc..m.min((mb + 1) * mc);
            let ps = g * group..panels.min(g * group + group);
            // SAFETY: rows `rows` of A; the panels `ps` of this chunk; C's
            // rows `rows`, columns n0 + ps·NR (this task's alone).
            unsafe {
                block(
                    a.start().add(rows.start * lda),
                    lda,
                    k,
                    rows.len(),
                    packed,
                    cols,
                    ps.clone(),
                    c.get().add(rows.start * ldc + n0 + ps.start * NR),
                    ldc,
                    init.at(n0 + ps.start * NR),
                )
            }
        };
        if parallel && tiles > 1 {
            (0..tiles).into_par_iter().for_each(task);
        } else {
            (0..tiles).for_each(task);
        }
    }
    PACKED.with(|p| p.set(packed));
}

thread_local! {
    /// Each thread's buffer of packed panels (see [`gemm`]).
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `C (rows × the panels' columns) = init + A (rows × k) · B-panels` on
/// one thread, blocked by equal k blocks of at most [`KC`] (`init` is
/// for the tile's first element).
///
/// # Safety
/// `a` valid for `rows` rows of `k` at stride `lda`; `c` for `rows` rows at
/// stride `ldc` over the panels' valid columns (`cols` in all, counted
/// from panel 0; `c` points at panel `panels.start`'s first column).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    a: *const f32,
    lda: usize,
    k: usize,
    rows: usize,
    packed: &[f32],
    cols: usize,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let kc = k.div_ceil(k.div_ceil(KC));
        for q0 in (0..k).step_by(kc) {
            let depth = kc.min(k - q0);
            for panel in panels.clone() {
                let bp = packed.as_ptr().add(panel * NR * k + q0 * NR);
                let width = NR.min(cols - panel * NR);
                let cp = c.add((panel - panels.start) * NR);
                let init = match q0 {
                    0 => init.at((panel - panels.start) * NR),
                    _ => Init::Accumulate,
                };
                let mut r = 0;
                while r < rows {
                    let n_rows = MR.min(rows - r);
                    x86::micro(
                        n_rows,
                        a.add(r * lda + q0),
                        lda,
                        depth,
                        init,
                        bp,
                        cp.add(r * ldc),
                        ldc,
                        width,
                    );
                    r += n_rows;
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, lda, k, rows, packed, cols, panels, c, ldc, init);
        unreachable!("the AVX-512 f32 kernel runs on x86-64 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Init, MR, NR};
    use std::arch::x86_64::*;

    /// Dispatch [`tile`] on the row count (1..=MR).
    ///
    /// # Safety
    /// As [`tile`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn micro(
        rows: usize,
        a: *const f32,
        lda: usize,
        depth: usize,
        init: Init,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        match rows {
            6 => tile::<6>(a, lda, depth, init, b, c, ldc, cols),
            5 => tile::<5>(a, lda, depth, init, b, c, ldc, cols),
            4 => tile::<4>(a, lda, depth, init, b, c, ldc, cols),
            3 => tile::<3>(a, lda, depth, init, b, c, ldc, cols),
            2 => tile::<2>(a, lda, depth, init, b, c, ldc, cols),
            _ => tile::<1>(a, lda, depth, init, b, c, ldc, cols),
        }
        const _: () = assert!(MR == 6);
    }

    /// `C[R × cols] = init + A[R × depth] · B-panel`, the accumulators
    /// `R × 4` zmm registers, one `vfmadd231ps` per register and k step.
    ///
    /// # Safety
    /// `a` valid for `R` rows (stride `lda`) of `depth` f32; `b` for
    /// `depth` rows of `NR` f32; `c` for `R` rows (stride `ldc`) of
    /// `cols ≤ NR` f32; AVX-512F present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(
        a: *const f32,
        lda: usize,
        depth: usize,
        init: Init,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let masks: [__mmask16; 4] = std::array::from_fn(|v| {
            let valid = cols.saturating_sub(16 * v).min(16);
            ((1u32 << valid) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, reg) in row.iter_mut().enumerate() {
                *reg = match init {
                    Init::Zero => _mm512_setzero_ps(),
                    Init::Accumulate => _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + 16 * v)),
                    Init::ColumnBias(p) => _mm512_maskz_loadu_ps(masks[v], p.add(16 * v)),
                };
            }
        }
        for q in 0..depth {
            let bq = b.add(q * NR);
            let bv: [__m512; 4] = std::array::from_fn(|v| _mm512_loadu_ps(bq.add(16 * v)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + q));
                for v in 0..4 {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, reg) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *reg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pack_f32::RowFormat;
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// `n` rows of `k` values in `format` (pseudo-random bits; the scales
    /// of the block formats finite) and their widening by the format's
    /// documented rule.
    fn stored_rows(format: RowFormat, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let v = values(n * k, seed);
        let bits: Vec<u8> = values(n * k, seed + 1)
            .iter()
            .map(|&x| ((x + 2.0) * 63.9) as u8)
            .collect();
        match format {
            RowFormat::F16 => {
                let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                let bytes = h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
                (bytes, h.iter().map(|x| x.to_f32()).collect())
            }
            RowFormat::Bf16 => {
                let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
                let bytes = h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
                (bytes, h.iter().map(|x| x.to_f32()).collect())
            }
            RowFormat::Q8_0 | RowFormat::Q4_0 => {
                let (mut bytes, mut wide) = (Vec::new(), Vec::new());
                for block in 0..n * k / 32 {
                    let d = half::f16::from_f32(v[block] * 0.1);
                    bytes.extend(d.to_bits().to_le_bytes());
                    let q = &bits[block * 32..block * 32 + 32];
                    let ints: Vec<i32> = if format == RowFormat::Q8_0 {
                        bytes.extend(q);
                        q.iter().map(|&b| b as i8 as i32).collect()
                    } else {
                        bytes.extend(&q[..16]);
                        let low = q[..16].iter().map(|&b| (b & 15) as i32 - 8);
                        low.chain(q[..16].iter().map(|&b| (b >> 4) as i32 - 8))
                            .collect()
                    };
                    wide.extend(ints.iter().map(|&i| i as f32 * d.to_f32()));
                }
                (bytes, wide)
            }
        }
    }

    /// A weight packed straight from its stored rows (half precision, GGML
    /// blocks) gives exactly the product of its f32 widening read
    /// transposed (odd k, partial sixteen-row groups and panels, one
    /// thread and the pool).
    #[test]
    fn stored_rows_equal_their_widening() {
        if !cpu_has_avx512f() {
            eprintln!("SKIPPED stored_rows_equal_their_widening: this CPU has no AVX-512F");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (7, 5, 3),
            (13, 70, 301),
            (97, 129, 40),
            (3, 64, 513),
            (5, 70, 64),
            (77, 100, 320),
        ];
        let formats = [
            RowFormat::F16,
            RowFormat::Bf16,
            RowFormat::Q8_0,
            RowFormat::Q4_0,
        ];
        for &(m, n, k) in &shapes {
            let a = values(m * k, 5);
            let bias = values(n, 7);
            for format in formats.into_iter().filter(|f| f.fits(k)) {
                let (bytes, wide) = stored_rows(format, n, k, 8);
                assert_eq!(bytes.len(), n * format.row_bytes(k));
                let stored = Source::Rows {
                    ptr: bytes.as_ptr(),
                    row_bytes: format.row_bytes(k),
                    format,
                };
                let transposed = Source::F32(Strided {
                    ptr: wide.as_ptr(),
                    rs: 1,
                    cs: k,
                });
                for parallel in [false, true] {
                    let run = |b: Source| {
                        let mut c = vec![f32::NAN; m * n];
                        let init = Init::ColumnBias(bias.as_ptr());
                        unsafe {
                            gemm(m, n, k, c.as_mut_ptr(), n, init, a.as_ptr(), k, b, parallel)
                        };
                        c
                    };
                    let (got, want) = (run(stored), run(transposed));
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{format:?} {m}x{n}x{k} par {parallel}"
                    );
                }
            }
        }
    }

    /// Every shape class (rows not a multiple of MR or MC, columns not of
    /// NR or of a packed chunk, k above and below KC, row-major and
    /// transposed and general B, every start of C, one thread and the
    /// pool) against an f64 reference.
    #[test]
    fn products_match_an_f64_reference() {
        if !cpu_has_avx512f() {
            eprintln!("SKIPPED products_match_an_f64_reference: this CPU has no AVX-512F");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 70, 300),
            (97, 129, 40),
            (200, 4100, 9),
            (3, 64, 513),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let init = values(m * n, 3);
            let col_bias = values(n, 4);
            // (rs, cs) of B stored row-major, transposed, or both strided.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let wide: Vec<f32> = b.iter().flat_map(|&v| [v, 7.0]).collect();
            let layouts = [(&b[..], n, 1), (&bt[..], 1, k), (&wide[..], 2 * n, 2)];
            for (store, rs, cs) in layouts {
                for start in 0..3 {
                    let first = |i: usize, j: usize| match start {
                        0 => 0.0,
                        1 => init[i * n + j] as f64,
                        _ => col_bias[j] as f64,
                    };
                    for parallel in [false, true] {
                        let mut c = init.clone();
                        let ldc = n;
                        unsafe {
                            gemm(
                                m,
                                n,
                                k,
                                c.as_mut_ptr(),
                                ldc,
                                [
                                    Init::Zero,
                                    Init::Accumulate,
                                    Init::ColumnBias(col_bias.as_ptr()),
                                ][start],
                                a.as_ptr(),
                                k,
                                Source::F32(Strided {
                                    ptr: store.as_ptr(),
                                    rs,
                                    cs,
                                }),
                                parallel,
                            )
                        };
                        for i in 0..m {
                            for j in 0..n {
                                let mut want = first(i, j);
                                let mut abs = want.abs();
                                for q in 0..k {
                                    let p = a[i * k + q] as f64 * b[q * n + j] as f64;
                                    want += p;
                                    abs += p.abs();
                                }
                                let got = c[i * ldc + j] as f64;
                                let tol = abs * (k as f64 + 2.0) * f32::EPSILON as f64 + 1e-6;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{m}x{n}x{k} rs {rs} cs {cs} init {start} par {parallel} \
                                     at ({i}, {j}): got {got}, want {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
