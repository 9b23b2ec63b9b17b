//! Weights as they are held in memory: dense candle tensors (f32 / f16 /
//! bf16), GGML block-quantized tensors (GGUF files, `--quantize q8_0 |
//! q4_0`) and 8-bit floats (fp8 safetensors, `--quantize fp8`).
//!
//! Matrix and convolution weights stay in their stored form for the life
//! of a model; the CPU kernels widen one layer's weight to f32 just before
//! its product ([`StoredTensor::with_f32`]) and drop it after, so a
//! quantized FLUX.1 transformer takes its quantized size in memory (Q8_0:
//! 8.5 bits per weight, Q4_0: 4.5, fp8: 8). Widening is exact in every
//! format: it follows ggml's dequantization (`dequantize_row_*` in
//! `ggml-quants.c`, through candle's `k_quants`) and, for fp8, the
//! `float8_e4m3fn` / `float8_e5m2` formats of Micikevicius et al. 2022
//! ("FP8 Formats for Deep Learning") that PyTorch's `.to(torch.float32)`
//! widens exactly; a scaled-fp8 weight (ComfyUI's `scale_weight`) is
//! multiplied by its per-tensor scale in f32 after widening, as ComfyUI
//! does.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::models::kernels::RowFormat;

/// The 8-bit float formats of fp8 checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// `float8_e4m3fn`: 4 exponent bits (bias 7), 3 mantissa bits, no
    /// infinities, `S.1111.111` is NaN; largest finite value 448.
    E4M3Fn,
    /// `float8_e5m2`: the upper byte of an IEEE f16 (5 exponent bits, bias
    /// 15, 2 mantissa bits); largest finite value 57344.
    E5M2,
}

impl Fp8Format {
    /// The safetensors dtype name (`F8_E4M3`, `F8_E5M2`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Self::E4M3Fn => "F8_E4M3",
            Self::E5M2 => "F8_E5M2",
        }
    }

    /// The value of each of the 256 bytes, as f32 (exact).
    fn table(self) -> &'static [f32; 256] {
        static E4M3: LazyLock<[f32; 256]> =
            LazyLock::new(|| std::array::from_fn(|b| float8::F8E4M3::from_bits(b as u8).to_f32()));
        static E5M2: LazyLock<[f32; 256]> = LazyLock::new(|| {
            std::array::from_fn(|b| half::f16::from_bits((b as u16) << 8).to_f32())
        });
        match self {
            Self::E4M3Fn => &E4M3,
            Self::E5M2 => &E5M2,
        }
    }

    /// The largest finite value of the format.
    fn max_finite(self) -> f32 {
        match self {
            Self::E4M3Fn => 448.0,
            Self::E5M2 => 57344.0,
        }
    }

    /// `x` rounded to the nearest value of the format (ties to even), as
    /// PyTorch's `.to(torch.float8_e4m3fn / float8_e5m2)`.
    fn round(self, x: f32) -> u8 {
        match self {
            Self::E4M3Fn => float8::F8E4M3::from_f32(x).to_bits(),
            Self::E5M2 => float8::F8E5M2::from_f32(x).to_bits(),
        }
    }
}

/// An fp8 tensor: one byte per element, row-major, with an optional
/// per-tensor scale (scaled-fp8 checkpoints: value = fp8 × scale).
#[derive(Debug)]
pub struct Fp8Tensor {
    bytes: Vec<u8>,
    shape: Vec<usize>,
    format: Fp8Format,
    scale: Option<f32>,
}

impl Fp8Tensor {
    /// An fp8 tensor of `shape` from its row-major bytes.
    ///
    /// Errors: `bytes` does not hold one byte per element of `shape`, or
    /// `scale` is not a finite number.
    pub fn new(
        bytes: Vec<u8>,
        shape: &[usize],
        format: Fp8Format,
        scale: Option<f32>,
    ) -> Result<Self> {
        if bytes.len() != shape.iter().product::<usize>() {
            return Err(Error::invalid(
                "fp8 tensor",
                format!("{} bytes for a {shape:?} tensor", bytes.len()),
            ));
        }
        if scale.is_some_and(|s| !s.is_finite()) {
            return Err(Error::invalid(
                "fp8 tensor",
                format!("scale {scale:?} is not finite"),
            ));
        }
        Ok(Self {
            bytes,
            shape: shape.to_vec(),
            format,
            scale,
        })
    }

