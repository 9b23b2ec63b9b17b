"""FLUX LoRA references: a rank-4 LoRA for tiny-flux-dev touching every
linear layer of the transformer and the CLIP text encoder's attention and
MLP, written in two layouts, and diffusers' FluxPipeline run with each:

- tiny-flux-lora.safetensors: diffusers / PEFT (`transformer.<module>.lora_A.weight`,
  `lora_B.weight`, `text_encoder.<module>...`), run at scale 0.8;
- tiny-flux-lora-kohya.safetensors: kohya sd-scripts, with the original
  Black Forest Labs module names (`lora_unet_double_blocks_0_img_attn_qkv`,
  fused q/k/v as one block-diagonal up matrix, `single_blocks_N_linear1` as
  fused q/k/v/mlp, `final_layer_adaLN_modulation_1` in BFL's (shift, scale)
  row order) and `lora_te1_` for CLIP, alpha 2 (alpha / rank = 0.5), run at
  scale 1.6: the same update as the PEFT file at 0.8, so the two cases agree.
  The final layer carries no alpha and has its up matrix pre-scaled by 0.5,
  because diffusers ignores alpha there.

diffusers' kohya converter hard-codes FLUX.1's real sizes for the split of
`linear1` (3072, 3072, 3072, 12288); this script patches the converter's
source to the tiny model's sizes before loading the kohya file. It also
checks that diffusers' conversion of the kohya file gives the PEFT file's
products.

Writes tests/fixtures/loras/tiny-flux-lora{,-kohya}.safetensors and, in
tests/fixtures/generated/, flux_dev_lora_peft_scale0.8 and
flux_dev_lora_kohya_scale1.6 (layout of gen_flux_img2img_refs.py).

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1, transformers 5.23, peft 0.21):
    /tmp/refenv/bin/python tools/gen_flux_lora_refs.py
"""
import glob
import inspect
import json
import os

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
import diffusers.loaders.lora_conversion_utils as conv
import diffusers.loaders.lora_pipeline as lora_pipeline
import diffusers.pipelines.flux.pipeline_flux as flux_module
from diffusers import FluxPipeline

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "generated")
LORAS = os.path.join(ROOT, "loras")
MODEL = os.path.join(ROOT, "models", "tiny-flux-dev")
RANK = 4
ALPHA = 2.0

DOUBLE = {
    # BFL name -> diffusers modules (fused ones split in this row order)
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def shapes(component):
    path = glob.glob(os.path.join(MODEL, component, "*.safetensors"))[0]
    with safe_open(path, "pt") as f:
        return {k[: -len(".weight")]: f.get_slice(k).get_shape() for k in f.keys()
                if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}


def make_loras():
    gen = torch.Generator("cpu").manual_seed(4321)
    peft, kohya, mats = {}, {}, {}
    tr = shapes("transformer")
    for module in sorted(tr):
        out_f, in_f = tr[module]
        a = torch.randn(RANK, in_f, generator=gen) * 0.3
        b = torch.randn(out_f, RANK, generator=gen) * 0.3
        peft[f"transformer.{module}.lora_A.weight"] = a
        peft[f"transformer.{module}.lora_B.weight"] = b
        mats[module] = (a, b)
    te = shapes("text_encoder")
    for module in sorted(m for m in te if any(m.endswith(t) for t in TE_TARGETS)):
        out_f, in_f = te[module]
        a = torch.randn(RANK, in_f, generator=gen) * 0.3
        b = torch.randn(out_f, RANK, generator=gen) * 0.3
        peft[f"text_encoder.{module}.lora_A.weight"] = a
        peft[f"text_encoder.{module}.lora_B.weight"] = b
        k = "lora_te1_" + module.replace(".", "_")
        kohya[f"{k}.lora_down.weight"] = a
        kohya[f"{k}.lora_up.weight"] = b
        kohya[f"{k}.alpha"] = torch.tensor(ALPHA)

    def fused(key, modules):
        # Block-diagonal: down stacks the parts' downs, up places each
        # part's up in its own rows and rank columns.
        downs = [mats[m][0] for m in modules]
        ups = [mats[m][1] for m in modules]
        down = torch.cat(downs, 0)
        up = torch.zeros(sum(u.shape[0] for u in ups), RANK * len(ups))
        row = 0
        for j, u in enumerate(ups):
            up[row: row + u.shape[0], j * RANK: (j + 1) * RANK] = u
            row += u.shape[0]
        kohya[f"{key}.lora_down.weight"] = down
        kohya[f"{key}.lora_up.weight"] = up
        # alpha scales by alpha / rank of the fused layer (rank 4 * parts)
        kohya[f"{key}.alpha"] = torch.tensor(ALPHA * len(modules))

    blocks = sorted({int(m.split(".")[1]) for m in tr if m.startswith("transformer_blocks.")})
    for i in blocks:
        for bfl, modules in DOUBLE.items():
            fused(f"lora_unet_double_blocks_{i}_{bfl}", [f"transformer_blocks.{i}.{m}" for m in modules])
    singles = sorted({int(m.split(".")[1]) for m in tr if m.startswith("single_transformer_blocks.")})
    for i in singles:
        for bfl, modules in SINGLE.items():
            fused(f"lora_unet_single_blocks_{i}_{bfl}", [f"single_transformer_blocks.{i}.{m}" for m in modules])
    for bfl, module in GLOBAL.items():
        if bfl == "final_layer_linear":
            a, b = mats[module]
            kohya[f"lora_unet_{bfl}.lora_down.weight"] = a
            kohya[f"lora_unet_{bfl}.lora_up.weight"] = b * (ALPHA / RANK)
        else:
            fused(f"lora_unet_{bfl}", [module])
    # norm_out.linear: BFL orders the rows (shift, scale), diffusers (scale, shift).
    a, b = mats["norm_out.linear"]
    half = b.shape[0] // 2
    kohya["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"] = a
    kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] = (
        torch.cat([b[half:], b[:half]]) * (ALPHA / RANK))
    used = {m for ms in DOUBLE.values() for m in ms} | {m for ms in SINGLE.values() for m in ms}
    covered = {m for m in tr if m.split(".", 2)[-1] in used and m.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    covered |= set(GLOBAL.values()) | {"norm_out.linear"}
    assert covered == set(tr), set(tr) - covered
    save_file(peft, os.path.join(LORAS, "tiny-flux-lora.safetensors"))
    save_file(kohya, os.path.join(LORAS, "tiny-flux-lora-kohya.safetensors"))
    return tr


def patch_converter(tr):
    """diffusers splits linear1 as (3072, 3072, 3072, 12288); use the tiny
    sizes. It also returns the non-block layers (img_in, txt_in, time_in,
    vector_in, guidance_in, final_layer) without the `transformer.` prefix,
    so the pipeline drops them silently; easel applies them, as kohya's and
    ComfyUI's loaders do, so the reference gets them prefixed."""
    inner = tr["single_transformer_blocks.0.attn.to_q"][0]
    mlp = tr["single_transformer_blocks.0.proj_mlp"][0]
    src = inspect.getsource(conv._convert_kohya_flux_lora_to_diffusers)
    patched = src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{inner}, {inner}, {inner}, {mlp}]")
    assert patched != src
    namespace = dict(vars(conv))
    exec(patched, namespace)
    convert = namespace["_convert_kohya_flux_lora_to_diffusers"]

    def prefixed(state_dict):
        out = convert(state_dict)
        return {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
                for k, v in out.items()}

    lora_pipeline._convert_kohya_flux_lora_to_diffusers = prefixed
    return prefixed


