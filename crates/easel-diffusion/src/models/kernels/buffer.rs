//! f32 views of tensors for the kernels, and tensors from their outputs.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `t` itself when contiguous, else a contiguous copy: for an f32 or bf16
/// CPU tensor whose last axis has stride 1 (a transposed head split, a
/// permuted channel axis: what the kernels are handed) the rows are copied
/// in parallel; anything else goes through candle's (single-threaded)
/// `contiguous`. The same values either way.
///
/// Errors: as `Tensor::contiguous`.
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    let layout = t.layout();
    let (dims, strides) = (layout.dims(), layout.stride());
    let row = dims.last().copied().unwrap_or(1);
    if !t.device().is_cpu() || dims.len() < 2 || strides.last() != Some(&1) || row == 0 {
        return Ok(t.contiguous()?);
    }
    fn gather<T: Copy + Send + Sync + candle_core::WithDType>(
        src: &[T],
        start: usize,
        dims: &[usize],
        strides: &[usize],
    ) -> Result<Tensor> {
        let row = *dims.last().expect("rank ≥ 2");
        let outer = &dims[..dims.len() - 1];
        let mut out = vec![src[start]; dims.iter().product()];
        out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
            // Offset of row r: its index over the outer axes, by their strides.
            let (mut rest, mut offset) = (r, start);
            for (&d, &s) in outer.iter().zip(strides).rev() {
                offset += (rest % d) * s;
                rest /= d;
            }
            dst.copy_from_slice(&src[offset..offset + row]);
        });
        tensor(out, dims)
    }
    let (storage, _) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(t.contiguous()?);
    };
    let start = layout.start_offset();
    match t.dtype() {
        DType::F32 => gather(cpu.as_slice::<f32>()?, start, dims, strides),
        DType::BF16 => gather(cpu.as_slice::<half::bf16>()?, start, dims, strides),
        _ => Ok(t.contiguous()?),
    }
}

/// Run `f` on the contiguous f32 data of `t` (copied to contiguous first if needed).
///
/// Errors: `t` is not an f32 CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_data(&contiguous(t)?, DType::F32, "expected an f32 CPU tensor", f)
}

/// Run `f` on the contiguous bf16 data of `t` (copied to contiguous first
/// if needed), for the bf16 kernels.
///
/// Errors: `t` is not a bf16 CPU tensor.
pub fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[half::bf16]) -> R) -> Result<R> {
    with_data(
        &contiguous(t)?,
        DType::BF16,
        "expected a bf16 CPU tensor",
        f,
    )
}

/// Run `f` on the data of a contiguous CPU tensor of `dtype` (element
/// type `T`); `wrong` is the error's text for any other tensor.
pub(super) fn with_data<T: candle_core::WithDType, R>(
    t: &Tensor,
    dtype: DType,
    wrong: &str,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    if t.dtype() != dtype || !t.device().is_cpu() {
        return Err(Error::invalid("kernel", wrong));
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::invalid("kernel", "expected a CPU tensor"));
    };
    let data = cpu.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::invalid("kernel", "tensor is not contiguous"))?;
    Ok(f(&data[start..end]))
}

/// Whether the bf16 kernels ([`super::linear_bf16`], [`super::conv_bf16`],
/// [`super::attention_bf16`]) apply to `t`: a bf16 CPU tensor, the kernels
/// enabled ([`enabled`], [`bf16_enabled`]) and the CPU with AVX512-BF16
/// ([`super::bf16_gemm_available`]).
pub fn applies_bf16(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu() && bf16_compute_available()
}

/// Whether this process computes bf16 layers on the CPU's bf16
/// instructions: the kernels enabled ([`enabled`], [`bf16_enabled`]) and
/// the CPU with AVX512-BF16 ([`super::bf16_gemm_available`]). The engine
/// runs `precision: bf16` jobs in bf16 on the CPU only then.
pub fn bf16_compute_available() -> bool {
    enabled() && bf16_enabled() && super::bf16_gemm_available()
}