    /// `values` (row-major, of `shape`) in `format`, scaled so the largest
    /// magnitude maps to the format's largest finite value (ComfyUI's
    /// scaled fp8: a per-tensor `scale_weight` of `amax / max_finite`).
    pub fn quantize(values: &[f32], shape: &[usize], format: Fp8Format) -> Result<Self> {
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / format.max_finite()
        } else {
            1.0
        };
        let bytes = values.par_iter().map(|v| format.round(v / scale)).collect();
        Self::new(bytes, shape, format, Some(scale))
    }

    /// The format.
    pub fn format(&self) -> Fp8Format {
        self.format
    }

    /// The per-tensor scale, if any.
    pub fn scale(&self) -> Option<f32> {
        self.scale
    }

    fn widen_into(&self, out: &mut [f32]) {
        let table = self.format.table();
        let scale = self.scale.unwrap_or(1.0);
        out.par_chunks_mut(WIDEN_CHUNK)
            .zip(self.bytes.par_chunks(WIDEN_CHUNK))
            .for_each(|(dst, src)| {
                for (d, &b) in dst.iter_mut().zip(src) {
                    *d = table[b as usize] * scale;
                }
            });
    }
}

/// Elements widened per rayon task.
const WIDEN_CHUNK: usize = 1 << 16;

/// A weight tensor in the form it is kept in memory.
#[derive(Debug, Clone)]
pub enum StoredTensor {
    /// A candle tensor (f32, f16, bf16, ...).
    Dense(Tensor),
    /// GGML blocks (Q8_0, Q4_0, Q4_K, ...), on the CPU.
    Quantized(Arc<QTensor>),
    /// 8-bit floats.
    Fp8(Arc<Fp8Tensor>),
}

impl From<Tensor> for StoredTensor {
    fn from(t: Tensor) -> Self {
        Self::Dense(t)
    }
}

