#!/usr/bin/env python3
"""Time PyTorch (diffusers / transformers) and sd-wgpu's CPU backend on the same full-size
SD 1.5 or SDXL weights and the same inputs, in one run, and print the ratios.

    python3 tools/bench_vs_pytorch.py                 # SD 1.5, full size (builds the weights once)
    python3 tools/bench_vs_pytorch.py --sdxl          # SDXL base, full size, 1024x1024
    python3 tools/bench_vs_pytorch.py --tiny [--sdxl] # seconds: the tests' tiny sd1 / sdxl fixture

Needs torch, diffusers and transformers (no network: the weights are random, from the real
configs, which sd-wgpu keeps as its single-file presets in src/model/presets/sd15 and
sdxl_base).  What it does, with one mechanism for both architectures:

1. Builds a random full-size diffusers folder once, seeded, in safetensors:
   <cache>/f32 (float32 files) and <cache>/fp16 (the same values rounded to float16, in
   `*.fp16.safetensors` files as diffusers' `variant="fp16"` writes them).  Reused when
   present (--rebuild to redo).  SD 1.5: about 6 GB in /tmp/sd15-random; SDXL (two text
   encoders, the 2.6 B-parameter UNet): about 21 GB in /work/bench-cache/sdxl-random
   (--drop-f32 deletes the float32 copy at the end).
2. Writes the inputs both sides read to <cache>/inputs.safetensors: the token ids of one
   prompt (`ids`, and `ids_2` from SDXL's second tokenizer), `latents` [2, 4, S, S],
   `context` [2, 77, width], `timestep`, `vae_latents` [1, 4, S, S] (already divided by the
   VAE's scaling factor), and for SDXL's text_time UNet `text_embeds` [2, 1280] and
   `time_ids` [2, 6]; S is the UNet's sample_size (64: 512x512; SDXL 128: 1024x1024).
3. Times PyTorch in a child process (torch.set_num_threads(all cores), inference_mode,
   float32): each text encoder (SDXL: the penultimate hidden states and the pooled
   projection, as its pipeline reads them), one UNet forward (batch 2: a guided step), one
   VAE decode; --warmup untimed runs and the median of --runs runs each; peak memory of
   that process.
4. Runs the Rust bench (`cargo bench --bench sd15_cpu`, built with the release profile) on
   the same folder and inputs, likewise, and compares the two sides' outputs.
5. Runs one whole image at the model's size (--image-steps steps, the model's guidance:
   7.5 for SD 1.5, 5 for SDXL) on the fp16 folder on both sides, for peak memory (sd-wgpu
   keeps f16 weights f16; diffusers loads them as float32), and compares the two images.

Prints a table (stage, PyTorch s, sd-wgpu s, ratio, target) and writes everything as JSON
to --json when asked.

`--precision bf16` runs both sides in bfloat16 (issue 18's opt-in mode): PyTorch under
`torch.autocast("cpu", dtype=torch.bfloat16)`, sd-wgpu with `--precision bf16` (bf16
products, f32 sums; needs AMX-BF16 or AVX512_BF16).  The whole-image step then also draws
each side's float32 image with the same seed and prints how far the bf16 images are from
them and from each other (max and mean levels of 255, PSNR).
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
from contextlib import nullcontext

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "models")
PROMPT = "a photograph of an astronaut riding a horse"

# The real configs, as sd-wgpu's built-in single-file presets keep them (one copy in the
# repo), and the CLIP BPE files every tokenizer of both families shares.
PRESETS = os.path.join(ROOT, "src", "model", "presets")
CLIP_BPE = os.path.join(PRESETS, "clip_tokenizer")

# What differs between the architectures; everything else is one code path.  `targets`:
# the issues' limits on sd-wgpu's time / PyTorch's time (None: no target); `peak_gb`: the
# whole image's peak on the CPU.
ARCHS = {
    "sd15": {
        "name": "SD 1.5",
        "preset": "sd15",
        "tiny": "sd1",
        "cache": "/tmp/sd15-random",
        # Issue 18's, on every machine (the first SD 1.5 issue's were 1.0, 0.8 and 0.7).
        "targets": {"text_encoder": 0.8, "unet": 0.7, "vae": 0.5},
        "peak_gb": 4.0,
        "runs": 3,
    },
    "sdxl": {
        "name": "SDXL",
        "preset": "sdxl_base",
        "tiny": "sdxl",
        "cache": "/work/bench-cache/sdxl-random",
        # Issue 15 sets the UNet step's; the rest are reported without one.
        "targets": {"unet": 0.8},
        "peak_gb": 9.0,
        # A guided 1024x1024 step is tens of seconds a side on a few cores.
        "runs": 1,
    },
}
WEIGHT_FILES = {
    "text_encoder": "model",
    "text_encoder_2": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
}


def preset_dir(preset="sd15"):
    return os.path.join(PRESETS, preset)


def preset_config(component, preset="sd15"):
    with open(os.path.join(preset_dir(preset), component, "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def components(folder):
    """The weight-bearing components a folder (or preset) has, in pipeline order."""
    return [c for c in WEIGHT_FILES if os.path.isfile(os.path.join(folder, c, "config.json"))]


def model_defaults(folder):
    """Pixels a side and guidance of the folder's pipeline (diffusers' defaults):
    sample_size x the VAE's factor (512 for SD 1.5, 1024 for SDXL), 7.5 (SDXL: 5)."""
    cfg = lambda c: json.load(open(os.path.join(folder, c, "config.json")))  # noqa: E731
    factor = 2 ** (len(cfg("vae")["block_out_channels"]) - 1)
    xl = "text_encoder_2" in components(folder)
    return cfg("unet").get("sample_size", 128 if xl else 64) * factor, 5.0 if xl else 7.5


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


