"""The `webuiapi` client (AUTOMATIC1111's web UI API) against easel's /sdapi/v1.

Run by tools/clients-e2e.sh (EASEL_URL, EASEL_KEY set; the server's
default_model is the tiny SD 1.5 fixture). The key goes as the Basic
password, as `--api-auth` clients send it. Exits non-zero on any failure.
"""

import os
import sys

import webuiapi
from PIL import Image

base = os.environ["EASEL_URL"] + "/sdapi/v1"
api = webuiapi.WebUIApi(baseurl=base, username="webui", password=os.environ["EASEL_KEY"])

# The lists the client reads.
assert "Euler a" in api.util_get_sampler_names(), api.util_get_sampler_names()
assert "karras" in api.util_get_scheduler_names()
assert "tiny-sd15" in api.util_get_model_names(), api.util_get_model_names()
api.util_set_model("tiny-sd15", find_closest=False)
assert api.util_get_current_model() == "tiny-sd15", api.util_get_current_model()

# txt2img with the client's defaults (Euler a, automatic schedule, eta 1,
# hires. fix fields sent but off): two 64x64 images with seeds 1 and 2.
result = api.txt2img(prompt="a red cube", negative_prompt="blurry", seed=1, steps=2,
                     cfg_scale=6, width=64, height=64, batch_size=2)
assert len(result.images) == 2, result.json
for image in result.images:
    assert image.size == (64, 64), image.size
assert result.info["all_seeds"] == [1, 2], result.info
assert result.info["infotexts"][0].startswith("a red cube\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a"), result.info
assert result.parameters["prompt"] == "a red cube"
# The PNG carries the web UI's `parameters` text.
assert result.images[0].info["parameters"] == result.info["infotexts"][0]
# png-info reads it back (the client re-encodes the PNG with its text chunks).
read = api.png_info(result.images[0])
assert read.info == result.info["infotexts"][0], read.json
assert read.json["parameters"]["Prompt"] == "a red cube", read.json
assert read.json["parameters"]["Seed"] == "1", read.json
# What easel has: no upscalers, no scripts.
assert api.get_upscalers() == [], api.get_upscalers()
assert api.get_scripts() == {"txt2img": [], "img2img": []}, api.get_scripts()

# img2img on the first image, at another size.
edit = api.img2img(images=[result.image], prompt="a blue cube", seed=3, steps=4,
                   width=72, height=56, denoising_strength=0.5)
assert len(edit.images) == 1 and edit.image.size == (72, 56), edit.image.size

# Inpainting: white repaints. easel neither blurs the mask nor crops to it,
# so those fields are sent at the values that say so ...
mask = Image.new("RGB", (64, 64), "black")
mask.paste(Image.new("RGB", (32, 32), "white"), (16, 16))
inpaint = api.img2img(images=[result.image], mask_image=mask, prompt="a hole", seed=4, steps=4,
                      width=64, height=64, denoising_strength=0.75, mask_blur=0, inpainting_fill=1,
                      inpaint_full_res=False)
assert inpaint.image.size == (64, 64)
# ... and the client's defaults (mask_blur 4, ...) are refused naming the field.
try:
    api.img2img(images=[result.image], mask_image=mask, prompt="x", steps=2, width=64, height=64)
except RuntimeError as e:
    status, text = e.args
    assert status == 422 and "mask_blur" in text, e.args
else:
    sys.exit("mask_blur 4 was accepted")

# A sampler easel does not have: 422 naming sampler_name, listing the allowed.
try:
    api.txt2img(prompt="x", sampler_name="DPM++ SDE", steps=2, width=64, height=64)
except RuntimeError as e:
    status, text = e.args
    assert status == 422 and "sampler_name" in text and "Euler a" in text, e.args
else:
    sys.exit("an unknown sampler was accepted")

# Progress when idle, and interrupt with nothing running.
progress = api.get_progress()
assert progress["progress"] == 0 and progress["state"]["job_count"] == 0, progress
api.interrupt()

# A wrong key: 401.
bad = webuiapi.WebUIApi(baseurl=base, username="webui", password="esk_wrong")
try:
    bad.txt2img(prompt="x", steps=2, width=64, height=64)
except RuntimeError as e:
    assert e.args[0] == 401, e.args
else:
    sys.exit("a wrong key was accepted")
print("webuiapi client: lists, set model, txt2img, img2img, inpaint, 422 and 401 as the web UI")
