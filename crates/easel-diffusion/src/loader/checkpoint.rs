//! The containers a checkpoint file comes in: safetensors (dense, fp8 and
//! scaled-fp8 tensors) and GGUF (ggml's format: dense or block-quantized
//! tensors, as city96's FLUX / SDXL files and stable-diffusion.cpp's
//! conversions publish them), behind one view of named tensors so the
//! single-file detection and key renames ([`super::single_file`]) work on
//! both.
//!
//! GGUF is read with candle's reader (`candle_core::quantized::gguf_file`,
//! which follows the GGUF spec of ggml's `docs/gguf.md`); the tensor data
//! stays in the read-only mapped file until a model asks for a tensor, and
//! quantized tensors are then kept in their blocks ([`StoredTensor`]).
//! GGUF stores dimensions innermost first; the shapes here are PyTorch's
//! order. A tensor that a converter flattened to quantize it (ComfyUI-GGUF
//! writes `comfy.gguf.orig_shape.<name>`) gets its original shape back.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::stored::{ggml_type_name, quantized_from_bytes, StoredTensor};
use crate::models::weights::load_safetensors_stored;

/// The metadata key prefix under which ComfyUI-GGUF records the shape a
/// tensor had before it was flattened for quantization.
const ORIG_SHAPE: &str = "comfy.gguf.orig_shape.";

/// A checkpoint file's tensors, by key, in either container.
pub struct CheckpointFile {
    path: PathBuf,
    inner: Inner,
}

enum Inner {
    Safetensors(MmapedSafetensors),
    Gguf(Box<GgufFile>),
}

struct GgufFile {
    content: Content,
    mmap: memmap2::Mmap,
    /// Shapes restored from `comfy.gguf.orig_shape.*`.
    orig_shapes: HashMap<String, Vec<usize>>,
}

/// Whether `path` is a GGUF file, by extension or by its `GGUF` magic.
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

impl CheckpointFile {
    /// Map `path` (read-only) and read its header: GGUF when
    /// [`is_gguf`], else safetensors.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (field `model`) when the file is neither
    /// readable safetensors nor GGUF, or when a GGUF tensor has a type easel
    /// does not read (the message names the tensor and the type: the
    /// supported ones are F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1,
    /// Q2_K..Q6_K).
    pub fn open(path: &Path) -> Result<Self> {
        if is_gguf(path) {
            return Ok(Self {
                path: path.to_path_buf(),
                inner: Inner::Gguf(Box::new(GgufFile::open(path)?)),
            });
        }
        // SAFETY: read-only mapping; like every safetensors loader we rely
        // on the file not being truncated while mapped.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
            Error::invalid(
                "model",
                format!(
                    "{} is not a readable safetensors or GGUF file ({e}); weight files must be \
                     .safetensors or .gguf",
                    path.display()
                ),
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            inner: Inner::Safetensors(tensors),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The container's name: `safetensors` or `GGUF`.
    pub fn format(&self) -> &'static str {
        match self.inner {
            Inner::Safetensors(_) => "safetensors",
            Inner::Gguf(_) => "GGUF",
        }
    }

    /// Every tensor key.
    pub fn keys(&self) -> Vec<String> {
        match &self.inner {
            Inner::Safetensors(t) => t.tensors().into_iter().map(|(k, _)| k).collect(),
            Inner::Gguf(g) => g.content.tensor_infos.keys().cloned().collect(),
        }
    }

    /// Every tensor key with its shape (PyTorch order).
    pub fn keys_and_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.keys()
            .into_iter()
            .filter_map(|k| {
                let shape = self.shape(&k)?;
                Some((k, shape))
            })
            .collect()
    }