/// Whether bf16 layers may use the bf16 kernels: yes, unless the
/// environment sets `EASEL_BF16_KERNELS=off` (read once per process), which
/// sends them down the widening f32 path (to compare the two). Any other
/// value than `off` or `on` is ignored with a warning.
pub fn bf16_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var("EASEL_BF16_KERNELS").as_deref() {
        Ok("off") => {
            tracing::info!("EASEL_BF16_KERNELS=off: bf16 layers widen to f32");
            false
        }
        Ok("on") | Ok("") | Err(_) => true,
        Ok(other) => {
            tracing::warn!("EASEL_BF16_KERNELS={other} ignored (allowed: on, off)");
            true
        }
    })
}

/// Whether the fast CPU kernels apply to `t` (an f32 tensor on the CPU),
/// unless they are switched off ([`enabled`]).
pub fn applies(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && enabled()
}

/// Whether `t` is a weight the fast kernels can read: a contiguous CPU
/// tensor stored as f32, f16 or bf16 (see [`with_f32_weight`]), unless the
/// kernels are switched off ([`enabled`]).
pub fn applies_weight(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && t.device().is_cpu()
        && t.is_contiguous()
        && enabled()
}

/// Whether the engine's own CPU kernels are used at all: yes, unless the
/// environment sets `EASEL_KERNELS=off` (read once per process), which
/// sends every layer through candle's generic ops, the path a GPU or a
/// half-precision run takes, so the parity suite can check that path on
/// the CPU. Any other value than `off` or `on` is ignored with a warning.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var("EASEL_KERNELS").as_deref() {
        Ok("off") => {
            tracing::info!("EASEL_KERNELS=off: every layer runs on candle's generic ops");
            false
        }
        Ok("on") | Ok("") | Err(_) => true,
        Ok(other) => {
            tracing::warn!("EASEL_KERNELS={other} ignored (allowed: on, off)");
            true
        }
    })
}

/// Elements converted per rayon task ([`with_f32_weight`], [`to_f32`],
/// [`to_half`]).
const CONVERT_CHUNK: usize = 1 << 16;

/// The data of a contiguous f16 or bf16 CPU tensor widened to f32
/// (exactly: every f16 and bf16 value is an f32 value), in parallel
/// chunks: f16 with F16C where the CPU has it (`half`'s slice
/// conversion), bf16 by its 16-bit shift ([`super::bf16::widen`]).
///
/// Errors: `t` is not a contiguous f16 or bf16 CPU tensor.
fn widened(t: &Tensor) -> Result<Vec<f32>> {
    use half::slice::HalfFloatSliceExt;
    fn par<T: Sync>(src: &[T], convert: impl Fn(&[T], &mut [f32]) + Sync) -> Vec<f32> {
        let mut wide = vec![0f32; src.len()];
        wide.par_chunks_mut(CONVERT_CHUNK)
            .zip(src.par_chunks(CONVERT_CHUNK))
            .for_each(|(d, s)| convert(s, d));
        wide
    }
    match t.dtype() {
        DType::F16 => with_data(t, DType::F16, "expected an f16 CPU tensor", |s| {
            par(s, |s: &[half::f16], d| s.convert_to_f32_slice(d))
        }),
        _ => with_data(t, DType::BF16, "expected an f16 or bf16 CPU tensor", |s| {
            par(s, |s: &[half::bf16], d| {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = super::bf16::widen(s);
                }
            })
        }),
    }
}

/// Run `f` on the data of weight `t` as f32: in place for an f32 tensor,
/// else widened from f16 / bf16 into a temporary buffer ([`widened`]).
/// Weights stay in memory in their stored precision, half the bytes of
/// f32, and only one layer's weight is widened at a time.
///
/// Errors: `t` is not a contiguous f32 / f16 / bf16 CPU tensor.
pub fn with_f32_weight<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 {
        return with_f32(t, f);
    }
    if !applies_weight(t) {
        return Err(Error::invalid(
            "kernel",
            "expected a contiguous f32, f16 or bf16 CPU weight",
        ));
    }
    Ok(f(&widened(t)?))
}

