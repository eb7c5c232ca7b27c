//! The wgpu backend on one adapter, everything tools/gpu_bench.sh reports for sd-wgpu:
//!
//! 1. the adapter: name, backend, driver, features (SHADER_F16, SUBGROUP, cooperative
//!    matrices, timestamps), subgroup sizes, cooperative-matrix shapes, limits;
//! 2. with `--images`: the fixture image cases (tests/fixtures/reference/images.json) on this
//!    GPU against diffusers' images, with the tests' pass rule;
//! 3. each kernel family at the architecture's shapes (`--arch sd15|sdxl`, read from its
//!    UNet and VAE configs at `--latent`: every attention level's projections, feed-forward,
//!    self- and cross-attention, every level's 3x3 convolution, the VAE decoder's): GFLOP/s
//!    (or GB/s), and the share of the card's peak when `--peak-fp32`/`--peak-fp16`
//!    (TFLOP/s) are given;
//! 4. one guided UNet step (batch 2; SDXL's with its text_time conditioning), the VAE
//!    decode at the model's size and at twice it up to 1024x1024, with the kernel launches per UNet step,
//!    the host's recording time per launch, and the weights the device holds (the bench's
//!    own accounting from the folder's files: f16 stays f16 where the adapter keeps it);
//! 5. whole images through `StableDiffusion::generate` at `--image-steps` (needs `--model`),
//!    at the model's size and guidance.
//!
//! `cargo bench --bench sd15_gpu -- [options]`, or the executable `cargo bench --no-run`
//! builds, on a machine with no Rust (tools/gpu_bench.sh). Options:
//! * `--arch sd15|sdxl` (sd15): the kernel shapes, the random weights' architecture (real
//!   configs from src/model/presets/sd15, sdxl_base) and `--tiny`'s fixture.
//! * `--model DIR`: a diffusers folder, SD 1.x/2.x or SDXL (e.g. the random fp16 folder
//!   tools/gpu_bench_torch.py builds) for stages 4 and 5; without it stage 4 uses random
//!   f32 weights of `--arch` and stage 5 is skipped. `--tiny`: the tests' sd1 (sdxl) fixture.
//! * `--latent N` (the UNet's sample_size: 64 for SD 1.5, 128 for SDXL): latent side of
//!   the kernel shapes, the UNet step and the first VAE decode.
//! * `--image-steps 20,50`, `--image-size PX` (8 x latent), `--runs N` (3) timed runs per
//!   stage after one warm-up (the median is reported).
//! * `--images`, `--fixtures DIR` (tests/fixtures): stage 2.
//! * `--no-kernels`, `--quick` (stages 1-3 only), `--json FILE` (everything).
//! * `--memory-only`: stages 4 and 5 with no kernel run (`GpuDevice::set_dry_run`: every
//!   op allocates as it would, values are garbage), one run each and whole images of 2
//!   steps, for the device memory each needs (`peak_device_mib`, the backend's own
//!   account); the kernels (stage 3) are skipped. This measures SDXL's memory at 1024x1024
//!   on llvmpipe in minutes, where running it would take hours.
//! * `--text-encoders-on-cpu`: load `--model` with its text encoders on the CPU (the
//!   service's flag of the same name).
//! * `--allow-software`: run on a software adapter (llvmpipe) too, which is refused
//!   otherwise (numbers from one say nothing about a GPU); with `--tiny` it runs every
//!   stage in minutes, as CI's image can.
//!
//! Ops only record work into the device's command encoder; every timed run ends with
//! `GpuDevice::synchronize()` (submit and wait) or a read-back, so the times cover the GPU's
//! work. With `SD_GPU_PROFILE=1` (and an adapter with timestamp queries) each section ends
//! with the GPU time of each kernel entry point.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use sd_wgpu::backend::gpu::{profile, GpuDevice};
use sd_wgpu::backend::{select_device, BackendChoice};
use sd_wgpu::model::folder::{Component, ModelFolder};
use sd_wgpu::model::source::ModelOptions;
use sd_wgpu::model::unet::{Conditioning, TextTime, UNet2DConditionModel};
use sd_wgpu::model::vae::VaeDecoder;
use sd_wgpu::model::weights::Weights;
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::{Device, Tensor};
use sd_wgpu::{Error, Result};

/// How long the timed runs of one kernel may take in all (after the first, at least one
/// run is always timed).
const TARGET: Duration = Duration::from_millis(1000);
/// The most timed runs of one kernel.
const MAX_RUNS: usize = 200;
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

mod common;
use common::{peak_memory_mib, peak_text, source_path, Arch, Configs};

#[path = "../tests/common/image_cases.rs"]
mod image_cases;

