"""Drives the OpenAI routes with the official `openai` package (PyPI) and prints what it
saw as one JSON object for tests/dialects.rs.

usage: openai_images.py PORT
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused",
                       max_retries=0)
out = {"models": [m.id for m in client.models.list()]}
r = client.images.generate(
    model=out["models"][0], prompt="a red door", n=2, size="64x64",
    extra_body={"seed": 5, "num_inference_steps": 3, "guidance_scale": 6.0,
                "negative_prompt": "blurry"},
)
out["created"] = r.created
out["images"] = [d.b64_json for d in r.data]
out["errors"] = {}
for name, kwargs in {
    "size": {"size": "65x64"},
    "response_format": {"size": "64x64", "response_format": "url"},
    "n": {"size": "64x64", "n": 11},
    "steps": {"size": "64x64", "extra_body": {"num_inference_steps": 0}},
}.items():
    try:
        client.images.generate(prompt="a", **kwargs)
        out["errors"][name] = None
    except openai.BadRequestError as e:
        out["errors"][name] = {"status": e.status_code, "body": e.body}
print(json.dumps(out))