impl StoredTensor {
    /// The shape (PyTorch order: `(out, in)` for a linear weight).
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
            Self::Fp8(f) => &f.shape,
        }
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// The storage type's name: a candle dtype (`f16`), a GGML type
    /// (`Q8_0`) or an fp8 format (`F8_E4M3`, `F8_E4M3 (scaled)`).
    pub fn type_name(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Quantized(q) => ggml_type_name(q.dtype()).to_string(),
            Self::Fp8(f) => match f.scale {
                Some(_) => format!("{} (scaled)", f.format.safetensors_name()),
                None => f.format.safetensors_name().to_string(),
            },
        }
    }

    /// Bytes the tensor's data holds in memory.
    pub fn byte_len(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Fp8(f) => f.bytes.len(),
        }
    }

    /// Whether the CPU kernels can read it through [`Self::with_f32`]: a
    /// contiguous CPU f32 / f16 / bf16 tensor, a CPU quantized tensor of a
    /// type ggml dequantizes, or fp8.
    pub fn kernel_ready(&self) -> bool {
        match self {
            Self::Dense(t) => {
                matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
                    && t.device().is_cpu()
                    && t.is_contiguous()
            }
            Self::Quantized(q) => q.device().is_cpu() && widens(q.dtype()),
            Self::Fp8(_) => true,
        }
    }

    /// Run `f` on the tensor's values as f32, row-major: in place for a
    /// contiguous f32 tensor, else widened into a temporary buffer in
    /// parallel chunks (exactly; see the module docs) that lives only for
    /// the call.
    ///
    /// Errors: the tensor is not [`Self::kernel_ready`].
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        if !self.kernel_ready() {
            return Err(Error::invalid(
                "kernel",
                format!(
                    "a {} weight of shape {:?} cannot be read by the CPU kernels",
                    self.type_name(),
                    self.dims()
                ),
            ));
        }
        match self {
            Self::Dense(t) => super::kernels::with_f32_weight(t, f),
            Self::Quantized(q) => {
                let mut out = vec![0f32; q.shape().elem_count()];
                dequantize_into(q, &mut out)?;
                Ok(f(&out))
            }
            Self::Fp8(t) => {
                let mut out = vec![0f32; t.bytes.len()];
                t.widen_into(&mut out);
                Ok(f(&out))
            }
        }
    }

    /// `torch.nn.functional.linear` with this tensor as the `(n, k)`
    /// weight: `x` `(m, k)` → `(m, n)`, plus `bias` (`n` values or empty).
    /// Where the CPU has AVX-512F, an f16 / bf16 weight and a GGML `Q8_0` /
    /// `Q4_0` one are read as stored, widened while the product packs its
    /// panels ([`super::kernels::linear_stored`],
    /// [`super::kernels::linear_rows`]); other types (k-quants, fp8) and
    /// other CPUs widen the whole weight first ([`Self::with_f32`]). The
    /// result is the same either way.
    ///
    /// Errors: the tensor is not [`Self::kernel_ready`], or the shapes
    /// disagree (`n·k` weights, `m·k` inputs, `n` biases or none).
    pub fn linear(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        bias: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        if self.elem_count() != n * k || x.len() != m * k || !(bias.is_empty() || bias.len() == n) {
            return Err(Error::invalid(
                "linear",
                format!(
                    "a {:?} weight, {} inputs and {} biases for {m} rows of {k} → {n}",
                    self.dims(),
                    x.len(),
                    bias.len()
                ),
            ));
        }
        match self {
            Self::Dense(t) if self.kernel_ready() => {
                return super::kernels::linear_stored(x, m, k, t, bias, n);
            }
            Self::Quantized(q) if q.device().is_cpu() => {
                let format = match q.dtype() {
                    GgmlDType::Q8_0 => Some(RowFormat::Q8_0),
                    GgmlDType::Q4_0 => Some(RowFormat::Q4_0),
                    _ => None,
                };
                if let Some(format) = format.filter(|f| f.fits(k)) {
                    let rows = q.data()?;
                    if let Some(y) = super::kernels::linear_rows(x, m, k, &rows, format, bias, n)? {
                        return Ok(y);
                    }
                }
            }
            _ => {}
        }
        self.with_f32(|w| super::kernels::linear(x, m, k, w, bias, n))
    }

    /// The tensor as a dense candle tensor on `device`: a dense one as it
    /// is, a quantized or fp8 one widened to f32 (a full f32 copy: for
    /// biases, norms and embedding tables, and for devices without the
    /// per-layer kernels).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.to_device(device)?),
            _ => {
                let values = self.with_f32(<[f32]>::to_vec)?;
                Ok(Tensor::from_vec(values, self.dims(), device)?)
            }
        }
    }

    /// Rows `start..start + len` of the first dimension (a fused q/k/v
    /// projection split into its parts), kept in the stored form: a
    /// quantized tensor's rows are whole blocks when its row length is a
    /// multiple of the block size (as GGUF writers ensure), so its bytes are
    /// sliced without widening.
    ///
    /// Errors: the range exceeds the first dimension, or a quantized row
    /// does not end on a block boundary.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        let dims = self.dims().to_vec();
        let Some(&rows) = dims.first() else {
            return Err(Error::invalid("tensor", "a scalar has no rows"));
        };
        if start + len > rows {
            return Err(Error::invalid(
                "tensor",
                format!("rows {start}..{} of a {dims:?} tensor", start + len),
            ));
        }
        let row_elems: usize = dims[1..].iter().product();
        let mut new_dims = dims.clone();
        new_dims[0] = len;
        Ok(match self {
            Self::Dense(t) => Self::Dense(t.narrow(0, start, len)?.contiguous()?),
            Self::Fp8(f) => Self::Fp8(Arc::new(Fp8Tensor::new(
                f.bytes[start * row_elems..(start + len) * row_elems].to_vec(),
                &new_dims,
                f.format,
                f.scale,
            )?)),
            Self::Quantized(q) => {
                let block = q.dtype().block_size();
                if !row_elems.is_multiple_of(block) {
                    return Err(Error::invalid(
                        "tensor",
                        format!(
                            "a {} tensor of shape {dims:?}: rows of {row_elems} values are not \
                             whole blocks of {block}",
                            ggml_type_name(q.dtype())
                        ),
                    ));
                }
                let row_bytes = row_elems / block * q.dtype().type_size();
                let data = q.data()?;
                let bytes = &data[start * row_bytes..(start + len) * row_bytes];
                Self::Quantized(Arc::new(quantized_from_bytes(bytes, q.dtype(), &new_dims)?))
            }
        })
    }

    /// `parts` joined along the first dimension, in the stored form when
    /// they all share it (dense tensors of one dtype, quantized tensors of
    /// one type, fp8 of one format and scale), else widened to f32.
    ///
    /// Errors: the parts' trailing dimensions differ.
    pub fn cat_rows(parts: &[StoredTensor]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::invalid("tensor", "nothing to join"));
        };
        let tail = &first.dims()[1..];
        if parts
            .iter()
            .any(|p| p.dims().is_empty() || &p.dims()[1..] != tail)
        {
            return Err(Error::invalid(
                "tensor",
                format!(
                    "cannot join shapes {:?} by rows",
                    parts.iter().map(|p| p.dims().to_vec()).collect::<Vec<_>>()
                ),
            ));
        }
        let mut dims = first.dims().to_vec();
        dims[0] = parts.iter().map(|p| p.dims()[0]).sum();
        match first {
            Self::Dense(t)
                if parts
                    .iter()
                    .all(|p| matches!(p, Self::Dense(u) if u.dtype() == t.dtype())) =>
            {
                let ts: Vec<Tensor> = parts
                    .iter()
                    .map(|p| match p {
                        Self::Dense(u) => u.clone(),
                        _ => unreachable!("checked above"),
                    })
                    .collect();
                Ok(Self::Dense(Tensor::cat(&ts, 0)?.contiguous()?))
            }
            Self::Quantized(q)
                if parts
                    .iter()
                    .all(|p| matches!(p, Self::Quantized(r) if r.dtype() == q.dtype())) =>
            {
                let mut bytes = Vec::new();
                for p in parts {
                    if let Self::Quantized(r) = p {
                        bytes.extend_from_slice(&r.data()?);
                    }
                }
                Ok(Self::Quantized(Arc::new(quantized_from_bytes(
                    &bytes,
                    q.dtype(),
                    &dims,
                )?)))
            }
            Self::Fp8(f)
                if parts.iter().all(
                    |p| matches!(p, Self::Fp8(g) if g.format == f.format && g.scale == f.scale),
                ) =>
            {
                let mut bytes = Vec::new();
                for p in parts {
                    if let Self::Fp8(g) = p {
                        bytes.extend_from_slice(&g.bytes);
                    }
                }
                Ok(Self::Fp8(Arc::new(Fp8Tensor::new(
                    bytes, &dims, f.format, f.scale,
                )?)))
            }
            _ => {
                let ts = parts
                    .iter()
                    .map(|p| {
                        p.to_dense(&Device::Cpu)?
                            .to_dtype(DType::F32)
                            .map_err(Error::from)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Self::Dense(Tensor::cat(&ts, 0)?))
            }
        }
    }

    /// The same values under `shape` (same element count, row-major order
    /// kept): free for dense and fp8 tensors; a quantized tensor keeps its
    /// blocks when the new last dimension is whole blocks, else it is
    /// widened to f32.
    ///
    /// Errors: the element counts differ.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::invalid(
                "tensor",
                format!("cannot reshape {:?} to {shape:?}", self.dims()),
            ));
        }
        Ok(match self {
            Self::Dense(t) => Self::Dense(t.reshape(shape)?),
            Self::Fp8(f) => Self::Fp8(Arc::new(Fp8Tensor::new(
                f.bytes.clone(),
                shape,
                f.format,
                f.scale,
            )?)),
            Self::Quantized(q)
                if shape
                    .last()
                    .is_some_and(|l| l.is_multiple_of(q.dtype().block_size())) =>
            {
                Self::Quantized(Arc::new(quantized_from_bytes(
                    &q.data()?,
                    q.dtype(),
                    shape,
                )?))
            }
            Self::Quantized(_) => Self::Dense(self.to_dense(&Device::Cpu)?.reshape(shape)?),
        })
    }
}

