//! The shape checks of a component file ([`super::open_component_file`]):
//! the decisive tensors of each component class, with the shapes its
//! config implies (latent channels, widths, cross-attention width, layer
//! counts), so a file of another architecture is refused by name before
//! the model loads; then every tensor against the model's own weights for
//! the component, where those are on disk.

use candle_core::safetensors::MmapedSafetensors;
use serde_json::Value;

use super::component_files::{config_list, config_usize, ComponentFile};
use super::ldm_keys::Op;
use super::ModelDir;

/// One expected shape: a diffusers key, the shape the config implies, and
/// the config facts it follows from (for the message).
struct Expected {
    key: String,
    shape: Vec<usize>,
    because: String,
    required: bool,
}

/// The decisive tensors of a component and their shapes, from its config.
fn expected_shapes(class: &str, config: &Value) -> Vec<Expected> {
    let e = |key: String, shape: Vec<usize>, because: String, required: bool| Expected {
        key,
        shape,
        because,
        required,
    };
    let mut out = Vec::new();
    if class.starts_with("AutoencoderKL") {
        let Some(boc) = config_list(config, "block_out_channels") else {
            return out;
        };
        let (first, last) = (boc[0], boc[boc.len() - 1]);
        let latent = config_usize(config, "latent_channels").unwrap_or(4);
        let in_ch = config_usize(config, "in_channels").unwrap_or(3);
        let out_ch = config_usize(config, "out_channels").unwrap_or(3);
        let lc = format!("latent_channels {latent}, block_out_channels {boc:?}");
        out.push(e(
            "decoder.conv_in.weight".into(),
            vec![last, latent, 3, 3],
            lc.clone(),
            true,
        ));
        out.push(e(
            "encoder.conv_out.weight".into(),
            vec![2 * latent, last, 3, 3],
            lc,
            true,
        ));
        let io = format!("in_channels {in_ch}, out_channels {out_ch}, block_out_channels {boc:?}");
        out.push(e(
            "encoder.conv_in.weight".into(),
            vec![first, in_ch, 3, 3],
            io.clone(),
            true,
        ));
        out.push(e(
            "decoder.conv_out.weight".into(),
            vec![out_ch, first, 3, 3],
            io,
            true,
        ));
    } else if class.starts_with("UNet2DConditionModel") {
        let Some(boc) = config_list(config, "block_out_channels") else {
            return out;
        };
        let (first, last) = (boc[0], boc[boc.len() - 1]);
        let in_ch = config_usize(config, "in_channels").unwrap_or(4);
        let out_ch = config_usize(config, "out_channels").unwrap_or(4);
        let io = format!("in_channels {in_ch}, out_channels {out_ch}, block_out_channels {boc:?}");
        out.push(e(
            "conv_in.weight".into(),
            vec![first, in_ch, 3, 3],
            io.clone(),
            true,
        ));
        out.push(e(
            "conv_out.weight".into(),
            vec![out_ch, first, 3, 3],
            io,
            true,
        ));
        let cross = config
            .get("cross_attention_dim")
            .and_then(|v| v.as_u64().or_else(|| v.as_array()?.last()?.as_u64()))
            .map(|v| v as usize);
        if let Some(cross) = cross {
            out.push(e(
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight".into(),
                vec![last, cross],
                format!("cross_attention_dim {cross}, block_out_channels {boc:?}"),
                false,
            ));
        }
        if config.get("addition_embed_type").and_then(Value::as_str) == Some("text_time") {
            let time = config_usize(config, "time_embedding_dim").unwrap_or(first * 4);
            if let Some(proj) = config_usize(config, "projection_class_embeddings_input_dim") {
                out.push(e(
                    "add_embedding.linear_1.weight".into(),
                    vec![time, proj],
                    format!(
                        "addition_embed_type text_time (SDXL), \
                         projection_class_embeddings_input_dim {proj}"
                    ),
                    true,
                ));
            }
        }
        let blocks = boc.len();
        out.push(e(
            format!("up_blocks.{}.resnets.0.conv1.weight", blocks - 1),
            Vec::new(),
            format!("{blocks} up blocks (block_out_channels {boc:?})"),
            true,
        ));
    } else if class.starts_with("FluxTransformer2DModel") {
        let heads = config_usize(config, "num_attention_heads").unwrap_or(24);
        let head_dim = config_usize(config, "attention_head_dim").unwrap_or(128);
        let inner = heads * head_dim;
        let in_ch = config_usize(config, "in_channels").unwrap_or(64);
        let joint = config_usize(config, "joint_attention_dim").unwrap_or(4096);
        let pooled = config_usize(config, "pooled_projection_dim").unwrap_or(768);
        let width = format!("num_attention_heads {heads} x attention_head_dim {head_dim}");
        out.push(e(
            "x_embedder.weight".into(),
            vec![inner, in_ch],
            format!("{width}, in_channels {in_ch}"),
            true,
        ));
        out.push(e(
            "context_embedder.weight".into(),
            vec![inner, joint],
            format!("{width}, joint_attention_dim {joint}"),
            true,
        ));
        out.push(e(
            "time_text_embed.text_embedder.linear_1.weight".into(),
            vec![inner, pooled],
            format!("{width}, pooled_projection_dim {pooled}"),
            true,
        ));
        for (blocks, name) in [
            ("num_layers", "transformer_blocks"),
            ("num_single_layers", "single_transformer_blocks"),
        ] {
            if let Some(n) = config_usize(config, blocks).filter(|&n| n > 0) {
                out.push(e(
                    format!("{name}.{}.attn.to_q.weight", n - 1),
                    vec![inner, inner],
                    format!("{blocks} {n}, {width}"),
                    true,
                ));
            }
        }
        if config.get("guidance_embeds").and_then(Value::as_bool) == Some(true) {
            out.push(e(
                "time_text_embed.guidance_embedder.linear_1.weight".into(),
                Vec::new(),
                "guidance_embeds true (FLUX.1 dev: a schnell transformer has no guidance \
                 embedder)"
                    .into(),
                true,
            ));
        }
    } else if class.starts_with("CLIPTextModel") {
        let hidden = config_usize(config, "hidden_size").unwrap_or(768);
        let positions = config_usize(config, "max_position_embeddings").unwrap_or(77);
        let because = format!("hidden_size {hidden}, max_position_embeddings {positions}");
        out.push(e(
            "text_model.embeddings.position_embedding.weight".into(),
            vec![positions, hidden],
            because,
            true,
        ));
        if let Some(ff) = config_usize(config, "intermediate_size") {
            out.push(e(
                "text_model.encoder.layers.0.mlp.fc1.weight".into(),
                vec![ff, hidden],
                format!("intermediate_size {ff}, hidden_size {hidden}"),
                true,
            ));
        }
        if let Some(n) = config_usize(config, "num_hidden_layers").filter(|&n| n > 0) {
            out.push(e(
                format!(
                    "text_model.encoder.layers.{}.self_attn.q_proj.weight",
                    n - 1
                ),
                vec![hidden, hidden],
                format!("num_hidden_layers {n}, hidden_size {hidden}"),
                true,
            ));
        }
        if class == "CLIPTextModelWithProjection" {
            let proj = config_usize(config, "projection_dim").unwrap_or(hidden);
            out.push(e(
                "text_projection.weight".into(),
                vec![proj, hidden],
                format!("CLIPTextModelWithProjection, projection_dim {proj}"),
                true,
            ));
        }
    } else if class.starts_with("T5EncoderModel") {
        let d_model = config_usize(config, "d_model").unwrap_or(512);
        let inner = config_usize(config, "num_heads").unwrap_or(8)
            * config_usize(config, "d_kv").unwrap_or(64);
        let because = format!("d_model {d_model}, num_heads x d_kv {inner}");
        out.push(e(
            "encoder.block.0.layer.0.SelfAttention.q.weight".into(),
            vec![inner, d_model],
            because,
            true,
        ));
        if let Some(n) = config_usize(config, "num_layers").filter(|&n| n > 0) {
            out.push(e(
                format!("encoder.block.{}.layer.0.SelfAttention.q.weight", n - 1),
                vec![inner, d_model],
                format!("num_layers {n}"),
                true,
            ));
        }
    }
    out
}