def has_weights(folder, comp, fp16):
    suffix = ".fp16.safetensors" if fp16 else ".safetensors"
    return os.path.isfile(os.path.join(folder, comp, WEIGHT_FILES[comp] + suffix))


def folder_complete(folder, fp16, preset="sd15"):
    return all(has_weights(folder, comp, fp16) for comp in components(preset_dir(preset))) and os.path.isfile(
        os.path.join(folder, "model_index.json")
    )


def write_folder_files(folder, preset="sd15"):
    """The preset's model_index, scheduler and tokenizer files (weights are added later);
    every tokenizer (SDXL has two) gets the shared BPE files."""
    if os.path.exists(folder):
        shutil.rmtree(folder)
    shutil.copytree(preset_dir(preset), folder)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(folder, tokenizer)):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(CLIP_BPE, name), os.path.join(folder, tokenizer, name))


def save_safetensors(tensors, path):
    """safetensors.torch.save_file, streamed: one tensor in memory at a time besides the
    model (save_file copies every tensor's bytes first: twice the 10 GB of SDXL's float32
    UNet), and never sharded (diffusers' save_pretrained splits files over 10 GB)."""
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, offset, items = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().reshape(-1).cpu()  # one tensor at a time off a GPU
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
        items.append(t)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as save_file writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in items:
            f.write(t.view(torch.uint8).numpy().data)


def save_component(model, folder, comp, fp16):
    """The component's config.json and weights, as save_pretrained writes them (fp16: the
    `*.fp16.safetensors` name diffusers' variant="fp16" reads); fp16 converts in place."""
    import torch

    out = os.path.join(folder, comp)
    os.makedirs(out, exist_ok=True)
    if fp16:
        model = model.to(torch.float16)
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(out)
    else:  # transformers
        model.config.save_pretrained(out)
    stem = WEIGHT_FILES[comp] + (".fp16" if fp16 else "")
    save_safetensors(model.state_dict(), os.path.join(out, stem + ".safetensors"))
    return model


