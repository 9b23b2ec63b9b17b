"""Quantized FLUX.1 transformer files and their references, for easel's
quantized-weight parity tests (issue 14).

From the tiny FLUX.1 dev fixture (`models/tiny-flux-dev`, width 32) this
writes, under tests/fixtures/generated/quantized/:

GGUF, in city96's ComfyUI-GGUF layout (the layout of the published
`flux1-dev-Q8_0.gguf`): the transformer only, under Black Forest Labs' names
with no prefix (the conversion of tools/gen_flux_single_files.py), metadata
`general.architecture` = "flux", `general.quantization_version` = 2,
`general.file_type` (llama.cpp's `LlamaFileType`: 7 = MOSTLY_Q8_0,
2 = MOSTLY_Q4_0). Tensor types follow city96's recipe (ComfyUI-GGUF
`tools/convert.py`, then llama.cpp's `llama-quantize` with his
`tools/lcpp.patch`):
  - 1-D tensors (biases, RMS-norm scales): F32;
  - `img_in.weight`, `time_in.in_layer.weight`, `vector_in.in_layer.weight`,
    `guidance_in.in_layer.weight`, `final_layer.linear.weight`: F32;
  - `txt_in.weight`, `time_in.out_layer.weight`, `vector_in.out_layer.weight`,
    `guidance_in.out_layer.weight`, `final_layer.adaLN_modulation.1.weight`:
    F16;
  - every other 2-D weight (all of `double_blocks.*` and `single_blocks.*`):
    the file's type (Q8_0 / Q4_0) when its row length is a multiple of the
    block size (32), else F16 (the patch's forced fallback). convert.py's
    1024-element threshold only picks the intermediate F16/F32 file's type;
    llama-quantize still quantizes those tensors, so no size threshold
    applies here and the tiny model's 32x32 weights are quantized.
  FLUX files are never reshaped (convert.py's `shape_fix` is off for
  flux), so no `comfy.gguf.orig_shape.*` keys are written.
  Files: tiny-flux-dev-Q8_0.gguf, tiny-flux-dev-Q4_0.gguf.

fp8 single files (BFL layout, transformer only), every 2-D weight in fp8,
the rest bf16, as the published flux1-dev-fp8 files:
  - tiny-flux-dev-fp8_e4m3fn.safetensors (torch.float8_e4m3fn, no prefix);
  - tiny-flux-dev-fp8_e5m2.safetensors (torch.float8_e5m2, no prefix);
  - tiny-flux-dev-fp8_scaled.safetensors: ComfyUI's "scaled fp8" layout,
    with ComfyUI's `model.diffusion_model.` prefix: the marker
    `model.diffusion_model.scaled_fp8` (an empty float8_e4m3fn tensor, shape
    [0]; ComfyUI takes the fp8 type from its dtype, and 0 elements, not 2,
    means "fp8 matmuls allowed"), per 2-D weight `<layer>.weight` =
    float8_e4m3fn(w / s) with `<layer>.scale_weight` = s = amax(|w|) / 448
    (float32, shape []), so that w ~ fp8 * scale_weight, and
    `<layer>.scale_input` = 1.0 (float32, shape []), which ComfyUI only uses
    to scale activations for fp8 x fp8 matmuls; upcasting weights ignores it.

References (FluxPipeline from the tiny-flux-dev folder, the transformer
replaced, float32 on CPU; the request of references/flux_dev_txt2img:
prompt "A photo of an astronaut riding a horse on mars", 6 steps, guidance
3.5, 80x64, max_sequence_length 64, seed 19), in the layout of
gen_flux_img2img_refs.py (NAME.json, NAME.safetensors with `image`,
`latents_to_vae`, `noise.0`, NAME.0.png):
  - flux_dev_gguf_{q8_0,q4_0}_diffusers: diffusers'
    `from_single_file(gguf, quantization_config=GGUFQuantizationConfig(
    compute_dtype=float32))`. diffusers dequantizes into float16
    (`d * q` with d float16), then casts to float32: rounded weights.
  - flux_dev_gguf_{q8_0,q4_0}_exact: the GGUF tensors dequantized exactly in
    float32 by gguf-py (`gguf.quants.dequantize`, ggml's own arithmetic:
    float32(d) * q), loaded as plain float32 weights. This is what easel
    computes.
  - flux_dev_fp8_e4m3fn, flux_dev_fp8_e5m2: diffusers'
    `from_single_file(file, torch_dtype=float32)`, which upcasts the fp8 and
    bf16 tensors exactly.
  - flux_dev_fp8_scaled: diffusers with the float32 weights
    fp8.float() * scale_weight (diffusers cannot read the scaled layout).
Every file is read back and checked (GGUF with gguf.GGUFReader: names,
shapes in both orders, types, metadata, data; fp8 files with safe_open), and
every loaded transformer's state dict is checked against the weights it
should hold.

diffusers 0.42 hard-codes FLUX.1's width (`inner_dim = 3072`) in its FLUX
converter; the patch of gen_flux_single_files.py is applied.

Rerun from the repository root with the reference stack in a virtual
environment under /tmp (never in the repository): torch 2.15 (CPU is
enough), diffusers 0.42.1, transformers 5.23, safetensors, accelerate,
gguf (PyPI `gguf`, llama.cpp's gguf-py, 0.19):
    /tmp/ref-venv/bin/python tools/gen_quantized_refs.py
"""
import json
import os
import sys
import tempfile
from importlib.metadata import version