/// A quantized tensor of `shape` from its GGML blocks, row-major.
///
/// Errors: the byte count does not match `shape` in `dtype`.
pub fn quantized_from_bytes(bytes: &[u8], dtype: GgmlDType, shape: &[usize]) -> Result<QTensor> {
    let elems: usize = shape.iter().product();
    let block = dtype.block_size();
    if !elems.is_multiple_of(block) || elems / block * dtype.type_size() != bytes.len() {
        return Err(Error::invalid(
            "tensor",
            format!(
                "{} bytes are not a {} tensor of shape {shape:?}",
                bytes.len(),
                ggml_type_name(dtype)
            ),
        ));
    }
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, shape)?)
}

/// GGML's name of a type (`Q8_0`, `Q4_K`, `F16`), as GGUF tools print it.
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Whether [`dequantize_into`] widens `dtype`: the weight types of
/// published GGUF files (F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1,
/// Q2_K..Q6_K). Q8_1 and Q8_K are ggml's activation types, never stored
/// weights.
pub fn widens(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// Blocks dequantized per rayon task.
const BLOCKS_PER_TASK: usize = 2048;

/// Dequantize `q` into `out` (one f32 per element, row-major) in parallel
/// chunks of blocks, each by ggml's `dequantize_row_*` (candle's
/// `k_quants::GgmlType::to_float`).
fn dequantize_into(q: &QTensor, out: &mut [f32]) -> Result<()> {
    fn run<T: GgmlType + Sync>(data: &[u8], out: &mut [f32]) -> Result<()> {
        let size = std::mem::size_of::<T>();
        if !data.len().is_multiple_of(size) || data.len() / size * T::BLCK_SIZE != out.len() {
            return Err(Error::invalid(
                "tensor",
                "quantized data of the wrong length",
            ));
        }
        if !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(Error::invalid("tensor", "misaligned quantized data"));
        }
        // SAFETY: the length and alignment are checked above; every block
        // type is plain data (integers and f16 scales), valid for any bytes.
        let blocks: &[T] =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), data.len() / size) };
        out.par_chunks_mut(BLOCKS_PER_TASK * T::BLCK_SIZE)
            .zip(blocks.par_chunks(BLOCKS_PER_TASK))
            .for_each(|(dst, src)| T::to_float(src, dst));
        Ok(())
    }
    let data = q.data()?;
    match q.dtype() {
        GgmlDType::F32 => run::<f32>(&data, out),
        GgmlDType::F16 => run::<half::f16>(&data, out),
        GgmlDType::BF16 => run::<half::bf16>(&data, out),
        GgmlDType::Q4_0 => run::<k_quants::BlockQ4_0>(&data, out),
        GgmlDType::Q4_1 => run::<k_quants::BlockQ4_1>(&data, out),
        GgmlDType::Q5_0 => run::<k_quants::BlockQ5_0>(&data, out),
        GgmlDType::Q5_1 => run::<k_quants::BlockQ5_1>(&data, out),
        GgmlDType::Q8_0 => run::<k_quants::BlockQ8_0>(&data, out),
        GgmlDType::Q2K => run::<k_quants::BlockQ2K>(&data, out),
        GgmlDType::Q3K => run::<k_quants::BlockQ3K>(&data, out),
        GgmlDType::Q4K => run::<k_quants::BlockQ4K>(&data, out),
        GgmlDType::Q5K => run::<k_quants::BlockQ5K>(&data, out),
        GgmlDType::Q6K => run::<k_quants::BlockQ6K>(&data, out),
        other => Err(Error::invalid(
            "tensor",
            format!("{} is not a weight type", ggml_type_name(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x as f32 / (1u32 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    /// The parallel dequantization equals candle's (ggml's) sequential one
    /// for every weight type, across task boundaries.
    #[test]
    fn dequantization_matches_ggml_for_every_type() {
        let rows = 9;
        let cols = 256 * 4;
        let x = Tensor::from_vec(values(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&x, dtype).unwrap();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let stored = StoredTensor::Quantized(Arc::new(q));
            assert!(stored.kernel_ready());
            let got = stored.with_f32(<[f32]>::to_vec).unwrap();
            assert_eq!(got, want, "{dtype:?}");
            // Rows sliced in the stored form widen to the same rows.
            let part = stored.narrow_rows(2, 5).unwrap();
            assert!(matches!(part, StoredTensor::Quantized(_)), "{dtype:?}");
            assert_eq!(part.dims(), &[5, cols]);
            let got = part.with_f32(<[f32]>::to_vec).unwrap();
            assert_eq!(got, want[2 * cols..7 * cols], "{dtype:?} rows");
            let joined = StoredTensor::cat_rows(&[
                stored.narrow_rows(0, 2).unwrap(),
                stored.narrow_rows(2, 7).unwrap(),
            ])
            .unwrap();
            assert_eq!(joined.with_f32(<[f32]>::to_vec).unwrap(), want);
        }
    }

    /// `StoredTensor::linear` gives bit for bit what `kernels::linear` gives
    /// on the weight widened by candle's (ggml's) dequantization, for the
    /// types read as stored (f16, bf16, Q8_0, Q4_0) and one widened first
    /// (Q4_K), whichever f32 kernel runs.
    #[test]
    fn linear_equals_linear_on_the_widened_weight() {
        let (m, k, n) = (77, 256, 130);
        let x = values(m * k, 4);
        let bias = values(n, 5);
        let w = Tensor::from_vec(values(n * k, 6), (n, k), &Device::Cpu).unwrap();
        let mut weights = vec![
            StoredTensor::Dense(w.to_dtype(DType::F16).unwrap()),
            StoredTensor::Dense(w.to_dtype(DType::BF16).unwrap()),
        ];
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            weights.push(StoredTensor::Quantized(Arc::new(
                QTensor::quantize(&w, dtype).unwrap(),
            )));
        }
        for weight in &weights {
            let wide = weight.with_f32(<[f32]>::to_vec).unwrap();
            let want = crate::models::kernels::linear(&x, m, k, &wide, &bias, n);
            let got = weight.linear(&x, m, k, &bias, n).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{}",
                weight.type_name()
            );
        }
        // A weight of another shape is an error.
        assert!(weights[2].linear(&x, m, k, &bias, n - 1).is_err());
    }

    /// Every fp8 byte widens to the value PyTorch gives it (spot checks of
    /// both formats' special values), and a scale multiplies.
    #[test]
    fn fp8_widens_exactly() {
        let e4 = Fp8Format::E4M3Fn.table();
        assert_eq!(e4[0x38], 1.0); // 0.0111.000 = 2^0
        assert_eq!(e4[0x7e], 448.0); // largest finite
        assert_eq!(e4[0x01], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4[0xb8], -1.0);
        assert!(e4[0x7f].is_nan());
        let e5 = Fp8Format::E5M2.table();
        assert_eq!(e5[0x3c], 1.0);
        assert_eq!(e5[0x7b], 57344.0);
        assert_eq!(e5[0x01], 2f32.powi(-16));
        assert!(e5[0x7c].is_infinite());
        let t = Fp8Tensor::new(vec![0x38, 0xb8, 0x40], &[3], Fp8Format::E4M3Fn, Some(0.5)).unwrap();
        let got = StoredTensor::Fp8(Arc::new(t))
            .with_f32(<[f32]>::to_vec)
            .unwrap();
        assert_eq!(got, [0.5, -0.5, 1.0]);
        assert!(Fp8Tensor::new(vec![0; 2], &[3], Fp8Format::E5M2, None).is_err());
    }

    /// Quantizing to scaled fp8 keeps values within the format's relative
    /// precision (3 mantissa bits: 1/16) and maps the largest to 448.
    #[test]
    fn fp8_quantization_round_trips_within_precision() {
        let v = values(4096, 7);
        let t = Fp8Tensor::quantize(&v, &[64, 64], Fp8Format::E4M3Fn).unwrap();
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((t.scale().unwrap() - amax / 448.0).abs() < 1e-9);
        let back = StoredTensor::Fp8(Arc::new(t))
            .with_f32(<[f32]>::to_vec)
            .unwrap();
        for (a, b) in v.iter().zip(&back) {
            // Normal range: relative error ≤ 2^-4; tiny values: absolute.
            assert!((a - b).abs() <= a.abs() / 16.0 + amax / 448.0 * 2f32.powi(-9));
        }
    }

    /// Misuse is an error, never a panic.
    #[test]
    fn bad_shapes_are_errors() {
        let x = Tensor::from_vec(values(64, 1), (2, 32), &Device::Cpu).unwrap();
        let q = StoredTensor::Quantized(Arc::new(QTensor::quantize(&x, GgmlDType::Q8_0).unwrap()));
        assert!(q.narrow_rows(1, 2).is_err());
        assert!(q.reshape(&[3, 32]).is_err());
        // A reshape that splits blocks widens instead.
        assert!(matches!(
            q.reshape(&[4, 16]).unwrap(),
            StoredTensor::Dense(_)
        ));
        assert!(matches!(
            q.reshape(&[1, 64]).unwrap(),
            StoredTensor::Quantized(_)
        ));
        assert!(quantized_from_bytes(&[0u8; 10], GgmlDType::Q8_0, &[32]).is_err());
    }
}
