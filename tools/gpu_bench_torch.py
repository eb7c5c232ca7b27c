#!/usr/bin/env python3
"""The PyTorch side of tools/gpu_bench.sh: SD 1.5 (or, with --sdxl, SDXL base) stages on a
CUDA (or ROCm, or MPS) device in fp32 and fp16 (SDPA attention), on the same random
full-size weights sd-wgpu loads.

    python3 tools/gpu_bench_torch.py [--sdxl] --model DIR [--build] --json torch.json
    python3 tools/gpu_bench_torch.py --report --rust rust.json --torch torch.json --json all.json

Needs torch, diffusers and transformers; no network.  `--build` writes a random full-size
folder (fp16 safetensors, the real configs from sd-wgpu's presets sd15 / sdxl_base, the
CLIP BPE files) to --model unless one is there.  Then it times, for fp32 and for fp16:

* one guided UNet step: batch 2 at the UNet's sample_size (SD 1.5 64x64 latents, a 512x512
  image's step; SDXL 128x128, 1024x1024, with its text_time conditioning), 77-token context;
* the VAE decode at the model's size and at twice it up to 1024x1024 (SD 1.5: 512 and
  1024; SDXL: 1024);
* one whole image at the model's size through its pipeline (StableDiffusionPipeline with
  PNDM and guidance 7.5; StableDiffusionXLPipeline with Euler and guidance 5) at 20 and 50
  steps;
* matrix products at SD 1.5's linear shapes (what cuBLAS reaches: a yardstick for the
  kernels' GFLOP/s).

Each time is the median of --runs runs after --warmup untimed ones, each run ending in a
device synchronize.  PyTorch's defaults are kept (cuDNN may use TF32 for fp32 convolutions;
the JSON records the flags).  `--report` reads both sides' JSON and prints the table of
ratios (sd-wgpu time / PyTorch time).
"""

import argparse
import json
import os
import statistics
import sys
import time

# The SD 1.5 configs, the folder layout and the prompt are the CPU comparison's (one copy).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_pytorch import (  # noqa: E402
    ARCHS,
    PROMPT,
    components,
    has_weights,
    load_text_encoders,
    log,
    model_defaults,
    preset_dir,
    random_component,
    save_component,
    write_folder_files,
)


def device_name():
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return None


def sync(dev):
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()
    elif dev == "mps":
        torch.mps.synchronize()


def timed(dev, warmup, runs, fn):
    for _ in range(warmup):
        fn()
    sync(dev)
    seconds = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync(dev)
        seconds.append(time.perf_counter() - t)
    return {"median_s": statistics.median(seconds), "runs_s": seconds}


def build(folder, seed, preset="sd15"):
    """A random full-size folder of `preset` in fp16 (`*.fp16.safetensors`, as diffusers'
    variant="fp16" writes them), built on the GPU when there is one."""
    import torch

    comps = components(preset_dir(preset))
    if all(has_weights(folder, c, True) for c in comps):
        log(f"reusing the random {preset} folder {folder}")
        return
    log(f"building random full-size {preset} fp16 weights in {folder}")
    write_folder_files(folder, preset)
    dev = device_name() or "cpu"
    # The same seeds as tools/bench_vs_pytorch.py's folders.
    for i, comp in enumerate(comps):
        t = time.perf_counter()
        torch.manual_seed(seed + i)
        with torch.device(dev):
            model = random_component(comp, preset).eval()
        save_component(model, folder, comp, True)
        del model
        log(f"  {comp}: {time.perf_counter() - t:.1f} s")


def stage_sides(model):
    """Latent sides of the UNet step and the VAE decodes: the model's, and twice it up to
    1024x1024."""
    unet = json.load(open(os.path.join(model, "unet", "config.json")))
    side = unet.get("sample_size") or 64
    return unet, side, [side] + ([2 * side] if 2 * side * 8 <= 1024 else [])


