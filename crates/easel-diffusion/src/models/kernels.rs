//! The engine's own CPU kernels for the operations that dominate diffusion
//! models: 3×3 convolution by Winograd F(2×2, 3×3) or as nine shifted
//! matrix products (reading PyTorch's weight layout in place), group norm
//! fused with SiLU, and attention computed block by block without
//! materialising the full score matrix, its softmax on a vectorised `exp`. Matrix products go through the `gemm` crate (runtime
//! dispatch to AVX2/AVX-512/NEON micro-kernels); everything around them
//! (layout, padding, softmax, normalisation) is ours.
//!
//! All functions take and return contiguous row-major f32 buffers; shapes
//! are given explicitly. Results equal PyTorch's within float32 rounding.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Threads the kernels use (rayon's pool, sized by `RAYON_NUM_THREADS` or the core count).
pub fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

fn parallelism() -> gemm::Parallelism {
    match num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Run `f` on the contiguous f32 data of `t` (copied to contiguous first if needed).
///
/// Errors: `t` is not an f32 CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Err(Error::invalid("kernel", "expected an f32 CPU tensor"));
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::invalid("kernel", "expected a CPU tensor"));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::invalid("kernel", "tensor is not contiguous"))?;
    Ok(f(&data[start..end]))
}

/// Whether the fast CPU kernels apply to `t` (an f32 tensor on the CPU).
pub fn applies(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

/// Whether `t` is a weight the fast kernels can read: a contiguous CPU
/// tensor stored as f32, f16 or bf16 (see [`with_f32_weight`]).
pub fn applies_weight(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && t.device().is_cpu()
        && t.is_contiguous()
}

/// Elements widened per rayon task in [`with_f32_weight`].
const WIDEN_CHUNK: usize = 1 << 16;

/// Run `f` on the data of weight `t` as f32: in place for an f32 tensor,
/// else widened from f16 / bf16 into a temporary buffer (exactly: every
/// f16 and bf16 value is an f32 value), in parallel chunks with F16C where
/// the CPU has it (`half`'s slice conversion). Weights stay in memory in
/// their stored precision, half the bytes of f32, and only one layer's
/// weight is widened at a time.
///
/// Errors: `t` is not a contiguous f32 / f16 / bf16 CPU tensor.
pub fn with_f32_weight<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    use half::slice::HalfFloatSliceExt;
    if t.dtype() == DType::F32 {
        return with_f32(t, f);
    }
    if !applies_weight(t) {
        return Err(Error::invalid(
            "kernel",
            "expected a contiguous f32, f16 or bf16 CPU weight",
        ));
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::invalid("kernel", "expected a CPU tensor"));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::invalid("kernel", "tensor is not contiguous"))?;
    fn widen<T: Sync>(data: &[T]) -> Vec<f32>
    where
        [T]: HalfFloatSliceExt,
    {
        let mut wide = vec![0f32; data.len()];
        wide.par_chunks_mut(WIDEN_CHUNK)
            .zip(data.par_chunks(WIDEN_CHUNK))
            .for_each(|(dst, src)| src.convert_to_f32_slice(dst));
        wide
    }
    let wide = match t.dtype() {
        DType::F16 => widen(&cpu.as_slice::<half::f16>()?[start..end]),
        _ => widen(&cpu.as_slice::<half::bf16>()?[start..end]),
    };
    Ok(f(&wide))
}

/// Copy `planes` of `h × w` values from `src` into `dst`, whose planes are
/// `plane` values long with rows of `pw`, at row 1 and column 1: the
/// zero-padded inputs of the 3×3 convolution kernels (`dst` zeroed).
fn pad_planes(dst: &mut [f32], src: &[f32], h: usize, w: usize, plane: usize, pw: usize) {
    dst.par_chunks_mut(plane)
        .zip(src.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for y in 0..h {
                dst[(y + 1) * pw + 1..(y + 1) * pw + 1 + w]
                    .copy_from_slice(&src[y * w..(y + 1) * w]);
            }
        });
}

