//! The key names of single-file checkpoints in the original (LDM /
//! CompVis, A1111, ComfyUI) layout, renamed to the diffusers / transformers
//! names the models load.
//!
//! The rules follow diffusers' `loaders/single_file_utils.py`
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written
//! as a per-key rename so the tensors are read straight from the mapped
//! file: each LDM key gives the diffusers key(s) it holds and how its
//! tensor is reshaped ([`Op`]).

/// How a stored tensor becomes the tensor a diffusers key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// As stored.
    Same,
    /// Reshaped to the shape the model asks (same element count): the VAE
    /// attention projections are 1x1 convolutions `[c, c, 1, 1]` in LDM
    /// files and linear `[c, c]` in diffusers.
    Reshape,
    /// Part `index` of `parts` equal slices along the first dimension:
    /// OpenCLIP's fused `in_proj_weight` / `in_proj_bias` hold q, k, v.
    Chunk { index: usize, parts: usize },
    /// Transposed: OpenCLIP's `text_projection` is stored `[in, out]`,
    /// a linear weight is `[out, in]`.
    Transpose,
    /// Rows `start..start + len` along the first dimension: FLUX's fused
    /// `linear1` holds q, k, v and the MLP input, of unequal sizes.
    Rows { start: usize, len: usize },
    /// The two halves of the first dimension swapped: FLUX's
    /// `final_layer.adaLN_modulation` orders (shift, scale), diffusers'
    /// `norm_out.linear` (scale, shift).
    SwapHalves,
}

/// The diffusers UNet key of `key` (an LDM UNet key without its
/// `model.diffusion_model.` prefix), for a UNet with `layers_per_block`
/// resnets per down block; `None` for a key diffusers has no place for.
pub(crate) fn unet_key(key: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    for (ldm, diffusers) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
        ("middle_block.1.", "mid_block.attentions.0."),
    ] {
        if let Some(rest) = key.strip_prefix(ldm) {
            return Some(if diffusers.contains("resnets") {
                format!("{diffusers}{}", resnet(rest)?)
            } else {
                format!("{diffusers}{rest}")
            });
        }
    }
    if let Some((n, sub, rest)) = block_parts(key, "input_blocks.") {
        // input_blocks.N (N >= 1): block (N-1)/per, layer (N-1)%per; the
        // last layer of a block is its downsampler.
        let n = n.checked_sub(1)?;
        let (block, layer) = (n / per, n % per);
        if layer == layers_per_block {
            let rest = rest.strip_prefix("op.")?;
            return (sub == 0).then(|| format!("down_blocks.{block}.downsamplers.0.conv.{rest}"));
        }
        return match sub {
            0 => Some(format!(
                "down_blocks.{block}.resnets.{layer}.{}",
                resnet(rest)?
            )),
            1 => Some(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    // output_blocks.N: block N/per, layer N%per; the last layer of a block
    // ends with its upsampler (after the attention, when there is one).
    let (n, sub, rest) = block_parts(key, "output_blocks.")?;
    let (block, layer) = (n / per, n % per);
    if sub > 0 {
        if let Some(conv) = rest.strip_prefix("conv.") {
            return Some(format!("up_blocks.{block}.upsamplers.0.conv.{conv}"));
        }
    }
    match sub {
        0 => Some(format!(
            "up_blocks.{block}.resnets.{layer}.{}",
            resnet(rest)?
        )),
        1 => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
        _ => None,
    }
}

/// `prefix N.S.rest` split into (N, S, rest).
fn block_parts<'a>(key: &'a str, prefix: &str) -> Option<(usize, usize, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('.')?;
    let (s, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, s.parse().ok()?, rest))
}

/// A UNet resnet's LDM sub-key in diffusers' names.
fn resnet(rest: &str) -> Option<String> {
    for (ldm, diffusers) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(tail) = rest.strip_prefix(ldm) {
            return Some(format!("{diffusers}{tail}"));
        }
    }
    None
}

/// The diffusers VAE key of `key` (an LDM VAE key without its
/// `first_stage_model.` prefix) and its [`Op`], for a VAE with
/// `up_blocks` decoder blocks (`len(block_out_channels)`: LDM numbers the
/// decoder's blocks from the lowest resolution up, diffusers from the top).
pub(crate) fn vae_key(key: &str, up_blocks: usize) -> Option<(String, Op)> {
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Some((key.to_string(), Op::Same));
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let same = |s: String| Some((format!("{side}.{s}"), Op::Same));
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return same(rest.to_string());
    }
    if let Some(tail) = rest.strip_prefix("norm_out.") {
        return same(format!("conv_norm_out.{tail}"));
    }
    if let Some(tail) = rest.strip_prefix("mid.block_1.") {
        return same(format!("mid_block.resnets.0.{}", vae_resnet(tail)));
    }
    if let Some(tail) = rest.strip_prefix("mid.block_2.") {
        return same(format!("mid_block.resnets.1.{}", vae_resnet(tail)));
    }
    if let Some(tail) = rest.strip_prefix("mid.attn_1.") {
        let (name, param) = tail.split_once('.')?;
        let name = match name {
            "norm" => return same(format!("mid_block.attentions.0.group_norm.{param}")),
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some((
            format!("{side}.mid_block.attentions.0.{name}.{param}"),
            Op::Reshape,
        ));
    }
    let (blocks, sample, diffusers_blocks) = if side == "encoder" {
        ("down.", "downsample.", "down_blocks")
    } else {
        ("up.", "upsample.", "up_blocks")
    };
    let tail = rest.strip_prefix(blocks)?;
    let (i, tail) = tail.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let block = if side == "encoder" {
        i
    } else {
        up_blocks.checked_sub(i + 1)?
    };
    if let Some(conv) = tail.strip_prefix(sample) {
        let sampler = if side == "encoder" {
            "downsamplers"
        } else {
            "upsamplers"
        };
        return same(format!("{diffusers_blocks}.{block}.{sampler}.0.{conv}"));
    }
    let tail = tail.strip_prefix("block.")?;
    let (j, tail) = tail.split_once('.')?;
    let j: usize = j.parse().ok()?;
    same(format!(
        "{diffusers_blocks}.{block}.resnets.{j}.{}",
        vae_resnet(tail)
    ))
}

