//! The engine's own CPU kernels for the operations that dominate diffusion
//! models: 3×3 convolution as nine shifted matrix products, group norm fused
//! with SiLU, and attention computed block by block without materialising the
//! full score matrix. Matrix products go through the `gemm` crate (runtime
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

/// Re-order a `(co, ci, 3, 3)` convolution weight into nine `(co, ci)`
/// matrices, one per kernel tap `ky * 3 + kx`.
pub fn pack_conv3x3_weight(weight: &[f32], co: usize, ci: usize) -> Vec<f32> {
    let mut taps = vec![0f32; 9 * co * ci];
    for o in 0..co {
        for i in 0..ci {
            for t in 0..9 {
                taps[(t * co + o) * ci + i] = weight[(o * ci + i) * 9 + t];
            }
        }
    }
    taps
}

/// 3×3 convolution, stride 1, zero padding 1 ("same"), plus bias.
///
/// - `x`: `(batch, ci, h, w)`; `taps`: from [`pack_conv3x3_weight`];
///   `bias`: `co` values → `(batch, co, h, w)`.
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
    taps: &[f32],
    bias: &[f32],
    co: usize,
) -> Vec<f32> {
    let wp = w + 2;
    let plane = (h + 2) * wp + 2; // +2: the last tap reads two past the padded plane
    let n = h * wp;
    let mut out = vec![0f32; batch * co * h * w];
    let mut padded = vec![0f32; ci * plane];
    let mut out_pad = vec![0f32; co * n];
    for b in 0..batch {
        let xb = &x[b * ci * h * w..(b + 1) * ci * h * w];
        padded
            .par_chunks_mut(plane)
            .zip(xb.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for y in 0..h {
                    dst[(y + 1) * wp + 1..(y + 1) * wp + 1 + w]
                        .copy_from_slice(&src[y * w..(y + 1) * w]);
                }
            });
        for t in 0..9 {
            let (ky, kx) = (t / 3, t % 3);
            // SAFETY: taps[t] is (co × ci); the shifted view of `padded` reads
            // rows of n elements starting at ky*wp+kx, within `plane`; out_pad is co × n.
            unsafe {
                matmul(
                    co,
                    n,
                    ci,
                    out_pad.as_mut_ptr(),
                    n,
                    t > 0,
                    taps.as_ptr().add(t * co * ci),
                    ci,
                    padded.as_ptr().add(ky * wp + kx),
                    plane,
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

/// `row = exp(row - max) / Σ exp(row - max)`.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in row.iter_mut() {
        *s *= inv;
    }
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

    #[test]
    fn conv3x3_matches_candle_on_odd_and_tiny_sizes() {
        for &(b, ci, co, h, w) in &[
            (2, 3, 5, 7, 9),
            (1, 4, 2, 1, 1),
            (1, 8, 16, 1, 13),
            (2, 16, 8, 12, 1),
        ] {
            let x = randn(&[b, ci, h, w], 1);
            let weight = randn(&[co, ci, 3, 3], 2);
            let bias = randn(&[co], 3);
            let want = x
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let taps = with_f32(&weight, |d| pack_conv3x3_weight(d, co, ci)).unwrap();
            let bias_v = bias.to_vec1::<f32>().unwrap();
            let got = with_f32(&x, |d| conv3x3_same(d, b, ci, h, w, &taps, &bias_v, co)).unwrap();
            let got = tensor(got, &[b, co, h, w]).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "{b}x{ci}x{h}x{w} -> {co}");
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
