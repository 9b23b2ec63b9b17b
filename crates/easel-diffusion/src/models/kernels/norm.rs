//! Normalisation: group norm, optionally fused with SiLU.

use half::bf16;
use rayon::prelude::*;

/// A value group norm reads: f32, or bf16 widened exactly.
pub trait NormInput: Copy + Send + Sync {
    /// The value as f32.
    fn f32(self) -> f32;
}

impl NormInput for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl NormInput for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        super::bf16::widen(self)
    }
}

/// [`group_norm`] of a bf16 `x`, bf16 out: the same per-plane affine map
/// (statistics in f64 of the exact values), each value computed in f32
/// (SiLU's `e^-y` by [`super::exp_f32`], vectorised) and rounded once. The
/// numbers of PyTorch's CPU bf16 group norm, which accumulates in f32 and
/// rounds its output, followed by SiLU (rounded once more there).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_bf16(
    x: &[bf16],
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) -> Vec<bf16> {
    let affine = group_norm_affine(x, channels, spatial, groups, eps, gamma, beta);
    let mut out = vec![bf16::ZERO; x.len()];
    if spatial == 0 {
        return out;
    }
    out.par_chunks_mut(spatial)
        .zip(x.par_chunks(spatial))
        .zip(affine.par_iter())
        .for_each_init(
            || vec![0f32; spatial],
            |row, ((d, s), &(scale, shift))| {
                affine_row(s, scale, shift, silu, row);
                super::bf16::round_into(row, d);
            },
        );
    out
}

/// `row[i] = act(s[i] · scale + shift)` (SiLU or none), compiled for
/// AVX-512 where the CPU has it.
fn affine_row(s: &[bf16], scale: f32, shift: f32, silu: bool, row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { affine_row_avx512(s, scale, shift, silu, row) };
        return;
    }
    affine_row_lanes(s, scale, shift, silu, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn affine_row_avx512(s: &[bf16], scale: f32, shift: f32, silu: bool, row: &mut [f32]) {
    affine_row_lanes(s, scale, shift, silu, row)
}

#[inline(always)]
fn affine_row_lanes(s: &[bf16], scale: f32, shift: f32, silu: bool, row: &mut [f32]) {
    if silu {
        for (o, &v) in row.iter_mut().zip(s) {
            let y = v.f32() * scale + shift;
            *o = y / (1.0 + super::exp_f32(-y));
        }
    } else {
        for (o, &v) in row.iter_mut().zip(s) {
            *o = v.f32() * scale + shift;
        }
    }
}

/// Group normalisation (Wu & He 2018, arXiv:1803.08494) over `x` laid out
/// as `(batch, channels, spatial)`, with per-channel `gamma`/`beta`, optionally
/// followed by SiLU in the same pass: each value `v` of plane `(b, c)`
/// becomes `v · scale + shift` with the plane's [`group_norm_affine`], then
/// `y / (1 + e^-y)` with `silu`.
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
    let affine = group_norm_affine(x, channels, spatial, groups, eps, gamma, beta);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(spatial)
        .zip(x.par_chunks(spatial))
        .zip(affine.par_iter())
        .for_each(|((d, s), &(scale, shift))| {
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
        });
    out
}

/// The per-plane affine map a group norm applies: for each `(batch,
/// channel)` plane of `x` (`(batch, channels, spatial)`), in that order,
/// `(scale, shift)` = `(γ_c / σ_g, β_c − μ_g γ_c / σ_g)` with the mean `μ_g`
/// and `σ_g = √(var_g + eps)` of the plane's group (biased variance).
/// Mean and variance are accumulated in f64 (two passes), as precise as
/// PyTorch's Welford; scale and shift are rounded to f32 once.
///
/// What [`group_norm`] applies, and what the 3×3 convolutions apply while
/// they read their input (`super::ConvInput::with_affine`), so the two give
/// the same values bit for bit.
pub fn group_norm_affine<T: NormInput>(
    x: &[T],
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
) -> Vec<(f32, f32)> {
    let cpg = channels / groups;
    let group_len = cpg * spatial;
    let mut affine = vec![(0f32, 0f32); x.len() / spatial];
    affine
        .par_chunks_mut(cpg)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(bg, (dst, src))| {
            let g = bg % groups;
            let n = src.len() as f64;
            let mean = lane_sum(src, |v| v) / n;
            let var = lane_sum(src, |v| {
                let d = v - mean;
                d * d
            }) / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (c, slot) in dst.iter_mut().enumerate() {
                let ch = g * cpg + c;
                let scale = (gamma[ch] as f64 * inv) as f32;
                let shift = (beta[ch] as f64 - mean * gamma[ch] as f64 * inv) as f32;
                *slot = (scale, shift);
            }
        });
    affine
}

/// `Σ f(x[i] as f64)` over eight interleaved f64 partial sums (added at
/// the end), so the loop vectorises; the order differs from a sequential
/// sum by f64 rounding only (relative 1e-16, far below the f32 results).
#[inline]
fn lane_sum<T: NormInput>(x: &[T], f: impl Fn(f64) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v.f32() as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v.f32() as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, randn};
    use super::super::{tensor, with_f32};
    use super::*;

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
