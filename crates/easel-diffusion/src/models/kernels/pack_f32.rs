//! Packing the `B` matrix of [`super::gemm_f32`] into panels of [`NR`]
//! columns (`k` rows of `NR` f32, the layout its micro-kernel reads), from
//! f32 at any strides or from a weight stored as PyTorch's `Linear` holds
//! it (`(n, k)` row-major) in half precision or GGML blocks
//! ([`RowFormat`]), widened exactly while packed. A `(n, k)` source read
//! as `k × n` is transposed 16×16 in registers (AVX-512F).

/// Columns of one packed panel of `B` (four zmm registers of 16 f32).
pub(super) const NR: usize = 64;

/// The longest row, in bytes, an f32 `B` read transposed may have for its
/// last `k mod 16` values to be packed by gathers (sixteen rows' 32-bit
/// byte offsets); past it they are packed element by element.
const GATHER_MAX_ROW_BYTES: usize = (i32::MAX as usize) / 16;

/// Whether the CPU has AVX-512F (detected at run time).
pub(super) fn cpu_has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A read-only strided matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// How the rows of a weight held as PyTorch's `Linear` holds it (`(n, k)`,
/// row-major) store their values; each is widened to f32 exactly as its
/// reference widens it (`half`'s conversions, ggml's `dequantize_row`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RowFormat {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// GGML `Q8_0`: per 32 values an f16 scale `d` and 32 `i8` `q`; value
    /// `q·d`. `k` a multiple of 32.
    Q8_0,
    /// GGML `Q4_0`: per 32 values an f16 scale `d` and 16 bytes; value
    /// `j < 16` is `((byte j & 15) − 8)·d`, value `j ≥ 16` is
    /// `((byte j−16 >> 4) − 8)·d`. `k` a multiple of 32.
    Q4_0,
}

impl RowFormat {
    /// Bytes of a row of `k` values (`k` a multiple of 32 for the block
    /// formats).
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            RowFormat::F16 | RowFormat::Bf16 => 2 * k,
            RowFormat::Q8_0 => k / 32 * 34,
            RowFormat::Q4_0 => k / 32 * 18,
        }
    }

    /// Whether rows of `k` values can be held in this format.
    pub fn fits(self, k: usize) -> bool {
        matches!(self, RowFormat::F16 | RowFormat::Bf16) || k.is_multiple_of(32)
    }
}

/// The matrix `B` of [`super::gemm_f32::gemm`]: f32 at any strides, or a weight stored as
/// PyTorch's `Linear` holds it, `(n, k)` row-major, in half precision or
/// GGML blocks ([`RowFormat`]), read as its `k × n` transpose and widened
/// exactly while its panels are packed, so no f32 copy of the weight is
/// made.
#[derive(Clone, Copy)]
pub(super) enum Source {
    /// f32 values at any strides.
    F32(Strided),
    /// Rows of `format` ([`RowFormat::fits`] `k`), `row_bytes` apart
    /// ([`RowFormat::row_bytes`]).
    Rows {
        ptr: *const u8,
        row_bytes: usize,
        format: RowFormat,
    },
}
// SAFETY: the sources are only read.
unsafe impl Send for Source {}
unsafe impl Sync for Source {}

impl Source {
    /// The same matrix from column `col` on.
    ///
    /// # Safety
    /// `col` is at most the matrix's column count.
    pub(super) unsafe fn columns_from(self, col: usize) -> Self {
        match self {
            Source::F32(s) => Source::F32(Strided {
                ptr: s.ptr.add(col * s.cs),
                ..s
            }),
            Source::Rows {
                ptr,
                row_bytes,
                format,
            } => Source::Rows {
                ptr: ptr.add(col * row_bytes),
                row_bytes,
                format,
            },
        }
    }

    /// Pack columns `j0 .. j0+NR` of this `k × cols` matrix into `dst`,
    /// as [`pack_panel`].
    ///
    /// # Safety
    /// As [`pack_panel`]; AVX-512F present.
    pub(super) unsafe fn pack(self, k: usize, j0: usize, cols: usize, dst: &mut [f32]) {
        let width = NR.min(cols - j0);
        match self {
            Source::F32(s) => pack_panel(s, k, j0, cols, dst),
            #[cfg(target_arch = "x86_64")]
            Source::Rows {
                ptr,
                row_bytes,
                format,
            } => x86::pack_rows(
                x86::Elem::Stored(format),
                ptr.add(j0 * row_bytes),
                row_bytes,
                k,
                width,
                dst,
            ),
            #[cfg(not(target_arch = "x86_64"))]
            _ => {
                let _ = width;
                unreachable!("the AVX-512 f32 kernel runs on x86-64 only")
            }
        }
    }
}

