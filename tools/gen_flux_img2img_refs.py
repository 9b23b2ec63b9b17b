"""FLUX.1 image-to-image references for easel's parity tests.

Runs diffusers' FluxImg2ImgPipeline (float32, CPU) on the tiny FLUX fixture
models with `references/init_image.png` and records what the parity test
needs, in the layout of `tests/fixtures/references/` (see the fixtures
README): `NAME.json` (the request), `NAME.safetensors` (`image`,
`latents_to_vae`, and every Gaussian draw `noise.0`, `noise.1`, ... in call
order: the VAE posterior sample of the init image, then the initial noise),
`NAME.0.png`. The draws are recorded by wrapping diffusers' `randn_tensor`
where the pipeline and the VAE call it.

Rerun (needs torch, diffusers 0.42.1, transformers 5.23, from PyPI), from the
repository root:
    python tools/gen_flux_img2img_refs.py
"""
import json
import os

import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.flux.pipeline_flux_img2img as img2img_module
from diffusers import FluxImg2ImgPipeline

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "generated")

CASES = [
    {
        "name": "flux_dev_img2img",
        "model": "models/tiny-flux-dev",
        "prompt": "A photo of an astronaut riding a horse on mars",
        "num_inference_steps": 5,
        "strength": 0.6,
        "guidance_scale": 3.5,
        "seed": 29,
    },
    {
        "name": "flux_schnell_img2img",
        "model": "models/tiny-flux-schnell",
        "prompt": "A portrait in a sunlit garden",
        "num_inference_steps": 4,
        "strength": 0.75,
        "guidance_scale": 0.0,
        "seed": 31,
    },
]

draws = []


def recording(randn):
    def wrapped(*args, **kwargs):
        t = randn(*args, **kwargs)
        draws.append(t.detach().clone())
        return t

    return wrapped


img2img_module.randn_tensor = recording(img2img_module.randn_tensor)
vae_module.randn_tensor = recording(vae_module.randn_tensor)

init_image = Image.open(os.path.join(ROOT, "references", "init_image.png")).convert("RGB")
for case in CASES:
    draws.clear()
    pipe = FluxImg2ImgPipeline.from_pretrained(os.path.join(ROOT, case["model"]), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    decoded_inputs = []
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        decoded_inputs.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    width, height = init_image.size
    out = pipe(
        prompt=case["prompt"],
        image=init_image,
        height=height,
        width=width,
        strength=case["strength"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        max_sequence_length=64,
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
    )
    image = torch.from_numpy(out.images).to(torch.float32)
    name = case["name"]
    tensors = {"image": image, "latents_to_vae": decoded_inputs[-1]}
    for i, d in enumerate(draws):
        tensors[f"noise.{i}"] = d
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.safetensors"))
    png = f"{name}.0.png"
    Image.fromarray((out.images[0] * 255).round().astype("uint8")).save(os.path.join(OUT, png))
    meta = {
        "model": case["model"],
        "pipeline": "FluxImg2ImgPipeline",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "init_image": "../references/init_image.png",
        "prompt": case["prompt"],
        "num_inference_steps": case["num_inference_steps"],
        "strength": case["strength"],
        "guidance_scale": case["guidance_scale"],
        "height": height,
        "width": width,
        "max_sequence_length": 64,
        "seed": case["seed"],
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "image_shape_nhwc": list(image.shape),
        "noise_draws": len(draws),
        "images": [png],
        "_generated_by": "tools/gen_flux_img2img_refs.py",
        "_versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})
