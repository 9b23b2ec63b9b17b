"""Time diffusers on the same machine and model configs as `easel bench`.

Two modes, both on random weights built from a bench-models folder's
config.json files (compute does not depend on the values):

* Without --steps: builds the UNet and VAE, then times one guided UNet call
  (batch 2) and one VAE decode, the same work as a step and a decode of
  `easel bench`, and (where the folder has a `text_encoder`) the text
  encoding of a prompt and a negative prompt. Prints a table like easel's.

      python tools/bench_diffusers.py --model ../shared/bench-models/sd15 \
          --width 512 --height 512 --threads 2 [--dtype float32|bfloat16]

* With --steps N: builds the whole pipeline the folder's model_index.json
  names (text encoders and tokenizers included; Stable Diffusion 1.x/2.x,
  SDXL, FLUX) and times one full generation after a warm-up, as
  `easel bench --steps N` does: seconds per image (the pipeline call, from
  the prompt to decoded pixels), seconds per denoising step (between the
  first and last step callbacks, the device synchronised at each), and peak
  memory: torch.cuda.max_memory_allocated on a GPU (weights included), peak
  RSS on the CPU. Attention runs through PyTorch's scaled_dot_product_attention
  (diffusers' AttnProcessor2_0 / FluxAttnProcessor, its defaults). The
  pipeline upcasts the VAE to f32 where its config says `force_upcast`.

      python tools/bench_diffusers.py --model ../shared/bench-models/sdxl \
          --device cuda --dtype float16 --width 1024 --height 1024 --steps 25 \
          [--json result.json]

Needs torch, diffusers and transformers (pip install torch diffusers
transformers; scripts/gpu-check.sh installs carried wheels where missing).
"""
import argparse
import json
import os
import resource
import time

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def best_of(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipeline(folder, device, dtype):
    """The pipeline model_index.json names, every model from its config with
    random weights created directly on `device` in `dtype`."""
    import diffusers
    import transformers

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    components = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for name, spec in index.items():
            if name.startswith("_"):
                continue
            library, cls_name = spec if isinstance(spec, list) else (None, None)
            path = os.path.join(folder, name)
            if cls_name is None or not os.path.isdir(path):
                components[name] = None
                continue
            module = diffusers if library == "diffusers" else transformers
            cls = getattr(module, cls_name)
            if name.startswith("tokenizer"):
                components[name] = cls.from_pretrained(path)
            elif name == "scheduler":
                components[name] = cls.from_config(cls.load_config(path))
            elif library == "diffusers":
                with torch.device(device):
                    model = cls.from_config(cls.load_config(path))
                components[name] = model.to(device=device, dtype=dtype).eval()
            else:
                config = transformers.AutoConfig.from_pretrained(path)
                with torch.device(device):
                    model = cls(config)
                # A config's own dtype can leave some layers in it: one dtype.
                components[name] = model.to(device=device, dtype=dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    if "safety_checker" in components:
        components["requires_safety_checker"] = False
    expected = set(pipeline_cls._get_signature_keys(pipeline_cls)[0])
    kwargs = {k: v for k, v in components.items() if k in expected or k == "requires_safety_checker"}
    for key in expected - set(kwargs):
        kwargs[key] = None
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(a, device, dtype):
    pipe = build_pipeline(a.model, device, dtype)
    family = type(pipe).__name__
    call = {
        "prompt": a.prompt,
        "width": a.width,
        "height": a.height,
        "num_inference_steps": a.steps,
        "output_type": "np",
    }
    if a.guidance_scale is not None:
        call["guidance_scale"] = a.guidance_scale
    elif "Flux" in family:
        call["guidance_scale"] = 0.0  # schnell's default: no guidance embedding
    if "Flux" in family and a.max_sequence_length is not None:
        call["max_sequence_length"] = a.max_sequence_length
    stamps = []

    def on_step_end(_pipe, _i, _t, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    call["callback_on_step_end"] = on_step_end
    per_image, per_step = [], []
    with torch.inference_mode():
        for run in range(a.runs + 1):
            if run == 1 and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stamps.clear()
            sync(device)
            t0 = time.perf_counter()
            pipe(generator=torch.Generator("cpu").manual_seed(0), **call)
            sync(device)
            total = time.perf_counter() - t0
            steps = len(stamps)
            step = (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else total
            print(f"{'warm-up' if run == 0 else 'run'} {run}: {total:.3f}s ({step:.3f}s per step)", flush=True)
            if run > 0 or a.runs == 0:
                per_image.append(total)
                per_step.append(step)
    best = min(range(len(per_image)), key=per_image.__getitem__)
    result = {
        "tool": "diffusers",
        "pipeline": family,
        "device": str(device),
        "dtype": a.dtype,
        "width": a.width,
        "height": a.height,
        "steps": a.steps,
        "seconds_per_image": per_image[best],
        "seconds_per_step": per_step[best],
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["gpu"] = torch.cuda.get_device_name(device)
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import diffusers

    result["diffusers"] = diffusers.__version__
    gib = 1 << 30
    print(f"diffusers {diffusers.__version__} {family} {a.dtype} on {result.get('gpu', device)}, "
          f"{a.width}x{a.height}, {a.steps} steps, torch {torch.__version__}")
    print("| stage | value |")
    print("| --- | --- |")
    print(f"| seconds per image | {result['seconds_per_image']:.3f} |")
    print(f"| seconds per step | {result['seconds_per_step']:.3f} |")
    if device.type == "cuda":
        print(f"| peak GPU memory allocated | {result['peak_allocated_bytes'] / gib:.2f} GiB |")
        print(f"| peak GPU memory reserved | {result['peak_reserved_bytes'] / gib:.2f} GiB |")
    else:
        print(f"| peak RSS | {result['peak_rss_bytes'] / gib:.2f} GiB |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


def run_components(a, device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(a.model, "unet")))
    unet = unet.to(device=device, dtype=dtype).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(a.model, "vae")))
    vae = vae.to(device=device, dtype=dtype).eval()
    h, w = a.height // 8, a.width // 8
    sample = torch.randn(2, unet.config.in_channels, h, w, dtype=dtype, device=device)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype, device=device)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, dtype=dtype, device=device),
            "time_ids": torch.tensor([[a.height, a.width, 0, 0, a.height, a.width]] * 2, dtype=dtype, device=device),
        }
    z = torch.randn(1, vae.config.latent_channels, h, w, dtype=dtype, device=device)

    def timed(fn):
        def go():
            fn()
            sync(device)
        return go

    # The text encoder as the pipelines call it: the prompt and the
    # negative prompt, 77 tokens each, one forward pass apiece (SD 1.x/2.x
    # folders; SDXL's second encoder is not timed here).
    encode = None
    te_dir = os.path.join(a.model, "text_encoder")
    if os.path.isdir(te_dir):
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig.from_pretrained(te_dir)).to(device=device, dtype=dtype).eval()
        ids = torch.randint(0, te.config.vocab_size, (1, 77), device=device)

        def encode_pair():
            te(ids)
            te(ids)

        encode = encode_pair
    with torch.no_grad():
        step = best_of(timed(lambda: unet(sample, 500, encoder_hidden_states=ctx, **kwargs)), a.runs + 1)
        dec = best_of(timed(lambda: vae.decode(z)), a.runs)
        text = best_of(timed(encode), a.runs + 1) if encode else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"diffusers {a.dtype}, {a.width}x{a.height}, {a.threads} threads, {device}, torch {torch.__version__}")
    print("| stage | seconds |")
    print("| --- | --- |")
    print(f"| UNet call (batch 2, one guided step) | {step:.3f} |")
    print(f"| VAE decode | {dec:.3f} |")
    if text is not None:
        print(f"| text encoding (prompt and negative prompt) | {text:.3f} |")
    print(f"| peak RSS | {rss:.2f} GiB |")
    if device.type == "cuda":
        print(f"| peak GPU memory allocated | {torch.cuda.max_memory_allocated(device) / (1 << 30):.2f} GiB |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--runs", type=int, default=2, help="timed runs after a warm-up; the fastest is reported")
    p.add_argument("--steps", type=int, help="time the whole pipeline with this many steps")
    p.add_argument("--guidance-scale", type=float, help="[default: the pipeline's; FLUX schnell 0]")
    p.add_argument("--max-sequence-length", type=int,
                   help="FLUX: T5 tokens (easel: 256 for schnell, 512 otherwise) [default: the pipeline's, 512]")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--json", help="with --steps: also write the result to this JSON file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch sees no CUDA device")
    dtype = DTYPES[a.dtype]
    torch.manual_seed(0)
    if a.steps is not None:
        run_pipeline(a, device, dtype)
    else:
        run_components(a, device, dtype)


if __name__ == "__main__":
    main()
