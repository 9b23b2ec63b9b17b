"""Reference outputs of diffusers' tiled VAE decode (`AutoencoderKL.enable_tiling()`,
what `pipe.enable_vae_tiling()` switches on) on the tiny fixture VAEs, for
easel's VAE tiling tests (crates/easel-diffusion/tests/vae_tiling.rs).

The tiny VAEs have `sample_size` 64 and four blocks, so diffusers tiles the
latents in 8x8 tiles (`tile_latent_min_size = 64 / 2**3`) every 6 latents
(`int(8 * (1 - 0.25))`), blends 16 pixels (`int(64 * 0.25)`) and keeps 48
(`row_limit`) of each tile. The latent sizes below make several tiles overlap
in both directions, with ragged last tiles (a 1-latent-tall last row, a
latent just over the tile in one direction only).

Writes to tests/fixtures/generated/:
  vae_tiling.safetensors   for each case KEY:
                           `KEY.z`       the latents handed to `vae.decode`
                           `KEY.tiled`   `vae.decode(z)` after `vae.enable_tiling()`
                           `KEY.untiled` (sd15 13x17 only) the plain decode
  sd15_vae_tiling_ddim.*   a StableDiffusionPipeline run (DDIM, 3 steps,
                           112x80) with `pipe.vae.enable_tiling()`, in the
                           layout of tests/fixtures/references/ (`image`,
                           `latents_to_vae`, `noise.N`; NAME.json with
                           `"vae_tiling": true`; NAME.0.png)

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1, transformers 5.23), e.g. in a virtual environment under
/tmp (never commit one):
    /tmp/refenv/bin/python tools/gen_vae_tiling_refs.py
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import diffusers.utils.torch_utils as torch_utils
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "generated")

# (key, model folder, batch, latent height, latent width, also save the untiled decode)
VAE_CASES = [
    # 3x3 tiles: rows start at 0, 6, 12 (8, 7 and 1 latents tall), columns
    # at 0, 6, 12 (8, 8, 5 wide).
    ("sd15_13x17", "tiny-sd15", 1, 13, 17, True),
    # Height equal to the tile, width one over: diffusers still tiles both
    # ways (rows at 0 and 6, the second 2 latents tall); a batch of two.
    ("sd15_8x9", "tiny-sd15", 2, 8, 9, False),
    # FLUX's 16-channel VAE (no post_quant_conv): 2x3 tiles.
    ("flux_11x14", "tiny-flux-schnell", 1, 11, 14, False),
]


def vae_cases():
    out = {}
    g = torch.Generator("cpu").manual_seed(15)
    for key, folder, batch, h, w, untiled in VAE_CASES:
        vae = AutoencoderKL.from_pretrained(
            os.path.join(ROOT, "models", folder, "vae"), torch_dtype=torch.float32
        ).eval()
        assert vae.tile_latent_min_size == 8 and vae.tile_sample_min_size == 64
        z = torch.randn((batch, vae.config.latent_channels, h, w), generator=g)
        with torch.no_grad():
            plain = vae.decode(z).sample
            vae.enable_tiling()
            tiled = vae.decode(z).sample
        out[f"{key}.z"] = z.contiguous()
        out[f"{key}.tiled"] = tiled.contiguous()
        if untiled:
            out[f"{key}.untiled"] = plain.contiguous()
        print(key, tuple(z.shape), "->", tuple(tiled.shape),
              "max |tiled - untiled|", float((tiled - plain).abs().max()))
    save_file(out, os.path.join(OUT, "vae_tiling.safetensors"))


_original_randn = torch_utils.randn_tensor
_draws = []


def _recording_randn(*args, **kwargs):
    t = _original_randn(*args, **kwargs)
    _draws.append(t.detach().clone().contiguous())
    return t


def pipeline_case():
    name = "sd15_vae_tiling_ddim"
    case = dict(model="tiny-sd15", prompt="a mountain lake at dawn", steps=3,
                guidance_scale=7.5, height=80, width=112, seed=21)
    pipe = StableDiffusionPipeline.from_pretrained(
        os.path.join(ROOT, "models", case["model"]), torch_dtype=torch.float32
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "randn_tensor", None) is _original_randn:
            module.randn_tensor = _recording_randn
    captured = {}
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        captured["latents_to_vae"] = z.detach().clone().contiguous()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    _draws.clear()
    with torch.no_grad():
        image = pipe(
            prompt=case["prompt"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance_scale"],
            height=case["height"],
            width=case["width"],
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            output_type="np",
        ).images
    tensors = {
        "image": torch.from_numpy(np.ascontiguousarray(image)).float(),
        "latents_to_vae": captured["latents_to_vae"],
    }
    for i, d in enumerate(_draws):
        tensors[f"noise.{i}"] = d
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))
    pngs = []
    for i, pil in enumerate(pipe.numpy_to_pil(image)):
        pngs.append(f"{name}.{i}.png")
        pil.save(os.path.join(OUT, pngs[-1]))
    meta = {
        "model": f"models/{case['model']}",
        "pipeline": "StableDiffusionPipeline",
        "scheduler": "DDIMScheduler",
        "vae_tiling": True,
        "prompt": case["prompt"],
        "num_inference_steps": case["steps"],
        "guidance_scale": case["guidance_scale"],
        "height": case["height"],
        "width": case["width"],
        "seed": case["seed"],
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "image_shape_nhwc": list(image.shape),
        "noise_draws": len(_draws),
        "images": pngs,
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(name, "latents", tuple(captured["latents_to_vae"].shape), "image", image.shape)


if __name__ == "__main__":
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    os.makedirs(OUT, exist_ok=True)
    vae_cases()
    pipeline_case()