def stages(a, dev, dtype_name):
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", variant="fp16", dtype=dtype).to(dev).eval()
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", variant="fp16", dtype=dtype).to(dev).eval()
    cfg, side, vae_sides = stage_sides(a.model)
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, cfg["in_channels"], side, side, generator=g).to(dev, dtype)
    context = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g).to(dev, dtype)
    added = None
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled embeddings, size ids
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        px = float(side * 8)
        added = {
            "text_embeds": torch.randn(2, pooled, generator=g).to(dev, dtype),
            "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * 2).to(dev, dtype),
        }
    out = {"attention": type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        return unet(latents, 981, encoder_hidden_states=context, added_cond_kwargs=added).sample

    with torch.inference_mode():
        out["unet"] = timed(dev, a.warmup, a.runs, step)
        log(f"  PyTorch {dtype_name} UNet step (batch 2, {side}x{side}): {out['unet']['median_s'] * 1e3:.1f} ms")
        out["unet_output_finite"] = bool(torch.isfinite(step().float()).all())
        for s in vae_sides:
            z = torch.randn(1, 4, s, s, generator=g).to(dev, dtype) / vae.config.scaling_factor
            key = f"vae_{s * 8}"
            out[key] = timed(dev, a.warmup, a.runs, lambda: vae.decode(z).sample)
            log(f"  PyTorch {dtype_name} VAE decode {s * 8}x{s * 8}: {out[key]['median_s'] * 1e3:.1f} ms")
    if dev == "cuda":
        out["stages_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    encoders = dict(load_text_encoders(a.model, dtype, {"variant": "fp16"}))
    extra = {} if "text_encoder_2" in encoders else {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(
        a.model, unet=unet, vae=vae, variant="fp16", dtype=dtype, **{k: v.to(dev) for k, v in encoders.items()}, **extra
    ).to(dev)
    pipe.set_progress_bar_config(disable=True)
    size, guidance = model_defaults(a.model)
    for steps in a.image_steps:
        def image():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
        key = f"image_{steps}"
        out[key] = timed(dev, 1, max(1, min(a.runs, 3)), image)
        out[key]["size"] = size
        log(f"  PyTorch {dtype_name} whole {size}x{size} image, {steps} steps: {out[key]['median_s']:.2f} s")
    if dev == "cuda":
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del pipe, unet, vae, encoders
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


# SD 1.5's matrix products at 512x512, batch 2 (m, n, k), as the Rust bench times them.
MATMULS = [
    ("attn proj [8192,320]x[320,320]^T", 8192, 320, 320),
    ("GEGLU [8192,320]x[2560,320]^T", 8192, 2560, 320),
    ("FF out [8192,1280]x[320,1280]^T", 8192, 320, 1280),
    ("[2048,640]x[5120,640]^T", 2048, 5120, 640),
    ("square 4096^3", 4096, 4096, 4096),
]


def matmuls(a, dev):
    import torch

    rows = []
    for label, m, n, k in MATMULS:
        row = {"label": label, "m": m, "n": n, "k": k}
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("fp16", torch.float16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            x = torch.randn(m, k, device=dev, dtype=dtype)
            w = torch.randn(n, k, device=dev, dtype=dtype)
            t = timed(dev, 3, max(a.runs, 10), lambda: x @ w.t())
            row[name + "_gflops"] = 2 * m * n * k / t["median_s"] / 1e9
        torch.backends.cuda.matmul.allow_tf32 = False
        rows.append(row)
        log(f"  PyTorch matmul {label}: fp32 {row['fp32_gflops']:.0f}, tf32 {row['tf32_gflops']:.0f}, "
            f"fp16 {row['fp16_gflops']:.0f} GFLOP/s")
    return rows


def run(a):
    import torch

    dev = a.device or device_name()
    if dev is None:
        log("PyTorch sees no GPU (CUDA, ROCm or MPS): no PyTorch side")
        return None
    if a.build:
        build(a.model, a.seed, a.preset)
    import diffusers

    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else dev,
        "cuda": torch.version.cuda,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if dev == "cuda" else None,
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if dev == "cuda" else None,
    }
    log(f"PyTorch {info['torch']}, diffusers {info['diffusers']} on {info['device']}")
    result = {"info": info, "matmul": matmuls(a, dev) if a.matmuls else []}
    for dtype_name in a.dtypes:
        result[dtype_name] = stages(a, dev, dtype_name)
    return result


# ----------------------------------------------------------------------------------------
# The combined report
# ----------------------------------------------------------------------------------------

def stage_list(rust):
    """(key in both JSONs, label, target: sd-wgpu / PyTorch fp16 at most this; None: none)
    for the stages sd15_gpu ran: the UNet step and the first VAE decode (the model's size)
    have SD 1.5's targets."""
    st = rust.get("stages", {})
    vaes = sorted((k for k in st if k.startswith("vae_") and k[4:].isdigit()), key=lambda k: int(k[4:]))
    images = sorted((k for k in st if k.startswith("image_")), key=lambda k: int(k[6:]))
    rows = [("unet", "UNet step, guided (batch 2)", 1.5)]
    rows += [(k, f"VAE decode {k[4:]}x{k[4:]}", 1.5 if i == 0 else None) for i, k in enumerate(vaes)]
    rows += [(k, f"whole {st[k].get('size', '?')}px image, {k[6:]} steps", None) for k in images]
    return rows


def report(rust, torch_r):
    lines = []
    info = rust.get("adapter", {})
    lines.append(f"sd-wgpu on {info.get('name', '?')} ({info.get('backend', '?')}, driver {info.get('driver', '?')} "
                 f"{info.get('driver_info', '')})")
    if torch_r:
        ti = torch_r["info"]
        lines.append(f"PyTorch {ti['torch']} / diffusers {ti['diffusers']} on {ti['device']} "
                     f"(cuDNN TF32 {ti['cudnn_allow_tf32']})")
    lines.append("")
    head = f"{'stage':<38} {'sd-wgpu':>10} {'torch fp16':>11} {'torch fp32':>11} {'vs fp16':>8} {'vs fp32':>8}  target"
    lines.append(head)
    ratios = {}
    for key, label, target in stage_list(rust):
        ours = rust.get("stages", {}).get(key, {}).get("median_s")
        t16 = (torch_r or {}).get("fp16", {}).get(key, {}).get("median_s")
        t32 = (torch_r or {}).get("fp32", {}).get(key, {}).get("median_s")
        r16 = ours / t16 if ours and t16 else None
        r32 = ours / t32 if ours and t32 else None
        ratios[key] = {"vs_fp16": r16, "vs_fp32": r32}

        def s(x):
            return "n/a" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")

        def r(x):
            return "n/a" if x is None else f"{x:.2f}"

        goal = ""
        if target is not None and r16 is not None:
            goal = f"<= {target} vs fp16: {'met' if r16 <= target else 'NOT met'}"
            if key == "unet" and r32 is not None:
                goal += f"; < 1 vs fp32: {'met' if r32 < 1 else 'NOT met'}"
        if key == "image_50" and ours is not None and rust["stages"][key].get("size") == 512:
            goal = f"< 2 s: {'met' if ours < 2 else 'NOT met'}"
        lines.append(f"{label:<38} {s(ours):>10} {s(t16):>11} {s(t32):>11} {r(r16):>8} {r(r32):>8}  {goal}")
    kernels = rust.get("kernels") or []
    if kernels:
        lines.append("")
        lines.append(f"{'sd-wgpu kernel (' + rust.get('arch', 'SD 1.5') + ' shapes)':<52} {'rate':>16} {'% fp32 peak':>12} {'% fp16 peak':>12} {'mean':>10}")
        for k in kernels:
            if "gflops" in k:
                rate = f"{k['gflops']:.0f} GFLOP/s"
            elif "gb_per_s" in k:
                rate = f"{k['gb_per_s']:.0f} GB/s"
            else:
                lines.append(f"{k['kernel']:<52} {k.get('record_us', 0):>9.1f} us to record, {k.get('total_us', 0):.1f} us with execution")
                continue
            p32 = k.get("pct_fp32_peak")
            p16 = k.get("pct_fp16_peak")
            lines.append(f"{k['kernel']:<52} {rate:>16} {'' if p32 is None else f'{p32:.1f}%':>12} "
                         f"{'' if p16 is None else f'{p16:.1f}%':>12} {k['mean_ms']:>7.3f} ms")
    w = (rust.get("model") or {}).get("device_weight_bytes")
    if w:
        lines.append(f"weights on the device (sd15_gpu's accounting): {sum(w.values()) / 2**30:.2f} GiB "
                     f"({', '.join(f'{k} {v / 2**30:.2f}' for k, v in w.items())})")
    gm = rust.get("gpu_memory_used_peak_mib")
    if gm:
        lines.append(f"device memory in use at the most during sd15_gpu (nvidia-smi, whole card): {gm:.0f} MiB")
    if torch_r:
        for name in ("fp16", "fp32"):
            pk = torch_r.get(name, {}).get("peak_allocated_mib")
            if pk:
                lines.append(f"PyTorch {name} peak allocated (torch.cuda.max_memory_allocated): {pk:.0f} MiB")
    d = rust.get("stages", {}).get("unet_dispatch")
    if d:
        lines.append(f"UNet step: {d['launches']} kernel launches, {d['host_us_per_launch']:.1f} us of host time each to record")
    if torch_r and torch_r.get("matmul"):
        lines.append("")
        lines.append(f"{'PyTorch matmul (cuBLAS), GFLOP/s':<52} {'fp32':>10} {'tf32':>10} {'fp16':>10}")
        for m in torch_r["matmul"]:
            lines.append(f"{m['label']:<52} {m['fp32_gflops']:>10.0f} {m['tf32_gflops']:>10.0f} {m['fp16_gflops']:>10.0f}")
    images = rust.get("images")
    if images:
        lines.append("")
        lines.append(f"fixture images on this GPU: {images['passed']} of {images['cases']} within the tests' rule "
                     f"(worst max diff {images['worst_max_diff']}, worst mean {images['worst_mean_diff']:.4f})")
    return "\n".join(lines), ratios


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdxl", action="store_true", help="SDXL base instead of SD 1.5")
    p.add_argument("--model", help="the random fp16 folder (default /tmp/sd15-random-fp16; SDXL /tmp/sdxl-random-fp16)")
    p.add_argument("--build", action="store_true", help="build the folder first unless it is there")
    p.add_argument("--build-only", action="store_true", help="build the folder and stop")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--image-steps", type=int, nargs="*", default=[20, 50])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--device", help="torch device (default: cuda, else mps); cpu only for a smoke test")
    p.add_argument("--dtypes", nargs="*", default=["fp16", "fp32"])
    p.add_argument("--no-matmuls", dest="matmuls", action="store_false")
    p.add_argument("--report", action="store_true", help="print the table from --rust and --torch")
    p.add_argument("--rust", help="sd15_gpu's JSON")
    p.add_argument("--torch", help="this script's JSON from an earlier run")
    a = p.parse_args()
    a.preset = ARCHS["sdxl" if a.sdxl else "sd15"]["preset"]
    a.model = a.model or ("/tmp/sdxl-random-fp16" if a.sdxl else "/tmp/sd15-random-fp16")

    if a.report:
        rust = json.load(open(a.rust))
        torch_r = json.load(open(a.torch)) if a.torch and os.path.isfile(a.torch) else None
        text, ratios = report(rust, torch_r)
        print(text)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rust": rust, "torch": torch_r, "ratios": ratios}, f, indent=2)
        return
    if a.build_only:
        build(a.model, a.seed, a.preset)
        return
    result = run(a)
    if a.json and result is not None:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