import gguf
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
import diffusers.pipelines.flux.pipeline_flux as flux_module
from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_flux_single_files import patch_diffusers_width, to_bfl  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "models", "tiny-flux-dev")
OUT = os.path.join(ROOT, "generated", "quantized")
REL = "generated/quantized"  # OUT relative to tests/fixtures, for the JSON files
COMFY_PREFIX = "model.diffusion_model."

Q = gguf.GGMLQuantizationType
# city96's lcpp.patch: kept in F32 / in F16 whatever the file's type.
KEEP_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")
KEEP_F16 = ("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
FILE_TYPES = {Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}

# The request of references/flux_dev_txt2img.
REQUEST = dict(
    prompt="A photo of an astronaut riding a horse on mars",
    num_inference_steps=6,
    guidance_scale=3.5,
    height=64,
    width=80,
    max_sequence_length=64,
    seed=19,
)


def fail(msg):
    sys.exit(f"gen_quantized_refs: {msg}")


def bfl_weights():
    """The folder's transformer (float16) under BFL names, checked against
    the committed single file that gen_flux_single_files.py proved."""
    d = os.path.join(MODEL, "transformer")
    config = json.load(open(os.path.join(d, "config.json")))
    sd = to_bfl(load_file(os.path.join(d, "diffusion_pytorch_model.safetensors")), config)
    committed = load_file(os.path.join(ROOT, "generated", "single_file", "tiny-flux-dev.safetensors"))
    if set(sd) != set(committed) or any(not torch.equal(sd[k], committed[k]) for k in sd):
        fail("to_bfl no longer gives generated/single_file/tiny-flux-dev.safetensors")
    return sd


# ---------------------------------------------------------------- GGUF


def gguf_type(key, shape, qtype):
    """The GGML type city96's convert.py + patched llama-quantize give `key`."""
    if len(shape) == 1:
        return Q.F32
    if any(p in key for p in KEEP_F32):
        return Q.F32
    if any(p in key for p in KEEP_F16):
        return Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def write_gguf(sd, qtype, path):
    """Write `sd` (BFL names, float16) as a city96-style GGUF; returns the
    {name: ggml type} it used."""
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[qtype])
    types = {}
    for key, w in sorted(sd.items()):
        t = gguf_type(key, tuple(w.shape), qtype)
        # llama-quantize quantizes from float32; float16 -> float32 is exact.
        data = gguf.quants.quantize(w.float().numpy(), t)
        writer.add_tensor(key, data, raw_dtype=t)
        types[key] = t
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def read_gguf(path, sd, types, qtype):
    """Read `path` back, check it against what was written and return the
    exact float32 dequantization {name: tensor in PyTorch (out, in) order}."""
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    arch = fields["general.architecture"]
    if bytes(arch.parts[arch.data[0]]).decode() != "flux":
        fail(f"{path}: general.architecture is not flux")
    ftype = fields["general.file_type"]
    if int(ftype.parts[ftype.data[0]][0]) != FILE_TYPES[qtype]:
        fail(f"{path}: general.file_type is not {FILE_TYPES[qtype]}")
    if any(k.startswith("comfy.gguf.orig_shape.") for k in fields):
        fail(f"{path}: unexpected orig_shape metadata")
    exact = {}
    for t in reader.tensors:
        want = tuple(sd[t.name].shape)
        # GGUF stores ggml's ne (innermost first): the reverse of PyTorch's.
        if tuple(int(n) for n in t.shape) != tuple(reversed(want)):
            fail(f"{path}: {t.name} has ggml shape {list(t.shape)}, want reversed {want}")
        if t.tensor_type != types[t.name]:
            fail(f"{path}: {t.name} is {t.tensor_type.name}, want {types[t.name].name}")
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(want)
        src = sd[t.name].float()
        if t.tensor_type in (Q.F32, Q.F16):
            if not torch.equal(w, src):
                fail(f"{path}: {t.name} ({t.tensor_type.name}) is not the source exactly")
        else:
            again = gguf.quants.dequantize(gguf.quants.quantize(src.numpy(), t.tensor_type), t.tensor_type)
            if not torch.equal(w, torch.from_numpy(np.array(again)).reshape(want)):
                fail(f"{path}: {t.name} data differs from gguf-py's quantization")
            # a block's error is at most half a step (Q8_0: amax/254, Q4_0: amax/16, plus f16 scale rounding)
            step = (src.abs().max() / (127 if t.tensor_type == Q.Q8_0 else 8)).item()
            if (w - src).abs().max().item() > step:
                fail(f"{path}: {t.name} dequantizes too far from the source")
        exact[t.name] = w
    if set(exact) != set(sd):
        fail(f"{path}: tensors differ from the source: {sorted(set(exact) ^ set(sd))[:8]}")
    return exact


