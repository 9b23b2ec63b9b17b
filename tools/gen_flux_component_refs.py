"""Component-level reference outputs for easel's FLUX models.

Runs each network of the tiny FLUX fixture models once through diffusers /
transformers (float32 on CPU) on fixed inputs and saves inputs and outputs to
tests/fixtures/generated/flux_components.safetensors, so that a mismatch in a
FLUX parity test can be traced to the T5 encoder, the CLIP pooled output,
the rotary embeddings, the transformer or the 16-channel VAE.

Rerun (needs torch, diffusers 0.42.1, transformers 5.23, from PyPI), from the
repository root:
    python tools/gen_flux_component_refs.py
"""
import os

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from safetensors.torch import save_file
from transformers import CLIPTextModel, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
MODELS = os.path.join(ROOT, "models")
out = {}
g = torch.Generator("cpu").manual_seed(0)

# T5 relative-position buckets (bidirectional), for the fixture config (8
# buckets) and the published T5 v1.1 config (32 buckets, distance 128).
rel = torch.arange(-300, 301)
out["t5.relative_positions"] = rel.to(torch.int64)
for nb, md in [(8, 128), (32, 128)]:
    out[f"t5.buckets.{nb}_{md}"] = T5Attention._relative_position_bucket(rel, True, nb, md).to(torch.int64)

# T5 encoder (text_encoder_2): the tiny models' vocabulary has 4 pieces.
t5 = T5EncoderModel.from_pretrained(os.path.join(MODELS, "tiny-flux-dev", "text_encoder_2"),
                                    torch_dtype=torch.float32).eval()
t5_ids = torch.randint(0, t5.config.vocab_size, (2, 19), generator=g)
with torch.no_grad():
    out["t5.input_ids"] = t5_ids.to(torch.int64)
    out["t5.last_hidden_state"] = t5(t5_ids).last_hidden_state.contiguous()

# CLIP pooled output (text_encoder): FLUX conditions on it.
clip = CLIPTextModel.from_pretrained(os.path.join(MODELS, "tiny-flux-dev", "text_encoder"),
                                     torch_dtype=torch.float32).eval()
clip_ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
with torch.no_grad():
    out["clip.input_ids"] = clip_ids.to(torch.int64)
    out["clip.pooled"] = clip(clip_ids).pooler_output.contiguous()

# Rotary embeddings of a (text, image) id sequence, with the published axes.
ids = torch.cat([torch.zeros(5, 3), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)])
cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
out["rope.ids"] = ids
out["rope.cos"] = cos.contiguous()
out["rope.sin"] = sin.contiguous()

# The transformer: schnell (no guidance embedding), dev (guidance), fill (384 input channels).
h, w, n_txt, batch = 3, 4, 7, 2
img_ids = FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32)
txt_ids = torch.zeros(n_txt, 3)
for name in ["schnell", "dev", "fill"]:
    tr = FluxTransformer2DModel.from_pretrained(os.path.join(MODELS, f"tiny-flux-{name}", "transformer"),
                                                torch_dtype=torch.float32).eval()
    c = tr.config
    hidden = torch.randn((batch, h * w, c.in_channels), generator=g)
    context = torch.randn((batch, n_txt, c.joint_attention_dim), generator=g)
    pooled = torch.randn((batch, c.pooled_projection_dim), generator=g)
    timestep = torch.tensor([0.75, 0.3125])
    guidance = torch.tensor([3.5, 30.0]) if c.guidance_embeds else None
    with torch.no_grad():
        y = tr(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
               timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
               return_dict=False)[0]
    k = f"transformer.{name}"
    out[f"{k}.hidden_states"] = hidden
    out[f"{k}.encoder_hidden_states"] = context
    out[f"{k}.pooled_projections"] = pooled
    out[f"{k}.timestep"] = timestep
    if guidance is not None:
        out[f"{k}.guidance"] = guidance
    out[f"{k}.img_ids"] = img_ids
    out[f"{k}.txt_ids"] = txt_ids
    out[f"{k}.out"] = y.contiguous()

# The 16-channel VAE (no quant convs).
vae = AutoencoderKL.from_pretrained(os.path.join(MODELS, "tiny-flux-dev", "vae"), torch_dtype=torch.float32).eval()
z = torch.randn((1, 16, 5, 6), generator=g)
x = torch.rand((1, 3, 24, 40), generator=g) * 2 - 1
with torch.no_grad():
    out["vae.z"] = z
    out["vae.decoded"] = vae.decode(z).sample.contiguous()
    out["vae.x"] = x
    d = vae.encode(x).latent_dist
    out["vae.mean"] = d.mean.contiguous()
    out["vae.std"] = d.std.contiguous()

os.makedirs(os.path.join(ROOT, "generated"), exist_ok=True)
path = os.path.join(ROOT, "generated", "flux_components.safetensors")
save_file({k: v.contiguous().clone() for k, v in out.items()}, path)
print({k: tuple(v.shape) for k, v in out.items()})
