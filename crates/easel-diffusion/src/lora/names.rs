//! Matching a file's module names to a model's: dotted and underscored
//! (kohya) names, the original Stable Diffusion UNet names and the original
//! FLUX (Black Forest Labs) names.

use std::collections::{HashMap, HashSet};

use super::format::ModuleName;
use crate::models::weights::TensorSource;

/// The module names of one component, to match adapter keys against.
pub(super) struct ModuleIndex {
    /// Dotted module paths that have a `.weight`.
    dotted: HashSet<String>,
    /// `a_b_c` → `a.b.c` (kohya names).
    underscored: HashMap<String, String>,
}

impl ModuleIndex {
    pub(super) fn new(source: &dyn TensorSource) -> Self {
        let dotted: HashSet<String> = source
            .keys()
            .into_iter()
            .filter_map(|k| k.strip_suffix(".weight").map(String::from))
            .collect();
        let underscored = dotted
            .iter()
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        Self {
            dotted,
            underscored,
        }
    }

    /// The weights `name` updates in this component. `layers_per_block`
    /// enables the original-SD UNet names, `flux` the original FLUX ones.
    pub(super) fn resolve(
        &self,
        name: &ModuleName,
        layers_per_block: Option<usize>,
        flux: bool,
    ) -> Option<Target> {
        let single = |m: String| Target {
            modules: vec![m],
            swap_halves: false,
        };
        match name {
            ModuleName::Dotted(m) => [m.clone(), format!("text_model.{m}")]
                .into_iter()
                .find(|c| self.dotted.contains(c))
                .map(single),
            ModuleName::Underscored(m) => {
                if let Some(found) = self.underscored.get(m) {
                    return Some(single(found.clone()));
                }
                if let Some(lpb) = layers_per_block {
                    let mapped = sgm_to_diffusers(m, lpb)?;
                    return self.underscored.get(&mapped).cloned().map(single);
                }
                if flux {
                    let target = flux_bfl_to_diffusers(m)?;
                    return target
                        .modules
                        .iter()
                        .all(|m| self.dotted.contains(m))
                        .then_some(target);
                }
                None
            }
        }
    }
}

/// The weights one layer of a file updates.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Target {
    /// Dotted module paths. A fused layer of the original FLUX code
    /// (`img_attn_qkv`, `linear1`) updates several: its update's rows are
    /// split among them in order, each taking its weight's row count.
    pub(crate) modules: Vec<String>,
    /// The update's two row halves are swapped first: the original FLUX
    /// `final_layer.adaLN_modulation` orders its output (shift, scale),
    /// diffusers' `norm_out.linear` (scale, shift).
    pub(crate) swap_halves: bool,
}

