"""Reference runs of diffusers' pipelines with seamless tiling on the tiny
fixture models, for easel's tiling parity tests
(crates/easel-diffusion/tests/tiling.rs).

Tiling is switched on as AUTOMATIC1111's web UI does it: every `nn.Conv2d`
of the UNet and the VAE gets `padding_mode = "circular"` (PyTorch then pads
the input by wrapping it around and convolves without padding). FLUX's
transformer has no `nn.Conv2d`, so there only the VAE changes.

Each case NAME is written to tests/fixtures/generated/ in the layout of
tests/fixtures/references/ (see tests/fixtures/README.md), with
`"tiling": true` in NAME.json:
  NAME.json         the pipeline, model, scheduler, prompt, steps, size,
                    seed (and `tiling`)
  NAME.safetensors  `image` (N, H, W, 3) in [0, 1]; `latents_to_vae`;
                    `noise.0`, ...: every Gaussian draw diffusers made
  NAME.0.png        the 8-bit image

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1, transformers 5.23), e.g. in a virtual environment under
/tmp (never commit one):
    /tmp/refenv/bin/python tools/gen_tiling_refs.py
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import diffusers.utils.torch_utils as torch_utils
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "generated")

_original_randn = torch_utils.randn_tensor
_draws = []


def _recording_randn(*args, **kwargs):
    t = _original_randn(*args, **kwargs)
    _draws.append(t.detach().clone().contiguous())
    return t


def _patch_randn():
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "randn_tensor", None) is _original_randn:
            module.randn_tensor = _recording_randn


def set_tiling(*models):
    """A1111's `tiling`: every Conv2d pads circularly. Returns how many."""
    n = 0
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.padding_mode = "circular"
                n += 1
    return n


SCHEDULERS = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
}

CASES = [
    dict(name="sd15_tiling_ddim", cls=StableDiffusionPipeline, model="tiny-sd15",
         scheduler="DDIMScheduler", prompt="a seamless stone wall texture",
         negative_prompt="blurry", steps=4, guidance_scale=7.5, height=64, width=96, seed=5),
    # Image-to-image: the init image goes through the VAE encoder with
    # circular convolutions too (its down-samplers' explicit (0, 1, 0, 1)
    # zero pad is F.pad, not a convolution's padding, and stays zeros).
    dict(name="sd15_img2img_tiling_ddim", cls=StableDiffusionImg2ImgPipeline, model="tiny-sd15",
         scheduler="DDIMScheduler", prompt="a seamless stone wall texture",
         init_image="init_image.png", strength=0.7, steps=5, guidance_scale=7.5,
         height=64, width=64, seed=9),
    dict(name="sdxl_tiling_euler", cls=StableDiffusionXLPipeline, model="tiny-sdxl",
         scheduler="EulerDiscreteScheduler", prompt="a seamless tiled floor",
         steps=3, guidance_scale=5.0, height=64, width=64, seed=6),
    dict(name="flux_schnell_tiling", cls=FluxPipeline, model="tiny-flux-schnell",
         scheduler="FlowMatchEulerDiscreteScheduler", prompt="a seamless brick pattern",
         steps=2, guidance_scale=0.0, height=64, width=80, max_sequence_length=64, seed=8),
]


def run_case(case):
    model = os.path.join(ROOT, "models", case["model"])
    pipe = case["cls"].from_pretrained(model, torch_dtype=torch.float32)
    pipe.scheduler = SCHEDULERS[case["scheduler"]].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    convs = set_tiling(denoiser, pipe.vae)
    _patch_randn()

    captured = {}
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        captured["latents_to_vae"] = z.detach().clone().contiguous()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    kwargs = dict(
        prompt=case["prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
    )
    if "init_image" in case:
        kwargs["image"] = Image.open(os.path.join(OUT, case["init_image"])).convert("RGB")
        kwargs["strength"] = case["strength"]
    else:
        kwargs["height"], kwargs["width"] = case["height"], case["width"]
    for key in ("negative_prompt", "max_sequence_length"):
        if key in case:
            kwargs[key] = case[key]
    _draws.clear()
    with torch.no_grad():
        image = pipe(**kwargs).images
    tensors = {
        "image": torch.from_numpy(np.ascontiguousarray(image)).float(),
        "latents_to_vae": captured["latents_to_vae"],
    }
    for i, d in enumerate(_draws):
        tensors[f"noise.{i}"] = d
    name = case["name"]
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))
    pngs = []
    for i, pil in enumerate(pipe.numpy_to_pil(image)):
        pngs.append(f"{name}.{i}.png")
        pil.save(os.path.join(OUT, pngs[-1]))
    meta = {
        "model": f"models/{case['model']}",
        "pipeline": case["cls"].__name__,
        "scheduler": case["scheduler"],
        "tiling": True,
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
    for key in ("negative_prompt", "max_sequence_length", "init_image", "strength"):
        if key in case:
            meta[key] = case[key]
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(name, "circular convs:", convs, "draws:", [tuple(d.shape) for d in _draws],
          "image", image.shape)


if __name__ == "__main__":
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    os.makedirs(OUT, exist_ok=True)
    for case in CASES:
        run_case(case)
