"""Drives the AUTOMATIC1111 routes with the `webuiapi` package (PyPI), as scripts written
for AUTOMATIC1111 do, and prints what it saw as one JSON object for tests/dialects.rs.

usage: a1111_webuiapi.py PORT (txt2img | img2img | interrupt | skip | lora)
"""
import json
import sys
import threading
import time

import webuiapi
from PIL import Image

port, mode = int(sys.argv[1]), sys.argv[2]
api = webuiapi.WebUIApi(host="127.0.0.1", port=port)


def raw_images(result):
    """The base64 PNGs as the server sent them (webuiapi decodes them into PIL images)."""
    return result.json["images"]


def wait_until_running():
    deadline = time.time() + 120
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0:
            return progress
        time.sleep(0.05)
    raise SystemExit("the job never started")


if mode == "txt2img":
    out = {
        "models": api.util_get_model_names(),
        "samplers": api.util_get_sampler_names(),
        "schedulers": api.util_get_scheduler_names(),
        "current_model": api.util_get_current_model(),
        "idle_progress": api.get_progress(),
    }
    api.util_set_model(out["models"][0])
    karras = api.txt2img(
        prompt="a red door", negative_prompt="blurry", seed=7, steps=4, cfg_scale=6.0,
        width=64, height=64, batch_size=2, sampler_name="DPM++ 2M", scheduler="Karras",
    )
    legacy = api.txt2img(
        prompt="a red door", seed=9, steps=3, width=64, height=64,
        sampler_name="DPM++ 2M Karras", scheduler=None, n_iter=2,
    )
    out["karras"] = {"images": raw_images(karras), "info": karras.info,
                     "sizes": [list(i.size) for i in karras.images]}
    out["legacy"] = {"images": raw_images(legacy), "info": legacy.info}
    try:
        api.txt2img(prompt="a", sampler_name="Heun", width=64, height=64, steps=1)
        out["unknown_sampler"] = None
    except RuntimeError as e:
        out["unknown_sampler"] = {"status": e.args[0], "body": json.loads(e.args[1])}
elif mode == "img2img":
    def picture(size):
        image = Image.new("RGB", size, (30, 60, 200))
        image.paste((240, 230, 40), (16, 16, 48, 40))
        return image

    # A 64x64 init image (no resizing, so /generate can repeat the run exactly), then a
    # 96x80 one with a mask, white (repaint) on the right, that img2img brings to 64x64.
    init = picture((64, 64))
    restyled = api.img2img(images=[init], prompt="a yellow box", seed=5, steps=4, cfg_scale=7.0,
                           width=64, height=64, denoising_strength=0.6, sampler_name="Euler")
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (48, 0, 96, 80))
    inpainted = api.img2img(images=[picture((96, 80))], mask_image=mask, prompt="a yellow box",
                            seed=6, steps=4, width=64, height=64, denoising_strength=1.0,
                            sampler_name="Euler a")
    out = {
        "restyled": {"images": raw_images(restyled), "info": restyled.info,
                     "sizes": [list(i.size) for i in restyled.images]},
        "inpainted": {"info": inpainted.info, "sizes": [list(i.size) for i in inpainted.images]},
        "init": webuiapi.raw_b64_img(init),
    }
elif mode in ("interrupt", "skip"):
    result = {}

    def generate():
        result["r"] = api.txt2img(prompt="a long job", seed=20, steps=40, width=64, height=64,
                                  batch_size=2, sampler_name="Euler")

    worker = threading.Thread(target=generate)
    worker.start()
    running = wait_until_running()
    answer = api.interrupt() if mode == "interrupt" else api.skip()
    worker.join()
    r = result["r"]
    out = {"running": running, "answer": answer, "images": raw_images(r), "info": r.info,
           "after": api.get_progress()}
elif mode == "lora":
    # The server's --lora-dir as the Lora extension lists it, and a prompt that names one.
    styled = api.txt2img(prompt="a red door <lora:ink:0.8>", seed=7, steps=4, width=64, height=64,
                         sampler_name="Euler a")
    out = {"loras": api.get_loras(), "images": raw_images(styled), "info": styled.info}
    try:
        api.txt2img(prompt="a red door <lora:nothing:1>", steps=1, width=64, height=64)
        out["unknown"] = None
    except RuntimeError as e:
        out["unknown"] = {"status": e.args[0], "body": json.loads(e.args[1])}
else:
    raise SystemExit(f"unknown mode {mode}")
print(json.dumps(out))