struct Options {
    arch: Arch,
    model: Option<PathBuf>,
    /// `None`: the UNet's sample_size.
    latent: Option<usize>,
    image_steps: Vec<usize>,
    image_size: Option<usize>,
    runs: usize,
    images: bool,
    fixtures: PathBuf,
    kernels: bool,
    quick: bool,
    memory_only: bool,
    text_encoders_on_cpu: bool,
    allow_software: bool,
    json: Option<PathBuf>,
    peak_fp32: Option<f64>,
    peak_fp16: Option<f64>,
}

fn usage(message: String) -> Error {
    Error::Other(format!(
        "{message}\nusage: sd15_gpu [--arch sd15|sdxl] [--model DIR | --tiny] [--latent N] [--image-steps 20,50] \
         [--image-size PX] [--runs N] [--images [--fixtures DIR]] [--no-kernels] [--quick] \
         [--memory-only] [--text-encoders-on-cpu] [--allow-software] [--json FILE] \
         [--peak-fp32 TFLOPS] [--peak-fp16 TFLOPS]"
    ))
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        arch: Arch::Sd15,
        model: None,
        latent: None,
        image_steps: vec![20, 50],
        image_size: None,
        runs: 3,
        images: false,
        fixtures: source_path("tests/fixtures"),
        kernels: true,
        quick: false,
        memory_only: false,
        text_encoders_on_cpu: false,
        allow_software: false,
        json: None,
        peak_fp32: None,
        peak_fp16: None,
    };
    let mut tiny = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        fn number<T: std::str::FromStr>(name: &str, v: String) -> Result<T> {
            v.parse()
                .map_err(|_| usage(format!("{name}: not a number: {v:?}")))
        }
        match arg.as_str() {
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            "--quick" => o.quick = true,
            "--text-encoders-on-cpu" => o.text_encoders_on_cpu = true,
            "--memory-only" => {
                o.memory_only = true;
                o.kernels = false;
                o.runs = 1;
                o.image_steps = vec![2];
            }
            "--allow-software" => o.allow_software = true,
            "--images" => o.images = true,
            "--no-kernels" => o.kernels = false,
            "--tiny" => tiny = true,
            "--arch" => o.arch = Arch::parse(&value("--arch")?)?,
            "--model" => o.model = Some(value("--model")?.into()),
            "--fixtures" => o.fixtures = value("--fixtures")?.into(),
            "--json" => o.json = Some(value("--json")?.into()),
            "--latent" => o.latent = Some(number("--latent", value("--latent")?)?),
            "--runs" => o.runs = number("--runs", value("--runs")?)?,
            "--image-size" => o.image_size = Some(number("--image-size", value("--image-size")?)?),
            "--peak-fp32" => o.peak_fp32 = Some(number("--peak-fp32", value("--peak-fp32")?)?),
            "--peak-fp16" => o.peak_fp16 = Some(number("--peak-fp16", value("--peak-fp16")?)?),
            "--image-steps" => {
                let v = value("--image-steps")?;
                o.image_steps = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| number("--image-steps", s.to_string()))
                    .collect::<Result<_>>()?;
            }
            other => return Err(usage(format!("unknown argument {other:?}"))),
        }
    }
    if tiny {
        // The fixtures' UNets sample 16x16 latents (their sample_size); their VAEs upsample
        // by 2.
        o.model = Some(o.fixtures.join("models").join(o.arch.tiny_fixture()));
    }
    if o.runs == 0 {
        return Err(usage("--runs must be at least 1".into()));
    }
    Ok(o)
}

/// What one run of a kernel does: FLOPs (compute-bound) or bytes moved (memory-bound).
#[derive(Clone, Copy)]
enum Work {
    Flops(f64),
    Bytes(f64),
}