def check_conversion(convert):
    peft = load_file(os.path.join(LORAS, "tiny-flux-lora.safetensors"))
    kohya = load_file(os.path.join(LORAS, "tiny-flux-lora-kohya.safetensors"))
    converted = convert(dict(kohya))
    # The text encoder's keys come out in diffusers' older spelling; the
    # pipeline runs below cover them.
    stems = {k[: -len(".lora_A.weight")] for k in peft
             if k.endswith(".lora_A.weight") and k.startswith("transformer.")}
    assert len(stems) > 0
    worst = 0.0
    for stem in stems:
        want = peft[f"{stem}.lora_B.weight"] @ peft[f"{stem}.lora_A.weight"] * (ALPHA / RANK)
        got = converted[f"{stem}.lora_B.weight"] @ converted[f"{stem}.lora_A.weight"]
        worst = max(worst, (want - got).abs().max().item())
    assert worst < 1e-6, worst
    print("kohya -> diffusers conversion matches PEFT products; max diff", worst)


draws = []


def recording(randn):
    def wrapped(*args, **kwargs):
        t = randn(*args, **kwargs)
        draws.append(t.detach().clone())
        return t

    return wrapped


flux_module.randn_tensor = recording(flux_module.randn_tensor)

CASES = [
    dict(name="flux_dev_lora_peft_scale0.8", lora="tiny-flux-lora.safetensors", scale=0.8),
    dict(name="flux_dev_lora_kohya_scale1.6", lora="tiny-flux-lora-kohya.safetensors", scale=1.6),
]


def run_case(case):
    draws.clear()
    pipe = FluxPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(os.path.join(LORAS, case["lora"]))
    decoded = []
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        decoded.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    prompt, steps, guidance, seed, width, height = "a photo of a cat", 4, 3.5, 23, 64, 48
    with torch.no_grad():
        out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
                   height=height, width=width, max_sequence_length=64,
                   joint_attention_kwargs={"scale": case["scale"]},
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    image = torch.from_numpy(out.images).to(torch.float32)
    name = case["name"]
    tensors = {"image": image, "latents_to_vae": decoded[-1]}
    for i, d in enumerate(draws):
        tensors[f"noise.{i}"] = d
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.safetensors"))
    png = f"{name}.0.png"
    Image.fromarray((out.images[0] * 255).round().astype("uint8")).save(os.path.join(OUT, png))
    meta = {
        "model": "models/tiny-flux-dev",
        "pipeline": "FluxPipeline",
        "lora": f"loras/{case['lora']}",
        "lora_scale": case["scale"],
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "prompt": prompt,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "height": height,
        "width": width,
        "max_sequence_length": 64,
        "seed": seed,
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "image_shape_nhwc": list(image.shape),
        "noise_draws": len(draws),
        "images": [png],
        "_generated_by": "tools/gen_flux_lora_refs.py",
        "_versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})
    return tensors["latents_to_vae"]


if __name__ == "__main__":
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    tr = make_loras()
    convert = patch_converter(tr)
    check_conversion(convert)
    a = run_case(CASES[0])
    b = run_case(CASES[1])
    print("peft vs kohya latents max abs diff", (a - b).abs().max().item())