/// Checks `file`'s shapes: the config's decisive tensors, then every
/// tensor the model's own weights for the component also hold.
pub(super) fn check_shapes(
    model: &ModelDir,
    file: &ComponentFile,
    class: &str,
    config: &Value,
) -> std::result::Result<(), String> {
    let component = file.component();
    let shown = |name: &str, key: &str| {
        if name == key {
            format!("`{key}`")
        } else {
            format!("`{key}` (diffusers `{name}`)")
        }
    };
    let same = |found: &[usize], want: &[usize], op: Op| {
        found == want
            || (op == Op::Reshape
                && found.iter().product::<usize>() == want.iter().product::<usize>())
    };
    let head = format!(
        "{} ({component} file, {} layout)",
        file.path().display(),
        file.layout().name()
    );
    for want in expected_shapes(class, config) {
        match file.shape(&want.key) {
            Some((found, key, op)) if !want.shape.is_empty() && !same(&found, &want.shape, op) => {
                return Err(format!(
                    "{head}: tensor {} has shape {found:?}, but this model's `{component}` \
                     ({class}; {}) needs {:?}: the file is a {component} of another \
                     architecture",
                    shown(&want.key, key),
                    want.because,
                    want.shape
                ));
            }
            Some(_) => {}
            None if want.required => {
                return Err(format!(
                    "{head}: it has no tensor for `{}`{}, which this model's `{component}` \
                     ({class}; {}) needs: the file is a {component} of another architecture",
                    want.key,
                    if file.prefix().is_empty() {
                        String::new()
                    } else {
                        format!(" (looked under the prefix `{}`)", file.prefix())
                    },
                    want.because
                ));
            }
            None => {}
        }
    }
    // Every tensor against the model's own weights, where they are on disk.
    let own: Vec<(String, Vec<usize>)> = match model.single_file() {
        Some(single) if single.components().any(|c| c == component) => single
            .tensor_infos(component)
            .into_iter()
            .map(|(name, _, shape)| (name, shape))
            .collect(),
        _ => match model.weight_files(component) {
            // SAFETY: read-only mapping of the model's own weights, headers only.
            Ok(files) => match unsafe { MmapedSafetensors::multi(&files) } {
                Ok(t) => t
                    .tensors()
                    .into_iter()
                    .map(|(k, v)| (k, v.shape().to_vec()))
                    .collect(),
                Err(_) => Vec::new(),
            },
            Err(_) => Vec::new(),
        },
    };
    let mut own = own;
    own.sort();
    for (name, want) in own {
        if let Some((found, key, op)) = file.shape(&name) {
            if !same(&found, &want, op) {
                return Err(format!(
                    "{head}: tensor {} has shape {found:?}, but the model's own `{component}` \
                     weights have {want:?}: the file is a {component} of another architecture",
                    shown(&name, key)
                ));
            }
        }
    }
    Ok(())
}