/// Map a module name of the original FLUX code (Black Forest Labs' `flux`
/// repository, as kohya sd-scripts and ComfyUI write LoRAs for it), with
/// underscores (`double_blocks_3_img_attn_qkv`), to the diffusers
/// `FluxTransformer2DModel` modules it updates, following diffusers'
/// `_convert_kohya_flux_lora_to_diffusers`:
///
/// - `double_blocks_{i}_`: `img_attn_qkv` → `attn.to_q/to_k/to_v`,
///   `img_attn_proj` → `attn.to_out.0`, `img_mlp_{0,2}` → `ff.net.{0.proj,2}`,
///   `img_mod_lin` → `norm1.linear`, and `txt_*` likewise →
///   `attn.add_{q,k,v}_proj`, `attn.to_add_out`, `ff_context.*`,
///   `norm1_context.linear`, under `transformer_blocks.{i}`;
/// - `single_blocks_{i}_`: `linear1` → `attn.to_q/to_k/to_v` + `proj_mlp`,
///   `linear2` → `proj_out`, `modulation_lin` → `norm.linear`, under
///   `single_transformer_blocks.{i}`;
/// - `img_in`, `txt_in`, `time_in_*`, `vector_in_*`, `guidance_in_*`,
///   `final_layer_linear`, `final_layer_adaLN_modulation_1` (rows swapped).
///
/// `None` when the name is none of these. Also the key map of FLUX
/// single-file checkpoints ([`crate::loader`]'s `flux_keys`).
pub(crate) fn flux_bfl_to_diffusers(name: &str) -> Option<Target> {
    let target = |modules: Vec<String>| Target {
        modules,
        swap_halves: false,
    };
    let under = |prefix: String, parts: &[&str]| {
        target(parts.iter().map(|p| format!("{prefix}.{p}")).collect())
    };
    let block = |rest: &str| -> Option<(usize, String)> {
        let (i, part) = rest.split_once('_')?;
        Some((i.parse().ok()?, part.to_string()))
    };
    if let Some((i, part)) = name.strip_prefix("double_blocks_").and_then(block) {
        let prefix = format!("transformer_blocks.{i}");
        let parts: &[&str] = match part.as_str() {
            "img_attn_qkv" => &["attn.to_q", "attn.to_k", "attn.to_v"],
            "img_attn_proj" => &["attn.to_out.0"],
            "img_mlp_0" => &["ff.net.0.proj"],
            "img_mlp_2" => &["ff.net.2"],
            "img_mod_lin" => &["norm1.linear"],
            "txt_attn_qkv" => &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "txt_attn_proj" => &["attn.to_add_out"],
            "txt_mlp_0" => &["ff_context.net.0.proj"],
            "txt_mlp_2" => &["ff_context.net.2"],
            "txt_mod_lin" => &["norm1_context.linear"],
            _ => return None,
        };
        return Some(under(prefix, parts));
    }
    if let Some((i, part)) = name.strip_prefix("single_blocks_").and_then(block) {
        let prefix = format!("single_transformer_blocks.{i}");
        let parts: &[&str] = match part.as_str() {
            "linear1" => &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2" => &["proj_out"],
            "modulation_lin" => &["norm.linear"],
            _ => return None,
        };
        return Some(under(prefix, parts));
    }
    let module = match name {
        "img_in" => "x_embedder",
        "txt_in" => "context_embedder",
        "time_in_in_layer" => "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer" => "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer" => "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer" => "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer" => "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer" => "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear" => "proj_out",
        "final_layer_adaLN_modulation_1" => {
            return Some(Target {
                modules: vec!["norm_out.linear".into()],
                swap_halves: true,
            })
        }
        _ => return None,
    };
    Some(target(vec![module.into()]))
}