/// Wrap a buffer as a CPU tensor of `shape`.
pub fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// `dst (m×n, row stride dst_rs) = [dst +] a (m×k, row stride lda) · b (k×n, row stride ldb)`.
///
/// # Safety
/// The pointers must be valid for the given shapes and strides, and `dst`
/// must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        1,
        lda as isize,
        b,
        1,
        ldb as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}

/// `torch.nn.functional.linear`: `y = x · Wᵀ + bias`.
///
/// - `x`: `(m, k)` row-major; `weight`: `(n, k)` row-major, as stored by
///   PyTorch (read transposed through strides, never copied);
///   `bias`: `n` values or empty → `(m, n)`.
///
/// One matrix product over all `m` rows (every batch and sequence position
/// at once), with the bias written into the output first and accumulated
/// onto, so no separate broadcast pass runs.
pub fn linear(x: &[f32], m: usize, k: usize, weight: &[f32], bias: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(weight.len(), n * k);
    let mut out = if bias.is_empty() {
        vec![0f32; m * n]
    } else {
        debug_assert_eq!(bias.len(), n);
        let mut out = Vec::with_capacity(m * n);
        for _ in 0..m {
            out.extend_from_slice(bias);
        }
        out
    };
    // SAFETY: `x` is m×k (row stride k), `weight` read as k×n with row
    // stride 1 and column stride k, `out` is m×n; no aliasing.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            !bias.is_empty(),
            x.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism(),
        );
    }
    out
}

