"""Reference runs of diffusers' image-to-image and inpainting pipelines on the
tiny fixture models, for the cases tests/fixtures/references/ lacks (SDXL,
inpainting with a regular 4-channel UNet, strength < 1 with the inpainting
UNet, an init image that must be resized), and Pillow's Lanczos resize of
a few images, for easel's parity tests.

Each case NAME is written to tests/fixtures/generated/ in the layout of
tests/fixtures/references/ (see tests/fixtures/README.md):
  NAME.json         the pipeline, model, scheduler, prompt, steps, strength,
                    size, seed and input files (relative to this folder)
  NAME.safetensors  `image` (N, H, W, 3) in [0, 1]; `latents_to_vae` (what the
                    pipeline passed to vae.decode); `noise.0`, `noise.1`, ...:
                    every Gaussian draw diffusers made (its `randn_tensor`), in order
  NAME.0.png        the 8-bit image
Input images written here: init_rgba.png (init_image.png with alpha = 255 -
mask.png, for `--mask alpha`), init_70x60.png (init_image.png resized, so the
pipeline rounds it down to 64x56 and resizes it again) and mask_32.png (mask.png
at half size, resized by the mask processor).

image_resize.safetensors: for each `<src>.<mode>.<W>x<H>`, the uint8 pixels
(H, W, C) of `Image.open(src).convert(mode).resize((W, H), Image.LANCZOS)`.

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1, transformers 5.23):
    /tmp/refenv/bin/python tools/gen_img2img_refs.py
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
import diffusers.utils.torch_utils as torch_utils
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
REFS = os.path.join(ROOT, "references")
OUT = os.path.join(ROOT, "generated")

# Record every Gaussian draw: the pipelines, the VAE posterior and the
# schedulers all import `randn_tensor` by name, so patch each module's copy.
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


def _inputs():
    init = Image.open(os.path.join(REFS, "init_image.png")).convert("RGB")
    mask = Image.open(os.path.join(REFS, "mask.png")).convert("L")
    init.resize((70, 60), Image.BICUBIC).save(os.path.join(OUT, "init_70x60.png"))
    mask.resize((32, 32), Image.BICUBIC).save(os.path.join(OUT, "mask_32.png"))
    init.save(os.path.join(OUT, "init_image.png"))
    # The init image with the mask as transparency (alpha = 255 - mask), for
    # `easel generate --mask alpha`.
    rgba = init.copy()
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))
    rgba.save(os.path.join(OUT, "init_rgba.png"))
    mask.save(os.path.join(OUT, "mask.png"))


SCHEDULERS = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
}

CASES = [
    # SD 1.x image-to-image with an image that is resized (70x60 -> 64x56)
    # and a stochastic sampler drawing after the image-to-image draws.
    dict(name="sd15_img2img_resize_euler_a", cls=StableDiffusionImg2ImgPipeline,
         model="tiny-sd15", scheduler="EulerAncestralDiscreteScheduler",
         init_image="init_70x60.png", prompt="a watercolor of a lighthouse",
         negative_prompt="blurry", strength=0.75, steps=4, guidance_scale=6.0, seed=21),
    # Inpainting with the regular 4-channel UNet: the kept region re-imposed.
    dict(name="sd15_inpaint_4ch_euler", cls=StableDiffusionInpaintPipeline,
         model="tiny-sd15", scheduler="EulerDiscreteScheduler",
         init_image="init_image.png", mask_image="mask.png",
         prompt="a photo of a cat", strength=0.8, steps=5, guidance_scale=7.5,
         height=64, width=64, seed=4),
    # The inpainting UNet with strength < 1 (init image noised, three draws).
    dict(name="sd15_inpaint_9ch_strength0.6_ddim", cls=StableDiffusionInpaintPipeline,
         model="tiny-sd15-inpaint", scheduler="DDIMScheduler",
         init_image="init_image.png", mask_image="mask.png",
         prompt="A portrait in a sunlit garden", strength=0.6, steps=5,
         guidance_scale=7.5, height=64, width=64, seed=12),
    # SDXL image-to-image (Euler, the model's default).
    dict(name="sdxl_img2img_euler", cls=StableDiffusionXLImg2ImgPipeline,
         model="tiny-sdxl", scheduler="EulerDiscreteScheduler",
         init_image="init_image.png", prompt="a photo of a cat",
         negative_prompt="low quality", strength=0.7, steps=4, guidance_scale=5.0, seed=7),
    # SDXL inpainting with its regular 4-channel UNet and a half-size mask.
    dict(name="sdxl_inpaint_euler", cls=StableDiffusionXLInpaintPipeline,
         model="tiny-sdxl", scheduler="EulerDiscreteScheduler",
         init_image="init_image.png", mask_image="mask_32.png",
         prompt="a photo of a dog", strength=1.0, steps=3, guidance_scale=5.0,
         height=64, width=64, seed=9),
]


def run_case(case):
    model = os.path.join(ROOT, "models", case["model"])
    pipe = case["cls"].from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = SCHEDULERS[case["scheduler"]].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    _patch_randn()

    captured = {}
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        captured["latents_to_vae"] = z.detach().clone().contiguous()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    kwargs = dict(
        prompt=case["prompt"],
        image=Image.open(os.path.join(OUT, case["init_image"])),
        strength=case["strength"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
    )
    if "negative_prompt" in case:
        kwargs["negative_prompt"] = case["negative_prompt"]
    if "mask_image" in case:
        kwargs["mask_image"] = Image.open(os.path.join(OUT, case["mask_image"]))
    if "height" in case:
        kwargs["height"], kwargs["width"] = case["height"], case["width"]
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
        "init_image": case["init_image"],
        "prompt": case["prompt"],
        "num_inference_steps": case["steps"],
        "guidance_scale": case["guidance_scale"],
        "strength": case["strength"],
        "seed": case["seed"],
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "image_shape_nhwc": list(image.shape),
        "noise_draws": len(_draws),
        "images": pngs,
    }
    for key in ("negative_prompt", "mask_image", "height", "width"):
        if key in case:
            meta[key] = case[key]
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(name, "draws:", [tuple(d.shape) for d in _draws], "image", image.shape)


def resize_refs():
    out = {}
    for src, mode in [("init_image.png", "RGB"), ("mask.png", "L"), ("init_70x60.png", "RGB")]:
        im = Image.open(os.path.join(OUT, src)).convert(mode)
        for size in [(64, 56), (40, 48), (96, 72), (23, 81), (128, 128)]:
            arr = np.array(im.resize(size, Image.LANCZOS), dtype=np.uint8)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            out[f"{src}.{mode}.{size[0]}x{size[1]}"] = torch.from_numpy(np.ascontiguousarray(arr))
    save_file(out, os.path.join(OUT, "image_resize.safetensors"))


if __name__ == "__main__":
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    os.makedirs(OUT, exist_ok=True)
    _inputs()
    resize_refs()
    for case in CASES:
        run_case(case)
