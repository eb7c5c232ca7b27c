#!/usr/bin/env python3
"""Time PyTorch (diffusers / transformers) and sd-wgpu's CPU backend on the same full-size
SD 1.5 weights and the same inputs, in one run, and print the ratios.

    python3 tools/bench_vs_pytorch.py                 # full size (builds the weights once)
    python3 tools/bench_vs_pytorch.py --tiny          # seconds: the tests' tiny sd1 fixture

Needs torch, diffusers and transformers (no network: the weights are random, from the real
SD 1.5 configs written out below).  What it does:

1. Builds a random full-size SD 1.5 diffusers folder once, seeded, in safetensors:
   <cache>/f32 (float32 files) and <cache>/fp16 (the same values rounded to float16, in
   `*.fp16.safetensors` files as diffusers' `variant="fp16"` writes them).  Reused when
   present (--rebuild to redo).
2. Writes the inputs both sides read to <cache>/inputs.safetensors: the token ids of one
   prompt, `latents` [2, 4, 64, 64], `context` [2, 77, 768], `timestep`, `vae_latents`
   [1, 4, 64, 64] (already divided by the VAE's scaling factor).
3. Times PyTorch in a child process (torch.set_num_threads(all cores), inference_mode,
   float32): the text encoder, one UNet forward (batch 2: a guided step), one VAE decode;
   one warm-up and the median of --runs runs each; peak memory of that process.
4. Runs the Rust bench (`cargo bench --bench sd15_cpu`, built with the release profile) on
   the same folder and inputs, likewise, and compares the two sides' outputs.
5. Runs one whole 512x512 generation (--image-steps steps, guidance 7.5) on the fp16
   folder on both sides, for peak memory (sd-wgpu keeps f16 weights f16; diffusers loads
   them as float32), and compares the two images.

Prints a table (stage, PyTorch s, sd-wgpu s, ratio, target) and writes everything as JSON
to --json when asked.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIXTURE_SD1 = os.path.join(ROOT, "tests", "fixtures", "models", "sd1")
PROMPT = "a photograph of an astronaut riding a horse"

# The configs of stable-diffusion-v1-5/stable-diffusion-v1-5, as sd-wgpu's built-in
# single-file preset keeps them (one copy in the repo), and the CLIP BPE files.
PRESET = os.path.join(ROOT, "src", "model", "presets", "sd15")
CLIP_BPE = os.path.join(ROOT, "src", "model", "presets", "clip_tokenizer")


def preset_config(component):
    with open(os.path.join(PRESET, component, "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


# The issue's targets: sd-wgpu's time / PyTorch's time at most this.
TARGETS = {"text_encoder": 1.0, "unet": 0.8, "vae": 0.7}
IMAGE_PEAK_TARGET_GB = 4.0
WEIGHT_FILES = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def all_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def peak_mib():
    # ru_maxrss is the peak resident set in KiB on Linux (VmHWM).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    return statistics.median(xs)


# ----------------------------------------------------------------------------------------
# 1. The random folder
# ----------------------------------------------------------------------------------------


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def folder_complete(folder, fp16):
    suffix = ".fp16.safetensors" if fp16 else ".safetensors"
    return all(
        os.path.isfile(os.path.join(folder, comp, stem + suffix)) for comp, stem in WEIGHT_FILES.items()
    ) and os.path.isfile(os.path.join(folder, "model_index.json"))


def write_folder_files(folder):
    """The preset's model_index, scheduler and tokenizer files (weights are added later)."""
    if os.path.exists(folder):
        shutil.rmtree(folder)
    shutil.copytree(PRESET, folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(CLIP_BPE, name), os.path.join(folder, "tokenizer", name))


def save_component(model, folder, comp, fp16):
    import torch

    out = os.path.join(folder, comp)
    if fp16:
        model = model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    if fp16:  # the file name diffusers' variant="fp16" reads
        stem = WEIGHT_FILES[comp]
        os.replace(os.path.join(out, stem + ".safetensors"), os.path.join(out, stem + ".fp16.safetensors"))
    return model