/// 3×3 convolution, stride 1, zero padding 1 ("same"), plus bias, as nine
/// shifted matrix products (the direct method; [`conv3x3_winograd`] for
/// layers with many channels, see [`conv3x3_prefers_winograd`]).
///
/// - `x`: `(batch, ci, h, w)`; `weight`: PyTorch's `(co, ci, 3, 3)` (tap
///   `ky * 3 + kx` is read in place as a `(co × ci)` matrix with column
///   stride 9); `bias`: `co` values → `(batch, co, h, w)`.
///
/// Each image is zero-padded to `(ci, h+2, w+2)`; the output is computed on
/// the padded width as `Σ_taps W_tap · X_pad[shifted by ky*(w+2)+kx]`, nine
/// matrix products of `(co × ci) · (ci × h(w+2))` with no im2col copy, and
/// the two padding columns of each row are dropped at the end.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_same(
    x: &[f32],
    batch: usize,
    ci: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    co: usize,
) -> Vec<f32> {
    debug_assert_eq!(weight.len(), co * ci * 9);
    let wp = w + 2;
    let plane = (h + 2) * wp + 2; // +2: the last tap reads two past the padded plane
    let n = h * wp;
    let mut out = vec![0f32; batch * co * h * w];
    let mut padded = vec![0f32; ci * plane];
    let mut out_pad = vec![0f32; co * n];
    for b in 0..batch {
        let xb = &x[b * ci * h * w..(b + 1) * ci * h * w];
        pad_planes(&mut padded, xb, h, w, plane, wp);
        for t in 0..9 {
            let (ky, kx) = (t / 3, t % 3);
            // SAFETY: tap t of `weight` is (co × ci) with row stride 9*ci and
            // column stride 9 from offset t; the shifted view of `padded`
            // reads rows of n elements starting at ky*wp+kx, within `plane`;
            // out_pad is co × n.
            unsafe {
                gemm::gemm(
                    co,
                    n,
                    ci,
                    out_pad.as_mut_ptr(),
                    1,
                    n as isize,
                    t > 0,
                    weight.as_ptr().add(t),
                    9,
                    (9 * ci) as isize,
                    padded.as_ptr().add(ky * wp + kx),
                    1,
                    plane as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        }
        let ob = &mut out[b * co * h * w..(b + 1) * co * h * w];
        ob.par_chunks_mut(h * w)
            .zip(out_pad.par_chunks(n))
            .zip(bias.par_iter())
            .for_each(|((dst, src), &bv)| {
                for y in 0..h {
                    let s = &src[y * wp..y * wp + w];
                    for (d, v) in dst[y * w..(y + 1) * w].iter_mut().zip(s) {
                        *d = v + bv;
                    }
                }
            });
    }
    out
}

/// A raw pointer that rayon tasks may share, for kernels whose tasks write
/// disjoint, non-contiguous parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used where every task writes a disjoint set of elements.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Tiles of the Winograd transform processed together (whole rows of
/// tiles, at least one): bounds the transformed input and product buffers
/// to about `16 · channels · 1024` floats.
const WINOGRAD_TILE_BLOCK: usize = 1024;

/// The Winograd F(2×2, 3×3) filter transform `U = G g Gᵀ` (Lavin & Gray
/// 2015, arXiv:1509.09308) of a PyTorch `(co, ci, 3, 3)` weight, laid out
/// `(co, 16, ci)`: for each output channel the 16 transformed taps, each a
/// row over the input channels. With `G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]`.
pub fn winograd_filter(weight: &[f32], co: usize, ci: usize) -> Vec<f32> {
    debug_assert_eq!(weight.len(), co * ci * 9);
    let mut u = vec![0f32; co * 16 * ci];
    u.par_chunks_mut(16 * ci)
        .zip(weight.par_chunks(ci * 9))
        .for_each(|(uo, wo)| {
            // The nine taps as rows over the input channels.
            let mut g = vec![0f32; 9 * ci];
            for (i, taps) in wo.chunks_exact(9).enumerate() {
                for (t, &v) in taps.iter().enumerate() {
                    g[t * ci + i] = v;
                }
            }
            let row = |t: usize| &g[t * ci..(t + 1) * ci];
            // t = G g: four rows of three taps (columns kx), each over ci.
            let mut tg = vec![0f32; 12 * ci];
            for kx in 0..3 {
                let (g0, g1, g2) = (row(kx), row(3 + kx), row(6 + kx));
                for i in 0..ci {
                    tg[kx * ci + i] = g0[i];
                    tg[(3 + kx) * ci + i] = 0.5 * (g0[i] + g1[i] + g2[i]);
                    tg[(6 + kx) * ci + i] = 0.5 * (g0[i] - g1[i] + g2[i]);
                    tg[(9 + kx) * ci + i] = g2[i];
                }
            }
            // U = t Gᵀ.
            for r in 0..4 {
                let (a, b, c) = (
                    &tg[(3 * r) * ci..(3 * r + 1) * ci],
                    &tg[(3 * r + 1) * ci..(3 * r + 2) * ci],
                    &tg[(3 * r + 2) * ci..(3 * r + 3) * ci],
                );
                let out = &mut uo[r * 4 * ci..(r + 1) * 4 * ci];
                let (u0, rest) = out.split_at_mut(ci);
                let (u1, rest) = rest.split_at_mut(ci);
                let (u2, u3) = rest.split_at_mut(ci);
                for i in 0..ci {
                    u0[i] = a[i];
                    u1[i] = 0.5 * (a[i] + b[i] + c[i]);
                    u2[i] = 0.5 * (a[i] - b[i] + c[i]);
                    u3[i] = c[i];
                }
            }
        });
    u
}

/// 3×3 convolution, stride 1, zero padding 1 ("same"), plus bias, by
/// Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2015,
/// arXiv:1509.09308): each 2×2 output tile is `Aᵀ [U ⊙ (Bᵀ d B)] A` of its
/// 4×4 input patch `d`, so the channel contraction is 16 matrix products
/// `(co × ci) · (ci × tiles)`: 4 multiplies per output per input channel
/// instead of the 9 of a direct convolution (2.25× less arithmetic, at the
/// price of transforms whose memory traffic dominates when channels are few;
/// see [`conv3x3_prefers_winograd`]).
///
/// - `x`: `(batch, ci, h, w)`; `weight`: PyTorch's `(co, ci, 3, 3)`
///   (transformed here, per call: no second copy of the weights is kept);
///   `bias`: `co` values → `(batch, co, h, w)`. Any `h, w ≥ 1` (a partial
///   last tile reads zero padding and writes only the pixels that exist).
///
/// Tiles are processed in blocks of whole tile rows across the batch
/// ([`WINOGRAD_TILE_BLOCK`]); the transforms run row-vectorised per channel.
/// Results equal the direct convolution within f32 rounding (the transforms
/// only add, subtract and halve).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_winograd(
    x: &[f32],
    batch: usize,
    ci: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    co: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), batch * ci * h * w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let (ph, pw) = (2 * th + 2, 2 * tw + 2);
    // Zero-padded input, (batch, ci, ph, pw), data at (1, 1).
    let mut padded = vec![0f32; batch * ci * ph * pw];
    pad_planes(&mut padded, x, h, w, ph * pw, pw);
    let u = winograd_filter(weight, co, ci);
    let tile_rows = batch * th; // global tile rows (image, ty)
    let rows_per_block = (WINOGRAD_TILE_BLOCK / tw).clamp(1, tile_rows);
    let block = rows_per_block * tw;
    let mut v = vec![0f32; ci * 16 * block];
    let mut m = vec![0f32; co * 16 * block];
    let mut out = vec![0f32; batch * co * h * w];
    let out_ptr = SharedMut(out.as_mut_ptr());
    for row0 in (0..tile_rows).step_by(rows_per_block) {
        let nr = rows_per_block.min(tile_rows - row0);
        let nb = nr * tw;
        // Input transform: V (ci, 16, block) = Bᵀ d B per tile, with
        // Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]].
        v.par_chunks_mut(16 * block)
            .enumerate()
            .for_each(|(c, vc)| {
                let mut t = vec![0f32; 4 * pw];
                for rr in 0..nr {
                    let (b, ty) = ((row0 + rr) / th, (row0 + rr) % th);
                    let plane = &padded[(b * ci + c) * ph * pw..(b * ci + c + 1) * ph * pw];
                    let at = |k: usize| &plane[(2 * ty + k) * pw..(2 * ty + k + 1) * pw];
                    let (d0, d1, d2, d3) = (at(0), at(1), at(2), at(3));
                    // Rows of Bᵀ d, over the whole padded width.
                    let (t0, rest) = t.split_at_mut(pw);
                    let (t1, rest) = rest.split_at_mut(pw);
                    let (t2, t3) = rest.split_at_mut(pw);
                    for q in 0..pw {
                        t0[q] = d0[q] - d2[q];
                        t1[q] = d1[q] + d2[q];
                        t2[q] = d2[q] - d1[q];
                        t3[q] = d1[q] - d3[q];
                    }
                    // Columns: (Bᵀ d) B for every tile of the row.
                    let j0 = rr * tw;
                    for (r, tr) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                        let base = r * 4 * block + j0;
                        let (o0, rest) = vc[base..].split_at_mut(block);
                        let (o1, rest) = rest.split_at_mut(block);
                        let (o2, o3) = rest.split_at_mut(block);
                        for tx in 0..tw {
                            let p = &tr[2 * tx..2 * tx + 4];
                            o0[tx] = p[0] - p[2];
                            o1[tx] = p[1] + p[2];
                            o2[tx] = p[2] - p[1];
                            o3[tx] = p[1] - p[3];
                        }
                    }
                }
            });
        // M (co, 16, block): one product per transformed tap.
        for k in 0..16 {
            // SAFETY: U row o of tap k starts at o*16*ci + k*ci (row stride
            // 16*ci, ci columns); V tap k rows c at c*16*block + k*block (row
            // stride 16*block, nb ≤ block columns); M likewise with co rows;
            // the buffers are distinct.
            unsafe {
                matmul(
                    co,
                    nb,
                    ci,
                    m.as_mut_ptr().add(k * block),
                    16 * block,
                    false,
                    u.as_ptr().add(k * ci),
                    16 * ci,
                    v.as_ptr().add(k * block),
                    16 * block,
                    parallelism(),
                );
            }
        }
        // Output transform: Y = Aᵀ m A per tile, plus bias, with
        // Aᵀ = [[1,1,1,0],[0,1,-1,-1]].
        m.par_chunks(16 * block)
            .zip(bias.par_iter())
            .enumerate()
            .for_each(|(o, (mo, &bv))| {
                // Capture the whole (Send) wrapper, not its raw-pointer field.
                #[allow(clippy::redundant_locals)]
                let out_ptr = out_ptr;
                let mut s = vec![0f32; 8 * tw];
                for rr in 0..nr {
                    let (b, ty) = ((row0 + rr) / th, (row0 + rr) % th);
                    let j0 = rr * tw;
                    let mk = |k: usize| &mo[k * block + j0..k * block + j0 + tw];
                    // s = Aᵀ m: two rows of four columns, per tile.
                    for c in 0..4 {
                        let (m0, m1, m2, m3) = (mk(c), mk(4 + c), mk(8 + c), mk(12 + c));
                        let (s0, s1) = s[c * 2 * tw..(c + 1) * 2 * tw].split_at_mut(tw);
                        for tx in 0..tw {
                            s0[tx] = m0[tx] + m1[tx] + m2[tx];
                            s1[tx] = m1[tx] - m2[tx] - m3[tx];
                        }
                    }
                    let sc = |c: usize, i: usize| &s[(c * 2 + i) * tw..(c * 2 + i + 1) * tw];
                    let plane = (b * co + o) * h * w;
                    for i in 0..2 {
                        let y = 2 * ty + i;
                        if y >= h {
                            continue;
                        }
                        let (a0, a1, a2, a3) = (sc(0, i), sc(1, i), sc(2, i), sc(3, i));
                        // SAFETY: row y of plane (b, o) is written by this
                        // task only (channel o), within bounds.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out_ptr.0.add(plane + y * w), w)
                        };
                        for tx in 0..w / 2 {
                            dst[2 * tx] = a0[tx] + a1[tx] + a2[tx] + bv;
                            dst[2 * tx + 1] = a1[tx] - a2[tx] - a3[tx] + bv;
                        }
                        if w % 2 == 1 {
                            let tx = w / 2;
                            dst[2 * tx] = a0[tx] + a1[tx] + a2[tx] + bv;
                        }
                    }
                }
            });
    }
    out
}

