//! Each network of the tiny fixture models against transformers / diffusers
//! outputs on fixed inputs (`tests/fixtures/generated/components.safetensors`,
//! made by `tools/gen_component_refs.py`).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use easel_diffusion::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use easel_diffusion::models::clip_text::{ClipTextConfig, ClipTextModel};
use easel_diffusion::models::unet_2d_condition::{
    TextTimeConditioning, UNet2DConditionConfig, UNet2DConditionModel,
};

fn refs() -> std::collections::HashMap<String, Tensor> {
    load_refs("generated/components.safetensors")
}

fn input_ids(r: &std::collections::HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    let ids = r["text.input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    ids.to_vec2::<u32>().unwrap()
}

#[test]
fn clip_text_encoders_match_transformers() {
    let r = refs();
    let ids = input_ids(&r);
    for (name, folder, sub) in [
        ("sd15", "tiny-sd15", "text_encoder"),
        ("sd2v", "tiny-sd2-v", "text_encoder"),
        ("sdxl", "tiny-sdxl", "text_encoder_2"),
    ] {
        let cfg = ClipTextConfig::from_file(&model(folder).join(sub).join("config.json")).unwrap();
        let m = ClipTextModel::load(&component_weights(folder, sub), &cfg).unwrap();
        let o = m.forward(&ids, &Device::Cpu).unwrap();
        let key = format!("text.{name}.{sub}");
        assert_close(
            &format!("{key} last"),
            &o.last_hidden_state,
            &r[&format!("{key}.last_hidden_state")],
            1e-5,
        );
        let pen = &o.hidden_states[o.hidden_states.len() - 2];
        assert_close(
            &format!("{key} penultimate"),
            pen,
            &r[&format!("{key}.penultimate")],
            1e-5,
        );
        match o.text_embeds {
            Some(te) => assert_close(
                &format!("{key} text_embeds"),
                &te,
                &r[&format!("{key}.text_embeds")],
                1e-5,
            ),
            None => assert_close(
                &format!("{key} pooled"),
                &o.pooled_output,
                &r[&format!("{key}.pooled")],
                1e-5,
            ),
        }
    }
}

#[test]
fn unets_match_diffusers_including_odd_latent_sizes() {
    let r = refs();
    for (name, folder) in [
        ("sd15", "tiny-sd15"),
        ("sd15_odd", "tiny-sd15"),
        ("sd2v", "tiny-sd2-v"),
        ("sdxl", "tiny-sdxl"),
        ("sdxl_odd", "tiny-sdxl"),
    ] {
        let cfg =
            UNet2DConditionConfig::from_file(&model(folder).join("unet/config.json")).unwrap();
        let unet = UNet2DConditionModel::load(&component_weights(folder, "unet"), &cfg).unwrap();
        let k = |s: &str| r[&format!("unet.{name}.{s}")].clone();
        let t = k("timestep").to_vec1::<f32>().unwrap()[0] as f64;
        let time_ids: Vec<[f64; 6]>;
        let text_embeds;
        let tt = if cfg.uses_text_time() {
            text_embeds = k("text_embeds");
            time_ids = k("time_ids")
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|row| std::array::from_fn(|i| row[i] as f64))
                .collect();
            Some(TextTimeConditioning {
                text_embeds: &text_embeds,
                time_ids: &time_ids,
            })
        } else {
            None
        };
        let out = unet.forward(&k("sample"), t, &k("context"), tt).unwrap();
        assert_close(&format!("unet {name}"), &out, &k("out"), 1e-5);
    }
}

#[test]
fn vae_decoder_and_encoder_match_diffusers() {
    let r = refs();
    let cfg = AutoencoderKLConfig::from_file(&model("tiny-sd15").join("vae/config.json")).unwrap();
    let vae = AutoencoderKL::load(&component_weights("tiny-sd15", "vae"), &cfg, true).unwrap();
    assert_eq!(cfg.vae_scale_factor(), 8);
    let decoded = vae.decode(&r["vae.sd15.z"]).unwrap();
    assert_close("vae decode", &decoded, &r["vae.sd15.decoded"], 1e-5);
    let dist = vae.encode(&r["vae.sd15.x"]).unwrap();
    assert_close("vae mean", &dist.mean, &r["vae.sd15.mean"], 1e-5);
    assert_close("vae std", &dist.std, &r["vae.sd15.std"], 1e-5);
}

// FLUX.1 (issue 5): `tests/fixtures/generated/flux_components.safetensors`,
// made by `tools/gen_flux_component_refs.py`.

fn flux_refs() -> std::collections::HashMap<String, Tensor> {
    load_refs("generated/flux_components.safetensors")
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
}