def random_component(comp, preset):
    """One component with transformers' / diffusers' own random initialisation."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # float32 whatever the repo's config says (transformers builds in a config's dtype).
    cfg = {k: v for k, v in preset_config(comp, preset).items() if k not in ("torch_dtype", "dtype")}
    if comp == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**cfg))
    if comp == "text_encoder_2":  # SDXL's OpenCLIP bigG, with the pooled projection
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    if comp == "unet":
        return UNet2DConditionModel.from_config(cfg)
    return AutoencoderKL.from_config(cfg)


def build_random(cache, want_fp16, seed, preset="sd15"):
    """Random full-size weights of `preset` in <cache>/f32 and <cache>/fp16: each component
    is built, seeded, saved as float32, then rounded to float16 and saved again."""
    import torch

    f32, f16 = os.path.join(cache, "f32"), os.path.join(cache, "fp16")
    if folder_complete(f32, False, preset) and (not want_fp16 or folder_complete(f16, True, preset)):
        log(f"reusing the random {preset} folder in {cache}")
        return f32, f16 if want_fp16 else None
    log(f"building random full-size {preset} weights in {cache} (once; the components not there yet)")
    torch.set_num_threads(all_cores())
    folders = [(f32, False)] + ([(f16, True)] if want_fp16 else [])
    for folder, _ in folders:
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            write_folder_files(folder, preset)
    # Each component from its own seed, so one rebuilt alone is the same as in a full build.
    for i, comp in enumerate(components(preset_dir(preset))):
        if all(has_weights(folder, comp, fp16) for folder, fp16 in folders):
            continue
        t = time.perf_counter()
        torch.manual_seed(seed + i)
        model = random_component(comp, preset).eval()
        save_component(model, f32, comp, False)
        if want_fp16:
            save_component(model, f16, comp, True)
        del model
        log(f"  {comp}: {time.perf_counter() - t:.0f} s")
    return f32, f16 if want_fp16 else None


# ----------------------------------------------------------------------------------------
# 2. The shared inputs
# ----------------------------------------------------------------------------------------


def write_inputs(model_dir, path, seed):
    """The inputs of every stage, shaped from the folder's configs (see the module docs)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    cfg = lambda c: json.load(open(os.path.join(model_dir, c, "config.json")))  # noqa: E731
    unet, vae = cfg("unet"), cfg("vae")
    encoders = [c for c in components(model_dir) if c.startswith("text_encoder")]
    g = torch.Generator("cpu").manual_seed(seed)
    s = unet["sample_size"]
    tensors = {}
    for comp in encoders:
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, comp.replace("text_encoder", "tokenizer")))
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        # Token ids as float32 (exact below 2^24): one dtype for every input.
        tensors[comp.replace("text_encoder", "ids")] = torch.tensor(ids, dtype=torch.float32)
    width = sum(cfg(c)["hidden_size"] for c in encoders)
    tensors["latents"] = torch.randn(2, unet["in_channels"], s, s, generator=g)
    tensors["context"] = torch.randn(2, 77, width, generator=g)
    # The first timestep of 50 steps (PNDM's and Euler's "leading"), an integer as SD 1.5's
    # pipeline passes it.
    tensors["timestep"] = torch.tensor([981.0])
    tensors["vae_latents"] = torch.randn(1, vae["latent_channels"], s, s, generator=g) / vae["scaling_factor"]
    if unet.get("addition_embed_type") == "text_time":
        # SDXL's added_cond_kwargs for a guided step: the pooled embeddings of both branches
        # and _get_add_time_ids (original size, crop (0, 0), target size).
        pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        side = float(s * 2 ** (len(vae["block_out_channels"]) - 1))
        tensors["text_embeds"] = torch.randn(2, pooled, generator=g)
        tensors["time_ids"] = torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2)
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


def load_text_encoders(model, dtype, kw):
    """(component, model) for each text encoder of the folder: SDXL's second is
    CLIPTextModelWithProjection (its pooled projection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    return [
        (comp, classes[comp].from_pretrained(os.path.join(model, comp), dtype=dtype, **kw).eval())
        for comp in components(model)
        if comp in classes
    ]


def precision_context(a):
    """What every PyTorch stage runs under: bfloat16 autocast for --precision bf16."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else nullcontext()