fn vae_resnet(tail: &str) -> String {
    match tail.strip_prefix("nin_shortcut.") {
        Some(p) => format!("conv_shortcut.{p}"),
        None => tail.to_string(),
    }
}

/// The transformers `CLIPTextModel` key of `key`, an OpenAI CLIP text
/// encoder key of an LDM file without its prefix
/// (`cond_stage_model.transformer.`, `conditioner.embedders.0.transformer.`):
/// the same names, under `text_model.` (which some old files leave out).
pub(crate) fn clip_key(key: &str) -> String {
    if key.starts_with("text_model.") || key == "text_projection.weight" {
        key.to_string()
    } else {
        format!("text_model.{key}")
    }
}

/// The transformers CLIP text encoder keys of `key`, an OpenCLIP text
/// encoder key without its prefix (`cond_stage_model.model.`,
/// `conditioner.embedders.1.model.`), each with its [`Op`]: the fused
/// attention input projection gives three keys.
pub(crate) fn open_clip_keys(key: &str) -> Vec<(String, Op)> {
    let one = |k: String| vec![(k, Op::Same)];
    match key {
        "token_embedding.weight" => {
            return one("text_model.embeddings.token_embedding.weight".into())
        }
        "positional_embedding" => {
            return one("text_model.embeddings.position_embedding.weight".into())
        }
        "text_projection" => return vec![("text_projection.weight".into(), Op::Transpose)],
        _ => {}
    }
    if let Some(p) = key.strip_prefix("ln_final.") {
        return one(format!("text_model.final_layer_norm.{p}"));
    }
    let Some(tail) = key.strip_prefix("transformer.resblocks.") else {
        return Vec::new();
    };
    let Some((layer, tail)) = tail.split_once('.') else {
        return Vec::new();
    };
    let base = format!("text_model.encoder.layers.{layer}");
    let param = match tail {
        "attn.in_proj_weight" => Some("weight"),
        "attn.in_proj_bias" => Some("bias"),
        _ => None,
    };
    if let Some(param) = param {
        return ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .map(|(index, p)| {
                (
                    format!("{base}.self_attn.{p}.{param}"),
                    Op::Chunk { index, parts: 3 },
                )
            })
            .collect();
    }
    for (ldm, diffusers) in [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ] {
        if let Some(p) = tail.strip_prefix(ldm) {
            return one(format!("{base}.{diffusers}{p}"));
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_follow_the_block_layout() {
        let k = |s| unet_key(s, 2);
        assert_eq!(k("input_blocks.0.0.weight").unwrap(), "conv_in.weight");
        assert_eq!(
            k("input_blocks.1.0.in_layers.2.weight").unwrap(),
            "down_blocks.0.resnets.0.conv1.weight"
        );
        assert_eq!(
            k("input_blocks.5.1.proj_in.weight").unwrap(),
            "down_blocks.1.attentions.1.proj_in.weight"
        );
        assert_eq!(
            k("input_blocks.3.0.op.bias").unwrap(),
            "down_blocks.0.downsamplers.0.conv.bias"
        );
        assert_eq!(
            k("output_blocks.2.1.conv.weight").unwrap(),
            "up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            k("output_blocks.5.2.conv.weight").unwrap(),
            "up_blocks.1.upsamplers.0.conv.weight"
        );
        assert_eq!(
            k("output_blocks.4.0.skip_connection.weight").unwrap(),
            "up_blocks.1.resnets.1.conv_shortcut.weight"
        );
        assert_eq!(
            k("output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight").unwrap(),
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight"
        );
        assert_eq!(
            k("middle_block.2.emb_layers.1.bias").unwrap(),
            "mid_block.resnets.1.time_emb_proj.bias"
        );
        assert_eq!(
            k("label_emb.0.2.weight").unwrap(),
            "add_embedding.linear_2.weight"
        );
        assert_eq!(k("input_blocks.3.1.foo"), None);
        assert_eq!(k("something.else"), None);
    }

    #[test]
    fn vae_and_clip_keys() {
        assert_eq!(
            vae_key("decoder.up.0.upsample.conv.weight", 3),
            Some((
                "decoder.up_blocks.2.upsamplers.0.conv.weight".into(),
                Op::Same
            ))
        );
        assert_eq!(
            vae_key("encoder.mid.attn_1.q.weight", 3),
            Some((
                "encoder.mid_block.attentions.0.to_q.weight".into(),
                Op::Reshape
            ))
        );
        assert_eq!(
            vae_key("encoder.down.1.block.0.nin_shortcut.bias", 3)
                .unwrap()
                .0,
            "encoder.down_blocks.1.resnets.0.conv_shortcut.bias"
        );
        assert_eq!(vae_key("decoder.up.5.block.0.conv1.weight", 3), None);
        assert_eq!(
            open_clip_keys("transformer.resblocks.3.attn.in_proj_bias")[2],
            (
                "text_model.encoder.layers.3.self_attn.v_proj.bias".into(),
                Op::Chunk { index: 2, parts: 3 }
            )
        );
        assert_eq!(
            clip_key("embeddings.token_embedding.weight"),
            "text_model.embeddings.token_embedding.weight"
        );
    }
}
