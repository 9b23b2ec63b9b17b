//! LoRA adapters (Hu et al. 2021, arXiv:2106.09685): low-rank updates
//! `W' = W + scale · (α / r) · up · down` of a pipeline's weights, merged
//! into the UNet and text encoders with a scale per adapter; several stack.
//!
//! File layouts read (safetensors), as diffusers' `load_lora_weights` does:
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` (down, `(r, in)`) and
//!   `lora_B.weight` (up, `(out, r)`); `text_encoder.<module>...`,
//!   `text_encoder_2.<module>...` (SDXL); the older diffusers spellings
//!   `<module>.lora.down.weight` / `lora.up.weight`,
//!   `<module>.lora_linear_layer.down/up.weight` and attention-processor
//!   keys (`attn1.processor.to_q_lora.down.weight`); keys with no component
//!   prefix are the UNet's. No `alpha`: α = r (scale 1).
//! - kohya-ss: `lora_unet_<module_with_underscores>.lora_down.weight`,
//!   `lora_up.weight` and `.alpha` (α; the update is scaled by α / r);
//!   `lora_te_` / `lora_te1_` for the (first) text encoder, `lora_te2_` for
//!   SDXL's second. UNet names may use the diffusers module names or the
//!   original Stable Diffusion ones (`input_blocks_4_1_...`,
//!   `middle_block_1_...`, `output_blocks_...`), which are mapped as
//!   diffusers' `_maybe_map_sgm_blocks_to_diffusers` does. Underscore names
//!   are matched against the model's own module names, so they are never
//!   guessed.
//! - FLUX (`FluxTransformer2DModel`): the PEFT layout with `transformer.`
//!   (ai-toolkit, diffusers' trainers; `lora_down`/`lora_up`/`alpha`
//!   spellings too); kohya sd-scripts' `lora_unet_` keys with the original
//!   Black Forest Labs names (`double_blocks_0_img_attn_qkv`, fused q/k/v
//!   and `single_blocks_N_linear1` split by rows among the diffusers
//!   modules, see `names::flux_bfl_to_diffusers`), the same names with ComfyUI's
//!   `diffusion_model.` prefix, and `lora_transformer_` with diffusers names;
//!   `lora_te1_` for the CLIP text encoder. Unprefixed keys and `lora_unet_`
//!   name the transformer of a FLUX pipeline. Unlike diffusers 0.42.1, whose
//!   converter drops them, the kohya non-block layers (`img_in`, `txt_in`,
//!   `time_in`, `vector_in`, `guidance_in`, `final_layer`) are applied, with
//!   their α, as kohya's and ComfyUI's loaders do.
//!
//! Linear and convolution weights are supported (a convolution's update is
//! `up (out, r, 1, 1) · down (r, in, k, k)`). LyCORIS variants (LoHa, LoKr,
//! DoRA, `lora_mid`) are refused with an error naming the key.
//!
//! How adapters are applied: a pipeline keeps each targetable component's
//! weights in a [`CachedSource`](crate::models::weights::CachedSource)
//! (the tensors its models hold). Setting a new adapter set computes the merged updates, then rebuilds the affected
//! components from the cache with the updates added ([`LoraOverlay`]), and
//! swaps them in. Nothing is read from the weight files again, unmerging is
//! exact (the base tensors are untouched), and a switched pipeline computes
//! the same numbers as a freshly loaded one with the same adapters. The cost
//! of a switch is the update products (`out·in·r` per layer) and the sums
//! `W + ΔW` of the targeted weights; the extra memory, the merged copies of
//! the targeted weights.
//!
//! Layout: `format` reads and checks the files, `names` maps their module
//! names onto a model's, `merge` computes the updates and overlays them on
//! the base weights, `state` keeps a pipeline's adapter set, and `resolve`
//! finds the file a reference names.

use std::path::PathBuf;

mod format;
mod merge;
pub(crate) mod names;
mod resolve;
mod state;

pub use format::{check_lora_bytes, check_lora_file, LoraAdapter};
pub use merge::{merge_deltas, LoraDeltas, LoraOverlay};
pub use names::sgm_to_diffusers;
pub use resolve::{lora_by_name, resolve_lora};
pub use state::LoraState;

/// One adapter to apply: a LoRA safetensors file and its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file (see [`resolve_lora`] for folders and repo ids).
    pub path: PathBuf,
    /// The multiplier of the update (`lora_scale`; the product API accepts
    /// -1..=3). kohya files are further scaled by their α / r.
    pub scale: f64,
}

impl LoraSpec {
    /// An adapter at `scale`.
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        Self {
            path: path.into(),
            scale,
        }
    }
}