def worker_stages(a):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    kw = {"variant": "fp16"} if a.variant_fp16 else {}
    encoders = load_text_encoders(a.model, torch.float32, kw)
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", dtype=torch.float32, **kw).eval()
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - t
    peak_after_load = peak_mib()
    x = load_file(a.inputs)
    timestep = x["timestep"][0]
    if float(timestep) == int(timestep):
        timestep = timestep.to(torch.int64)
    # SDXL's text_time UNet also reads the pooled embeddings and the size ids.
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "time_ids" in x else None

    def encode(encoder, ids, suffix):
        # What each pipeline reads: one encoder, last_hidden_state (SD 1.x/2.x); two,
        # hidden_states[-2] of each and the second's pooled text_embeds (SDXL).
        if len(encoders) == 1:
            return {"text_embeddings": encoder(ids).last_hidden_state}
        out = encoder(ids, output_hidden_states=True)
        result = {"text_embeddings" + suffix: out.hidden_states[-2]}
        if hasattr(out, "text_embeds"):
            result["pooled_text_embeds"] = out.text_embeds
        return result

    runs = []
    for comp, encoder in encoders:
        suffix = comp[len("text_encoder"):]
        ids = x["ids" + suffix].to(torch.int64)[None]
        runs.append((comp, lambda e=encoder, i=ids, s=suffix: encode(e, i, s)))
    runs.append(("unet", lambda: {"unet_out": unet(
        x["latents"], timestep, encoder_hidden_states=x["context"], added_cond_kwargs=added).sample}))
    if not a.quick:
        runs.append(("vae", lambda: {"image": vae.decode(x["vae_latents"]).sample}))
    stages, outputs = {}, {}
    with torch.inference_mode(), precision_context(a):
        for key, fn in runs:
            m, seconds, out = timed(a.warmup, a.runs, fn)
            stages[key] = {"median_s": m, "runs_s": seconds}
            outputs.update({name: v.contiguous().float() for name, v in out.items()})
            log(f"  PyTorch {key}: {m:.3f} s (runs {', '.join(f'{s:.3f}' for s in seconds)}); peak {peak_mib():.0f} MiB")
    save_file(outputs, a.outputs)
    return {
        "mode": "stages",
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_s": load_s,
        "stages": stages,
        "peak_after_load_mib": peak_after_load,
        "peak_mib": peak_mib(),
    }


