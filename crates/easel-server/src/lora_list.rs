//! The LoRA files a `loras[].path` can name by file name: those of the
//! model roots' A1111 (`Lora`) and ComfyUI (`loras`) folders, described
//! from their headers (`GET /v1/loras`).

use easel_diffusion::loader::{list_model_files, FileKind};

use crate::config::Config;

/// A LoRA file listed by `GET /v1/loras`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct LoraEntry {
    /// Its file name without the extension: what `loras[].path` takes.
    pub id: String,
    /// Always `lora`.
    pub object: String,
    /// The model family it was made for (`SD 1.x`, `SDXL`, `FLUX.1 dev`,
    /// ...) when its header says, else `unknown: REASON` or `null`.
    pub family: Option<String>,
    /// `safetensors` (read), or `pickle` and the like (refused when used).
    pub format: String,
    /// Bytes on disk.
    pub size_bytes: u64,
}

/// The LoRA files under the model roots of `config`, by name.
pub fn list_loras(config: &Config) -> Vec<LoraEntry> {
    let mut out: Vec<LoraEntry> = list_model_files(&config.model_roots())
        .into_iter()
        .filter(|f| f.kind == FileKind::Lora)
        .map(|f| LoraEntry {
            id: f.name,
            object: "lora".into(),
            family: f
                .family
                .or(f.unknown_reason.map(|why| format!("unknown: {why}"))),
            format: serde_json::to_value(f.format)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            size_bytes: f.size_bytes,
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}