/// One warm-up run, then timed runs (each followed by a synchronize) until [`TARGET`] has
/// passed or [`MAX_RUNS`] were made; prints and returns the mean, the best and the rate at
/// the mean.
fn bench(
    gpu: &GpuDevice,
    o: &Options,
    name: &str,
    work: Work,
    mut op: impl FnMut() -> Result<Tensor>,
) -> Result<Value> {
    let t = Instant::now();
    drop(op()?);
    gpu.synchronize()?;
    let warmup = t.elapsed();

    let mut times = Vec::new();
    let start = Instant::now();
    while times.is_empty() || (start.elapsed() < TARGET && times.len() < MAX_RUNS) {
        let t = Instant::now();
        let out = op()?;
        gpu.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
        drop(out);
    }
    let n = times.len();
    let mean = times.iter().sum::<f64>() / n as f64;
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let mut row = json!({"kernel": name, "mean_ms": mean * 1e3, "best_ms": best * 1e3, "runs": n});
    let rate = match work {
        Work::Flops(f) => {
            let gflops = f / mean / 1e9;
            row["gflops"] = json!(gflops);
            let mut text = format!("{gflops:>9.1} GFLOP/s");
            for (label, peak) in [("fp32", o.peak_fp32), ("fp16", o.peak_fp16)] {
                if let Some(peak) = peak {
                    let share = gflops / (peak * 1e3) * 100.0;
                    row[format!("pct_{label}_peak")] = json!(share);
                    text += &format!(" {share:>5.1}% {label}");
                }
            }
            text
        }
        Work::Bytes(b) => {
            let gbs = b / mean / 1e9;
            row["gb_per_s"] = json!(gbs);
            format!("{gbs:>9.1} GB/s   ")
        }
    };
    println!(
        "{name:<50} {rate}  mean {:>8.3} ms  best {:>8.3} ms  n={n:<3}  warm-up {:>8.1} ms",
        mean * 1e3,
        best * 1e3,
        warmup.as_secs_f64() * 1e3,
    );
    Ok(row)
}

/// A random `[out, in]` weight scaled as a layer's (±1/sqrt(in)) and a bias.
fn linear_weights(
    rng: &mut TorchRng,
    out_f: usize,
    in_f: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let scale = 1.0 / (in_f as f32).sqrt();
    let w: Vec<f32> = rng
        .randn(out_f * in_f)
        .into_iter()
        .map(|v| v * scale)
        .collect();
    let b: Vec<f32> = rng.randn(out_f).into_iter().map(|v| v * 0.1).collect();
    Ok((
        Tensor::from_vec(w, &[out_f, in_f], device)?,
        Tensor::from_vec(b, &[out_f], device)?,
    ))
}

/// The shapes each kernel family is timed at: the architecture's, from its configs at
/// `latent` latents a side (batch 2, the guided step's; the VAE decoder's batch 1).
struct KernelShapes {
    /// (label, m, n, k): `x [m, k] @ w [n, k]^T + b`.
    linears: Vec<(String, usize, usize, usize)>,
    /// (label, batch, channels in, channels out, side): 3x3, stride 1, padding 1.
    convs: Vec<(String, usize, usize, usize, usize)>,
    norms: Vec<(String, [usize; 4])>,
    /// (label, query tokens, key tokens, inner width, heads).
    attentions: Vec<(String, usize, usize, usize, usize)>,
    add: [usize; 4],
}

impl KernelShapes {
    fn new(configs: &Configs, latent: usize) -> Result<Self> {
        let unet = &configs.unet;
        let here = Path::new("unet/config.json");
        let levels = unet.block_out_channels.len();
        // diffusers' naming quirk: `attention_head_dim` holds the head count where
        // `num_attention_heads` is unset.
        let heads = unet
            .num_attention_heads
            .as_ref()
            .or(unet.attention_head_dim.as_ref())
            .map(|h| h.expand(levels, "attention_head_dim", here))
            .transpose()?
            .unwrap_or_else(|| vec![8; levels]);
        let context = unet
            .cross_attention_dim
            .expand(levels, "cross_attention_dim", here)?;
        let (b, text) = (2, 77);
        let mut k = KernelShapes {
            linears: Vec::new(),
            convs: Vec::new(),
            norms: Vec::new(),
            attentions: Vec::new(),
            add: [b, unet.block_out_channels[0], latent, latent],
        };
        for (i, &c) in unet.block_out_channels.iter().enumerate() {
            let side = (latent >> i).max(1);
            let tokens = side * side;
            let at = format!("{side}x{side}");
            k.convs.push((
                format!("conv2d 3x3 {c}->{c} [{b},{c},{side},{side}]"),
                b,
                c,
                c,
                side,
            ));
            if !unet.down_block_types[i].contains("CrossAttn") {
                continue;
            }
            let m = b * tokens;
            k.linears.extend([
                (
                    format!("linear [{m},{c}]x[{c},{c}]^T (attn proj, {at})"),
                    m,
                    c,
                    c,
                ),
                (
                    format!("linear [{m},{c}]x[{},{c}]^T (GEGLU, {at})", 8 * c),
                    m,
                    8 * c,
                    c,
                ),
                (
                    format!("linear [{m},{}]x[{c},{}]^T (FF out, {at})", 4 * c, 4 * c),
                    m,
                    c,
                    4 * c,
                ),
                (
                    format!(
                        "linear [{},{}]x[{c},{}]^T (cross-attn k/v)",
                        b * text,
                        context[i],
                        context[i]
                    ),
                    b * text,
                    c,
                    context[i],
                ),
            ]);
            let h = heads[i];
            k.attentions.extend([
                (
                    format!("self-attention [{b},{tokens},{c}] {h} heads"),
                    tokens,
                    tokens,
                    c,
                    h,
                ),
                (
                    format!("cross-attention q [{b},{tokens},{c}] kv [{b},{text},{c}] {h}h"),
                    tokens,
                    text,
                    c,
                    h,
                ),
            ]);
        }
        k.linears.push((
            "linear [4096,4096]x[4096,4096]^T (square)".into(),
            4096,
            4096,
            4096,
        ));
        k.norms.push((
            format!("group_norm(32)+SiLU [{b},{},{latent},{latent}]", k.add[1]),
            k.add,
        ));
        // The VAE decoder: its levels from the deepest, each upsampled by 2.
        let mut side = latent;
        let mut last = [1, 0, 0, 0];
        for &c in configs.vae.block_out_channels.iter().rev() {
            k.convs.push((
                format!("conv2d 3x3 {c}->{c} [1,{c},{side},{side}] (VAE)"),
                1,
                c,
                c,
                side,
            ));
            last = [1, c, side, side];
            side *= 2;
        }
        k.norms.push((
            format!(
                "group_norm(32)+SiLU [1,{},{},{}] (VAE)",
                last[1], last[2], last[3]
            ),
            last,
        ));
        Ok(k)
    }
}

