//! Element-wise kernels for activations on the CPU, each one parallel
//! pass: GEGLU's gated GELU (bf16 and f32), residual sums (bf16 and f32;
//! in bf16 also with a per-plane term: a time embedding), nearest ×2
//! upsampling. candle's CPU ops run these on one thread, GEGLU in three
//! passes; the values are the same (f32 bit for bit; each bf16 result the
//! f32 result rounded once, to nearest even).

use half::bf16;
use rayon::prelude::*;

use super::attention::exp_f32;
use super::bf16::widen as wide;

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

/// Elements per rayon task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// `a + b` element-wise, bf16 in and out: each sum taken in f32 and rounded
/// once (PyTorch's and candle's bf16 `add`).
pub fn add_bf16(a: &[bf16], b: &[bf16]) -> Vec<bf16> {
    assert_eq!(a.len(), b.len(), "add_bf16: lengths");
    let mut out = vec![bf16::ZERO; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each_init(
            || vec![0f32; CHUNK],
            |sum, (d, (a, b))| {
                let sum = &mut sum[..d.len()];
                for ((s, &a), &b) in sum.iter_mut().zip(a).zip(b) {
                    *s = wide(a) + wide(b);
                }
                super::bf16::round_into(sum, d);
            },
        );
    out
}

/// `x + t` with `t` one value per `(batch, channel)` plane: `x`
/// `(planes, spatial)` bf16, `t` `planes` bf16 values (`broadcast_add` of
/// a `(batch, channels, 1, 1)` tensor), each sum in f32 rounded once.
pub fn add_per_plane_bf16(x: &[bf16], spatial: usize, t: &[bf16]) -> Vec<bf16> {
    assert_eq!(x.len(), spatial * t.len(), "add_per_plane_bf16: lengths");
    let mut out = vec![bf16::ZERO; x.len()];
    if spatial == 0 {
        return out;
    }
    out.par_chunks_mut(spatial)
        .zip(x.par_chunks(spatial))
        .zip(t.par_iter())
        .for_each_init(
            || vec![0f32; spatial],
            |sum, ((d, x), &t)| {
                let t = wide(t);
                for (s, &x) in sum.iter_mut().zip(x) {
                    *s = wide(x) + t;
                }
                super::bf16::round_into(sum, d);
            },
        );
    out
}

/// Nearest-neighbour ×2 upsampling of `(planes, h, w)` → `(planes, 2h, 2w)`
/// (`upsample_nearest2d` to twice the size): every value copied to a 2×2
/// block, planes in parallel. Any element type (a copy, no arithmetic).
pub fn upsample2x<T: Copy + Send + Sync>(x: &[T], h: usize, w: usize) -> Vec<T> {
    let plane = h * w;
    if plane == 0 {
        return Vec::new();
    }
    assert_eq!(x.len() % plane, 0, "upsample2x: length");
    let mut out = Vec::with_capacity(4 * x.len());
    // SAFETY: every element is written below before it is read (each output
    // row is the source row doubled, written twice), and T is Copy.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(4 * x.len())
    };
    out.par_chunks_mut(4 * plane)
        .zip(x.par_chunks(plane))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(w).enumerate() {
                let (first, second) = dst[2 * y * 2 * w..(2 * y + 2) * 2 * w].split_at_mut(2 * w);
                for (pair, &v) in first.chunks_exact_mut(2).zip(row) {
                    pair[0] = v;
                    pair[1] = v;
                }
                second.copy_from_slice(first);
            }
        });
    out
}

/// [`geglu_bf16`] in f32: `h · gelu(g)` with candle's exact GELU,
/// `(erff(g/√2) + 1) · ½ · g` (libm's `erff`), in the same order, so the
/// values equal candle's `h * g.gelu_erf()` bit for bit; rows in parallel.
pub fn geglu_f32(x: &[f32], rows: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * 2 * n, "geglu_f32: input length");
    let mut out = vec![0f32; rows * n];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * n)
        .zip(x.par_chunks(ROWS_PER_TASK * 2 * n))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_exact_mut(n).zip(src.chunks_exact(2 * n)) {
                let (h, g) = s.split_at(n);
                for ((o, &h), &g) in d.iter_mut().zip(h).zip(g) {
                    let gelu = (libm::erff(g * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * g;
                    *o = h * gelu;
                }
            }
        });
    out
}

/// `a + b` element-wise in f32, in parallel chunks.
pub fn add_f32(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "add_f32: lengths");
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(d, (a, b))| {
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                *d = a + b;
            }
        });
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
    fn sums_and_upsampling_equal_candle() {
        use candle_core::{DType, Device, Tensor};
        let n = 3 * CHUNK + 77;
        let values = |seed: usize| -> Vec<bf16> {
            (0..n)
                .map(|i| {
                    bf16::from_f32((((i * 7919 + seed * 104729) % 4001) as f32 - 2000.0) / 37.0)
                })
                .collect()
        };
        let (a, b) = (values(1), values(2));
        let ta = Tensor::from_vec(a.clone(), n, &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), n, &Device::Cpu).unwrap();
        let want = (&ta + &tb).unwrap().to_vec1::<bf16>().unwrap();
        assert_eq!(add_bf16(&a, &b), want);

        let (planes, spatial) = (6, 50);
        let x = &a[..planes * spatial];
        let t = &b[..planes];
        let tx = Tensor::from_vec(x.to_vec(), (2, 3, 5, 10), &Device::Cpu).unwrap();
        let tt = Tensor::from_vec(t.to_vec(), (2, 3, 1, 1), &Device::Cpu).unwrap();
        let want = tx
            .broadcast_add(&tt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap();
        assert_eq!(add_per_plane_bf16(x, spatial, t), want);

        let up = tx.upsample_nearest2d(10, 20).unwrap();
        assert_eq!(up.dtype(), DType::BF16);
        assert_eq!(
            upsample2x(x, 5, 10),
            up.flatten_all().unwrap().to_vec1::<bf16>().unwrap()
        );
    }

    #[test]
    fn f32_geglu_and_sum_equal_candle_bit_for_bit() {
        use candle_core::{Device, Tensor, D};
        let (rows, n) = (21, 70);
        let x: Vec<f32> = (0..rows * 2 * n)
            .map(|i| ((i * 7919) % 2001) as f32 / 250.0 - 4.0)
            .collect();
        let t = Tensor::from_vec(x.clone(), (rows, 2 * n), &Device::Cpu).unwrap();
        let h = t.narrow(D::Minus1, 0, n).unwrap();
        let g = t.narrow(D::Minus1, n, n).unwrap();
        let want = (h * g.gelu_erf().unwrap()).unwrap().flatten_all().unwrap();
        let got = geglu_f32(&x, rows, n);
        assert_eq!(got, want.to_vec1::<f32>().unwrap());
        let y: Vec<f32> = x.iter().map(|v| v * 0.37 - 1.0).collect();
        let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        assert_eq!(add_f32(&x, &y), sum);
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
