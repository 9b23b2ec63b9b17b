//! Matrix products: the strided product the convolutions build on
//! (through the `gemm` crate), and `torch.nn.functional.linear` (on
//! [`super::gemm_f32`] where the CPU has AVX-512F, the `gemm` crate
//! elsewhere).
//!
//! The convolutions' products stay on the `gemm` crate: on this project's
//! Zen 4 machine `gemm_f32` ran the UNet's Winograd and 1×1 products at
//! the same speed and the VAE's (128 channels, many small products) 20 %
//! slower, measured in alternating runs.

use super::gemm_f32::{self, Init};
use super::pack_f32::{RowFormat, Source, Strided};
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
        let w = Source::F32(Strided {
            ptr: weight.as_ptr(),
            rs: 1,
            cs: k,
        });
        // SAFETY: the weight is n×k f32, read as k×n (row stride 1,
        // column stride k).
        return unsafe { linear_on_gemm_f32(x, m, k, w, bias, n) };
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

/// [`linear`] with its `(n, k)` weight as stored: an f16 or bf16 weight
/// runs on [`gemm_f32`] where that applies ([`linear_rows`]); otherwise the
/// weight is widened into a temporary f32 buffer
/// ([`super::with_f32_weight`]) and [`linear`] runs on it. The results are
/// the same either way.
///
/// Errors: `weight` is not a contiguous f32 / f16 / bf16 CPU tensor of
/// `n·k` values.
pub fn linear_stored(
    x: &[f32],
    m: usize,
    k: usize,
    weight: &candle_core::Tensor,
    bias: &[f32],
    n: usize,
) -> crate::Result<Vec<f32>> {
    use candle_core::DType;
    if weight.elem_count() != n * k {
        return Err(crate::Error::invalid(
            "linear",
            format!("a weight of shape {:?} for {k} → {n}", weight.dims()),
        ));
    }
    if super::applies_weight(weight) {
        // The 16-bit values as the bytes of their rows.
        fn bytes<T>(w: &[T]) -> &[u8] {
            // SAFETY: any initialised values are valid bytes.
            unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), std::mem::size_of_val(w)) }
        }
        let run = |w: &[u8], format| linear_rows(x, m, k, w, format, bias, n);
        let done = match weight.dtype() {
            DType::F16 => {
                super::buffer::with_data(weight, DType::F16, "f16", |w: &[half::f16]| {
                    run(bytes(w), RowFormat::F16)
                })??
            }
            DType::BF16 => {
                super::buffer::with_data(weight, DType::BF16, "bf16", |w: &[half::bf16]| {
                    run(bytes(w), RowFormat::Bf16)
                })??
            }
            _ => None,
        };
        if let Some(y) = done {
            return Ok(y);
        }
    }
    super::with_f32_weight(weight, |w| linear(x, m, k, w, bias, n))
}

/// [`linear`] with its `(n, k)` weight given as `n` rows of `format`
/// (`rows`: their bytes, as GGUF and safetensors store them), widened
/// exactly while [`gemm_f32`] packs its panels: the same result as
/// widening the whole weight first (`half`'s conversions, ggml's
/// dequantization) and running [`linear`], without that f32 copy. `None`
/// where `gemm_f32` does not run (no AVX-512F, `EASEL_F32_GEMM=portable`,
/// `n` under its minimum): the caller widens instead.
///
/// Errors: `k` does not fit the format ([`RowFormat::fits`]), or `rows` is
/// not `n` rows of `k` values.
pub fn linear_rows(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &[u8],
    format: RowFormat,
    bias: &[f32],
    n: usize,
) -> crate::Result<Option<Vec<f32>>> {
    if !format.fits(k) || rows.len() != n * format.row_bytes(k) {
        return Err(crate::Error::invalid(
            "linear",
            format!(
                "{} bytes of {format:?} rows for {k} → {n} (k must be a multiple of 32 for blocks)",
                rows.len()
            ),
        ));
    }
    if !gemm_f32::runs(n) {
        return Ok(None);
    }
    let w = Source::Rows {
        ptr: rows.as_ptr(),
        row_bytes: format.row_bytes(k),
        format,
    };
    // SAFETY: `rows` holds n rows of k values (checked above).
    Ok(Some(unsafe { linear_on_gemm_f32(x, m, k, w, bias, n) }))
}

/// [`linear`] on [`gemm_f32`], the weight `w` read as `k × n`. The bias is
/// added by the tasks, so the fresh output is first touched in parallel.
///
/// # Safety
/// `w` is valid for `k × n`; [`gemm_f32::runs`]`(n)`.
unsafe fn linear_on_gemm_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: Source,
    bias: &[f32],
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "linear: input length");
    let mut out = vec![0f32; m * n];
    let init = match bias {
        [] => Init::Zero,
        _ => {
            assert_eq!(bias.len(), n, "linear: bias length");
            Init::ColumnBias(bias.as_ptr())
        }
    };
    // SAFETY: `x` is m×k, `w` k×n (the caller's contract), `out` m×n,
    // the bias n values; no aliasing.
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
        num_threads() > 1,
    );
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

    /// A half-precision weight gives bit for bit what its f32 widening
    /// gives, whichever kernel runs ([`linear_stored`]).
    #[test]
    fn stored_weights_equal_their_widening() {
        for &(m, k, n) in &[(3, 5, 2), (77, 96, 130)] {
            let x = randn(&[m, k], 20);
            let bias = randn(&[n], 21).to_vec1::<f32>().unwrap();
            let xv = with_f32(&x, <[f32]>::to_vec).unwrap();
            for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
                let weight = randn(&[n, k], 22).to_dtype(dtype).unwrap();
                let wide = with_f32(
                    &weight.to_dtype(candle_core::DType::F32).unwrap(),
                    <[f32]>::to_vec,
                )
                .unwrap();
                let got = linear_stored(&xv, m, k, &weight, &bias, n).unwrap();
                let want = linear(&xv, m, k, &wide, &bias, n);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{m}x{k} -> {n} {dtype:?}"
                );
            }
        }
        let weight = randn(&[4, 3], 23);
        assert!(linear_stored(&[0.0; 6], 2, 3, &weight, &[], 5).is_err());
    }
}