/// Each kernel family at `shapes`.
fn kernels(
    gpu: &GpuDevice,
    o: &Options,
    shapes: &KernelShapes,
    device: &Device,
) -> Result<Vec<Value>> {
    let mut rng = TorchRng::new(0);
    let mut rows = Vec::new();
    println!("\nkernels (one warm-up run, then timed runs each ending in synchronize)");

    // ---- linear: x [m, k] @ w [n, k]^T + b -------------------------------------------
    for (label, m, n, k) in shapes.linears.iter().cloned() {
        let x = rng.randn_tensor(&[m, k], device)?;
        let (w, b) = linear_weights(&mut rng, n, k, device)?;
        let flops = 2.0 * (m * n * k) as f64;
        rows.push(bench(gpu, o, &label, Work::Flops(flops), || {
            x.linear(&w, Some(&b))
        })?);
    }

    // ---- conv2d 3x3, stride 1, padding 1 ------------------------------------------------
    for (label, n, ci, co, hw) in shapes.convs.iter().cloned() {
        let x = rng.randn_tensor(&[n, ci, hw, hw], device)?;
        let scale = 1.0 / ((ci * 9) as f32).sqrt();
        let w: Vec<f32> = rng
            .randn(co * ci * 9)
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let w = Tensor::from_vec(w, &[co, ci, 3, 3], device)?;
        let b = Tensor::from_vec(rng.randn(co), &[co], device)?;
        let flops = 2.0 * (n * co * hw * hw) as f64 * (ci * 9) as f64;
        rows.push(bench(gpu, o, &label, Work::Flops(flops), || {
            x.conv2d(&w, Some(&b), 1, 1)
        })?);
    }

    // ---- group norm + SiLU ------------------------------------------------------------
    for (label, shape) in shapes.norms.iter().cloned() {
        let x = rng.randn_tensor(&shape, device)?;
        let c = shape[1];
        let gamma = Tensor::from_vec(vec![1.0; c], &[c], device)?;
        let beta = Tensor::from_vec(vec![0.0; c], &[c], device)?;
        // One read and one write of the tensor: the least traffic the op can have.
        let bytes = 2.0 * 4.0 * shape.iter().product::<usize>() as f64;
        rows.push(bench(gpu, o, &label, Work::Bytes(bytes), || {
            x.clone().group_norm(32, &gamma, &beta, 1e-5, true)
        })?);
    }

    // ---- attention: 4 * B * H * Lq * Lk * D ---------------------------------------------
    for (label, lq, lk, inner, heads) in shapes.attentions.iter().cloned() {
        let b = 2;
        let q = rng.randn_tensor(&[b, lq, inner], device)?;
        let k = rng.randn_tensor(&[b, lk, inner], device)?;
        let v = rng.randn_tensor(&[b, lk, inner], device)?;
        let flops = 4.0 * (b * heads * lq * lk) as f64 * (inner / heads) as f64;
        rows.push(bench(gpu, o, &label, Work::Flops(flops), || {
            Tensor::attention(&q, &k, &v, heads, false)
        })?);
    }

    // ---- elementwise add ----------------------------------------------------------------
    {
        let shape = shapes.add;
        let a = rng.randn_tensor(&shape, device)?;
        let b = rng.randn_tensor(&shape, device)?;
        // Two reads and one write.
        let bytes = 3.0 * 4.0 * shape.iter().product::<usize>() as f64;
        let [n, c, h, w] = shape;
        let label = format!("add [{n},{c},{h},{w}]");
        rows.push(bench(gpu, o, &label, Work::Bytes(bytes), || a.add(&b))?);
    }
    // ---- the fixed cost of one kernel launch ------------------------------------------
    {
        let x = Tensor::from_vec(vec![1.0; 64], &[64], device)?;
        let mut y = x.add(&x)?;
        gpu.synchronize()?;
        let launches = 4000;
        let start = Instant::now();
        for _ in 0..launches {
            y = y.add(&x)?;
        }
        let recorded = start.elapsed();
        gpu.synchronize()?;
        let record_us = recorded.as_secs_f64() * 1e6 / launches as f64;
        let total_us = start.elapsed().as_secs_f64() * 1e6 / launches as f64;
        println!(
            "{:<50} {record_us:>8.1} us each to record, {total_us:.1} us with execution",
            "launch overhead (tiny adds)",
        );
        rows.push(json!({"kernel": "launch overhead (tiny adds)", "record_us": record_us, "total_us": total_us}));
    }
    Ok(rows)
}