// SAFETY: the matrix is only read.
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

/// Pack columns `j0 .. j0+NR` (those below `cols`) of the `k × cols`
/// matrix `b` into `dst` (`k` rows of `NR`, zero past `cols`; every
/// element of `dst[..k·NR]` is written).
///
/// # Safety
/// `b` is valid for `k` rows and `cols` columns.
pub(super) unsafe fn pack_panel(b: Strided, k: usize, j0: usize, cols: usize, dst: &mut [f32]) {
    let width = NR.min(cols - j0);
    // SAFETY (all reads): (q, j) for q < k, j < cols lies in `b`.
    if b.cs == 1 {
        for (q, row) in dst.chunks_exact_mut(NR).enumerate() {
            let src = unsafe { std::slice::from_raw_parts(b.ptr.add(q * b.rs + j0), width) };
            row[..width].copy_from_slice(src);
            row[width..].fill(0.0);
        }
    } else {
        #[cfg(target_arch = "x86_64")]
        if b.rs == 1 && cpu_has_avx512f() {
            // SAFETY: columns j0..j0+width are rows of k values at
            // stride cs; AVX-512F checked. `pack_rows` zeroes the columns
            // past `width` itself.
            unsafe {
                x86::pack_rows(
                    x86::Elem::F32,
                    b.ptr.add(j0 * b.cs).cast(),
                    b.cs * 4,
                    k,
                    width,
                    dst,
                )
            };
            return;
        }
        if width < NR {
            dst.fill(0.0);
        }
        for j in 0..width {
            let col = unsafe { b.ptr.add((j0 + j) * b.cs) };
            if b.rs == 1 {
                let src = unsafe { std::slice::from_raw_parts(col, k) };
                for (q, &v) in src.iter().enumerate() {
                    dst[q * NR + j] = v;
                }
            } else {
                for q in 0..k {
                    dst[q * NR + j] = unsafe { *col.add(q * b.rs) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RowFormat, GATHER_MAX_ROW_BYTES, NR};
    use std::arch::x86_64::*;

    /// Offsets of 16 consecutive rows `row_bytes` apart, in bytes, and
    /// the mask of the first `rows` of them.
    #[target_feature(enable = "avx512f")]
    unsafe fn row_offsets(row_bytes: usize, rows: usize) -> (__m512i, __mmask16) {
        let stride = row_bytes as i32;
        let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride));
        (offsets, ((1u32 << rows.min(16)) - 1) as __mmask16)
    }

    /// What the rows of a transposed `B` hold.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(super) enum Elem {
        F32,
        Stored(RowFormat),
    }

    /// [`Elem`] as a constant, so each format gets a packing loop of its own.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;
    const Q8_0: u8 = 3;
    const Q4_0: u8 = 4;

    /// Values `q .. q+16` of the row at `row`, of the format coded `E`, as
    /// f32, exactly (`q` a multiple of 16).
    ///
    /// # Safety
    /// The row holds those values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const E: u8>(row: *const u8, q: usize) -> __m512 {
        // A block format's (scale, first quant byte) for value q.
        let block = |bytes: usize| {
            let b = row.add(q / 32 * bytes);
            (
                half::f16::from_bits(b.cast::<u16>().read_unaligned()).to_f32(),
                b.add(2),
            )
        };
        match E {
            F32 => _mm512_loadu_ps(row.add(4 * q).cast()),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(row.add(2 * q).cast())),
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(row.add(2 * q).cast()),
            ))),
            Q8_0 => {
                let (d, qs) = block(34);
                let ints = _mm512_cvtepi8_epi32(_mm_loadu_si128(qs.add(q % 32).cast()));
                _mm512_mul_ps(_mm512_cvtepi32_ps(ints), _mm512_set1_ps(d))
            }
            _ => {
                let (d, qs) = block(18);
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
                let nibbles = if q % 32 < 16 {
                    _mm512_and_si512(bytes, _mm512_set1_epi32(15))
                } else {
                    _mm512_srli_epi32::<4>(bytes)
                };
                let ints = _mm512_sub_epi32(nibbles, _mm512_set1_epi32(8));
                _mm512_mul_ps(_mm512_cvtepi32_ps(ints), _mm512_set1_ps(d))
            }
        }
    }

    /// The 16×16 transpose of `r` (row `i` of the result is column `i` of
    /// `r`): pairs of rows interleaved, then pairs of pairs, then 128-bit
    /// lanes exchanged twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let (lo, hi) = (
            |a: __m512, b: __m512| {
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
            },
            |a: __m512, b: __m512| {
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
            },
        );
        // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved, per 128-bit lane.
        let t: [__m512; 16] = std::array::from_fn(|i| match i % 2 {
            0 => _mm512_unpacklo_ps(r[i], r[i + 1]),
            _ => _mm512_unpackhi_ps(r[i - 1], r[i]),
        });
        // u[4g + s]: rows 4g..4g+4 at columns s, s+4, s+8, s+12 (one per
        // 128-bit lane).
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, s) = (i / 4 * 4, i % 4);
            match s {
                0 => lo(t[g], t[g + 2]),
                1 => hi(t[g], t[g + 2]),
                2 => lo(t[g + 1], t[g + 3]),
                _ => hi(t[g + 1], t[g + 3]),
            }
        });
        let mut out = [_mm512_setzero_ps(); 16];
        for s in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[s], u[4 + s]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[s], u[4 + s]);
            let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + s], u[12 + s]);
            let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + s], u[12 + s]);
            out[s] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            out[s + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
            out[s + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            out[s + 12] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
        }
        out
    }

    /// Pack `width ≤ NR` rows of `k` values of `elem` (row `j` at `src +
    /// j·row_bytes`) as the columns of a `k × NR` f32 panel (zero past
    /// `width`), widened exactly: blocks of 16 rows × 16 values loaded
    /// row by row and transposed in registers, the last `k mod 16` values
    /// (f32 and half precision only) by gathers or one by one.
    ///
    /// # Safety
    /// `src` valid for `width` rows of `k` values `row_bytes` apart; `dst`
    /// holds `k·NR`; AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_rows(
        elem: Elem,
        src: *const u8,
        row_bytes: usize,
        k: usize,
        width: usize,
        dst: &mut [f32],
    ) {
        let pack = match elem {
            Elem::F32 => pack_rows_of::<F32>,
            Elem::Stored(RowFormat::F16) => pack_rows_of::<F16>,
            Elem::Stored(RowFormat::Bf16) => pack_rows_of::<BF16>,
            Elem::Stored(RowFormat::Q8_0) => pack_rows_of::<Q8_0>,
            Elem::Stored(RowFormat::Q4_0) => pack_rows_of::<Q4_0>,
        };
        pack(src, row_bytes, k, width, dst)
    }

    /// [`pack_rows`] for the format coded `E`.
    ///
    /// # Safety
    /// As [`pack_rows`].
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_rows_of<const E: u8>(
        src: *const u8,
        row_bytes: usize,
        k: usize,
        width: usize,
        dst: &mut [f32],
    ) {
        if width < NR {
            dst[..k * NR].fill(0.0);
        }
        let out = dst.as_mut_ptr();
        let whole = k / 16 * 16;
        for jb in (0..width).step_by(16) {
            let rows = (width - jb).min(16);
            let first = src.add(jb * row_bytes);
            for q in (0..whole).step_by(16) {
                let block: [__m512; 16] = std::array::from_fn(|r| {
                    if r < rows {
                        load16::<E>(first.add(r * row_bytes), q)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (c, v) in transpose16(block).into_iter().enumerate() {
                    _mm512_storeu_ps(out.add((q + c) * NR + jb), v);
                }
            }
            for q in whole..k {
                let v = match E {
                    F32 if row_bytes <= GATHER_MAX_ROW_BYTES => {
                        let (offsets, mask) = row_offsets(row_bytes, rows);
                        _mm512_mask_i32gather_ps::<1>(
                            _mm512_setzero_ps(),
                            mask,
                            offsets,
                            first.add(q * 4).cast(),
                        )
                    }
                    F32 => {
                        let mut v = [0f32; 16];
                        for (r, v) in v.iter_mut().enumerate().take(rows) {
                            *v = first
                                .add(r * row_bytes + q * 4)
                                .cast::<f32>()
                                .read_unaligned();
                        }
                        _mm512_loadu_ps(v.as_ptr())
                    }
                    // Half precision (block formats hold whole blocks of
                    // 32): the sixteen values into one vector, widened.
                    _ => {
                        let mut bits = [0u16; 16];
                        for (r, v) in bits.iter_mut().enumerate().take(rows) {
                            *v = first
                                .add(r * row_bytes + q * 2)
                                .cast::<u16>()
                                .read_unaligned();
                        }
                        load16::<E>(bits.as_ptr().cast(), 0)
                    }
                };
                _mm512_storeu_ps(out.add(q * NR + jb), v);
            }
        }
    }
}