/// `t` (an f16 or bf16 CPU tensor) widened to f32, exactly, in parallel
/// ([`widened`]): candle's `to_dtype` on the CPU converts on one thread,
/// which for the activations of a half-precision UNet (millions of values
/// per layer) costs as much as a small matrix product. Other tensors go
/// through `to_dtype` unchanged.
///
/// Errors: as `Tensor::to_dtype`.
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    if !t.device().is_cpu() || !matches!(t.dtype(), DType::F16 | DType::BF16) {
        return Ok(t.to_dtype(DType::F32)?);
    }
    let t = contiguous(t)?;
    tensor(widened(&t)?, t.dims())
}

/// `t` (an f32 CPU tensor) rounded to `dtype` (f16 or bf16, to nearest
/// even) in parallel chunks, bf16 with AVX512-BF16's conversion where the
/// CPU has it ([`super::bf16::round_into`]); the counterpart of [`to_f32`].
/// Other combinations go through `to_dtype`.
///
/// Errors: as `Tensor::to_dtype`.
pub fn to_half(t: &Tensor, dtype: DType) -> Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !matches!(dtype, DType::F16 | DType::BF16)
    {
        return Ok(t.to_dtype(dtype)?);
    }
    let dims = t.dims().to_vec();
    if dtype == DType::F16 {
        let mut out = vec![half::f16::ZERO; t.elem_count()];
        with_f32(t, |s| {
            out.par_chunks_mut(CONVERT_CHUNK)
                .zip(s.par_chunks(CONVERT_CHUNK))
                .for_each(|(d, s)| d.convert_from_f32_slice(s))
        })?;
        return tensor(out, &dims);
    }
    let mut out = vec![half::bf16::ZERO; t.elem_count()];
    with_f32(t, |s| {
        out.par_chunks_mut(CONVERT_CHUNK)
            .zip(s.par_chunks(CONVERT_CHUNK))
            .for_each(|(d, s)| super::bf16::round_into(s, d))
    })?;
    tensor(out, &dims)
}

/// Wrap a buffer as a CPU tensor of `shape` (f32, or bf16 from the bf16
/// kernels).
pub fn tensor<T: candle_core::WithDType>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::super::testing::randn;
    use super::*;

    /// Half-precision weights widen exactly (also across widening chunks).
    #[test]
    fn half_weights_widen_exactly() {
        let w = randn(&[3, CONVERT_CHUNK + 17], 5);
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

    /// The bits of `t`'s values, widened to f32, in row-major order.
    fn bits(t: &Tensor) -> Vec<u32> {
        let values = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        values
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// The parallel copy gives candle's `contiguous` values for permuted,
    /// transposed and narrowed tensors.
    #[test]
    fn parallel_contiguous_equals_candles() {
        for dtype in [DType::F32, DType::BF16] {
            let x = randn(&[2, 5, 7, 6], 3).to_dtype(dtype).unwrap();
            let views = [
                x.transpose(1, 2).unwrap(),
                x.permute((0, 2, 1, 3)).unwrap(),
                x.narrow(3, 1, 4).unwrap(),
                x.narrow(1, 2, 3).unwrap().transpose(0, 1).unwrap(),
            ];
            for v in &views {
                assert!(!v.is_contiguous());
                let got = contiguous(v).unwrap();
                assert!(got.is_contiguous());
                let want = v.contiguous().unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(bits(&got), bits(&want), "{dtype:?} {:?}", v.layout());
            }
        }
    }

    /// The parallel conversions give candle's `to_dtype` values, bit for
    /// bit, across chunk boundaries and on strided inputs.
    #[test]
    fn parallel_conversions_equal_to_dtype() {
        let x = (randn(&[3, CONVERT_CHUNK + 29], 6) * 1e3).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let half = to_half(&x, dtype).unwrap();
            assert_eq!(half.dtype(), dtype);
            assert_eq!(bits(&half), bits(&x.to_dtype(dtype).unwrap()), "{dtype:?}");
            let strided = half.t().unwrap();
            let wide = to_f32(&strided).unwrap();
            assert_eq!(wide.dims(), strided.dims());
            assert_eq!(bits(&wide), bits(&strided.to_dtype(DType::F32).unwrap()));
        }
    }
}