    /// Whether the file holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        match &self.inner {
            Inner::Safetensors(t) => t.get(key).is_ok(),
            Inner::Gguf(g) => g.content.tensor_infos.contains_key(key),
        }
    }

    /// The shape of `key` (PyTorch order), from the header.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match &self.inner {
            Inner::Safetensors(t) => t.get(key).ok().map(|v| v.shape().to_vec()),
            Inner::Gguf(g) => g.shape(key),
        }
    }

    /// The stored type of `key`: a safetensors dtype name (`F16`, `BF16`,
    /// `F32`, `F8_E4M3`, ...) or a GGML type name (`Q8_0`, `Q4_K`, ...).
    pub fn dtype_name(&self, key: &str) -> Option<String> {
        match &self.inner {
            Inner::Safetensors(t) => t.get(key).ok().map(|v| format!("{:?}", v.dtype())),
            Inner::Gguf(g) => g
                .content
                .tensor_infos
                .get(key)
                .map(|i| ggml_type_name(i.ggml_dtype).to_string()),
        }
    }

    /// A string metadata value of a GGUF file (`general.architecture`).
    pub fn metadata_string(&self, key: &str) -> Option<String> {
        match &self.inner {
            Inner::Safetensors(_) => None,
            Inner::Gguf(g) => match g.content.metadata.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
        }
    }

    /// The tensor `key` in its stored form (quantized and fp8 tensors stay
    /// so), on `device`.
    ///
    /// Errors: the key is absent, its data lies outside the file, or its
    /// type is not a weight type.
    pub fn stored(&self, key: &str, device: &Device) -> Result<StoredTensor> {
        match &self.inner {
            Inner::Safetensors(t) => load_safetensors_stored(t, key, device),
            Inner::Gguf(g) => g.stored(&self.path, key, device),
        }
    }

    /// The tensor `key` as a dense tensor (quantized and fp8 ones widened
    /// to f32).
    ///
    /// Errors: as [`Self::stored`].
    pub fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        self.stored(key, device)?.to_dense(device)
    }
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self> {
        let bad = |e: String| {
            Error::invalid(
                "model",
                format!("{} is not a readable GGUF file: {e}", path.display()),
            )
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping; the file must not be truncated while
        // mapped (as for safetensors).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let content = match Content::read(&mut std::io::Cursor::new(&mmap[..])) {
            Ok(c) => c,
            Err(e) => {
                // candle stops at the first type it does not know without
                // naming the tensor; find it for the message.
                return Err(match gguf_scan::unknown_type(&mmap) {
                    Some((tensor, code)) => Error::invalid(
                        "model",
                        format!(
                            "{}: tensor `{tensor}` has GGUF type {} which easel does not read; \
                             supported: F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, \
                             Q4_K, Q5_K, Q6_K (the I-quants and ternary types are not supported: \
                             use a file of one of these types)",
                            path.display(),
                            gguf_scan::type_name(code)
                        ),
                    ),
                    None => bad(e.to_string()),
                });
            }
        };
        let mut orig_shapes = HashMap::new();
        for (key, value) in &content.metadata {
            let Some(name) = key.strip_prefix(ORIG_SHAPE) else {
                continue;
            };
            let dims = value
                .to_vec()
                .ok()
                .and_then(|v| {
                    v.iter()
                        .map(|d| match d {
                            Value::I32(x) if *x >= 0 => Some(*x as usize),
                            Value::U32(x) => Some(*x as usize),
                            Value::I64(x) if *x >= 0 => Some(*x as usize),
                            Value::U64(x) => Some(*x as usize),
                            _ => None,
                        })
                        .collect::<Option<Vec<usize>>>()
                })
                .ok_or_else(|| bad(format!("`{key}` is not a list of dimensions")))?;
            orig_shapes.insert(name.to_string(), dims);
        }
        Ok(Self {
            content,
            mmap,
            orig_shapes,
        })
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        if let Some(s) = self.orig_shapes.get(key) {
            return Some(s.clone());
        }
        self.content
            .tensor_infos
            .get(key)
            .map(|i| i.shape.dims().to_vec())
    }

    fn stored(&self, path: &Path, key: &str, device: &Device) -> Result<StoredTensor> {
        let info = self.content.tensor_infos.get(key).ok_or_else(|| {
            Error::config(
                path.display().to_string(),
                format!("no tensor `{key}` in the GGUF file"),
            )
        })?;
        let dims = info.shape.dims().to_vec();
        let dtype = info.ggml_dtype;
        let elems: usize = dims.iter().product();
        let block = dtype.block_size();
        let len = elems.div_ceil(block) * dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        let bytes = usize::try_from(start)
            .ok()
            .and_then(|s| self.mmap.get(s..s.checked_add(len)?))
            .ok_or_else(|| {
                Error::config(
                    path.display().to_string(),
                    format!("GGUF tensor `{key}` ({len} bytes at {start}) lies outside the file"),
                )
            })?;
        let t = match dtype {
            GgmlDType::F32 => dense(bytes, DType::F32, &dims, device)?,
            GgmlDType::F16 => dense(bytes, DType::F16, &dims, device)?,
            GgmlDType::BF16 => dense(bytes, DType::BF16, &dims, device)?,
            GgmlDType::Q8_1 | GgmlDType::Q8K => {
                return Err(Error::invalid(
                    "model",
                    format!(
                    "{}: tensor `{key}` has GGUF type {}, an activation type, not a weight type",
                    path.display(),
                    ggml_type_name(dtype)
                ),
                ))
            }
            _ => {
                let q: QTensor = quantized_from_bytes(bytes, dtype, &dims).map_err(|e| {
                    Error::config(path.display().to_string(), format!("tensor `{key}`: {e}"))
                })?;
                StoredTensor::Quantized(std::sync::Arc::new(q))
            }
        };
        match self.orig_shapes.get(key) {
            Some(shape) if shape.as_slice() != t.dims() => t.reshape(shape),
            _ => Ok(t),
        }
    }
}

fn dense(bytes: &[u8], dtype: DType, dims: &[usize], device: &Device) -> Result<StoredTensor> {
    Ok(StoredTensor::Dense(Tensor::from_raw_buffer(
        bytes, dtype, dims, device,
    )?))
}

