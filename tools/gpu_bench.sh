#!/usr/bin/env bash
# sd-wgpu on this machine's GPU, in one command, with no Rust toolchain needed:
#
#   tools/gpu_bench.sh --bench path/to/sd15_gpu [--sdxl] [--out DIR] [--software] [--no-torch]
#                      [--text-encoders-on-cpu]
#
# --bench: the executable `cargo bench --bench sd15_gpu --no-run` builds (it prints the
#   path; tools/gpu_bench.sh --build finds it when cargo is here). Run from the repository
#   root: it reads tests/fixtures and the presets in src/model/presets.
# --out DIR (gpu-bench-out): sd-wgpu.json, torch.json, gpu_bench.json (both and the
#   ratios) and gpu_bench.txt (the table).
# --software: allow a software adapter (Mesa's llvmpipe, as in CI's image) and use the
#   tests' tiny model, so every stage runs in minutes; numbers from it mean nothing.
# --no-torch: skip the PyTorch side even where torch and a GPU are present.
# --sdxl: SDXL base instead of SD 1.5: kernels at SDXL's shapes, the UNet step and VAE
#   decode at 1024x1024, whole 1024x1024 images, on a random SDXL fp16 folder
#   (/tmp/sdxl-random-fp16, about 7 GB); with --software, the tests' tiny sdxl fixture.
# --text-encoders-on-cpu: sd-wgpu loads the model as the service's flag of that name does
#   (the text encoders' weights off the GPU: SDXL at 1024x1024 within 8 GB; see the README's
#   "GPU memory"), so the card's peak below is that setup's.
# --peak-fp32 / --peak-fp16 TFLOPS: the card's dense peaks, for the kernels' share of it
#   (known for H100/H200 from nvidia-smi's name).
#
# What it does: prints the adapter (driver, features, subgroup sizes, cooperative-matrix
# shapes, limits); where python3 has torch, diffusers and a CUDA/ROCm/MPS device, builds a
# random full-size fp16 folder (tools/gpu_bench_torch.py --build-only) so both sides run
# the same weights; runs sd15_gpu: the fixture image cases against diffusers' images, each
# kernel family at the model's shapes, a guided UNet step, VAE decodes (SD 1.5: 512 and
# 1024; SDXL: 1024), whole images at 20 and 50 steps, the weights' bytes on the device by
# the bench's accounting; samples nvidia-smi's memory in use meanwhile (the card's peak);
# then PyTorch's same stages (fp32 and fp16 with SDPA, and torch's peak allocation), and
# prints the table of ratios.
set -euo pipefail

bench=""
out="gpu-bench-out"
software=0
torch=1
build=0
peak_fp32=""
peak_fp16=""
model="${SD_BENCH_MODEL:-}"
arch=sd15
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bench) bench="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --software) software=1; shift ;;
        --sdxl) arch=sdxl; shift ;;
        --no-torch) torch=0; shift ;;
        --text-encoders-on-cpu) extra+=(--text-encoders-on-cpu); shift ;;
        --build) build=1; shift ;;
        --model) model="$2"; shift 2 ;;
        --peak-fp32) peak_fp32="$2"; shift 2 ;;
        --peak-fp16) peak_fp16="$2"; shift 2 ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "gpu_bench.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done

torch_arch=()
if [ "$arch" = sdxl ]; then
    torch_arch=(--sdxl)
    model="${model:-/tmp/sdxl-random-fp16}"
fi
model="${model:-/tmp/sd15-random-fp16}"

