//! Where a component's weight tensors come from, and shape-checked access
//! to them by checkpoint key.
//!
//! Module paths mirror the diffusers / transformers checkpoint keys
//! (`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`), so
//! safetensors files load without renaming. Tensors stored as f16 / bf16 are
//! upcast to the compute dtype (f32 on CPU) when a model is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::stored::{Fp8Format, Fp8Tensor, StoredTensor};
use crate::error::{Error, Result};

/// The tensor `key` of a mapped safetensors file in its stored form: fp8
/// (`F8_E4M3` = `float8_e4m3fn`, `F8_E5M2`) kept as fp8 with the
/// per-tensor scale of a scaled-fp8 file (ComfyUI's `<layer>.scale_weight`
/// beside `<layer>.weight`), anything else as a candle tensor in its
/// stored dtype.
///
/// Errors: the key is absent, or its data does not match its header, or a
/// `scale_weight` is not a single number.
pub fn load_safetensors_stored(
    tensors: &MmapedSafetensors,
    key: &str,
    device: &Device,
) -> Result<StoredTensor> {
    let view = tensors.get(key)?;
    // candle links its own `safetensors` version: compare by name.
    let format = match format!("{:?}", view.dtype()).as_str() {
        "F8_E4M3" => Fp8Format::E4M3Fn,
        "F8_E5M2" => Fp8Format::E5M2,
        _ => return Ok(StoredTensor::Dense(tensors.load(key, device)?)),
    };
    let scale = match key.strip_suffix(".weight") {
        Some(layer) if tensors.get(&format!("{layer}.scale_weight")).is_ok() => {
            let s = tensors
                .load(&format!("{layer}.scale_weight"), &Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            match s.as_slice() {
                [one] => Some(*one),
                _ => {
                    return Err(Error::config(
                        key,
                        format!(
                            "`{layer}.scale_weight` holds {} values, expected one",
                            s.len()
                        ),
                    ))
                }
            }
        }
        _ => None,
    };
    Ok(StoredTensor::Fp8(std::sync::Arc::new(Fp8Tensor::new(
        view.data().to_vec(),
        view.shape(),
        format,
        scale,
    )?)))
}

/// A source of named weight tensors for one component (`unet`, `vae`, ...).
pub trait TensorSource: Send + Sync {
    /// The tensor stored under `name` in its stored dtype, or `None` when the
    /// source has no such key. `shape` is what the model expects; a source
    /// that synthesises weights (benchmarks) uses it, others ignore it.
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>>;

    /// The tensor stored under `name` in the form it is kept in memory
    /// (quantized and fp8 weights stay so; see [`StoredTensor`]), or `None`
    /// when the source has no such key. Sources of dense tensors only need
    /// not override it; sources that hold quantized or fp8 tensors return
    /// them here and widened to f32 from [`TensorSource::tensor`].
    fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<StoredTensor>> {
        Ok(self.tensor(name, shape, device)?.map(StoredTensor::Dense))
    }

    /// Whether the source holds `name`.
    fn contains(&self, name: &str) -> bool;

    /// A human-readable description of where the tensors come from (a path).
    fn origin(&self) -> PathBuf;

    /// All keys, where the source can enumerate them (used to detect LoRA
    /// targets and unexpected keys).
    fn keys(&self) -> Vec<String>;
}

/// Weights memory-mapped from one or more `.safetensors` files (sharded
/// checkpoints are several files).
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    mmaped: MmapedSafetensors,
}

impl SafetensorsSource {
    /// Map `files`. Errors if a file cannot be opened or is not a valid
    /// safetensors file.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "weight file not found"),
                ));
            }
        }
        // SAFETY: the files are opened read-only; like every safetensors
        // loader we rely on them not being truncated while mapped.
        let mmaped = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            Error::config(
                files
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                format!("not a readable safetensors file: {e}"),
            )
        })?;
        Ok(Self {
            files: files.to_vec(),
            mmaped,
        })
    }
}

