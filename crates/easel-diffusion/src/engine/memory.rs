//! How many bytes a model's weights hold once loaded, estimated before
//! loading from the safetensors headers alone (the model cache's budget is
//! spent with it).
//!
//! The estimate follows what the loader and the layers keep (see
//! `models::weights`): on the CPU with f32 compute, a half-precision
//! (f16 / bf16) matrix or convolution weight stays in its stored precision
//! (the kernels widen it one layer at a time), every other floating-point
//! tensor (biases, norm scales, embedding tables) is widened to f32. The
//! components LoRA adapters can target
//! ([`ModelFamily::lora_components`](crate::loader::ModelFamily::lora_components))
//! also keep the stored copy of each widened tensor (the base weights a
//! LoRA switch rebuilds from). Integer buffers (`position_ids`) are not read.
//! The test `engine_memory` checks the estimate against the bytes the loaded
//! tensors really hold, for every fixture model.

use std::io::Read;
use std::path::Path;

use crate::loader::{ModelDir, ModelFamily};
use crate::models::quantize::{is_embedding_table, is_t5_token_table, Quantization};

/// The largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor of a safetensors header: its name, dtype and shape.
struct TensorInfo {
    name: String,
    dtype: String,
    shape: Vec<usize>,
}

/// The tensors a safetensors file declares (its JSON header), without
/// reading the data; `None` when the file is unreadable or not safetensors.
fn header(path: &Path) -> Option<Vec<TensorInfo>> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return None;
    }
    let mut bytes = vec![0u8; n as usize];
    file.read_exact(&mut bytes).ok()?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
    Some(
        map.into_iter()
            .filter(|(k, _)| k != "__metadata__")
            .filter_map(|(name, v)| {
                let dtype = v.get("dtype")?.as_str()?.to_string();
                let shape = v
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()?;
                Some(TensorInfo { name, dtype, shape })
            })
            .collect(),
    )
}

/// Bytes `numel` elements of a stored type take: safetensors dtypes
/// (`F16`, `F8_E4M3`, ...) and GGML block types (`Q8_0`, `Q4_K`, ...);
/// `None` for integer and boolean types (buffers the models do not read).
fn stored_bytes(dtype: &str, numel: u64) -> Option<u64> {
    let (block, bytes) = match dtype {
        "F8_E4M3" | "F8_E5M2" => (1, 1),
        "F16" | "BF16" => (1, 2),
        "F32" => (1, 4),
        "F64" => (1, 8),
        "Q4_0" => (32, 18),
        "Q4_1" => (32, 20),
        "Q5_0" => (32, 22),
        "Q5_1" => (32, 24),
        "Q8_0" => (32, 34),
        "Q2_K" => (256, 84),
        "Q3_K" => (256, 110),
        "Q4_K" => (256, 144),
        "Q5_K" => (256, 176),
        "Q6_K" => (256, 210),
        _ => return None,
    };
    Some(numel.div_ceil(block) * bytes)
}

/// The bytes one tensor holds once loaded (see the module docs), and the
/// extra bytes of the stored copy a LoRA-targetable component keeps of a
/// widened tensor. With `quantization`, a linear weight it applies to
/// holds its quantized size.
fn tensor_bytes(t: &TensorInfo, quantization: Option<Quantization>) -> (u64, u64) {
    let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
    let Some(stored) = stored_bytes(&t.dtype, numel) else {
        return (0, 0);
    };
    // T5's token table is kept in its stored precision (rows widened as
    // looked up); CLIP's tables and T5's position buckets are widened.
    let t5_table = is_t5_token_table(&t.name);
    let matrix = matches!(t.shape.len(), 2 | 4)
        && t.name.ends_with(".weight")
        && (t5_table || !is_embedding_table(&t.name));
    let dense = matches!(t.dtype.as_str(), "F16" | "BF16" | "F32" | "F64");
    match quantization {
        // The quantizing source converts dense linear weights only.
        Some(q) if dense && Quantization::applies(&t.name, &t.shape) => {
            (q.bytes(t.shape[0], t.shape[1]), 0)
        }
        // Half, fp8 and GGML-block matrices stay as stored.
        _ if matrix && !matches!(t.dtype.as_str(), "F32" | "F64") => (stored, 0),
        _ if stored < numel * 4 => (numel * 4, stored),
        _ => (stored, 0),
    }
}

/// The estimated bytes the weights of `model` hold once loaded on the CPU
/// (f32 compute), from the safetensors headers of the components its
/// family loads (`ModelFamily::weight_components`); 0 for a model with
/// synthesised weights ([`ModelDir::with_random_weights`]), of an unknown
/// pipeline class, or whose headers
/// cannot be read (the load itself then reports the problem).
///
/// Within 10 % of the loaded tensors' bytes for every fixture model (the
/// `engine_memory` test measures it).
pub fn estimate_model_bytes(model: &ModelDir) -> u64 {
    if model.random_weights() {
        return 0;
    }
    let Some(family) = model.family() else {
        return 0;
    };
    let mut total = 0;
    for &component in family.weight_components() {
        // An offloaded T5 is loaded only while a prompt is encoded.
        if model.offloaded_t5()
            && matches!(family, ModelFamily::Flux | ModelFamily::FluxFill)
            && component == "text_encoder_2"
        {
            continue;
        }
        let keeps_base = family.lora_components().contains(&component);
        let quantization = model
            .quantization()
            .filter(|_| family.quantized_components().contains(&component));
        let mut count = |t: TensorInfo| {
            let (held, base_copy) = tensor_bytes(&t, quantization);
            total += held + if keeps_base { base_copy } else { 0 };
        };
        // A component file (`--vae FILE`) or a single-file checkpoint
        // gives its components (under their diffusers names), not the
        // config folder.
        let from_file = match model.component_file(component) {
            Some(file) => file.tensor_infos(),
            None => model
                .single_file()
                .map(|f| f.tensor_infos(component))
                .unwrap_or_default(),
        };
        if !from_file.is_empty() {
            for (name, dtype, shape) in from_file {
                count(TensorInfo { name, dtype, shape });
            }
            continue;
        }
        let Ok(files) = model.weight_files(component) else {
            continue;
        };
        for file in files {
            for t in header(&file).unwrap_or_default() {
                count(t);
            }
        }
    }
    total
}
