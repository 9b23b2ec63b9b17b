"""Time diffusers on the same machine and model configs as `easel bench`.

Builds the UNet and VAE of a bench-models folder from their config.json
with random weights (compute does not depend on the values), then times one
guided UNet call (batch 2) and one VAE decode, the same work as a step and a
decode of `easel bench`. Prints a table like easel's.

    python tools/bench_diffusers.py --model ../shared/bench-models/sd15 \
        --width 512 --height 512 --threads 2 [--dtype float32|bfloat16]

Needs torch and diffusers (pip install torch diffusers transformers).
"""
import argparse
import os
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def best_of(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(a.model, "unet"))).to(dtype).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(a.model, "vae"))).to(dtype).eval()
    h, w = a.height // 8, a.width // 8
    sample = torch.randn(2, unet.config.in_channels, h, w, dtype=dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, dtype=dtype),
            "time_ids": torch.tensor([[a.height, a.width, 0, 0, a.height, a.width]] * 2, dtype=dtype),
        }
    z = torch.randn(1, vae.config.latent_channels, h, w, dtype=dtype)
    with torch.no_grad():
        step = best_of(lambda: unet(sample, 500, encoder_hidden_states=ctx, **kwargs), a.runs + 1)
        dec = best_of(lambda: vae.decode(z), a.runs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"diffusers {a.dtype}, {a.width}x{a.height}, {a.threads} threads, torch {torch.__version__}")
    print("| stage | seconds |")
    print("| --- | --- |")
    print(f"| UNet call (batch 2, one guided step) | {step:.3f} |")
    print(f"| VAE decode | {dec:.3f} |")
    print(f"| peak RSS | {rss:.2f} GiB |")


if __name__ == "__main__":
    main()