#[test]
fn t5_relative_position_buckets_match_transformers() {
    use easel_diffusion::models::t5::relative_position_bucket;
    let r = flux_refs();
    let positions: Vec<i64> = r["t5.relative_positions"].to_vec1().unwrap();
    for (nb, md) in [(8usize, 128usize), (32, 128)] {
        let want: Vec<i64> = r[&format!("t5.buckets.{nb}_{md}")].to_vec1().unwrap();
        for (p, w) in positions.iter().zip(&want) {
            assert_eq!(
                relative_position_bucket(*p, nb, md) as i64,
                *w,
                "position {p}, {nb} buckets"
            );
        }
    }
}

#[test]
fn flux_t5_encoder_matches_transformers() {
    use easel_diffusion::models::t5::{T5Config, T5EncoderModel};
    let r = flux_refs();
    let dir = model("tiny-flux-dev").join("text_encoder_2");
    let cfg = T5Config::from_file(&dir.join("config.json")).unwrap();
    let t5 =
        T5EncoderModel::load(&component_weights("tiny-flux-dev", "text_encoder_2"), &cfg).unwrap();
    let out = t5
        .forward(&ids_of(&r["t5.input_ids"]), &Device::Cpu)
        .unwrap();
    assert_close(
        "t5 last_hidden_state",
        &out,
        &r["t5.last_hidden_state"],
        1e-5,
    );
    assert!(t5.forward(&[vec![0, 9]], &Device::Cpu).is_err());
}

#[test]
fn flux_clip_pooled_output_matches_transformers() {
    let r = flux_refs();
    let dir = model("tiny-flux-dev").join("text_encoder");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let m = ClipTextModel::load(&component_weights("tiny-flux-dev", "text_encoder"), &cfg).unwrap();
    let o = m
        .forward(&ids_of(&r["clip.input_ids"]), &Device::Cpu)
        .unwrap();
    assert_close("clip pooled", &o.pooled_output, &r["clip.pooled"], 1e-5);
}

#[test]
fn flux_rotary_embeddings_match_diffusers() {
    use easel_diffusion::models::flux_transformer::FluxPosEmbed;
    let r = flux_refs();
    let (cos, sin) = FluxPosEmbed::new(10000.0, vec![16, 56, 56])
        .forward(&r["rope.ids"])
        .unwrap();
    assert_close("rope cos", &cos, &r["rope.cos"], 1e-6);
    assert_close("rope sin", &sin, &r["rope.sin"], 1e-6);
}

#[test]
fn flux_transformers_match_diffusers() {
    use easel_diffusion::models::flux_transformer::{
        FluxTransformer2DConfig, FluxTransformer2DModel, FluxTransformerInput,
    };
    let r = flux_refs();
    for name in ["schnell", "dev", "fill"] {
        let folder = format!("tiny-flux-{name}");
        let cfg =
            FluxTransformer2DConfig::from_file(&model(&folder).join("transformer/config.json"))
                .unwrap();
        let tr =
            FluxTransformer2DModel::load(&component_weights(&folder, "transformer"), &cfg).unwrap();
        let k = |s: &str| r[&format!("transformer.{name}.{s}")].clone();
        let timestep: Vec<f32> = k("timestep").to_vec1().unwrap();
        let guidance: Option<Vec<f32>> = r
            .get(&format!("transformer.{name}.guidance"))
            .map(|g| g.to_vec1().unwrap());
        let (hidden, context, pooled, img_ids, txt_ids) = (
            k("hidden_states"),
            k("encoder_hidden_states"),
            k("pooled_projections"),
            k("img_ids"),
            k("txt_ids"),
        );
        let out = tr
            .forward(&FluxTransformerInput {
                hidden_states: &hidden,
                encoder_hidden_states: &context,
                pooled_projections: &pooled,
                timestep: &timestep,
                img_ids: &img_ids,
                txt_ids: &txt_ids,
                guidance: guidance.as_deref(),
            })
            .unwrap();
        assert_close(&format!("transformer {name}"), &out, &k("out"), 1e-5);
        assert_eq!(cfg.guidance_embeds, guidance.is_some());
    }
}

#[test]
fn flux_vae_decoder_and_encoder_match_diffusers() {
    let r = flux_refs();
    let cfg =
        AutoencoderKLConfig::from_file(&model("tiny-flux-dev").join("vae/config.json")).unwrap();
    assert_eq!(cfg.latent_channels, 16);
    assert_eq!(cfg.shift_factor, Some(0.1159));
    assert!(!cfg.use_quant_conv && !cfg.use_post_quant_conv);
    let vae = AutoencoderKL::load(&component_weights("tiny-flux-dev", "vae"), &cfg, true).unwrap();
    let decoded = vae.decode(&r["vae.z"]).unwrap();
    assert_close("flux vae decode", &decoded, &r["vae.decoded"], 1e-5);
    let dist = vae.encode(&r["vae.x"]).unwrap();
    assert_close("flux vae mean", &dist.mean, &r["vae.mean"], 1e-5);
    assert_close("flux vae std", &dist.std, &r["vae.std"], 1e-5);
}
