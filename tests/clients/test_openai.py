"""The official `openai` client against easel's OpenAI Images routes.

Run by tools/clients-e2e.sh (EASEL_URL, EASEL_KEY set; the server's
default_model is the tiny SD 1.5 fixture). Exits non-zero on any failure.
"""

import base64
import io
import os
import sys

import openai
from PIL import Image

client = openai.OpenAI(base_url=os.environ["EASEL_URL"] + "/v1", api_key=os.environ["EASEL_KEY"])

# Text to image, base64 answer: two decodable 64x64 PNGs.
result = client.images.generate(prompt="a red cube", n=2, size="64x64", response_format="b64_json")
assert len(result.data) == 2, result
for item in result.data:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.size == (64, 64), image.size

# Edits: the first image back in, image-to-image.
png = base64.b64decode(result.data[0].b64_json)
edit = client.images.edit(image=("in.png", png, "image/png"), prompt="a blue cube", size="64x64",
                          response_format="b64_json")
assert len(edit.data) == 1, edit
assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).size == (64, 64)

# A size out of range is the client's BadRequestError (OpenAI's 400 shape).
try:
    client.images.generate(prompt="x", size="7x7")
except openai.BadRequestError as e:
    assert e.body and e.body.get("param") == "size", e.body
else:
    sys.exit("size 7x7 was accepted")

# A wrong key is the client's AuthenticationError.
bad = openai.OpenAI(base_url=os.environ["EASEL_URL"] + "/v1", api_key="esk_wrong")
try:
    bad.images.generate(prompt="x", size="64x64")
except openai.AuthenticationError:
    pass
else:
    sys.exit("a wrong key was accepted")
print("openai client: generate, edit, 400 and 401 as the hosted API")
