"""Single-file checkpoints in the original (LDM / A1111) layout of the tiny
fixture models, for easel's single-file parity tests
(crates/easel-diffusion/tests/single_file.rs, issue 14).

For each diffusers folder (tiny-sd15, tiny-sd2-v, tiny-sdxl) the UNet, VAE
and text encoder(s) are written under their LDM names, the inverse of
diffusers' `convert_ldm_*_checkpoint` (the layout of the published
checkpoints: `model.diffusion_model.*` with `input_blocks` / `middle_block`
/ `output_blocks`, `first_stage_model.*` with 1x1-conv VAE attention,
`cond_stage_model.transformer.*` (SD 1.x), OpenCLIP `cond_stage_model.model.*`
with a fused `in_proj_weight` and `[in, out]` `text_projection` (SD 2.x),
`conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*`
(SDXL)), into
tests/fixtures/generated/single_file/NAME.safetensors.

Each file is then proved faithful: diffusers' own
`StableDiffusion[XL]Pipeline.from_single_file(file, config=<folder>)` loads
it and every state dict must equal the folder's exactly. As the issue's
facts say, the tiny SDXL's two text encoders have the same width, so
diffusers cannot tell them apart: `text_encoder_2` is checked with
diffusers' `convert_open_clip_checkpoint` on the `embedders.1` keys instead.

Rerun from the repository root with the reference stack (torch 2.15 CPU,
diffusers 0.42.1, transformers 5.23), e.g. in a virtual environment under
/tmp (never commit one):
    /tmp/tiling-venv/bin/python tools/gen_single_files.py
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu

MODELS = "tests/fixtures/models"
OUT = "tests/fixtures/generated/single_file"

RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def sub(rest, table):
    for new, old in table:
        if rest.startswith(new):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(sd, config):
    lpb = config["layers_per_block"]
    per = lpb + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("conv_in."):
            n = "input_blocks.0.0." + k[len("conv_in."):]
        elif k.startswith("time_embedding.linear_1."):
            n = "time_embed.0." + p[-1]
        elif k.startswith("time_embedding.linear_2."):
            n = "time_embed.2." + p[-1]
        elif k.startswith("add_embedding.linear_1."):
            n = "label_emb.0.0." + p[-1]
        elif k.startswith("add_embedding.linear_2."):
            n = "label_emb.0.2." + p[-1]
        elif k.startswith("conv_norm_out."):
            n = "out.0." + p[-1]
        elif k.startswith("conv_out."):
            n = "out.2." + p[-1]
        elif k.startswith("mid_block.resnets."):
            n = f"middle_block.{0 if p[2] == '0' else 2}." + sub(".".join(p[3:]), RESNET)
        elif k.startswith("mid_block.attentions.0."):
            n = "middle_block.1." + ".".join(p[3:])
        elif k.startswith("down_blocks."):
            b = int(p[1])
            rest = ".".join(p[4:])
            if p[2] == "resnets":
                n = f"input_blocks.{1 + b * per + int(p[3])}.0." + sub(rest, RESNET)
            elif p[2] == "attentions":
                n = f"input_blocks.{1 + b * per + int(p[3])}.1." + rest
            else:  # downsamplers.0.conv.X
                n = f"input_blocks.{1 + b * per + lpb}.0.op." + ".".join(p[5:])
        elif k.startswith("up_blocks."):
            b = int(p[1])
            rest = ".".join(p[4:])
            if p[2] == "resnets":
                n = f"output_blocks.{b * per + int(p[3])}.0." + sub(rest, RESNET)
            elif p[2] == "attentions":
                n = f"output_blocks.{b * per + int(p[3])}.1." + rest
            else:  # upsamplers.0.conv.X
                n = f"output_blocks.{b * per + lpb}.{2 if up_attn[b] else 1}.conv." + ".".join(p[5:])
        else:
            raise KeyError(k)
        out["model.diffusion_model." + n] = v
    return out


def vae_to_ldm(sd, config):
    nblocks = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        side = p[0]
        if p[0] in ("quant_conv", "post_quant_conv"):
            n = k
        elif p[1] in ("conv_in", "conv_out"):
            n = k
        elif p[1] == "conv_norm_out":
            n = f"{side}.norm_out.{p[2]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            n = f"{side}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block" and p[2] == "attentions":
            n = f"{side}.mid.attn_1.{attn[p[4]]}.{p[-1]}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            ldm_i = i if side == "encoder" else nblocks - 1 - i
            blocks = "down" if side == "encoder" else "up"
            if p[3] == "resnets":
                n = f"{side}.{blocks}.{ldm_i}.block.{p[4]}." + ".".join(p[5:]).replace(
                    "conv_shortcut", "nin_shortcut"
                )
            else:  # downsamplers / upsamplers .0.conv.X
                sample = "downsample" if side == "encoder" else "upsample"
                n = f"{side}.{blocks}.{ldm_i}.{sample}.conv.{p[-1]}"
        else:
            raise KeyError(k)
        out["first_stage_model." + n] = v.contiguous()
    return out


def clip_to_ldm(sd, prefix):
    out = {}
    for k, v in sd.items():
        if not k.startswith("text_model."):
            k = "text_model." + k  # transformers >= 5.6 flattens CLIPTextModel
        out[prefix + k] = v
    return out


def open_clip_to_ldm(sd, prefix):
    out = {}
    layers = {}
    for k, v in sd.items():
        k = k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k
        if k == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + k.split(".")[-1]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif k.startswith("text_model.encoder.layers."):
            p = k.split(".")
            i, rest = p[3], ".".join(p[4:])
            base = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault((i, p[-1]), {})[rest.split(".")[1]] = v
            else:
                for new, old in [
                    ("layer_norm1.", "ln_1."),
                    ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."),
                    ("self_attn.out_proj.", "attn.out_proj."),
                ]:
                    if rest.startswith(new):
                        out[base + old + rest[len(new):]] = v
                        break
                else:
                    raise KeyError(k)
        else:
            raise KeyError(k)
    for (i, param), qkv in layers.items():
        fused = torch.cat([qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]], dim=0)
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{param}"] = fused
    return out


def folder(name, component):
    d = os.path.join(MODELS, name, component)
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    config = json.load(open(os.path.join(d, "config.json")))
    return load_file(os.path.join(d, files[0])), config


def same(name, component, want, got):
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    norm = lambda sd: {(k if k.startswith("text_model.") or k.startswith("text_projection") or "text" not in component else "text_model." + k): v for k, v in sd.items()}
    got, want = norm(got), norm(want)
    if set(got) != set(want):
        sys.exit(f"{name}/{component}: keys differ: {sorted(set(got) ^ set(want))[:8]}")
    for k in want:
        if got[k].shape != want[k].shape or not torch.equal(got[k].to(want[k].dtype), want[k]):
            sys.exit(f"{name}/{component}: `{k}` differs")


def convert(name, kind):
    unet, unet_cfg = folder(name, "unet")
    vae, vae_cfg = folder(name, "vae")
    te, _ = folder(name, "text_encoder")
    sd = {**unet_to_ldm(unet, unet_cfg), **vae_to_ldm(vae, vae_cfg)}
    if kind == "sd1":
        sd.update(clip_to_ldm(te, "cond_stage_model.transformer."))
    elif kind == "sd2":
        sd.update(open_clip_to_ldm(te, "cond_stage_model.model."))
    else:
        te2, _ = folder(name, "text_encoder_2")
        sd.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(te2, "conditioner.embedders.1.model."))
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)

    # The proof: diffusers' own single-file loader gives the folder's weights.
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {"safety_checker": None} if kind != "sdxl" else {}
    pipe = cls.from_single_file(
        path, config=os.path.join(MODELS, name), torch_dtype=torch.float16, local_files_only=True, **extra
    )
    same(name, "unet", unet, pipe.unet.state_dict())
    same(name, "vae", vae, pipe.vae.state_dict())
    if kind != "sdxl":
        same(name, "text_encoder", te, pipe.text_encoder.state_dict())
    else:
        same(name, "text_encoder", te, pipe.text_encoder.state_dict())
        checkpoint = load_file(path)
        te2_sd = sfu.convert_open_clip_checkpoint(
            pipe.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model."
        )
        same(name, "text_encoder_2", te2, te2_sd)
    print(f"{path}: {len(sd)} tensors, {os.path.getsize(path)} bytes; diffusers loads the folder's weights")

    # What is committed: the file without its UNet and its CLIP
    # token-embedding tables (most of its bytes; equal, tensor for tensor,
    # to the folder's), which the tests copy back in from the folder
    # (tests/support/single_file.rs). The header's `easel.left_out` lists
    # each left-out LDM key with the folder component and key it equals.
    left_out = {ldm: ["unet", key] for ldm, key in unet_to_ldm({k: k for k in unet}, unet_cfg).items()}
    for k in sd:
        if "token_embedding" in k:
            component = "text_encoder_2" if k.startswith("conditioner.embedders.1.") else "text_encoder"
            left_out[k] = [component, "text_model.embeddings.token_embedding.weight"]
    partial = os.path.join(OUT, f"{name}.partial.safetensors")
    save_file(
        {k: v.contiguous() for k, v in sd.items() if k not in left_out},
        partial,
        metadata={"easel.left_out": json.dumps(left_out, sort_keys=True)},
    )
    os.remove(path)
    print(f"{partial}: {os.path.getsize(partial)} bytes committed")


if __name__ == "__main__":
    convert("tiny-sd15", "sd1")
    convert("tiny-sd2-v", "sd2")
    convert("tiny-sdxl", "sdxl")