/// Which 3×3 convolution kernel [`conv3x3_prefers_winograd`] picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv3x3Kernel {
    /// Winograd from [`WINOGRAD_MIN_CHANNELS`] channels, direct below.
    Auto,
    /// Always the direct nine-product kernel.
    Direct,
    /// Always Winograd.
    Winograd,
}

thread_local! {
    static THREAD_CONV3X3: std::cell::Cell<Option<Conv3x3Kernel>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the 3×3 convolution kernel forced to `kernel` for the layers
/// this thread runs (tests, comparisons); elsewhere
/// `EASEL_CONV3X3=direct|winograd|auto` decides (default auto).
pub fn with_conv3x3_kernel<R>(kernel: Conv3x3Kernel, f: impl FnOnce() -> R) -> R {
    let before = THREAD_CONV3X3.with(|k| k.replace(Some(kernel)));
    let result = f();
    THREAD_CONV3X3.with(|k| k.set(before));
    result
}

/// Whether [`conv3x3_winograd`] runs for a layer with `ci` input and `co`
/// output channels. Its transforms cost memory traffic per pixel and
/// channel while its products save arithmetic per pixel and channel pair,
/// so it wins once channels are many: on this project's AVX2 machine it is
/// 1.15× faster than the direct kernel at 128 channels (VAE, 512²) and
/// 1.3–1.7× at 320–1280 (UNet), measured per layer.
pub fn conv3x3_prefers_winograd(ci: usize, co: usize) -> bool {
    static FROM_ENV: std::sync::OnceLock<Conv3x3Kernel> = std::sync::OnceLock::new();
    let kernel = THREAD_CONV3X3.with(|k| k.get()).unwrap_or_else(|| {
        *FROM_ENV.get_or_init(|| match std::env::var("EASEL_CONV3X3") {
            Ok(v) if v.eq_ignore_ascii_case("direct") => Conv3x3Kernel::Direct,
            Ok(v) if v.eq_ignore_ascii_case("winograd") => Conv3x3Kernel::Winograd,
            _ => Conv3x3Kernel::Auto,
        })
    });
    match kernel {
        Conv3x3Kernel::Auto => ci.min(co) >= WINOGRAD_MIN_CHANNELS,
        Conv3x3Kernel::Direct => false,
        Conv3x3Kernel::Winograd => true,
    }
}

/// From this many input and output channels [`conv3x3_winograd`] is used
/// (see [`conv3x3_prefers_winograd`]).
pub const WINOGRAD_MIN_CHANNELS: usize = 128;

/// 1×1 convolution plus bias: `(co × ci) · (ci × hw)` per image.
///
/// - `x`: `(batch, ci, hw)`, `weight`: `(co, ci)` → `(batch, co, hw)`.
pub fn conv1x1(
    x: &[f32],
    batch: usize,
    ci: usize,
    hw: usize,
    weight: &[f32],
    bias: &[f32],
    co: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; batch * co * hw];
    for b in 0..batch {
        let ob = &mut out[b * co * hw..(b + 1) * co * hw];
        for (row, &bv) in ob.chunks_mut(hw).zip(bias) {
            row.fill(bv);
        }
        // SAFETY: shapes as documented; `ob` does not alias `x` or `weight`.
        unsafe {
            matmul(
                co,
                hw,
                ci,
                ob.as_mut_ptr(),
                hw,
                true,
                weight.as_ptr(),
                ci,
                x.as_ptr().add(b * ci * hw),
                hw,
                parallelism(),
            );
        }
    }
    out
}

