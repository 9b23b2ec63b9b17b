//! Matrix products: the strided product the convolutions build on
//! (through the `gemm` crate), and `torch.nn.functional.linear` (on
//! [`super::gemm_f32`] where the CPU has AVX-512F, the `gemm` crate
//! elsewhere).
//!
//! The convolutions' products stay on the `gemm` crate: on this project's
//! Zen 4 machine `gemm_f32` ran the UNet's Winograd and 1×1 products at
//! the same speed and the VAE's (128 channels, many small products) 20 %
//! slower, measured in alternating runs.

use super::gemm_f32::{self, Init, Strided};
use super::{num_threads, parallelism};

/// `dst (m×n, row stride dst_rs) = [dst +] a (m×k, row stride lda) · b (k×n, row stride ldb)`.
///
/// # Safety
/// The pointers must be valid for the given shapes and strides, and `dst`
/// must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) unsafe fn matmul(
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

/// `dst (m×n, row stride dst_rs) = bias[i] + a (m×k) · b (k×n)`: a
/// product plus one bias per row (a 1×1 convolution's per-channel bias),
/// the rows filled first and accumulated onto.
///
/// # Safety
/// As [`matmul`]; `bias` holds `m` values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_row_bias(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    bias: &[f32],
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    par: gemm::Parallelism,
) {
    assert_eq!(bias.len(), m, "matmul_row_bias: bias length");
    for (i, &v) in bias.iter().enumerate() {
        std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(v);
    }
    matmul(m, n, k, dst, dst_rs, true, a, lda, b, ldb, par);
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
    if gemm_f32::runs(n) {
        // The bias is added by the tasks, so the fresh output is first
        // touched in parallel.
        let mut out = vec![0f32; m * n];
        let w = Strided {
            ptr: weight.as_ptr(),
            rs: 1,
            cs: k,
        };
        let init = match bias {
            [] => Init::Zero,
            _ => {
                assert_eq!(bias.len(), n, "linear: bias length");
                Init::ColumnBias(bias.as_ptr())
            }
        };
        let parallel = num_threads() > 1;
        // SAFETY: `x` is m×k, the weight read as k×n (row stride 1,
        // column stride k), `out` m×n, the bias n values; no aliasing.
        unsafe {
            gemm_f32::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                n,
                init,
                x.as_ptr(),
                k,
                w,
                parallel,
            )
        };
        return out;
    }
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

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, randn};
    use super::super::{tensor, with_f32};
    use super::*;

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
}