/// A tolerant walk over a GGUF header, only to name the tensor whose type
/// candle's reader refused.
mod gguf_scan {
    /// ggml's name of type `code` (`ggml.h`'s `ggml_type`).
    pub(super) fn type_name(code: u32) -> String {
        let name = match code {
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => return format!("#{code}"),
        };
        format!("{name} (#{code})")
    }

    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
            self.at += n;
            Some(s)
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn string(&mut self) -> Option<String> {
            let n = usize::try_from(self.u64()?).ok()?;
            Some(String::from_utf8_lossy(self.take(n)?).into_owned())
        }
        /// Skip one metadata value of type `t`.
        fn skip_value(&mut self, t: u32, depth: usize) -> Option<()> {
            let size = match t {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                8 => {
                    self.string()?;
                    return Some(());
                }
                9 if depth < 8 => {
                    let inner = self.u32()?;
                    let n = self.u64()?;
                    for _ in 0..n {
                        self.skip_value(inner, depth + 1)?;
                    }
                    return Some(());
                }
                _ => return None,
            };
            self.take(size).map(|_| ())
        }
    }

    /// The first tensor whose type candle does not read, with its type
    /// code (GGUF v2 / v3 headers).
    pub(super) fn unknown_type(bytes: &[u8]) -> Option<(String, u32)> {
        let mut c = Cursor { bytes, at: 0 };
        if c.take(4)? != b"GGUF" || !matches!(c.u32()?, 2 | 3) {
            return None;
        }
        let tensors = c.u64()?;
        let kvs = c.u64()?;
        for _ in 0..kvs {
            c.string()?;
            let t = c.u32()?;
            c.skip_value(t, 0)?;
        }
        for _ in 0..tensors {
            let name = c.string()?;
            let dims = c.u32()?;
            for _ in 0..dims {
                c.u64()?;
            }
            let code = c.u32()?;
            c.u64()?;
            if !matches!(code, 0..=3 | 6..=15 | 30) {
                return Some((name, code));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    fn write_gguf(path: &Path, tensors: &[(&str, &QTensor)], metadata: &[(&str, Value)]) {
        let mut f = File::create(path).unwrap();
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &metadata, tensors).unwrap();
    }

    /// Tensors come back with their PyTorch shapes, quantized ones in their
    /// blocks, dense GGUF types as dense tensors, and a flattened tensor
    /// with its `comfy.gguf.orig_shape`.
    #[test]
    fn gguf_tensors_keep_their_form_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let w: Vec<f32> = (0..64 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(w, (64, 32), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let rows: Vec<f32> = w
            .narrow(0, 0, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rows = Tensor::from_vec(rows, (3, 32), &Device::Cpu).unwrap();
        let f16 = QTensor::quantize(&rows, GgmlDType::F16).unwrap();
        let flat = QTensor::quantize(&w.reshape(2048).unwrap(), GgmlDType::Q4_0).unwrap();
        write_gguf(
            &path,
            &[
                ("a.weight", &q8),
                ("b.weight", &f16),
                ("conv.weight", &flat),
            ],
            &[
                ("general.architecture", Value::String("flux".into())),
                (
                    "comfy.gguf.orig_shape.conv.weight",
                    Value::Array(vec![
                        Value::I32(16),
                        Value::I32(8),
                        Value::I32(4),
                        Value::I32(4),
                    ]),
                ),
            ],
        );
        let file = CheckpointFile::open(&path).unwrap();
        assert_eq!(file.format(), "GGUF");
        assert_eq!(
            file.metadata_string("general.architecture").as_deref(),
            Some("flux")
        );
        assert_eq!(file.shape("a.weight"), Some(vec![64, 32]));
        assert_eq!(file.dtype_name("a.weight").as_deref(), Some("Q8_0"));
        let a = file.stored("a.weight", &Device::Cpu).unwrap();
        assert!(matches!(a, StoredTensor::Quantized(_)));
        let want = q8.dequantize(&Device::Cpu).unwrap();
        let got = a.to_dense(&Device::Cpu).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let b = file.stored("b.weight", &Device::Cpu).unwrap();
        assert!(matches!(&b, StoredTensor::Dense(t) if t.dtype() == DType::F16));
        assert_eq!(b.dims(), &[3, 32]);
        assert_eq!(file.shape("conv.weight"), Some(vec![16, 8, 4, 4]));
        let conv = file.stored("conv.weight", &Device::Cpu).unwrap();
        assert_eq!(conv.dims(), &[16, 8, 4, 4]);
        assert!(file.stored("missing", &Device::Cpu).is_err());
    }

    /// A type candle does not read is refused naming the tensor and type.
    #[test]
    fn unknown_gguf_types_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let w = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        write_gguf(&path, &[("blk.0.weight", &q)], &[]);
        // Patch the tensor's type code (Q8_0 = 8) to IQ4_NL (20): the code
        // follows the name and its two dimensions.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(12)
            .position(|w| w == b"blk.0.weight")
            .unwrap()
            + 12
            + 4
            + 16;
        assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 8);
        bytes[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let err = CheckpointFile::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("`blk.0.weight`") && err.contains("IQ4_NL"),
            "{err}"
        );
    }

    /// Neither safetensors nor GGUF: a clear refusal.
    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let err = CheckpointFile::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("not a readable safetensors or GGUF file"),
            "{err}"
        );
    }
}