/// Map an original-Stable-Diffusion UNet module name with underscores
/// (`input_blocks_4_1_transformer_blocks_0_attn1_to_k`) to the diffusers
/// one (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k`),
/// given the UNet's `layers_per_block`. `None` when it is not one.
pub fn sgm_to_diffusers(name: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    let resnet_part = |rest: &str| -> String {
        rest.replace("in_layers_2", "conv1")
            .replace("out_layers_3", "conv2")
            .replace("emb_layers_1", "time_emb_proj")
            .replace("skip_connection", "conv_shortcut")
    };
    let split_ids = |s: &str| -> Option<(usize, usize, String)> {
        let mut it = s.splitn(3, '_');
        let i = it.next()?.parse().ok()?;
        let j = it.next()?.parse().ok()?;
        Some((i, j, it.next().unwrap_or("").to_string()))
    };
    let join = |a: String, rest: &str| {
        if rest.is_empty() {
            a
        } else {
            format!("{a}_{rest}")
        }
    };
    if let Some(s) = name.strip_prefix("input_blocks_") {
        let (i, j, rest) = split_ids(s)?;
        if i == 0 {
            return Some("conv_in".into());
        }
        let (block, layer) = ((i - 1) / per, (i - 1) % per);
        return Some(match (j, rest.as_str()) {
            (0, r) if r.starts_with("op") => join(
                format!("down_blocks_{block}_downsamplers_0_conv"),
                r.trim_start_matches("op").trim_start_matches('_'),
            ),
            (0, r) => join(
                format!("down_blocks_{block}_resnets_{layer}"),
                &resnet_part(r),
            ),
            (1, r) => join(format!("down_blocks_{block}_attentions_{layer}"), r),
            _ => return None,
        });
    }
    if let Some(s) = name.strip_prefix("middle_block_") {
        let (j, rest) = s.split_once('_').unwrap_or((s, ""));
        return Some(match j.parse::<usize>().ok()? {
            0 => join("mid_block_resnets_0".into(), &resnet_part(rest)),
            1 => join("mid_block_attentions_0".into(), rest),
            2 => join("mid_block_resnets_1".into(), &resnet_part(rest)),
            _ => return None,
        });
    }
    if let Some(s) = name.strip_prefix("output_blocks_") {
        let (i, j, rest) = split_ids(s)?;
        let (block, layer) = (i / per, i % per);
        return Some(if rest == "conv" || rest.starts_with("conv_") {
            join(
                format!("up_blocks_{block}_upsamplers_0_conv"),
                rest[4..].trim_start_matches('_'),
            )
        } else {
            match j {
                0 => join(
                    format!("up_blocks_{block}_resnets_{layer}"),
                    &resnet_part(&rest),
                ),
                1 => join(format!("up_blocks_{block}_attentions_{layer}"), &rest),
                _ => return None,
            }
        });
    }
    let simple = [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
    ];
    simple
        .iter()
        .find(|(from, _)| *from == name)
        .map(|(_, to)| to.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::format::component_of;
    use super::*;

    #[test]
    fn original_sd_names_map_to_diffusers() {
        let m = |s| sgm_to_diffusers(s, 2);
        assert_eq!(
            m("input_blocks_4_1_transformer_blocks_0_attn1_to_k").unwrap(),
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
        );
        assert_eq!(
            m("input_blocks_2_0_in_layers_2").unwrap(),
            "down_blocks_0_resnets_1_conv1"
        );
        assert_eq!(
            m("input_blocks_3_0_op").unwrap(),
            "down_blocks_0_downsamplers_0_conv"
        );
        assert_eq!(
            m("middle_block_1_proj_in").unwrap(),
            "mid_block_attentions_0_proj_in"
        );
        assert_eq!(
            m("middle_block_2_emb_layers_1").unwrap(),
            "mid_block_resnets_1_time_emb_proj"
        );
        assert_eq!(
            m("output_blocks_5_1_proj_out").unwrap(),
            "up_blocks_1_attentions_2_proj_out"
        );
        assert_eq!(
            m("output_blocks_2_2_conv").unwrap(),
            "up_blocks_0_upsamplers_0_conv"
        );
        assert_eq!(
            m("output_blocks_2_1_conv").unwrap(),
            "up_blocks_0_upsamplers_0_conv"
        );
        assert_eq!(
            m("output_blocks_0_0_skip_connection").unwrap(),
            "up_blocks_0_resnets_0_conv_shortcut"
        );
        assert!(m("something_else").is_none());
    }

    #[test]
    fn original_flux_names_map_to_diffusers_modules() {
        let t = flux_bfl_to_diffusers("double_blocks_12_txt_attn_qkv").unwrap();
        assert_eq!(
            t.modules,
            [
                "transformer_blocks.12.attn.add_q_proj",
                "transformer_blocks.12.attn.add_k_proj",
                "transformer_blocks.12.attn.add_v_proj"
            ]
        );
        assert!(!t.swap_halves);
        let t = flux_bfl_to_diffusers("single_blocks_3_linear1").unwrap();
        assert_eq!(t.modules.len(), 4);
        assert_eq!(t.modules[3], "single_transformer_blocks.3.proj_mlp");
        let t = flux_bfl_to_diffusers("final_layer_adaLN_modulation_1").unwrap();
        assert_eq!(t.modules, ["norm_out.linear"]);
        assert!(t.swap_halves);
        assert_eq!(
            flux_bfl_to_diffusers("guidance_in_out_layer")
                .unwrap()
                .modules,
            ["time_text_embed.guidance_embedder.linear_2"]
        );
        for bad in [
            "double_blocks_x_img_attn_qkv",
            "double_blocks_0_img_attn_norm",
            "single_blocks_0",
            "down_blocks_0_attentions_0",
        ] {
            assert!(flux_bfl_to_diffusers(bad).is_none(), "{bad}");
        }
        assert_eq!(
            component_of("diffusion_model.double_blocks.0.img_attn.qkv"),
            (
                "transformer".to_string(),
                ModuleName::Underscored("double_blocks_0_img_attn_qkv".into())
            )
        );
        assert_eq!(
            component_of("lora_transformer_single_transformer_blocks_0_proj_out"),
            (
                "transformer".to_string(),
                ModuleName::Underscored("single_transformer_blocks_0_proj_out".into())
            )
        );
    }
}
