"""How far diffusers' own bf16 run moves the fixture images from its f32 run,
in 8-bit levels (max and mean absolute difference), on the CPU: the peer's
drift that easel's half-precision bounds (crates/easel-diffusion/tests/
half_precision.rs) are compared with in docs/PERFORMANCE.md.

Each case of tests/fixtures/references/NAME.json runs twice with its
recorded settings and seed, once with torch_dtype=float32 and once with
bfloat16 (PyTorch's CPU bf16: oneDNN matrix products with f32 accumulation,
its flash attention rounding the probabilities to bf16).

    python tools/bf16_drift_diffusers.py [NAME ...]

Needs torch, diffusers and transformers (as tools/bench_diffusers.py).
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import diffusers

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
CASES = [
    "sd15_txt2img_euler",
    "sd15_img2img_ddim",
    "sdxl_txt2img_euler",
    "flux_schnell_txt2img",
    "flux_dev_txt2img",
    "flux_fill_inpaint",
]
KWARGS = ["prompt", "negative_prompt", "num_inference_steps", "guidance_scale",
          "height", "width", "strength", "max_sequence_length"]


def run(case, dtype):
    pipe_cls = getattr(diffusers, case["pipeline"])
    pipe = pipe_cls.from_pretrained(os.path.join(FIXTURES, case["model"]), torch_dtype=dtype)
    if "scheduler_config" in case:
        sched_cls = getattr(diffusers, case["scheduler"])
        pipe.scheduler = sched_cls.from_config(case["scheduler_config"])
    elif pipe.scheduler.__class__.__name__ != case["scheduler"]:
        pipe.scheduler = getattr(diffusers, case["scheduler"]).from_config(pipe.scheduler.config)
    kwargs = {k: case[k] for k in KWARGS if k in case}
    for key, arg in (("init_image", "image"), ("mask_image", "mask_image")):
        if key in case:
            kwargs[arg] = Image.open(os.path.join(FIXTURES, "references", case[key])).convert("RGB")
    generator = torch.Generator("cpu").manual_seed(case["seed"])
    out = pipe(**kwargs, generator=generator, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def main():
    torch.set_num_threads(os.cpu_count())
    names = sys.argv[1:] or CASES
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, CPU")
    print("| case | bf16 vs f32: max levels | mean levels |")
    print("| --- | --- | --- |")
    for name in names:
        with open(os.path.join(FIXTURES, "references", f"{name}.json")) as f:
            case = json.load(f)
        a = run(case, torch.float32).astype(np.int16)
        b = run(case, torch.bfloat16).astype(np.int16)
        d = np.abs(a - b)
        print(f"| {name} | {d.max()} | {d.mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
