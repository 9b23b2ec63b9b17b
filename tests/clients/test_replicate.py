"""The official `replicate` client against easel's Replicate-style routes.

Run by tools/clients-e2e.sh (EASEL_URL, EASEL_KEY set; the fixture models
include tiny-flux-dev and tiny-flux-schnell, which `model` dev / schnell map
to). Exits non-zero on any failure.
"""

import base64
import io
import os
import sys

import replicate
from PIL import Image
from replicate.exceptions import ReplicateError

client = replicate.Client(api_token=os.environ["EASEL_KEY"], base_url=os.environ["EASEL_URL"])
small = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2}

def fetch(item):
    """The bytes of an output: the client wraps https:// URLs in FileOutput;
    easel on plain http gives the URL string, fetched with the client's own
    HTTP session."""
    if hasattr(item, "read"):
        return item.read()
    response = client._client.get(item)
    response.raise_for_status()
    return response.content


# client.run on the models route (Prefer: wait).
output = client.run(
    "black-forest-labs/flux-dev-lora",
    input={"prompt": "a red cube", "num_outputs": 2, "output_format": "png", "seed": 3, **small},
)
assert isinstance(output, list) and len(output) == 2, output
for item in output:
    image = Image.open(io.BytesIO(fetch(item)))
    assert image.size == (256, 256) and image.format == "PNG", (image.size, image.format)

# predictions.create + wait (polling GET /v1/predictions/{id}), img2img from
# a data URI, jpg output.
buffer = io.BytesIO()
Image.new("RGB", (256, 256), (200, 30, 30)).save(buffer, format="PNG")
init = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
prediction = client.predictions.create(
    version="0123456789abcdef",
    input={"prompt": "a blue cube", "image": init, "prompt_strength": 0.6, "output_format": "jpg",
           "model": "schnell", "num_inference_steps": 2},
)
assert prediction.status in ("starting", "processing", "succeeded"), prediction.status
prediction.wait()
assert prediction.status == "succeeded", (prediction.status, prediction.error, prediction.logs)
assert "tiny-flux-schnell" in prediction.version, prediction.version
assert prediction.metrics and prediction.metrics["predict_time"] >= 0, prediction.metrics
data = fetch(prediction.output[0])
image = Image.open(io.BytesIO(data))
assert image.size == (256, 256) and image.format == "JPEG", (image.size, image.format)

# It is a native job too, listed by predictions.list.
page = client.predictions.list()
assert prediction.id in [p.id for p in page.results], [p.id for p in page.results]
assert client.predictions.get(prediction.id).status == "succeeded"

# Cancel (already finished: answered as it is).
assert client.predictions.cancel(prediction.id).status == "succeeded"

# An input out of range is a ReplicateError with Replicate's problem fields.
try:
    client.predictions.create(version="x", input={"prompt": "x", "num_outputs": 5})
except ReplicateError as e:
    assert e.status == 422 and "input.num_outputs" in (e.detail or ""), e.to_dict()
else:
    sys.exit("num_outputs 5 was accepted")

# A wrong key: 401 ReplicateError.
bad = replicate.Client(api_token="esk_wrong", base_url=os.environ["EASEL_URL"])
try:
    bad.run("black-forest-labs/flux-dev-lora", input={"prompt": "x", **small})
except ReplicateError as e:
    assert e.status == 401, e.to_dict()
else:
    sys.exit("a wrong key was accepted")
# Webhooks: the prediction object, signed so that the client's own
# validator accepts it with the key's secret (clients-e2e.sh allow-lists
# loopback for the receiver).
import http.server
import json
import threading
import time

received = []


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


receiver = http.server.HTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=receiver.serve_forever, daemon=True).start()
secret = client.webhooks.default.secret()
assert secret.key.startswith("whsec_"), secret.key
hooked = client.predictions.create(
    version="x",
    input={"prompt": "a green cube", **small},
    webhook=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
    webhook_events_filter=["start", "completed"],
)
hooked.wait()
deadline = time.time() + 30
while len(received) < 2 and time.time() < deadline:
    time.sleep(0.1)
assert len(received) == 2, received
for headers, body in received:
    replicate.webhook.Webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)
statuses = sorted(json.loads(body)["status"] for _, body in received)
assert statuses == ["processing", "succeeded"], statuses
final = next(json.loads(b) for _, b in received if json.loads(b)["status"] == "succeeded")
assert final["id"] == hooked.id and final["output"] == hooked.output, (final, hooked.output)
receiver.shutdown()

print("replicate client: run, predictions create/wait/get/list/cancel, 422 and 401 as the hosted API, "
      "webhooks validated")