# ---------------------------------------------------------------- fp8


def is_fp8_weight(key, w):
    return key.endswith(".weight") and w.dim() == 2


def write_fp8(sd, dtype, path):
    out = {k: (w.to(dtype) if is_fp8_weight(k, w) else w.to(torch.bfloat16)) for k, w in sd.items()}
    save_file(out, path)
    return {k: v.float() for k, v in out.items()}


def write_fp8_scaled(sd, path):
    """ComfyUI scaled fp8; returns the float32 weights fp8 * scale_weight."""
    out = {COMFY_PREFIX + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    weights = {}
    for k, w in sd.items():
        if is_fp8_weight(k, w):
            layer = k[: -len(".weight")]
            w32 = w.float()
            scale = (w32.abs().max() / 448.0).to(torch.float32)
            q = (w32 / scale).to(torch.float8_e4m3fn)
            out[COMFY_PREFIX + k] = q
            out[COMFY_PREFIX + layer + ".scale_weight"] = scale.reshape(())
            out[COMFY_PREFIX + layer + ".scale_input"] = torch.tensor(1.0, dtype=torch.float32)
            weights[k] = q.float() * scale
        else:
            out[COMFY_PREFIX + k] = w.to(torch.bfloat16)
            weights[k] = out[COMFY_PREFIX + k].float()
    save_file(out, path)
    return weights


def check_fp8_file(path, sd, dtype, prefix=""):
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for k, w in sd.items():
            got = f.get_tensor(prefix + k)
            want_dtype = dtype if is_fp8_weight(k, w) else torch.bfloat16
            if got.dtype != want_dtype or tuple(got.shape) != tuple(w.shape):
                fail(f"{path}: {prefix + k} is {got.dtype} {tuple(got.shape)}")
            if prefix and is_fp8_weight(k, w):
                scale = f.get_tensor(prefix + k[: -len(".weight")] + ".scale_weight")
                if scale.dtype != torch.float32 or scale.dim() != 0:
                    fail(f"{path}: scale_weight of {k} is {scale.dtype} {tuple(scale.shape)}")
                w = w.float() / scale
            # round trip: the stored value is the nearest fp8 of the source
            if not torch.equal(got, w.float().to(want_dtype)):
                fail(f"{path}: {prefix + k} is not the rounded source")
        extra = {k for k in keys if k[len(prefix):] not in sd}
        if prefix:
            marker = f.get_tensor(prefix + "scaled_fp8")
            if marker.dtype != torch.float8_e4m3fn or marker.numel() != 0:
                fail(f"{path}: bad scaled_fp8 marker")
            n = sum(is_fp8_weight(k, w) for k, w in sd.items())
            if len(extra) != 1 + 2 * n:
                fail(f"{path}: {len(extra)} extra keys, want {1 + 2 * n}")
        elif extra:
            fail(f"{path}: unexpected keys {sorted(extra)[:4]}")


# ---------------------------------------------------------------- references


def load_transformer(path, **kwargs):
    return FluxTransformer2DModel.from_single_file(
        path, config=os.path.join(MODEL, "transformer"), torch_dtype=torch.float32, local_files_only=True, **kwargs
    )


def load_f32(weights):
    """A transformer holding exactly `weights` (BFL names, float32)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "transformer.safetensors")
        save_file({k: v.contiguous() for k, v in weights.items()}, path)
        model = load_transformer(path)
    check_holds(model, weights, "float32 weights")
    return model


def check_holds(model, weights, what):
    config = dict(model.config)
    got = to_bfl({k: v.detach().clone() for k, v in model.state_dict().items()}, config)
    for k, want in weights.items():
        if got[k].dtype != torch.float32 or not torch.equal(got[k], want):
            fail(f"{what}: the loaded transformer's {k} is not the expected float32 weight")


def check_diffusers_gguf(model, exact, types, path):
    """diffusers must hold every quantized tensor as a GGUFLinear whose
    float16 dequantization is the exact one rounded to float16 (d * q is
    exact in float32, so float16 arithmetic rounds it once), and the F32 /
    F16 tensors as plain float32 weights."""
    quantized = {k for k, t in types.items() if t not in (Q.F32, Q.F16)}
    # diffusers splits a fused `qkv` into 3 linear layers and `linear1` into 4
    want = sum(3 if k.endswith("qkv.weight") else 4 if k.endswith("linear1.weight") else 1 for k in quantized)
    n = sum(isinstance(m, GGUFLinear) and hasattr(m.weight, "quant_type") for m in model.modules())
    if n != want:
        fail(f"{path}: diffusers made {n} GGUF linear layers, want {want}")
    sd = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            sd[f"{name}.{pname}"] = dequantize_gguf_tensor(p.detach()).float() if hasattr(p, "quant_type") else p.detach()
    got = to_bfl(sd, dict(model.config))
    for k, w in exact.items():
        want = w.half().float() if k in quantized else w
        if got[k].dtype != torch.float32 or not torch.equal(got[k], want):
            fail(f"{path}: diffusers' {k} is not the exact dequantization rounded to float16")


draws = []


def recording(randn):
    def wrapped(*args, **kwargs):
        t = randn(*args, **kwargs)
        draws.append(t.detach().clone())
        return t

    return wrapped


flux_module.randn_tensor = recording(flux_module.randn_tensor)


def run(name, transformer, extra):
    """Run the request with `transformer` and write NAME.{json,safetensors,0.png}."""
    draws.clear()
    pipe = FluxPipeline.from_pretrained(MODEL, transformer=transformer, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    decoded = []
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        decoded.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    r = REQUEST
    with torch.no_grad():
        out = pipe(
            prompt=r["prompt"],
            num_inference_steps=r["num_inference_steps"],
            guidance_scale=r["guidance_scale"],
            height=r["height"],
            width=r["width"],
            max_sequence_length=r["max_sequence_length"],
            generator=torch.Generator("cpu").manual_seed(r["seed"]),
            output_type="np",
        )
    image = torch.from_numpy(out.images).to(torch.float32)
    tensors = {"image": image, "latents_to_vae": decoded[-1]}
    for i, d in enumerate(draws):
        tensors[f"noise.{i}"] = d
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.safetensors"))
    png = f"{name}.0.png"
    Image.fromarray((out.images[0] * 255).round().astype("uint8")).save(os.path.join(OUT, png))
    meta = {
        "model": "models/tiny-flux-dev",
        **extra,
        "pipeline": "FluxPipeline",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "prompt": r["prompt"],
        "num_inference_steps": r["num_inference_steps"],
        "guidance_scale": r["guidance_scale"],
        "height": r["height"],
        "width": r["width"],
        "max_sequence_length": r["max_sequence_length"],
        "seed": r["seed"],
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "image_shape_nhwc": list(image.shape),
        "noise_draws": len(draws),
        "images": [png],
        "_generated_by": "tools/gen_quantized_refs.py",
        "_versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "gguf": version("gguf")},
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return tensors


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def compare(what, a, b):
    lat = rel_l2(a["latents_to_vae"], b["latents_to_vae"])
    img = (a["image"] - b["image"]).abs().max().item()
    print(f"  {what}: latents_to_vae rel L2 {lat:.3e}, image max abs {img:.3e}")
    return {"latents_rel_l2": lat, "image_max_abs": img}


def main():
    if diffusers.__version__ != "0.42.1":
        fail(f"needs diffusers 0.42.1, found {diffusers.__version__}")
    patch_diffusers_width()
    os.makedirs(OUT, exist_ok=True)
    sd = bfl_weights()
    baseline = load_file(os.path.join(ROOT, "references", "flux_dev_txt2img.safetensors"))
    report = {}

    for qtype in (Q.Q8_0, Q.Q4_0):
        tag = qtype.name
        path = os.path.join(OUT, f"tiny-flux-dev-{tag}.gguf")
        types = write_gguf(sd, qtype, path)
        exact = read_gguf(path, sd, types, qtype)
        counts = {}
        for t in types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        print(f"{path}: {os.path.getsize(path)} bytes, types {counts}")
        file_rel = f"{REL}/{os.path.basename(path)}"
        lower = tag.lower()

        model = load_transformer(path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
        check_diffusers_gguf(model, exact, types, path)
        a = run(f"flux_dev_gguf_{lower}_diffusers", model, {
            "transformer_file": file_rel,
            "transformer_weights": "diffusers GGUFQuantizationConfig(compute_dtype=float32): "
            "dequantized in float16 (d * q), cast to float32",
        })
        b = run(f"flux_dev_gguf_{lower}_exact", load_f32(exact), {
            "transformer_file": file_rel,
            "transformer_weights": "exact float32 dequantization (gguf.quants.dequantize: float32(d) * q, as ggml)",
        })
        if not torch.equal(a["noise.0"], baseline["noise.0"]) or not torch.equal(b["noise.0"], baseline["noise.0"]):
            fail("initial noise differs from references/flux_dev_txt2img")
        print(f"{tag}:")
        report[f"{tag} exact vs diffusers"] = compare("exact vs diffusers", b, a)
        report[f"{tag} exact vs float16 weights"] = compare("exact vs float16 weights (flux_dev_txt2img)", b, baseline)

    for dtype, tag in ((torch.float8_e4m3fn, "e4m3fn"), (torch.float8_e5m2, "e5m2")):
        path = os.path.join(OUT, f"tiny-flux-dev-fp8_{tag}.safetensors")
        weights = write_fp8(sd, dtype, path)
        check_fp8_file(path, sd, dtype)
        model = load_transformer(path)
        check_holds(model, weights, path)
        t = run(f"flux_dev_fp8_{tag}", model, {
            "transformer_file": f"{REL}/{os.path.basename(path)}",
            "transformer_weights": "diffusers from_single_file(torch_dtype=float32): fp8 and bf16 upcast exactly",
        })
        print(f"{path}: {os.path.getsize(path)} bytes")
        report[f"fp8 {tag} vs float16 weights"] = compare("vs float16 weights", t, baseline)

    path = os.path.join(OUT, "tiny-flux-dev-fp8_scaled.safetensors")
    weights = write_fp8_scaled(sd, path)
    check_fp8_file(path, sd, torch.float8_e4m3fn, prefix=COMFY_PREFIX)
    t = run("flux_dev_fp8_scaled", load_f32(weights), {
        "transformer_file": f"{REL}/{os.path.basename(path)}",
        "transformer_weights": "float32 weights fp8.float() * scale_weight (scale_input ignored), bf16 rest upcast",
    })
    print(f"{path}: {os.path.getsize(path)} bytes")
    report["fp8 scaled vs float16 weights"] = compare("vs float16 weights", t, baseline)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