def build_random_sd15(cache, want_fp16, seed):
    """Random full-size SD 1.5 in <cache>/f32 and <cache>/fp16: each component is built,
    seeded, saved as float32, then rounded to float16 and saved again."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    f32, f16 = os.path.join(cache, "f32"), os.path.join(cache, "fp16")
    if folder_complete(f32, False) and (not want_fp16 or folder_complete(f16, True)):
        log(f"reusing the random SD 1.5 folder in {cache}")
        return f32, f16 if want_fp16 else None
    log(f"building random full-size SD 1.5 weights in {cache} (once; about 6 GB on disk)")
    torch.set_num_threads(all_cores())
    folders = [f32] + ([f16] if want_fp16 else [])
    for folder in folders:
        write_folder_files(folder)
    makers = [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**preset_config("text_encoder")))),
        ("unet", lambda: UNet2DConditionModel.from_config(preset_config("unet"))),
        ("vae", lambda: AutoencoderKL.from_config(preset_config("vae"))),
    ]
    for i, (comp, make) in enumerate(makers):
        t = time.perf_counter()
        torch.manual_seed(seed + i)
        model = make().eval()
        save_component(model, f32, comp, False)
        if want_fp16:
            save_component(model, f16, comp, True)
        del model
        log(f"  {comp}: {time.perf_counter() - t:.0f} s")
    return f32, f16 if want_fp16 else None


# ----------------------------------------------------------------------------------------
# 2. The shared inputs
# ----------------------------------------------------------------------------------------


def write_inputs(model_dir, path, latent_size, seed):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    unet = json.load(open(os.path.join(model_dir, "unet", "config.json")))
    vae = json.load(open(os.path.join(model_dir, "vae", "config.json")))
    text = json.load(open(os.path.join(model_dir, "text_encoder", "config.json")))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    g = torch.Generator("cpu").manual_seed(seed)
    s = latent_size
    tensors = {
        # Token ids as float32 (exact below 2^24): one dtype for every input.
        "ids": torch.tensor(ids, dtype=torch.float32),
        "latents": torch.randn(2, unet["in_channels"], s, s, generator=g),
        "context": torch.randn(2, 77, text["hidden_size"], generator=g),
        # PNDM's first timestep for 50 steps (an integer, as the pipeline passes it).
        "timestep": torch.tensor([981.0]),
        "vae_latents": torch.randn(1, vae["latent_channels"], s, s, generator=g) / vae["scaling_factor"],
    }
    save_file(tensors, path)
    return {k: list(v.shape) for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------
# 3. The PyTorch side (run in a child process so its peak memory is its own)
# ----------------------------------------------------------------------------------------


def timed(warmup, runs, fn):
    for _ in range(warmup):
        fn()
    seconds, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t)
    return median(seconds), seconds, out


def worker_stages(a):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    kw = {"variant": "fp16"} if a.variant_fp16 else {}
    text_encoder = CLIPTextModel.from_pretrained(
        os.path.join(a.model, "text_encoder"), dtype=torch.float32, **kw
    ).eval()
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", dtype=torch.float32, **kw).eval()
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - t
    peak_after_load = peak_mib()
    x = load_file(a.inputs)
    ids = x["ids"].to(torch.int64)[None]
    timestep = x["timestep"][0]
    if float(timestep) == int(timestep):
        timestep = timestep.to(torch.int64)
    stages, outputs = {}, {}
    with torch.inference_mode():
        runs = [
            ("text_encoder", "text_embeddings", lambda: text_encoder(ids)[0]),
            ("unet", "unet_out", lambda: unet(x["latents"], timestep, encoder_hidden_states=x["context"]).sample),
            ("vae", "image", lambda: vae.decode(x["vae_latents"]).sample),
        ]
        for key, out_name, fn in runs:
            if key == "vae" and a.quick:
                continue
            m, seconds, out = timed(a.warmup, a.runs, fn)
            stages[key] = {"median_s": m, "runs_s": seconds}
            outputs[out_name] = out.contiguous().float()
            log(f"  PyTorch {key}: {m:.3f} s (runs {', '.join(f'{s:.3f}' for s in seconds)})")
    save_file(outputs, a.outputs)
    return {
        "mode": "stages",
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "stages": stages,
        "peak_after_load_mib": peak_after_load,
        "peak_mib": peak_mib(),
    }


def worker_image(a):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    kw = {"variant": "fp16"} if a.variant_fp16 else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, dtype=torch.float32, safety_checker=None, requires_safety_checker=False, **kw
    )
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t
    peak_after_load = peak_mib()
    t = time.perf_counter()
    image = pipe(
        PROMPT,
        num_inference_steps=a.steps,
        guidance_scale=7.5,
        height=a.size,
        width=a.size,
        generator=torch.Generator("cpu").manual_seed(a.seed),
        output_type="np",
    ).images[0]
    total = time.perf_counter() - t
    np.save(a.outputs, (image * 255).round().astype(np.uint8))
    return {
        "mode": "image",
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "total_s": total,
        "peak_after_load_mib": peak_after_load,
        "peak_mib": peak_mib(),
    }


def run_torch(mode, model, inputs, outputs, a, variant_fp16=False):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", model,
        "--outputs", outputs, "--threads", str(a.threads), "--runs", str(a.runs),
        "--warmup", str(a.warmup), "--image-steps", str(a.image_steps), "--size", str(a.size),
    ]
    if inputs:
        cmd += ["--inputs", inputs]
    if variant_fp16:
        cmd.append("--variant-fp16")
    if a.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# 4. The Rust side
# ----------------------------------------------------------------------------------------


def rust_bench_binary(a):
    if a.rust_bin:
        return a.rust_bin
    log("building the Rust bench (cargo bench --bench sd15_cpu --no-run)")
    out = subprocess.run(
        ["cargo", "bench", "--bench", "sd15_cpu", "--no-run", "--message-format=json-render-diagnostics"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    exe = None
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == "sd15_cpu":
            exe = msg["executable"]
    if not exe:
        sys.exit("could not find the sd15_cpu bench executable in cargo's output")
    return exe


def run_rust(exe, args, a):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = subprocess.run([exe, *args, "--json"], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# 5. Comparing and reporting
# ----------------------------------------------------------------------------------------


def compare_outputs(torch_path, rust_path):
    from safetensors.torch import load_file

    t, r = load_file(torch_path), load_file(rust_path)
    result = {}
    for name in t:
        if name not in r:
            continue
        a, b = t[name].float(), r[name].float().reshape(t[name].shape)
        result[name] = {
            "max_abs_diff": float((a - b).abs().max()),
            "max_abs_ref": float(a.abs().max()),
            "mean_abs_diff": float((a - b).abs().mean()),
        }
    return result


def machine_info(threads):
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads}
    try:
        text = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        flags = fields.get("Flags", "").split()
        info["simd"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile") if f in flags]
    except OSError:
        pass
    try:
        mem = open("/proc/meminfo").readline().split()
        info["memory_gb"] = round(int(mem[1]) / 1e6, 1)
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    return info


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def print_report(r):
    m = r["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores ({', '.join(m.get('simd', []))}), "
          f"{m.get('memory_gb', '?')} GB; {m['threads']} threads each side; torch {m['torch']}")
    print(f"weights: {r['model']}; median of {r['runs']} runs after {r['warmup']} warm-up(s)")
    print(f"1-minute load average {m['loadavg_start']:.2f} at the start, {m['loadavg_end']:.2f} at the end "
          f"(another busy process on these cores skews the times: compare with the runs' spread above)")
    print()
    rows = [("text_encoder", "text encoder (77 tokens)", "text_embeddings"),
            ("unet", "UNet step, batch 2 (guided)", "unet_out"),
            ("vae", "VAE decode", "image")]
    print(f"{'stage':<30} {'PyTorch s':>10} {'sd-wgpu s':>10} {'ratio':>7} {'target':>7}  {'ok':<3} {'max|diff| / max|ref|':>22}")
    for key, label, out in rows:
        if key not in r["torch"]["stages"]:
            continue
        pt = r["torch"]["stages"][key]["median_s"]
        rs = r["rust"]["stages"][key]["median_s"]
        ratio = rs / pt
        ok = "yes" if ratio <= TARGETS[key] else "no"
        d = r["agreement"].get(out)
        diff = f"{d['max_abs_diff']:.2e} / {d['max_abs_ref']:.2e}" if d else "n/a"
        print(f"{label:<30} {pt:>10.3f} {rs:>10.3f} {ratio:>7.2f} {'<= ' + str(TARGETS[key]):>7}  {ok:<3} {diff:>22}")
    print(f"{'peak memory, stages (f32)':<30} {r['torch']['peak_mib'] / 1024:>8.2f} G {r['rust']['peak_mib'] / 1024:>8.2f} G"
          f"   (GiB; after load: {r['torch']['peak_after_load_mib'] / 1024:.2f} / {r['rust']['peak_after_load_mib'] / 1024:.2f})")
    for key, label, _ in rows:
        stage = r["rust"]["stages"].get(key, {})
        ops = stage.get("ops", [])
        if key == "text_encoder" or not ops:
            continue
        total = sum(op["s_per_run"] for op in ops)
        print(f"\nsd-wgpu {label}, wall time by op kind (per run):")
        for op in ops:
            if op["s_per_run"] / total >= 0.005:
                print(f"  {op['op']:<32} {op['s_per_run']:>8.3f} s {100 * op['s_per_run'] / total:>5.1f}%  {op['calls_per_run']:>5.0f} calls")
    img = r.get("image")
    if img:
        ri, ti = img["rust"], img.get("torch")
        print()
        print(f"whole {img['size']}x{img['size']} image, {img['steps']} steps, guidance 7.5, weights {img['model']}:")
        peak_gb = ri["peak_mib"] * 1024 * 1024 / 1e9
        ok = "yes" if peak_gb <= IMAGE_PEAK_TARGET_GB else "no"
        print(f"  sd-wgpu (weights as stored; f16 stays f16): peak {ri['peak_mib']:.0f} MiB = {peak_gb:.2f} GB "
              f"(target <= {IMAGE_PEAK_TARGET_GB} GB: {ok}; {ri['peak_after_load_mib']:.0f} MiB after load); "
              f"text {ri['text_encoder_s']:.2f} s, denoise {ri['denoise_s']:.1f} s = {ri['unet_evaluations']} UNet evaluations "
              f"x {ri['step_s']:.2f} s, VAE {ri['vae_decode_s']:.2f} s, "
              f"total {ri['total_s']:.1f} s")
        if ti:
            print(f"  PyTorch (weights loaded as f32): peak {ti['peak_mib']:.0f} MiB = {ti['peak_mib'] * 1048576 / 1e9:.2f} GB "
                  f"({ti['peak_after_load_mib']:.0f} MiB after load); total {ti['total_s']:.1f} s")
        if "pixels" in img:
            p = img["pixels"]
            print(f"  images agree: max |diff| {p['max']} levels of 255, mean {p['mean']:.3f}")


# ----------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/sd15-random", help="where the random SD 1.5 folder and the inputs live (default %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the random folder even if present")
    p.add_argument("--build-only", action="store_true", help="only build the random folder")
    p.add_argument("--tiny", action="store_true", help="use the tests' tiny sd1 fixture instead of full size (a smoke test)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per stage; the median is reported (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    p.add_argument("--threads", type=int, default=all_cores(), help="threads for both sides (default: all cores, %(default)s)")
    p.add_argument("--quick", action="store_true", help="skip the VAE decode stage")
    p.add_argument("--no-fp16", action="store_true", help="no fp16 folder and no whole-image run")
    p.add_argument("--image-steps", type=int, default=2, help="steps of the whole-image run (0: skip it; default %(default)s)")
    p.add_argument("--no-torch-image", action="store_true", help="whole image on the Rust side only")
    p.add_argument("--size", type=int, default=512, help="whole-image side in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rust-bin", help="the sd15_cpu bench executable (default: built with cargo)")
    p.add_argument("--json", help="also write all results to this JSON file")
    # Internal: the PyTorch child processes.
    p.add_argument("--worker", choices=["stages", "image"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--outputs", help=argparse.SUPPRESS)
    p.add_argument("--variant-fp16", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        a.steps = a.image_steps
        result = worker_stages(a) if a.worker == "stages" else worker_image(a)
        print(json.dumps(result))
        return

    if a.tiny:
        # The fixture's UNet samples 16x16 latents; its VAE upsamples by 2.
        model, fp16_model, latent = FIXTURE_SD1, FIXTURE_SD1, 16
        work = os.path.join(a.cache + "-tiny")
        os.makedirs(work, exist_ok=True)
        if a.size == 512:
            a.size = 32
    else:
        os.makedirs(a.cache, exist_ok=True)
        if a.rebuild:
            for sub in ("f32", "fp16"):
                shutil.rmtree(os.path.join(a.cache, sub), ignore_errors=True)
        model, fp16_model = build_random_sd15(a.cache, not a.no_fp16, a.seed)
        if a.build_only:
            return
        latent, work = 64, a.cache

    exe = rust_bench_binary(a)
    inputs = os.path.join(work, "inputs.safetensors")
    shapes = write_inputs(model, inputs, latent, a.seed)
    log(f"inputs {shapes} in {inputs}")
    machine = machine_info(a.threads)
    machine["loadavg_start"] = os.getloadavg()[0]

    log(f"PyTorch: text encoder, UNet step, VAE decode ({a.warmup} warm-up + {a.runs} runs each)")
    torch_out = os.path.join(work, "outputs-torch.safetensors")
    rust_out = os.path.join(work, "outputs-rust.safetensors")
    torch_r = run_torch("stages", model, inputs, torch_out, a)
    log("sd-wgpu: the same")
    # --profile: wall time by op kind (a mutex per op: negligible next to the ops).
    rust_args = ["--model", model, "--inputs", inputs, "--outputs", rust_out, "--runs", str(a.runs),
                 "--warmup", str(a.warmup), "--profile"]
    if a.quick:
        rust_args.append("--quick")
    rust_r = run_rust(exe, rust_args, a)
    for key, s in rust_r["stages"].items():
        log(f"  sd-wgpu {key}: {s['median_s']:.3f} s (runs {', '.join(f'{x:.3f}' for x in s['runs_s'])})")
    report = {
        "machine": machine,
        "model": model,
        "runs": a.runs,
        "warmup": a.warmup,
        "inputs": shapes,
        "torch": torch_r,
        "rust": rust_r,
        "agreement": compare_outputs(torch_out, rust_out),
        "ratios": {k: rust_r["stages"][k]["median_s"] / torch_r["stages"][k]["median_s"] for k in torch_r["stages"]},
        "targets": TARGETS,
    }

    if fp16_model and a.image_steps > 0:
        log(f"whole {a.size}x{a.size} image, {a.image_steps} steps, from {fp16_model}")
        png = os.path.join(work, "image-rust.png")
        img_args = ["--image", "--model", fp16_model, "--steps", str(a.image_steps), "--size", str(a.size),
                    "--seed", str(a.seed), "--prompt", PROMPT, "--outputs", png]
        image = {"model": fp16_model, "steps": a.image_steps, "size": a.size, "rust": run_rust(exe, img_args, a)}
        if not a.no_torch_image:
            npy = os.path.join(work, "image-torch.npy")
            image["torch"] = run_torch("image", fp16_model, None, npy, a, variant_fp16=not a.tiny)
            try:
                import numpy as np
                from PIL import Image

                ours = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
                theirs = np.load(npy).astype(np.int32)
                d = np.abs(ours - theirs)
                image["pixels"] = {"max": int(d.max()), "mean": float(d.mean())}
            except ImportError:
                pass
        report["image"] = image

    machine["loadavg_end"] = os.getloadavg()[0]
    print_report(report)
    if a.json:
        write_json(a.json, report)
        log(f"results in {a.json}")


if __name__ == "__main__":
    main()