impl TensorSource for SafetensorsSource {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        self.stored(name, shape, device)?
            .map(|t| t.to_dense(device))
            .transpose()
    }

    fn stored(
        &self,
        name: &str,
        _shape: &[usize],
        device: &Device,
    ) -> Result<Option<StoredTensor>> {
        match self.mmaped.get(name) {
            Ok(_) => Ok(Some(load_safetensors_stored(&self.mmaped, name, device)?)),
            Err(_) => Ok(None),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.mmaped.get(name).is_ok()
    }

    fn origin(&self) -> PathBuf {
        match self.files.as_slice() {
            [one] => one.clone(),
            [first, ..] => first.parent().map(Path::to_path_buf).unwrap_or_default(),
            [] => PathBuf::new(),
        }
    }

    fn keys(&self) -> Vec<String> {
        self.mmaped.tensors().into_iter().map(|(k, _)| k).collect()
    }
}

/// A [`TensorSource`] that keeps every tensor it has handed out, converted
/// to `dtype` (f16 / bf16 tensors stay as stored when `dtype` is f32), so a
/// component can be built again (with other LoRA
/// adapters merged) without reading or converting its weight files again.
///
/// The cached tensors are the very tensors the models hold (candle tensors
/// share their storage), so the cache costs no extra memory while the models
/// use the base weights; with adapters merged it keeps the base copies of
/// the merged weights only. Tensors are cached on the device of the first
/// request (a pipeline lives on one device), or on the host device of
/// [`CachedSource::on_host`] (offloaded weights).
pub struct CachedSource {
    base: Arc<dyn TensorSource>,
    dtype: DType,
    /// Where the tensors are read and kept ([`CachedSource::on_host`]);
    /// `None`: on the device of each request.
    host: Option<Device>,
    cache: Mutex<HashMap<String, StoredTensor>>,
    reads: AtomicUsize,
}

impl CachedSource {
    /// Cache the tensors of `base`, converted to `dtype`.
    pub fn new(base: Arc<dyn TensorSource>, dtype: DType) -> Self {
        Self {
            base,
            dtype,
            host: None,
            cache: Mutex::new(HashMap::new()),
            reads: AtomicUsize::new(0),
        }
    }

    /// The same cache reading and keeping every tensor on `host` whatever
    /// device a request names (`--offload model|sequential`: the weights
    /// stay in host memory; [`Weights`] moves each to its device as a
    /// model is built, and [`CachedSource::tensor`] returns it on the
    /// requested device).
    pub fn on_host(mut self, host: Device) -> Self {
        self.host = Some(host);
        self
    }

    /// How many tensors were read from the underlying source so far (each
    /// key at most once).
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }
}

/// Whether a tensor stored as `stored` stays in that precision when the
/// compute dtype is `compute`: f16 / bf16 matrix and convolution weights
/// are kept half size for f32 compute and widened by the kernels per layer
/// ([`super::kernels::with_f32_weight`]).
fn keeps_stored(compute: DType, stored: DType) -> bool {
    compute == DType::F32 && matches!(stored, DType::F16 | DType::BF16)
}

impl TensorSource for CachedSource {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        self.stored(name, shape, device)?
            .map(|t| Ok(t.to_dense(device)?.to_dtype(self.dtype)?))
            .transpose()
    }

    fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<StoredTensor>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(name) {
            return Ok(Some(t.clone()));
        }
        let Some(t) = self
            .base
            .stored(name, shape, self.host.as_ref().unwrap_or(device))?
        else {
            return Ok(None);
        };
        self.reads.fetch_add(1, Ordering::Relaxed);
        // The layers keep matrix weights in their stored precision
        // (`Weights::get_stored`), so caching them widened would double
        // them; quantized and fp8 tensors stay as they are.
        let t = match t {
            StoredTensor::Dense(d) if !keeps_stored(self.dtype, d.dtype()) => {
                StoredTensor::Dense(d.to_dtype(self.dtype)?)
            }
            other => other,
        };
        cache.insert(name.to_string(), t.clone());
        Ok(Some(t))
    }

    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }

    fn origin(&self) -> PathBuf {
        self.base.origin()
    }

    fn keys(&self) -> Vec<String> {
        self.base.keys()
    }
}

