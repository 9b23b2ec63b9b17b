//! The key names of FLUX.1 transformer single files in the original Black
//! Forest Labs layout (`double_blocks.N.img_attn.qkv.weight`,
//! `single_blocks.N.linear1.weight`, ...; as BFL publishes them, and with
//! the `model.diffusion_model.` prefix as ComfyUI saves them), renamed to
//! diffusers' `FluxTransformer2DModel` names.
//!
//! The module map is the one FLUX LoRAs in the original names use
//! ([`crate::lora::names::flux_bfl_to_diffusers`], after diffusers'
//! `convert_flux_transformer_checkpoint_to_diffusers`); this adds the
//! per-tensor details: the RMS norms' `scale`, and the row split of fused
//! tensors, whose sizes come from the file's shapes (the model width is
//! `img_in.weight`'s row count), never from FLUX.1's real size.

use super::ldm_keys::Op;
use crate::lora::names::flux_bfl_to_diffusers;

/// The ComfyUI prefix of a FLUX transformer's keys, stripped when present.
pub(crate) const COMFY_PREFIX: &str = "model.diffusion_model.";

/// The diffusers keys `key` (a BFL key, prefix stripped) holds and how each
/// is cut from it, for a tensor with `rows` rows (its first dimension) in a
/// model of width `hidden`. Empty for a key diffusers has no place for, or
/// a fused tensor whose rows do not split as the architecture says.
///
/// - `*.qkv.{weight,bias}`: three equal row slices (q, k, v);
/// - `single_blocks.N.linear1.*`: q, k, v of `hidden` rows each, then the
///   MLP input (the remaining rows);
/// - `final_layer.adaLN_modulation.1.*`: its halves swapped (BFL orders
///   (shift, scale), diffusers' `norm_out.linear` (scale, shift));
/// - `*.norm.{query,key}_norm.scale`: the attention RMS norms' weights.
pub(crate) fn flux_keys(key: &str, rows: usize, hidden: usize) -> Vec<(String, Op)> {
    let Some((module, param)) = key.rsplit_once('.') else {
        return Vec::new();
    };
    if param == "scale" {
        return norm_key(module)
            .map(|k| vec![(k, Op::Same)])
            .unwrap_or_default();
    }
    if param != "weight" && param != "bias" {
        return Vec::new();
    }
    let Some(target) = flux_bfl_to_diffusers(&module.replace('.', "_")) else {
        return Vec::new();
    };
    let name = |m: &str| format!("{m}.{param}");
    match target.modules.as_slice() {
        [one] if target.swap_halves => vec![(name(one), Op::SwapHalves)],
        [one] => vec![(name(one), Op::Same)],
        [q, k, v] => (0..3)
            .zip([q, k, v])
            .map(|(index, m)| (name(m), Op::Chunk { index, parts: 3 }))
            .collect(),
        [q, k, v, mlp] if hidden > 0 && rows > 3 * hidden => [q, k, v]
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    name(m),
                    Op::Rows {
                        start: i * hidden,
                        len: hidden,
                    },
                )
            })
            .chain([(
                name(mlp),
                Op::Rows {
                    start: 3 * hidden,
                    len: rows - 3 * hidden,
                },
            )])
            .collect(),
        _ => Vec::new(),
    }
}

/// The diffusers key of an attention RMS norm's `scale` (`module` without
/// `.scale`).
fn norm_key(module: &str) -> Option<String> {
    let (block, rest) = if let Some(rest) = module.strip_prefix("double_blocks.") {
        ("transformer_blocks", rest)
    } else {
        (
            "single_transformer_blocks",
            module.strip_prefix("single_blocks.")?,
        )
    };
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let norm = match (block, rest) {
        ("transformer_blocks", "img_attn.norm.query_norm") => "norm_q",
        ("transformer_blocks", "img_attn.norm.key_norm") => "norm_k",
        ("transformer_blocks", "txt_attn.norm.query_norm") => "norm_added_q",
        ("transformer_blocks", "txt_attn.norm.key_norm") => "norm_added_k",
        ("single_transformer_blocks", "norm.query_norm") => "norm_q",
        ("single_transformer_blocks", "norm.key_norm") => "norm_k",
        _ => return None,
    };
    Some(format!("{block}.{i}.attn.{norm}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_tensors_split_by_the_given_width() {
        let keys = flux_keys("single_blocks.3.linear1.weight", 160, 32);
        assert_eq!(
            keys,
            vec![
                (
                    "single_transformer_blocks.3.attn.to_q.weight".to_string(),
                    Op::Rows { start: 0, len: 32 }
                ),
                (
                    "single_transformer_blocks.3.attn.to_k.weight".to_string(),
                    Op::Rows { start: 32, len: 32 }
                ),
                (
                    "single_transformer_blocks.3.attn.to_v.weight".to_string(),
                    Op::Rows { start: 64, len: 32 }
                ),
                (
                    "single_transformer_blocks.3.proj_mlp.weight".to_string(),
                    Op::Rows { start: 96, len: 64 }
                ),
            ]
        );
        // FLUX.1 at real size: width 3072, MLP 4 x 3072.
        assert_eq!(
            flux_keys("single_blocks.37.linear1.bias", 21504, 3072)[3],
            (
                "single_transformer_blocks.37.proj_mlp.bias".to_string(),
                Op::Rows {
                    start: 9216,
                    len: 12288
                }
            )
        );
        // Too few rows for q, k, v of that width: no mapping.
        assert!(flux_keys("single_blocks.3.linear1.weight", 96, 32).is_empty());
        assert_eq!(
            flux_keys("double_blocks.0.txt_attn.qkv.bias", 96, 32)[2],
            (
                "transformer_blocks.0.attn.add_v_proj.bias".to_string(),
                Op::Chunk { index: 2, parts: 3 }
            )
        );
    }

    #[test]
    fn norms_embedders_and_final_layer() {
        assert_eq!(
            flux_keys("double_blocks.1.txt_attn.norm.key_norm.scale", 16, 32),
            vec![(
                "transformer_blocks.1.attn.norm_added_k.weight".to_string(),
                Op::Same
            )]
        );
        assert_eq!(
            flux_keys("single_blocks.0.norm.query_norm.scale", 16, 32),
            vec![(
                "single_transformer_blocks.0.attn.norm_q.weight".to_string(),
                Op::Same
            )]
        );
        assert_eq!(
            flux_keys("guidance_in.out_layer.weight", 32, 32),
            vec![(
                "time_text_embed.guidance_embedder.linear_2.weight".to_string(),
                Op::Same
            )]
        );
        assert_eq!(
            flux_keys("final_layer.adaLN_modulation.1.bias", 64, 32),
            vec![("norm_out.linear.bias".to_string(), Op::SwapHalves)]
        );
        assert!(flux_keys("double_blocks.0.img_attn.unknown.weight", 32, 32).is_empty());
    }
}