def worker_image(a):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    kw = {"variant": "fp16"} if a.variant_fp16 else {}
    if "text_encoder_2" not in components(a.model):
        kw.update(safety_checker=None, requires_safety_checker=False)
    # The class model_index.json names: StableDiffusionPipeline or StableDiffusionXLPipeline.
    pipe = DiffusionPipeline.from_pretrained(a.model, dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t
    peak_after_load = peak_mib()
    t = time.perf_counter()
    with precision_context(a):
        image = pipe(
            PROMPT,
            num_inference_steps=a.steps,
            guidance_scale=a.guidance,
            height=a.size,
            width=a.size,
            generator=torch.Generator("cpu").manual_seed(a.seed),
            output_type="np",
        ).images[0]
    total = time.perf_counter() - t
    np.save(a.outputs, (image * 255).round().astype(np.uint8))
    return {
        "mode": "image",
        "pipeline": type(pipe).__name__,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "total_s": total,
        "peak_after_load_mib": peak_after_load,
        "peak_mib": peak_mib(),
    }


def run_torch(mode, model, inputs, outputs, a, variant_fp16=False, precision=None):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", model,
        "--outputs", outputs, "--threads", str(a.threads), "--runs", str(a.runs),
        "--warmup", str(a.warmup), "--image-steps", str(a.image_steps), "--size", str(a.size),
        "--guidance", str(a.guidance), "--precision", precision or a.precision,
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


def stage_rows(r):
    """(key, label, output name) of each stage both sides ran, in order."""
    shapes = r["inputs"]
    lat, vae = shapes["latents"], shapes["vae_latents"]
    factor = r.get("vae_factor", 8)
    rows = []
    for key in r["torch"]["stages"]:
        if key.startswith("text_encoder"):
            suffix = key[len("text_encoder"):]
            n = shapes["ids" + suffix][0]
            label = f"text encoder{' 2' if suffix else ''} ({n} tokens)"
            rows.append((key, label, "text_embeddings" + suffix))
        elif key == "unet":
            rows.append((key, f"UNet step, batch {lat[0]} (guided), {lat[3] * factor}x{lat[2] * factor}", "unet_out"))
        elif key == "vae":
            rows.append((key, f"VAE decode, {vae[2] * factor}x{vae[3] * factor}", "image"))
    return rows


def print_report(r):
    m = r["machine"]
    targets = r["targets"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores ({', '.join(m.get('simd', []))}), "
          f"{m.get('memory_gb', '?')} GB; {m['threads']} threads each side; torch {m['torch']}")
    print(f"{r['arch']} weights: {r['model']}; median of {r['runs']} runs after {r['warmup']} warm-up(s); "
          f"precision {r.get('precision', 'f32')} (sd-wgpu: {r['rust'].get('precision', 'f32')})")
    if r.get("simd_cap"):
        print(f"SIMD capped at {r['simd_cap']}: PyTorch's ATen kernels ran {r['torch'].get('cpu_capability', '?')}, "
              f"sd-wgpu's {r['rust'].get('simd', '?')}")
    print(f"load average (1, 5, 15 min) {fmt_load(m['loadavg_start'])} at the start, {fmt_load(m['loadavg_end'])} at the end "
          f"(another busy process on these cores skews the times: compare with the runs' spread above)")
    print()
    rows = stage_rows(r)
    print(f"{'stage':<34} {'PyTorch s':>10} {'sd-wgpu s':>10} {'ratio':>7} {'target':>7}  {'ok':<3} {'max|diff| / max|ref|':>22}")
    for key, label, out in rows:
        pt = r["torch"]["stages"][key]["median_s"]
        rs = r["rust"]["stages"][key]["median_s"]
        ratio = rs / pt
        target = targets.get(key)
        ok = "-" if target is None else ("yes" if ratio <= target else "no")
        d = r["agreement"].get(out)
        diff = f"{d['max_abs_diff']:.2e} / {d['max_abs_ref']:.2e}" if d else "n/a"
        goal = "-" if target is None else f"<= {target}"
        print(f"{label:<34} {pt:>10.3f} {rs:>10.3f} {ratio:>7.2f} {goal:>7}  {ok:<3} {diff:>22}")
    d = r["agreement"].get("pooled_text_embeds")
    if d:
        print(f"{'  pooled text_embeds (encoder 2)':<34} {'':>37}  {'':<3} {d['max_abs_diff']:.2e} / {d['max_abs_ref']:.2e}")
    print(f"{'peak memory, stages (' + r.get('precision', 'f32') + ')':<34} {r['torch']['peak_mib'] / 1024:>8.2f} G {r['rust']['peak_mib'] / 1024:>8.2f} G"
          f"   (GiB; after load: {r['torch']['peak_after_load_mib'] / 1024:.2f} / {r['rust']['peak_after_load_mib'] / 1024:.2f})")
    for key, label, _ in rows:
        stage = r["rust"]["stages"].get(key, {})
        ops = stage.get("ops", [])
        if key.startswith("text_encoder") or not ops:
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
        print(f"whole {img['size']}x{img['size']} image, {img['steps']} steps, guidance {img['guidance']}, weights {img['model']}:")
        peak_gb = ri["peak_mib"] * 1024 * 1024 / 1e9
        limit = r["peak_target_gb"]
        ok = "yes" if peak_gb <= limit else "no"
        print(f"  sd-wgpu (weights as stored; f16 stays f16): peak {ri['peak_mib']:.0f} MiB = {peak_gb:.2f} GB "
              f"(target <= {limit} GB: {ok}; {ri['peak_after_load_mib']:.0f} MiB after load); "
              f"text {ri['text_encoder_s']:.2f} s, denoise {ri['denoise_s']:.1f} s = {ri['unet_evaluations']} UNet evaluations "
              f"x {ri['step_s']:.2f} s, VAE {ri['vae_decode_s']:.2f} s, "
              f"total {ri['total_s']:.1f} s")
        if ti:
            print(f"  PyTorch (weights loaded as f32): peak {ti['peak_mib']:.0f} MiB = {ti['peak_mib'] * 1048576 / 1e9:.2f} GB "
                  f"({ti['peak_after_load_mib']:.0f} MiB after load); total {ti['total_s']:.1f} s")
        if "pixels" in img:
            p = img["pixels"]
            print(f"  images agree: max |diff| {p['max']} levels of 255, mean {p['mean']:.3f}")
        for key, what in (("rust_vs_f32", "sd-wgpu bf16 vs sd-wgpu f32"), ("torch_vs_f32", "PyTorch bf16 vs PyTorch f32"),
                          ("rust_vs_torch", "sd-wgpu bf16 vs PyTorch bf16"), ("rust_vs_torch_f32", "sd-wgpu bf16 vs PyTorch f32")):
            if key in img:
                p = img[key]
                print(f"  {what:<30} max {p['max']:>3} levels, mean {p['mean']:.3f}, PSNR {p['psnr_db']:.1f} dB")


def image_distance(x, y):
    """max and mean |x - y| in levels of 255, and PSNR in dB, of two uint8 images."""
    import numpy as np

    d = x.astype(np.float64) - y.astype(np.float64)
    mse = float((d * d).mean())
    return {"max": int(np.abs(d).max()), "mean": float(np.abs(d).mean()),
            "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)}


def load_image(path):
    import numpy as np
    from PIL import Image

    return np.load(path) if path.endswith(".npy") else np.asarray(Image.open(path).convert("RGB"))


def fmt_load(load):
    return ", ".join(f"{x:.2f}" for x in load)


# ----------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdxl", action="store_true", help="SDXL base (1024x1024) instead of SD 1.5 (512x512)")
    p.add_argument("--cache", help="where the random folder and the inputs live (default /tmp/sd15-random; "
                   "SDXL: /work/bench-cache/sdxl-random)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the random folder even if present")
    p.add_argument("--build-only", action="store_true", help="only build the random folder")
    p.add_argument("--drop-f32", action="store_true", help="delete the float32 folder at the end (SDXL's is 14 GB)")
    p.add_argument("--tiny", action="store_true", help="use the tests' tiny sd1 / sdxl fixture instead of full size (a smoke test)")
    p.add_argument("--runs", type=int, help="timed runs per stage; the median is reported (default 3; SDXL 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    p.add_argument("--threads", type=int, default=all_cores(), help="threads for both sides (default: all cores, %(default)s)")
    p.add_argument("--quick", action="store_true", help="skip the VAE decode stage")
    p.add_argument("--no-fp16", action="store_true", help="no fp16 folder and no whole-image run")
    p.add_argument("--image-steps", type=int, default=2, help="steps of the whole-image run (0: skip it; default %(default)s)")
    p.add_argument("--no-torch-image", action="store_true", help="whole image on the Rust side only")
    p.add_argument("--size", type=int, help="whole-image side in pixels (default: the model's, 512 / SDXL 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rust-bin", help="the sd15_cpu bench executable (default: built with cargo)")
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="both sides' precision: f32, or bf16 (PyTorch's bfloat16 autocast; sd-wgpu --precision bf16)")
    # Internal: the PyTorch child processes.
    p.add_argument("--simd", choices=["avx2"],
                   help="cap both sides at AVX2 + FMA on an AVX-512 CPU: sd-wgpu with SD_CPU_SIMD, PyTorch "
                        "with ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS")
    p.add_argument("--worker", choices=["stages", "image"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--outputs", help=argparse.SUPPRESS)
    p.add_argument("--guidance", type=float, help=argparse.SUPPRESS)
    p.add_argument("--variant-fp16", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    arch = ARCHS["sdxl" if a.sdxl else "sd15"]
    if a.runs is None:
        a.runs = 1 if a.tiny else arch["runs"]

    if a.simd == "avx2":
        # Inherited by both sides' child processes.
        os.environ.update(SD_CPU_SIMD="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                          MKL_ENABLE_INSTRUCTIONS="AVX2")
    if a.worker:
        a.steps = a.image_steps
        result = worker_stages(a) if a.worker == "stages" else worker_image(a)
        print(json.dumps(result))
        return

    if a.tiny:
        # The fixtures' UNets sample 16x16 latents; their VAEs upsample by 2.
        model = fp16_model = os.path.join(FIXTURES, arch["tiny"])
        work = (a.cache or arch["cache"]) + "-tiny"
        os.makedirs(work, exist_ok=True)
    else:
        work = a.cache or arch["cache"]
        os.makedirs(work, exist_ok=True)
        if a.rebuild:
            for sub in ("f32", "fp16"):
                shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
        model, fp16_model = build_random(work, not a.no_fp16, a.seed, arch["preset"])
        if a.build_only:
            return
    default_size, a.guidance = model_defaults(model)
    a.size = a.size or default_size

    exe = rust_bench_binary(a)
    inputs = os.path.join(work, "inputs.safetensors")
    shapes = write_inputs(model, inputs, a.seed)
    log(f"inputs {shapes} in {inputs}")
    machine = machine_info(a.threads)
    machine["loadavg_start"] = os.getloadavg()

    log(f"PyTorch: text encoder(s), UNet step, VAE decode ({a.warmup} warm-up + {a.runs} runs each)")
    torch_out = os.path.join(work, "outputs-torch.safetensors")
    rust_out = os.path.join(work, "outputs-rust.safetensors")
    torch_r = run_torch("stages", model, inputs, torch_out, a)
    log(f"  load average {fmt_load(os.getloadavg())}")
    log("sd-wgpu: the same")
    # --profile: wall time by op kind (a mutex per op: negligible next to the ops).
    rust_args = ["--model", model, "--inputs", inputs, "--outputs", rust_out, "--runs", str(a.runs),
                 "--warmup", str(a.warmup), "--profile", "--precision", a.precision]
    if a.quick:
        rust_args.append("--quick")
    rust_r = run_rust(exe, rust_args, a)
    for key, s in rust_r["stages"].items():
        log(f"  sd-wgpu {key}: {s['median_s']:.3f} s (runs {', '.join(f'{x:.3f}' for x in s['runs_s'])})")
    log(f"  load average {fmt_load(os.getloadavg())}")
    vae_cfg = json.load(open(os.path.join(model, "vae", "config.json")))
    report = {
        "arch": arch["name"],
        "precision": a.precision,
        "simd_cap": a.simd,
        "machine": machine,
        "model": model,
        "runs": a.runs,
        "warmup": a.warmup,
        "inputs": shapes,
        "vae_factor": 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "torch": torch_r,
        "rust": rust_r,
        "agreement": compare_outputs(torch_out, rust_out),
        "ratios": {k: rust_r["stages"][k]["median_s"] / torch_r["stages"][k]["median_s"] for k in torch_r["stages"]},
        "targets": arch["targets"],
        "peak_target_gb": arch["peak_gb"],
    }

    if fp16_model and a.image_steps > 0:
        log(f"whole {a.size}x{a.size} image, {a.image_steps} steps, from {fp16_model}")
        png = os.path.join(work, "image-rust.png")
        img_args = ["--image", "--model", fp16_model, "--steps", str(a.image_steps), "--size", str(a.size),
                    "--guidance", str(a.guidance), "--seed", str(a.seed), "--prompt", PROMPT]
        image = {"model": fp16_model, "steps": a.image_steps, "size": a.size, "guidance": a.guidance,
                 "rust": run_rust(exe, img_args + ["--outputs", png, "--precision", a.precision], a)}
        log(f"  sd-wgpu: peak {image['rust']['peak_mib']:.0f} MiB, total {image['rust']['total_s']:.1f} s; "
            f"load average {fmt_load(os.getloadavg())}")
        if not a.no_torch_image:
            npy = os.path.join(work, "image-torch.npy")
            image["torch"] = run_torch("image", fp16_model, None, npy, a, variant_fp16=not a.tiny)
            log(f"  PyTorch: peak {image['torch']['peak_mib']:.0f} MiB, total {image['torch']['total_s']:.1f} s")
            try:
                import numpy as np
                from PIL import Image

                ours = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
                theirs = np.load(npy).astype(np.int32)
                d = np.abs(ours - theirs)
                image["pixels"] = {"max": int(d.max()), "mean": float(d.mean())}
            except ImportError:
                pass
        if a.precision != "f32":
            # How far reduced precision moves each side's image from its own float32 one.
            png32 = os.path.join(work, "image-rust-f32.png")
            log("  the same image in float32 on both sides, to measure the bf16 images against")
            run_rust(exe, img_args + ["--outputs", png32, "--precision", "f32"], a)
            image["rust_vs_f32"] = image_distance(load_image(png), load_image(png32))
            if not a.no_torch_image:
                npy32 = os.path.join(work, "image-torch-f32.npy")
                run_torch("image", fp16_model, None, npy32, a, variant_fp16=not a.tiny, precision="f32")
                image["torch_vs_f32"] = image_distance(load_image(npy), load_image(npy32))
                image["rust_vs_torch"] = image_distance(load_image(png), load_image(npy))
                image["rust_vs_torch_f32"] = image_distance(load_image(png), load_image(npy32))
        report["image"] = image

    machine["loadavg_end"] = os.getloadavg()
    print_report(report)
    if a.json:
        write_json(a.json, report)
        log(f"results in {a.json}")
    if a.drop_f32 and not a.tiny:
        log(f"deleting {model} (--drop-f32)")
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
