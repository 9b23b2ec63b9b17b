//! Matrix products through the `gemm` crate: the strided product the other
//! kernels build on, and `torch.nn.functional.linear`.

use super::parallelism;

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