/// Prints the kernel profile gathered since the last call (when profiling), resets it, and
/// returns it as JSON rows.
fn take_profile(gpu: &GpuDevice, what: &str) -> Value {
    let rows = gpu.profile();
    gpu.reset_profile();
    if rows.is_empty() {
        return Value::Null;
    }
    println!(
        "\nGPU time by kernel, {what} (SD_GPU_PROFILE=1):\n{}",
        profile::table(&rows)
    );
    rows.iter()
        .map(|(k, calls, t)| json!({"kernel": k, "calls": calls, "ms": t.as_secs_f64() * 1e3}))
        .collect()
}

/// `runs` timed runs of `f` after one warm-up, each through its completion on the GPU;
/// the median, each run, and the output's range (a NaN or a flat output is a bug).
fn timed(gpu: &GpuDevice, runs: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<Value> {
    gpu.reset_memory_peak();
    let t = Instant::now();
    let out = f()?;
    gpu.synchronize()?;
    let first = t.elapsed().as_secs_f64();
    let values = out.to_vec()?;
    drop(out);
    let finite = values.iter().all(|v| v.is_finite());
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let mut seconds = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = f()?;
        gpu.synchronize()?;
        seconds.push(t.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(json!({
        "peak_device_mib": gpu.memory().peak as f64 / MIB,
        "median_s": median(&seconds),
        "runs_s": seconds,
        "first_s": first,
        "output_finite": finite,
        "output_min": lo,
        "output_max": hi,
    }))
}

fn median(xs: &[f64]) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn print_stage(label: &str, r: &Value) {
    println!(
        "{label:<46} {:>9.1} ms  (first {:.1} ms; output in [{:.3}, {:.3}]{})  peak device memory \
         {:.0} MiB, host {}",
        r["median_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
        r["first_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
        r["output_min"].as_f64().unwrap_or(f64::NAN),
        r["output_max"].as_f64().unwrap_or(f64::NAN),
        if r["output_finite"].as_bool() == Some(true) {
            ""
        } else {
            ", NOT FINITE"
        },
        r["peak_device_mib"].as_f64().unwrap_or(f64::NAN),
        peak_text()
    );
}

/// Latent side of the stages: `--latent`, else the UNet's sample_size.
fn latent_side(o: &Options, unet: &UNet2DConditionModel) -> usize {
    o.latent.or(unet.config().sample_size).unwrap_or(64)
}

/// `configs`' UNet and VAE decoder with random f32 weights (when no folder is given).
fn random_models(configs: &Configs, device: &Device) -> Result<(UNet2DConditionModel, VaeDecoder)> {
    let weights = Weights::random(0, device);
    let here = Path::new("random");
    Ok((
        UNet2DConditionModel::new(&configs.unet, &weights, here)?,
        VaeDecoder::new(&configs.vae, &weights, here)?,
    ))
}

/// The bytes a folder's weights take on `gpu` (the bench's own accounting, from the
/// safetensors headers of the files the loader picks): f16 and bf16 tensors stay 2 bytes
/// where the device keeps f16 weights, else widen to 4; per component on the device (not
/// the text encoders with `--text-encoders-on-cpu`).
fn device_weight_bytes(
    dir: &Path,
    gpu: &GpuDevice,
    text_encoders_on_cpu: bool,
) -> Result<Map<String, Value>> {
    let folder = ModelFolder::open(dir)?;
    let mut out = Map::new();
    for c in [
        Component::TextEncoder,
        Component::TextEncoder2,
        Component::Unet,
        Component::Vae,
    ] {
        let text_encoder = matches!(c, Component::TextEncoder | Component::TextEncoder2);
        if !folder.has(c) || (text_encoder && text_encoders_on_cpu) {
            continue;
        }
        let path = folder.weights(c)?;
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let header = safetensors_header(&mut file).map_err(|e| Error::io(&path, e))?;
        let mut bytes = 0u64;
        for (name, info) in header.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let elements: u64 = info["shape"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| d.as_u64().unwrap_or(0))
                .product();
            let size = match info["dtype"].as_str() {
                Some("F16" | "BF16") if gpu.keeps_f16() => 2,
                _ => 4,
            };
            bytes += elements * size;
        }
        out.insert(c.dir_name().into(), json!(bytes));
    }
    Ok(out)
}

/// A safetensors file's JSON header.
fn safetensors_header(file: &mut std::fs::File) -> std::io::Result<Value> {
    use std::io::Read;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let mut text = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut text)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

/// Stage 4: one guided UNet step and the VAE decode at the model's size and at twice it
/// (up to 1024x1024).
fn stages(
    gpu: &GpuDevice,
    o: &Options,
    unet: &UNet2DConditionModel,
    vae: &VaeDecoder,
    device: &Device,
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    let mut rng = TorchRng::new(0);
    let l = latent_side(o, unet);
    let factor = vae.config().downscale_factor();
    let sample = rng.randn_tensor(&[2, unet.config().in_channels, l, l], device)?;
    // The text encoders' width: every level's cross-attention takes the same context.
    let width =
        unet.config()
            .cross_attention_dim
            .expand(1, "cross_attention_dim", Path::new("unet"))?[0];
    // SDXL's UNet also reads the pooled embedding and the size ids.
    let side = (l * factor) as f32;
    let text_time = match unet.text_time_pooled_dim() {
        Some(pooled) => Some(TextTime {
            text_embeds: rng.randn_tensor(&[2, pooled], device)?,
            time_ids: vec![vec![side, side, 0.0, 0.0, side, side]; 2],
        }),
        None => None,
    };
    let cond = Conditioning {
        context: rng.randn_tensor(&[2, 77, width], device)?,
        text_time,
    };
    println!(
        "\nstages (one warm-up run, then the median of {} runs)",
        o.runs
    );
    let r = timed(gpu, o.runs, || unet.forward(&sample, 981.0, &cond))?;
    print_stage(&format!("UNet step, batch 2, {l}x{l} latents"), &r);
    out.insert("unet".into(), r);

    // Launches per step and the host's time to record them (the GPU runs meanwhile: a
    // command buffer is submitted every few hundred launches).
    gpu.synchronize()?;
    let before = gpu.launches();
    let t = Instant::now();
    let y = unet.forward(&sample, 981.0, &cond)?;
    let recorded = t.elapsed().as_secs_f64();
    gpu.synchronize()?;
    drop(y);
    let launches = gpu.launches() - before;
    let host_us = recorded * 1e6 / launches.max(1) as f64;
    println!(
        "{:<46} {launches} launches, {host_us:.1} us of host time each to record ({:.1} ms a step)",
        "UNet step dispatches",
        recorded * 1e3
    );
    out.insert(
        "unet_dispatch".into(),
        json!({"launches": launches, "host_us_per_launch": host_us, "record_ms": recorded * 1e3}),
    );
    out.insert(
        "unet_profile".into(),
        take_profile(gpu, "UNet steps (warm-up included)"),
    );

    // The model's size, and twice it up to 1024x1024 (SD 1.5: 512 and 1024; SDXL: 1024).
    let mut sides = vec![l];
    if 2 * l * factor <= 1024 {
        sides.push(2 * l);
    }
    for side in sides {
        let z = rng.randn_tensor(&[1, vae.config().latent_channels, side, side], device)?;
        // As the pipeline runs it (see Device::without_buffer_reuse), its peak not counting
        // the UNet's pooled buffers.
        gpu.release_idle_memory();
        let r = timed(gpu, o.runs, || {
            device.without_buffer_reuse(|| vae.decode(&z))
        })?;
        let px = side * factor;
        print_stage(&format!("VAE decode, {px}x{px}"), &r);
        out.insert(format!("vae_{px}"), r);
    }
    out.insert(
        "vae_profile".into(),
        take_profile(gpu, "VAE decodes (warm-ups included)"),
    );
    Ok(out)
}

/// Stage 5: whole images at each step count (one warm-up generation of 2 steps first).
fn whole_images(o: &Options, sd: &StableDiffusion) -> Result<Map<String, Value>> {
    let size = o
        .image_size
        .unwrap_or(latent_side(o, sd.unet()) * sd.vae_scale_factor());
    let guidance = sd.defaults().guidance_scale;
    let params = |steps| GenerateParams {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: None,
        prompt_2: None,
        negative_prompt_2: None,
        steps,
        guidance_scale: guidance,
        width: size,
        height: size,
        seed: 0,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras: Vec::new(),
        prompt_syntax: Default::default(),
    };
    let mut out = Map::new();
    println!("\nwhole {size}x{size} images, guidance {guidance}, the model's own scheduler");
    sd.generate(&params(2), &mut |_| std::ops::ControlFlow::Continue(()))?;
    for &steps in &o.image_steps {
        let mut evaluations = 0;
        let gpu = match sd.device() {
            Device::Gpu(gpu) => gpu,
            Device::Cpu => return Err(Error::Gpu("the model is not on the GPU".into())),
        };
        gpu.reset_memory_peak();
        let t = Instant::now();
        let g = sd.generate(&params(steps), &mut |_| {
            evaluations += 1;
            std::ops::ControlFlow::Continue(())
        })?;
        let total = t.elapsed().as_secs_f64();
        let pixels = &g.image.pixels;
        let mean = pixels.iter().map(|&p| p as f64).sum::<f64>() / pixels.len().max(1) as f64;
        let spread = pixels.iter().max().unwrap_or(&0) - pixels.iter().min().unwrap_or(&0);
        let peak_mib = gpu.memory().peak as f64 / MIB;
        println!(
            "{:<46} {total:>9.2} s   text {:.3} s, {evaluations} UNet evaluations {:.3} s, VAE {:.3} s; \
             pixels mean {mean:.1}, range {spread}; peak device memory {peak_mib:.0} MiB",
            format!("{steps} steps"),
            g.timings.text_encoder.as_secs_f64(),
            g.timings.denoise.as_secs_f64(),
            g.timings.vae_decode.as_secs_f64(),
        );
        out.insert(
            format!("image_{steps}"),
            json!({
                "median_s": total,
                "size": size,
                "guidance": guidance,
                "steps": steps,
                "unet_evaluations": evaluations,
                "text_encoder_s": g.timings.text_encoder.as_secs_f64(),
                "denoise_s": g.timings.denoise.as_secs_f64(),
                "vae_decode_s": g.timings.vae_decode.as_secs_f64(),
                "peak_device_mib": peak_mib,
                "pixel_mean": mean,
                "pixel_range": spread,
            }),
        );
    }
    Ok(out)
}

/// Stage 2: every fixture image case on this GPU.
fn fixture_images(o: &Options, device: &Device) -> Result<Value> {
    let reference = o.fixtures.join("reference");
    let mut cases = Vec::new();
    for file in image_cases::CASE_FILES {
        cases.extend(image_cases::read_cases(&reference, file).map_err(Error::Other)?);
    }
    println!(
        "\nfixture images on the GPU ({} cases, pass: every pixel within {} levels, mean within {})",
        cases.len(),
        image_cases::MAX_PIXEL_DIFF,
        image_cases::MEAN_PIXEL_DIFF
    );
    let mut models: std::collections::HashMap<String, StableDiffusion> = Default::default();
    let (mut passed, mut worst_max, mut worst_mean) = (0, 0u8, 0f64);
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let name = image_cases::describe(index, case);
        let key = image_cases::model_key(case);
        if !models.contains_key(&key) {
            let sd = image_cases::load_model(case, &o.fixtures, device).map_err(Error::Other)?;
            models.insert(key.clone(), sd);
        }
        match image_cases::run_case(&models[&key], case, &reference, &name) {
            Ok(d) => {
                passed += 1;
                worst_max = worst_max.max(d.max);
                worst_mean = worst_mean.max(d.mean);
            }
            Err(message) => {
                println!("FAILED {message}");
                failures.push(message);
            }
        }
    }
    println!(
        "fixture images: {passed} of {} pass (worst passing: max {worst_max}, mean {worst_mean:.4})",
        cases.len()
    );
    Ok(json!({
        "cases": cases.len(),
        "passed": passed,
        "worst_max_diff": worst_max,
        "worst_mean_diff": worst_mean,
        "failures": failures,
    }))
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let wanted = std::env::var("SD_GPU_ADAPTER").ok();
    let device = select_device(BackendChoice::Gpu, wanted.as_deref()).map_err(|e| {
        Error::Gpu(format!(
            "no usable GPU adapter, nothing to benchmark: {e} (install a Vulkan driver, e.g. \
             Mesa's llvmpipe, or set SD_GPU_ADAPTER)"
        ))
    })?;
    let Device::Gpu(gpu) = device.clone() else {
        return Err(Error::Gpu("select_device did not return a GPU".into()));
    };
    if gpu.is_software() && !o.allow_software {
        return Err(Error::Gpu(format!(
            "{} is a software adapter: its numbers say nothing about a GPU (pass \
             --allow-software, with --tiny, to run anyway)",
            gpu.name()
        )));
    }
    if o.memory_only {
        gpu.set_dry_run(true);
    }
    let adapter = gpu.describe();
    println!(
        "adapter\n{}",
        serde_json::to_string_pretty(&adapter).unwrap_or_default()
    );
    let mut report = Map::new();
    report.insert("adapter".into(), adapter);
    let save = |report: &Map<String, Value>| -> Result<()> {
        if let Some(path) = &o.json {
            let text = serde_json::to_string_pretty(report).unwrap_or_default();
            std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    };

    if o.images {
        report.insert("images".into(), fixture_images(&o, &device)?);
        save(&report)?;
    }
    gpu.reset_profile();
    let configs = o.arch.configs()?;
    report.insert("arch".into(), json!(o.arch.name()));
    if o.kernels {
        let latent = o.latent.or(configs.unet.sample_size).unwrap_or(64);
        println!("\n{} shapes at {latent}x{latent} latents", o.arch.name());
        let shapes = KernelShapes::new(&configs, latent)?;
        report.insert(
            "kernels".into(),
            Value::Array(kernels(&gpu, &o, &shapes, &device)?),
        );
        report.insert(
            "kernel_profile".into(),
            take_profile(&gpu, "the kernel runs above (warm-up runs included)"),
        );
        save(&report)?;
    }

    if o.quick {
        println!("\nstages and whole images skipped (--quick)");
    } else {
        let t = Instant::now();
        let sd = match &o.model {
            Some(dir) => {
                let options = ModelOptions {
                    text_encoders_on_cpu: o.text_encoders_on_cpu,
                    ..Default::default()
                };
                Some(StableDiffusion::load_with(dir, &options, &device)?)
            }
            None => None,
        };
        let random = match &sd {
            Some(_) => None,
            None => Some(random_models(&configs, &device)?),
        };
        let (unet, vae) = match (&sd, &random) {
            (Some(sd), _) => (sd.unet(), sd.vae()),
            (None, Some((u, v))) => (u, v),
            (None, None) => unreachable!("one of the two is loaded just above"),
        };
        gpu.synchronize()?;
        let load_s = t.elapsed().as_secs_f64();
        println!(
            "\nmodel: {} loaded in {load_s:.2} s",
            o.model
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| format!("random f32 {} weights", o.arch.name()))
        );
        // What the device holds for the weights, by the bench's own accounting (random
        // weights are f32 and not counted).
        let weights = match &o.model {
            Some(dir) => Some(device_weight_bytes(dir, &gpu, o.text_encoders_on_cpu)?),
            None => None,
        };
        if let Some(w) = &weights {
            let total: u64 = w.values().filter_map(Value::as_u64).sum();
            let parts: Vec<String> = w
                .iter()
                .map(|(c, b)| format!("{c} {:.2}", b.as_f64().unwrap_or(0.0) / GIB))
                .collect();
            println!(
                "weights on the device: {:.2} GiB ({}; f16 kept: {})",
                total as f64 / GIB,
                parts.join(", "),
                gpu.keeps_f16()
            );
        }
        let loaded = gpu.memory();
        println!(
            "device memory after loading: {:.0} MiB in use (the backend's account)",
            loaded.in_use as f64 / MIB
        );
        report.insert(
            "model".into(),
            json!({"source": o.model.as_ref().map(|d| d.display().to_string()), "load_s": load_s,
                   "f16_weights_kept": gpu.keeps_f16(), "device_weight_bytes": weights,
                   "device_memory_after_load": loaded}),
        );
        let mut all = stages(&gpu, &o, unet, vae, &device)?;
        if let Some(sd) = &sd {
            all.extend(whole_images(&o, sd)?);
        }
        report.insert("stages".into(), Value::Object(all));
    }
    report.insert("peak_host_mib".into(), json!(peak_memory_mib()));
    let (hits, misses) = gpu.bind_group_reuse();
    report.insert(
        "bind_groups".into(),
        json!({"reused": hits, "made": misses}),
    );
    println!(
        "\npeak host memory {}; bind groups {hits} reused, {misses} made",
        peak_text()
    );
    save(&report)?;
    if let Some(images) = report.get("images") {
        if images["passed"] != images["cases"] {
            return Err(Error::Other(format!(
                "{} fixture image case(s) differ from diffusers on the GPU",
                images["failures"].as_array().map_or(0, Vec::len)
            )));
        }
    }
    Ok(())
}
