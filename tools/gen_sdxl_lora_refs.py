"""SDXL LoRA references: a rank-4 LoRA for tiny-sdxl touching the UNet and
*both* text encoders, in the diffusers/PEFT layout and the kohya-ss layout
(the same matrices, alpha 2 so kohya's effective scale is alpha/rank = 0.5),
and diffusers' StableDiffusionXLPipeline run with each (load_lora_weights,
scale through cross_attention_kwargs, which scales the UNet and the text
encoders alike), for easel's parity tests.

Writes tests/fixtures/loras/tiny-sdxl-lora{,-kohya}.safetensors and, in
tests/fixtures/generated/ (layout of gen_img2img_refs.py), the cases
sdxl_lora_peft_scale0.8 and sdxl_lora_kohya_scale1.6 (kohya at 1.6 = PEFT at
0.8, so their images agree with each other too).

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1, transformers 5.23, peft 0.21):
    /tmp/refenv/bin/python tools/gen_sdxl_lora_refs.py
"""
import glob
import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffusers
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

import gen_img2img_refs as g

ROOT = g.ROOT
OUT = g.OUT
MODEL = os.path.join(ROOT, "models", "tiny-sdxl")
LORAS = os.path.join(ROOT, "loras")
RANK = 4
ALPHA = 2.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def make_loras():
    gen = torch.Generator("cpu").manual_seed(1234)
    peft, kohya = {}, {}
    for comp, kohya_prefix in [("unet", "lora_unet_"), ("text_encoder", "lora_te1_"),
                               ("text_encoder_2", "lora_te2_")]:
        path = glob.glob(os.path.join(MODEL, comp, "*.safetensors"))[0]
        with safe_open(path, "pt") as f:
            keys = sorted(k for k in f.keys()
                          if k.endswith(".weight") and any(f".{t}." in k for t in TARGETS))
            for key in keys:
                out_f, in_f = f.get_slice(key).get_shape()
                module = key[: -len(".weight")]
                a = torch.randn(RANK, in_f, generator=gen) * 0.3
                b = torch.randn(out_f, RANK, generator=gen) * 0.3
                peft[f"{comp}.{module}.lora_A.weight"] = a
                peft[f"{comp}.{module}.lora_B.weight"] = b
                k = kohya_prefix + module.replace(".", "_")
                kohya[f"{k}.lora_down.weight"] = a
                kohya[f"{k}.lora_up.weight"] = b
                kohya[f"{k}.alpha"] = torch.tensor(ALPHA)
    save_file(peft, os.path.join(LORAS, "tiny-sdxl-lora.safetensors"))
    save_file(kohya, os.path.join(LORAS, "tiny-sdxl-lora-kohya.safetensors"))


CASES = [
    dict(name="sdxl_lora_peft_scale0.8", lora="tiny-sdxl-lora.safetensors", scale=0.8),
    dict(name="sdxl_lora_kohya_scale1.6", lora="tiny-sdxl-lora-kohya.safetensors", scale=1.6),
]


def run_case(case):
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(os.path.join(LORAS, case["lora"]))
    g._patch_randn()
    captured = {}
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        captured["latents_to_vae"] = z.detach().clone().contiguous()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    prompt, negative, steps, guidance, seed = "a photo of a cat", "low quality", 3, 5.0, 11
    g._draws.clear()
    with torch.no_grad():
        image = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=steps,
                     guidance_scale=guidance, height=64, width=64,
                     cross_attention_kwargs={"scale": case["scale"]},
                     generator=torch.Generator("cpu").manual_seed(seed),
                     output_type="np").images
    name = case["name"]
    tensors = {
        "image": torch.from_numpy(np.ascontiguousarray(image)).float(),
        "latents_to_vae": captured["latents_to_vae"],
    }
    for i, d in enumerate(g._draws):
        tensors[f"noise.{i}"] = d
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))
    png = f"{name}.0.png"
    pipe.numpy_to_pil(image)[0].save(os.path.join(OUT, png))
    meta = {
        "model": "models/tiny-sdxl",
        "pipeline": "StableDiffusionXLPipeline",
        "lora": f"loras/{case['lora']}",
        "lora_scale": case["scale"],
        "scheduler": "EulerDiscreteScheduler",
        "prompt": prompt,
        "negative_prompt": negative,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "height": 64,
        "width": 64,
        "seed": seed,
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "image_shape_nhwc": list(image.shape),
        "noise_draws": len(g._draws),
        "images": [png],
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(name, "draws:", len(g._draws), "image", image.shape)
    return tensors["latents_to_vae"]


if __name__ == "__main__":
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    make_loras()
    a = run_case(CASES[0])
    b = run_case(CASES[1])
    print("peft vs kohya latents max abs diff", (a - b).abs().max().item())