/// Group normalisation (Wu & He 2018, arXiv:1803.08494) over `x` laid out
/// as `(batch, channels, spatial)`, with per-channel `gamma`/`beta`, optionally
/// followed by SiLU in the same pass. Mean and variance are accumulated in
/// f64 (two passes), as precise as PyTorch's Welford.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) -> Vec<f32> {
    let cpg = channels / groups;
    let group_len = cpg * spatial;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(bg, (dst, src))| {
            let g = bg % groups;
            let n = src.len() as f64;
            let mean = src.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = src
                .iter()
                .map(|&v| {
                    let d = v as f64 - mean;
                    d * d
                })
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + eps).sqrt();
            for c in 0..cpg {
                let ch = g * cpg + c;
                let scale = (gamma[ch] as f64 * inv) as f32;
                let shift = (beta[ch] as f64 - mean * gamma[ch] as f64 * inv) as f32;
                let s = &src[c * spatial..(c + 1) * spatial];
                let d = &mut dst[c * spatial..(c + 1) * spatial];
                if silu {
                    for (o, &v) in d.iter_mut().zip(s) {
                        let y = v * scale + shift;
                        *o = y / (1.0 + (-y).exp());
                    }
                } else {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = v * scale + shift;
                    }
                }
            }
        });
    out
}

