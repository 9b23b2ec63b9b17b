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
