"""FLUX.1 transformer-only single files in the original Black Forest Labs
layout, from the tiny fixture models, for easel's FLUX single-file parity
tests (crates/easel-diffusion/tests/parity.rs `single_file_flux_*`,
issue 14).

For each tiny FLUX folder the transformer is written under the names of
BFL's `flux` code (`double_blocks.N.img_attn.qkv` with q, k, v fused by
rows, `single_blocks.N.linear1` fusing q, k, v and the MLP input,
`linear2`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`
(dev only), `final_layer.adaLN_modulation.1` in BFL's (shift, scale) order,
the attention norms as `norm.{query,key}_norm.scale`): the inverse of
diffusers' `convert_flux_transformer_checkpoint_to_diffusers`. The
schnell file is written with ComfyUI's `model.diffusion_model.` prefix,
so both spellings are covered. Files go to
tests/fixtures/generated/single_file/NAME.safetensors (transformer only).

Each file is then proved faithful: diffusers' own
`FluxTransformer2DModel.from_single_file(file, config=<folder>/transformer)`
loads it and its state dict must equal the folder's exactly. diffusers
0.42 hard-codes FLUX.1's width (`inner_dim = 3072`) where it splits
`linear1`, so it cannot load the tiny model as released: this script
patches that one line to take the width from `img_in.weight`, as easel
does.

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1), e.g. in a virtual environment under /tmp (never commit
one):
    /tmp/tiling-venv/bin/python tools/gen_flux_single_files.py
"""
import inspect
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_model as sfm
from diffusers.loaders import single_file_utils as sfu

MODELS = "tests/fixtures/models"
OUT = "tests/fixtures/generated/single_file"


def patch_diffusers_width():
    """Make diffusers' FLUX converter take the width from the checkpoint."""
    fn = sfu.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    line = "inner_dim = 3072"
    if line not in src:
        sys.exit("diffusers' FLUX converter changed: `inner_dim = 3072` not found")
    src = src.replace(line, 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    scope = dict(sfu.__dict__)
    exec(compile(src, sfu.__file__, "exec"), scope)
    patched = scope[fn.__name__]
    sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = patched


def to_bfl(sd, config):
    out = {}
    take = lambda k: sd.pop(k)
    for p in ("weight", "bias"):
        out[f"img_in.{p}"] = take(f"x_embedder.{p}")
        out[f"txt_in.{p}"] = take(f"context_embedder.{p}")
        for bfl, d in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")]:
            for a, b in [("in_layer", "linear_1"), ("out_layer", "linear_2")]:
                k = f"time_text_embed.{d}.{b}.{p}"
                if k in sd:
                    out[f"{bfl}.{a}.{p}"] = take(k)
        out[f"final_layer.linear.{p}"] = take(f"proj_out.{p}")
        scale, shift = take(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)
    for i in range(config["num_layers"]):
        b = f"transformer_blocks.{i}."
        o = f"double_blocks.{i}."
        for p in ("weight", "bias"):
            for side, (q, k, v), proj, ff, mod in [
                ("img", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff", "norm1"),
                ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out", "ff_context", "norm1_context"),
            ]:
                out[f"{o}{side}_attn.qkv.{p}"] = torch.cat([take(f"{b}{x}.{p}") for x in (q, k, v)], dim=0)
                out[f"{o}{side}_attn.proj.{p}"] = take(f"{b}{proj}.{p}")
                out[f"{o}{side}_mlp.0.{p}"] = take(f"{b}{ff}.net.0.proj.{p}")
                out[f"{o}{side}_mlp.2.{p}"] = take(f"{b}{ff}.net.2.{p}")
                out[f"{o}{side}_mod.lin.{p}"] = take(f"{b}{mod}.linear.{p}")
        for side, q, k in [("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")]:
            out[f"{o}{side}_attn.norm.query_norm.scale"] = take(f"{b}attn.{q}.weight")
            out[f"{o}{side}_attn.norm.key_norm.scale"] = take(f"{b}attn.{k}.weight")
    for i in range(config["num_single_layers"]):
        b = f"single_transformer_blocks.{i}."
        o = f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}linear1.{p}"] = torch.cat(
                [take(f"{b}{x}.{p}") for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")], dim=0
            )
            out[f"{o}linear2.{p}"] = take(f"{b}proj_out.{p}")
            out[f"{o}modulation.lin.{p}"] = take(f"{b}norm.linear.{p}")
        out[f"{o}norm.query_norm.scale"] = take(f"{b}attn.norm_q.weight")
        out[f"{o}norm.key_norm.scale"] = take(f"{b}attn.norm_k.weight")
    if sd:
        sys.exit(f"unconverted diffusers keys: {sorted(sd)[:8]}")
    return out


def convert(name, prefix):
    d = os.path.join(MODELS, name, "transformer")
    want = load_file(os.path.join(d, "diffusion_pytorch_model.safetensors"))
    config = json.load(open(os.path.join(d, "config.json")))
    sd = {prefix + k: v.contiguous() for k, v in to_bfl(dict(want), config).items()}
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file(sd, path)

    # The proof: diffusers' own single-file loader gives the folder's weights.
    model = FluxTransformer2DModel.from_single_file(
        path, config=d, torch_dtype=torch.float16, local_files_only=True
    )
    got = model.state_dict()
    if set(got) != set(want):
        sys.exit(f"{name}: keys differ: {sorted(set(got) ^ set(want))[:8]}")
    for k in want:
        if got[k].shape != want[k].shape or not torch.equal(got[k].to(want[k].dtype), want[k]):
            sys.exit(f"{name}: `{k}` differs")
    print(f"{path}: {len(sd)} tensors, {os.path.getsize(path)} bytes; diffusers loads the folder's weights")


if __name__ == "__main__":
    patch_diffusers_width()
    convert("tiny-flux-dev", "")
    convert("tiny-flux-schnell", "model.diffusion_model.")
    convert("tiny-flux-fill", "")
