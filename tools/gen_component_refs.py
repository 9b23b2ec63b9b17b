"""Component-level reference outputs for easel's model tests.

Runs each network of the tiny fixture models once through diffusers /
transformers (float32 on CPU) on fixed inputs and saves inputs and outputs to
tests/fixtures/generated/components.safetensors, so a mismatch in an
end-to-end parity test can be traced to the text encoder, the UNet or the VAE.

Rerun (needs torch, diffusers 0.42.1, transformers 5.23, from PyPI):
    python tools/gen_component_refs.py
"""
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
MODELS = os.path.join(ROOT, "models")
out = {}

ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70,
                    [49406, 2368, 49407] + [0] * 74])
out["text.input_ids"] = ids.to(torch.int64)
for name, sub, cls in [("sd15", "text_encoder", CLIPTextModel),
                       ("sd2v", "text_encoder", CLIPTextModel),
                       ("sdxl", "text_encoder_2", CLIPTextModelWithProjection)]:
    folder = {"sd15": "tiny-sd15", "sd2v": "tiny-sd2-v", "sdxl": "tiny-sdxl"}[name]
    m = cls.from_pretrained(os.path.join(MODELS, folder, sub), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        o = m(ids, output_hidden_states=True)
    key = f"text.{name}.{sub}"
    out[f"{key}.last_hidden_state"] = o.last_hidden_state.contiguous()
    out[f"{key}.penultimate"] = o.hidden_states[-2].contiguous()
    if hasattr(o, "text_embeds"):
        out[f"{key}.text_embeds"] = o.text_embeds.contiguous()
    else:
        out[f"{key}.pooled"] = o.pooler_output.contiguous()

g = torch.Generator("cpu").manual_seed(0)
for name, folder, hw in [("sd15", "tiny-sd15", (8, 8)), ("sd15_odd", "tiny-sd15", (9, 13)),
                         ("sd2v", "tiny-sd2-v", (8, 12)), ("sdxl", "tiny-sdxl", (8, 8)),
                         ("sdxl_odd", "tiny-sdxl", (7, 10))]:
    unet = UNet2DConditionModel.from_pretrained(os.path.join(MODELS, folder, "unet"), torch_dtype=torch.float32).eval()
    c = unet.config
    sample = torch.randn((2, c.in_channels, *hw), generator=g)
    ctx = torch.randn((2, 77, c.cross_attention_dim), generator=g)
    t = 501.0 if name != "sd2v" else 981.0
    kwargs = {}
    if c.addition_embed_type == "text_time":
        text_embeds = torch.randn((2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim), generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [56.0, 80.0, 0.0, 0.0, 56.0, 80.0]])
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        out[f"unet.{name}.text_embeds"] = text_embeds
        out[f"unet.{name}.time_ids"] = time_ids
    with torch.no_grad():
        y = unet(sample, torch.tensor(t), encoder_hidden_states=ctx, **kwargs).sample
    out[f"unet.{name}.sample"] = sample
    out[f"unet.{name}.context"] = ctx
    out[f"unet.{name}.timestep"] = torch.tensor([t])
    out[f"unet.{name}.out"] = y.contiguous()

vae = AutoencoderKL.from_pretrained(os.path.join(MODELS, "tiny-sd15", "vae"), torch_dtype=torch.float32).eval()
z = torch.randn((1, 4, 5, 6), generator=g)
x = torch.rand((1, 3, 24, 40), generator=g) * 2 - 1
with torch.no_grad():
    out["vae.sd15.z"] = z
    out["vae.sd15.decoded"] = vae.decode(z).sample.contiguous()
    out["vae.sd15.x"] = x
    d = vae.encode(x).latent_dist
    out["vae.sd15.mean"] = d.mean.contiguous()
    out["vae.sd15.std"] = d.std.contiguous()

os.makedirs(os.path.join(ROOT, "generated"), exist_ok=True)
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "generated", "components.safetensors"))
print({k: tuple(v.shape) for k, v in out.items()})