/// Rows of queries handled per attention block.
const ATTENTION_BLOCK: usize = 128;

/// Scaled dot-product attention, `softmax(q kᵀ · scale) v`, per
/// (batch × head), in blocks of query rows: the score matrix of one block
/// (`block × m`) is all that exists at a time, so memory stays
/// `O(threads · block · m)` instead of `O(heads · n · m)`.
///
/// - `q`: `(bh, n, d)`, `k`, `v`: `(bh, m, d)` → `(bh, n, d)`.
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
fn softmax_in_place(row: &mut [f32]) {
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
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::noise::TorchGenerator::new(seed)
            .randn_tensor(shape, &Device::Cpu)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Half-precision weights widen exactly (also across widening chunks).
    #[test]
    fn half_weights_widen_exactly() {
        let w = randn(&[3, WIDEN_CHUNK + 17], 5);
        for dtype in [DType::F16, DType::BF16] {
            let stored = w.to_dtype(dtype).unwrap();
            let want = stored
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = with_f32_weight(&stored, <[f32]>::to_vec).unwrap();
            assert_eq!(got, want, "{dtype:?}");
        }
        let strided = w.to_dtype(DType::F16).unwrap().t().unwrap();
        assert!(!strided.is_contiguous());
        assert!(with_f32_weight(&strided, |_| ()).is_err());
    }

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
    fn conv3x3_matches_candle_on_odd_and_tiny_sizes() {
        // Both kernels, on sizes with partial Winograd tiles, single rows and
        // columns, and (last) more tiles than one Winograd block.
        for &(b, ci, co, h, w) in &[
            (2, 3, 5, 7, 9),
            (1, 4, 2, 1, 1),
            (1, 8, 16, 1, 13),
            (2, 16, 8, 12, 1),
            (1, 5, 3, 2, 2),
            (3, 6, 7, 45, 51),
        ] {
            let x = randn(&[b, ci, h, w], 1);
            let weight = randn(&[co, ci, 3, 3], 2);
            let bias = randn(&[co], 3);
            let want = x
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let wd = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bias_v = bias.to_vec1::<f32>().unwrap();
            let direct = with_f32(&x, |d| conv3x3_same(d, b, ci, h, w, &wd, &bias_v, co)).unwrap();
            let winograd =
                with_f32(&x, |d| conv3x3_winograd(d, b, ci, h, w, &wd, &bias_v, co)).unwrap();
            for (name, got) in [("direct", direct), ("winograd", winograd)] {
                let got = tensor(got, &[b, co, h, w]).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "{name} {b}x{ci}x{h}x{w} -> {co}: {d}");
            }
        }
    }

    #[test]
    fn conv1x1_matches_candle() {
        let (b, ci, co, h, w) = (2, 6, 4, 5, 3);
        let x = randn(&[b, ci, h, w], 4);
        let weight = randn(&[co, ci, 1, 1], 5);
        let bias = randn(&[co], 6);
        let want = x
            .conv2d(&weight, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        let wv = with_f32(&weight, <[f32]>::to_vec).unwrap();
        let got = with_f32(&x, |d| {
            conv1x1(d, b, ci, h * w, &wv, &bias.to_vec1::<f32>().unwrap(), co)
        })
        .unwrap();
        assert!(max_diff(&tensor(got, &[b, co, h, w]).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn linear_matches_candle_with_and_without_bias() {
        for &(m, k, n) in &[(1, 1, 1), (7, 33, 5), (300, 64, 130), (2, 768, 320)] {
            let x = randn(&[m, k], 10);
            let weight = randn(&[n, k], 11);
            let bias = randn(&[n], 12);
            let plain = x.matmul(&weight.t().unwrap()).unwrap();
            let with_bias = plain.broadcast_add(&bias).unwrap();
            let wv = with_f32(&weight, <[f32]>::to_vec).unwrap();
            let bv = bias.to_vec1::<f32>().unwrap();
            for (b, want) in [(&bv[..], &with_bias), (&[][..], &plain)] {
                let got = with_f32(&x, |d| linear(d, m, k, &wv, b, n)).unwrap();
                let got = tensor(got, &[m, n]).unwrap();
                assert!(max_diff(&got, want) < 1e-4, "{m}x{k} -> {n}");
            }
        }
    }

    #[test]
    fn attention_matches_naive_across_block_boundaries() {
        // n = 300 spans three blocks of 128 with a partial last block.
        let (bh, n, m, d) = (3, 300, 77, 8);
        let q = randn(&[bh, n, d], 7);
        let k = randn(&[bh, m, d], 8);
        let v = randn(&[bh, m, d], 9);
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        let got = with_f32(&q, |qd| {
            with_f32(&k, |kd| {
                with_f32(&v, |vd| attention(qd, kd, vd, bh, n, m, d, scale as f32))
            })
        })
        .unwrap()
        .unwrap()
        .unwrap();
        assert!(max_diff(&tensor(got, &[bh, n, d]).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn group_norm_with_silu_matches_candle() {
        let (b, c, hw, groups) = (2, 8, 15, 4);
        let x = (randn(&[b, c, hw], 10) * 3.0).unwrap();
        let gamma = randn(&[c], 11);
        let beta = randn(&[c], 12);
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-5).unwrap();
        let want = candle_nn::ops::silu(&candle_core::Module::forward(&gn, &x).unwrap()).unwrap();
        let got = with_f32(&x, |d| {
            group_norm(
                d,
                c,
                hw,
                groups,
                1e-5,
                &gamma.to_vec1::<f32>().unwrap(),
                &beta.to_vec1::<f32>().unwrap(),
                true,
            )
        })
        .unwrap();
        assert!(max_diff(&tensor(got, &[b, c, hw]).unwrap(), &want) < 1e-5);
    }
}
