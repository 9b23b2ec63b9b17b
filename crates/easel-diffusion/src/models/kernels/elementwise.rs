//! Element-wise kernels for half-precision activations: GEGLU's gated
//! GELU in one parallel pass (candle's CPU ops take three, each on one
//! thread, each widening and rounding every bf16 value).

use half::bf16;
use rayon::prelude::*;

use super::attention::exp_f32;

/// Rows per rayon task in [`geglu_bf16`].
const ROWS_PER_TASK: usize = 16;

/// GEGLU's activation (Shazeer 2020, arXiv:2002.05202; diffusers'
/// `GEGLU`): for `x` `(rows, 2n)` bf16 split as `(h, g)` on its last axis,
/// `h · gelu(g)` `(rows, n)` bf16, with the exact (erf) GELU
/// `g · ½ (1 + erf(g / √2))`, computed in f32 and rounded once to bf16.
///
/// PyTorch's CPU GELU on bf16 widens to f32 and uses the same erf
/// approximation ([`erf_f32`]); it then rounds `gelu(g)` and the product
/// separately, so the two differ by at most one bf16 rounding.
pub fn geglu_bf16(x: &[bf16], rows: usize, n: usize) -> Vec<bf16> {
    assert_eq!(x.len(), rows * 2 * n, "geglu_bf16: input length");
    let mut out = vec![bf16::ZERO; rows * n];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * n)
        .zip(x.par_chunks(ROWS_PER_TASK * 2 * n))
        .for_each_init(
            || vec![0f32; n],
            |row, (dst, src)| {
                for (d, s) in dst.chunks_exact_mut(n).zip(src.chunks_exact(2 * n)) {
                    let (h, g) = s.split_at(n);
                    gated_gelu(h, g, row);
                    super::bf16::round_into(row, d);
                }
            },
        );
    out
}

/// `out[i] = h[i] · gelu(g[i])` in f32, compiled for AVX-512 where the
/// CPU has it (the loop vectorises 16 lanes wide).
fn gated_gelu(h: &[bf16], g: &[bf16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { gated_gelu_avx512(h, g, out) };
        return;
    }
    gated_gelu_lanes(h, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gated_gelu_avx512(h: &[bf16], g: &[bf16], out: &mut [f32]) {
    gated_gelu_lanes(h, g, out)
}

#[inline(always)]
fn gated_gelu_lanes(h: &[bf16], g: &[bf16], out: &mut [f32]) {
    let wide = |v: bf16| f32::from_bits((v.to_bits() as u32) << 16);
    for ((o, &h), &g) in out.iter_mut().zip(h).zip(g) {
        let g = wide(g);
        *o = wide(h) * (0.5 * g * (1.0 + erf_f32(g * std::f32::consts::FRAC_1_SQRT_2)));
    }
}

/// `erf(x)` for f32 by Abramowitz & Stegun 7.1.26 (absolute error below
/// 1.5e-7 for the formula, 6e-7 as evaluated in f32): `1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵) e^{−x²}`,
/// `t = 1 / (1 + p|x|)`, with the sign of `x`. The approximation ATen's
/// vectorised `erf` (and so PyTorch's CPU GELU) uses. Branch-free.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_its_bound_of_libm() {
        let mut worst = 0f64;
        let mut x = -6.0f64;
        while x <= 6.0 {
            let got = erf_f32(x as f32) as f64;
            // libm's erf of the same f32 argument.
            let want = libm::erf(x as f32 as f64);
            worst = worst.max((got - want).abs());
            x += 0.001;
        }
        // The formula's 1.5e-7 plus f32 evaluation (exp_f32's 3e-7
        // relative, the final 1 − ·): measured 5.4e-7. bf16 keeps 4e-3.
        assert!(worst < 1e-6, "absolute error {worst:.2e}");
        assert_eq!(erf_f32(10.0), 1.0);
        assert_eq!(erf_f32(-10.0), -1.0);
    }

    #[test]
    fn geglu_matches_the_separate_operations() {
        let (rows, n) = (37, 45);
        let x: Vec<bf16> = (0..rows * 2 * n)
            .map(|i| bf16::from_f32(((i * 7919) % 2001) as f32 / 250.0 - 4.0))
            .collect();
        let got = geglu_bf16(&x, rows, n);
        for r in 0..rows {
            for j in 0..n {
                let h = x[r * 2 * n + j].to_f64();
                let g = x[r * 2 * n + n + j].to_f64();
                let want = h * 0.5 * g * (1.0 + libm::erf(g / std::f64::consts::SQRT_2));
                let got = got[r * n + j].to_f64();
                // One rounding to bf16 (2⁻⁸ relative) plus the erf error.
                let tol = want.abs() * 2f64.powi(-8) + h.abs() * g.abs() * 1e-6 + 1e-12;
                assert!((got - want).abs() <= tol, "[{r},{j}] {got} vs {want}");
            }
        }
    }
}