if [ "$build" = 1 ]; then
    bench=$(cargo bench --bench sd15_gpu --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sd15_gpu":
        print(m["executable"])' | tail -1)
fi
if [ -z "$bench" ] || [ ! -x "$bench" ]; then
    echo "gpu_bench.sh: --bench must name the sd15_gpu executable (cargo bench --bench sd15_gpu --no-run)" >&2
    exit 2
fi
if [ ! -d tests/fixtures ] || [ ! -d src/model/presets ]; then
    echo "gpu_bench.sh: run it from the repository root (it reads tests/fixtures)" >&2
    exit 2
fi
mkdir -p "$out"
start=$(date +%s)
echo "gpu_bench.sh on $(hostname) at $(date -u '+%Y-%m-%d %H:%M UTC')"

# The card's name and driver as the vendor's tool has them, and its dense peaks.
if command -v nvidia-smi >/dev/null 2>&1; then
    card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1 || true)
    echo "nvidia-smi: $card"
    case "$card" in
        # Datasheet dense peaks (SXM): fp32 67 TFLOP/s, fp16/bf16 tensor 989 TFLOP/s.
        *H100*|*H200*) peak_fp32=${peak_fp32:-67}; peak_fp16=${peak_fp16:-989} ;;
    esac
fi
peaks=()
[ -n "$peak_fp32" ] && peaks+=(--peak-fp32 "$peak_fp32")
[ -n "$peak_fp16" ] && peaks+=(--peak-fp16 "$peak_fp16")

# The PyTorch side needs torch with a GPU and diffusers.
have_torch=0
if [ "$torch" = 1 ] && [ "$software" = 0 ] && command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import torch, diffusers, transformers, sys
sys.exit(0 if torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()) else 1)' 2>/dev/null; then
    have_torch=1
fi

args=(--arch "$arch" --images --json "$out/sd-wgpu.json" "${peaks[@]}" "${extra[@]}")
if [ "$software" = 1 ]; then
    # The tiny fixture's 16x16 latents, and the kernels at the architecture's channels but
    # 16x16 latents too (full-size shapes take many minutes on llvmpipe).
    args+=(--allow-software --tiny --latent 16 --runs 1 --image-steps 4)
elif [ "$have_torch" = 1 ]; then
    python3 tools/gpu_bench_torch.py "${torch_arch[@]}" --build-only --model "$model"
    args+=(--model "$model")
else
    echo "no PyTorch with a GPU (or no diffusers) here: sd-wgpu alone, on random f32 weights, no whole images"
fi

echo "== sd-wgpu: $bench ${args[*]}"
# A failure (a fixture image off, a GPU error) is reported at the end; the rest still runs.
# The card's memory in use, sampled while sd15_gpu runs (the whole card's, as nvidia-smi
# sees it: other processes' too).
sampler=""
if command -v nvidia-smi >/dev/null 2>&1; then
    (while :; do
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1
        sleep 0.5
    done) >"$out/gpu_memory_used.txt" &
    sampler=$!
fi
set +e
"$bench" "${args[@]}" 2>&1 | tee "$out/sd-wgpu.txt"
status=${PIPESTATUS[0]}
set -e
if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    python3 - "$out" <<'PY' || true
import json, sys
out = sys.argv[1]
used = [float(l) for l in open(f"{out}/gpu_memory_used.txt") if l.strip().replace(".", "", 1).isdigit()]
if used:
    print(f"device memory in use at the most during sd15_gpu (nvidia-smi): {max(used):.0f} MiB")
    r = json.load(open(f"{out}/sd-wgpu.json"))
    r["gpu_memory_used_peak_mib"] = max(used)
    json.dump(r, open(f"{out}/sd-wgpu.json", "w"), indent=2)
PY
fi

if [ "$have_torch" = 1 ]; then
    echo "== PyTorch"
    python3 tools/gpu_bench_torch.py "${torch_arch[@]}" --model "$model" --json "$out/torch.json"
    python3 tools/gpu_bench_torch.py --report --rust "$out/sd-wgpu.json" --torch "$out/torch.json" \
        --json "$out/gpu_bench.json" | tee "$out/gpu_bench.txt"
elif command -v python3 >/dev/null 2>&1; then
    python3 tools/gpu_bench_torch.py --report --rust "$out/sd-wgpu.json" --json "$out/gpu_bench.json" |
        tee "$out/gpu_bench.txt"
fi
echo "gpu_bench.sh: done in $(( $(date +%s) - start )) s; results in $out/"
if [ "$status" != 0 ]; then
    echo "gpu_bench.sh: sd15_gpu FAILED (exit $status): see $out/sd-wgpu.txt" >&2
fi
exit "$status"