/// Synthesised weights for benchmarking real-size architectures without
/// their checkpoints: every tensor the model asks for exists, with the
/// asked shape, stored as `dtype` (f16 like a published checkpoint).
///
/// Values keep activations finite and of ordinary magnitude: 1-D `weight`s
/// (norm scales) are 1, 1-D `bias`es 0, and other tensors uniform in
/// `±sqrt(3 / fan_in)` (unit-variance outputs for unit-variance inputs),
/// with `fan_in` the product of all but the first dimension. Values are a
/// deterministic function of the key, so a rebuilt model is identical.
pub struct RandomSource {
    dtype: DType,
}

impl RandomSource {
    /// Random weights stored as `dtype` (f16, bf16 or f32).
    pub fn new(dtype: DType) -> Self {
        Self { dtype }
    }
}

/// SplitMix64 (Steele et al. 2014): a fast, well-mixed 64-bit generator.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl TensorSource for RandomSource {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 1 && name.ends_with("weight") {
            vec![1.0; n]
        } else if shape.len() == 1 && name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let fan_in = shape.iter().skip(1).product::<usize>().max(1);
            let bound = (3.0 / fan_in as f64).sqrt() as f32;
            let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            (0..n)
                .map(|_| {
                    let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                    (2.0 * u - 1.0) * bound
                })
                .collect()
        };
        Ok(Some(
            Tensor::from_vec(values, shape, device)?.to_dtype(self.dtype)?,
        ))
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn origin(&self) -> PathBuf {
        PathBuf::from("<random weights>")
    }

    fn keys(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Shape-checked access to a component's weights under a key prefix, in the
/// spirit of candle's `VarBuilder` but with errors that name the component,
/// the tensor and both shapes.
#[derive(Clone)]
pub struct Weights {
    source: Arc<dyn TensorSource>,
    component: Arc<str>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Weights of `component` from `source`, converted to `dtype` on `device`.
    pub fn new(
        source: Arc<dyn TensorSource>,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            source,
            component: component.into(),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// The same weights under `prefix.name` (`pp` = push prefix, as in candle).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the tensor `name` (under the current prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.full_name(name))
    }

    /// The tensor `name` under the current prefix, in its stored dtype,
    /// checked to have `shape`.
    fn fetch(&self, shape: &[usize], name: &str) -> Result<StoredTensor> {
        let full = self.full_name(name);
        let t = self
            .source
            .stored(&full, shape, &self.device)?
            .ok_or_else(|| Error::MissingTensor {
                component: self.component.to_string(),
                tensor: full.clone(),
                file: self.source.origin(),
            })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                component: self.component.to_string(),
                tensor: full,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// The tensor `name` under the current prefix, which must have `shape`.
    ///
    /// Errors: [`Error::MissingTensor`] when absent, [`Error::ShapeMismatch`]
    /// when its shape differs from `shape`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        Ok(self
            .fetch(shape, name)?
            .to_dense(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Like [`Weights::get`] for a matrix or convolution weight that the
    /// CPU kernels read through [`StoredTensor::with_f32`]: with f32 compute
    /// on the CPU, a tensor stored as f16, bf16, fp8 or GGML blocks is
    /// returned in that form (the kernels widen it exactly, one layer at a
    /// time), anything else as [`Weights::get`] (dense, compute dtype).
    ///
    /// Errors: as [`Weights::get`].
    pub fn get_stored(&self, shape: &[usize], name: &str) -> Result<StoredTensor> {
        let t = self.fetch(shape, name)?;
        let keep = self.device.is_cpu()
            && match &t {
                StoredTensor::Dense(d) => keeps_stored(self.dtype, d.dtype()),
                other => self.dtype == DType::F32 && other.kernel_ready(),
            };
        Ok(match t {
            StoredTensor::Dense(d) if keep => StoredTensor::Dense(d.contiguous()?),
            t if keep => t,
            t => StoredTensor::Dense(t.to_dense(&self.device)?.to_dtype(self.dtype)?),
        })
    }

    /// Like [`Weights::get`], but `None` when the tensor is absent.
    pub fn get_opt(&self, shape: &[usize], name: &str) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(shape, name).map(Some)
        } else {
            Ok(None)
        }
    }
}
