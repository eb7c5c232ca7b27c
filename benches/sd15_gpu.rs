//! The wgpu backend on one adapter, everything tools/gpu_bench.sh reports for sd-wgpu:
//!
//! 1. the adapter: name, backend, driver, features (SHADER_F16, SUBGROUP, cooperative
//!    matrices, timestamps), subgroup sizes, cooperative-matrix shapes, limits;
//! 2. with `--images`: the fixture image cases (tests/fixtures/reference/images.json) on this
//!    GPU against diffusers' images, with the tests' pass rule;
//! 3. each kernel family at SD 1.5 shapes: GFLOP/s (or GB/s), and the share of the card's
//!    peak when `--peak-fp32`/`--peak-fp16` (TFLOP/s) are given;
//! 4. one guided UNet step (batch 2), the VAE decode at two sizes, with the kernel launches
//!    per UNet step and the host's recording time per launch;
//! 5. whole images through `StableDiffusion::generate` at `--image-steps` (needs `--model`).
//!
//! `cargo bench --bench sd15_gpu -- [options]`, or the executable `cargo bench --no-run`
//! builds, on a machine with no Rust (tools/gpu_bench.sh). Options:
//! * `--model DIR`: a diffusers folder (e.g. the random SD 1.5 fp16 folder
//!   tools/gpu_bench_torch.py builds) for stages 4 and 5; without it stage 4 uses random
//!   f32 weights in SD 1.5's shapes and stage 5 is skipped. `--tiny`: the tests' sd1 fixture.
//! * `--latent N` (64: 512x512 for SD 1.5): latent side of the UNet step and the first VAE
//!   decode; the second decodes 2N.
//! * `--image-steps 20,50`, `--image-size PX` (8 x latent), `--runs N` (3) timed runs per
//!   stage after one warm-up (the median is reported).
//! * `--images`, `--fixtures DIR` (tests/fixtures): stage 2.
//! * `--no-kernels`, `--quick` (stages 1-3 only), `--json FILE` (everything).
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
use sd_wgpu::model::config::{UNetConfig, VaeConfig};
use sd_wgpu::model::unet::{Conditioning, UNet2DConditionModel};
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

mod common;
use common::{peak_memory_mib, peak_text};

#[path = "../tests/common/image_cases.rs"]
mod image_cases;

struct Options {
    model: Option<PathBuf>,
    latent: usize,
    image_steps: Vec<usize>,
    image_size: Option<usize>,
    runs: usize,
    images: bool,
    fixtures: PathBuf,
    kernels: bool,
    quick: bool,
    allow_software: bool,
    json: Option<PathBuf>,
    peak_fp32: Option<f64>,
    peak_fp16: Option<f64>,
}

fn usage(message: String) -> Error {
    Error::Other(format!(
        "{message}\nusage: sd15_gpu [--model DIR | --tiny] [--latent N] [--image-steps 20,50] \
         [--image-size PX] [--runs N] [--images [--fixtures DIR]] [--no-kernels] [--quick] \
         [--allow-software] [--json FILE] [--peak-fp32 TFLOPS] [--peak-fp16 TFLOPS]"
    ))
}

/// tests/fixtures under the working directory (a copied checkout), else under the source
/// tree the bench was built from.
fn default_fixtures() -> PathBuf {
    let here = Path::new("tests/fixtures");
    if here.is_dir() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        model: None,
        latent: 64,
        image_steps: vec![20, 50],
        image_size: None,
        runs: 3,
        images: false,
        fixtures: default_fixtures(),
        kernels: true,
        quick: false,
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
            "--allow-software" => o.allow_software = true,
            "--images" => o.images = true,
            "--no-kernels" => o.kernels = false,
            "--tiny" => tiny = true,
            "--model" => o.model = Some(value("--model")?.into()),
            "--fixtures" => o.fixtures = value("--fixtures")?.into(),
            "--json" => o.json = Some(value("--json")?.into()),
            "--latent" => o.latent = number("--latent", value("--latent")?)?,
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
        // The fixture's UNet samples 16x16 latents; its VAE upsamples by 2.
        o.model = Some(o.fixtures.join("models/sd1"));
        o.latent = 16;
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

/// Each kernel family at SD 1.5's shapes (512x512, batch 2).
fn kernels(gpu: &GpuDevice, o: &Options, device: &Device) -> Result<Vec<Value>> {
    let mut rng = TorchRng::new(0);
    let mut rows = Vec::new();
    println!("\nkernels (one warm-up run, then timed runs each ending in synchronize)");

    // ---- linear: x [m, k] @ w [n, k]^T + b -------------------------------------------
    for (label, m, n, k) in [
        ("linear [8192,320]x[320,320]^T (attn proj)", 8192, 320, 320),
        ("linear [8192,320]x[2560,320]^T (GEGLU)", 8192, 2560, 320),
        ("linear [8192,1280]x[320,1280]^T (FF out)", 8192, 320, 1280),
        (
            "linear [2048,640]x[5120,640]^T (GEGLU, 32x32)",
            2048,
            5120,
            640,
        ),
        (
            "linear [154,768]x[320,768]^T (cross-attn k/v)",
            154,
            320,
            768,
        ),
        (
            "linear [4096,4096]x[4096,4096]^T (square)",
            4096,
            4096,
            4096,
        ),
    ] {
        let x = rng.randn_tensor(&[m, k], device)?;
        let (w, b) = linear_weights(&mut rng, n, k, device)?;
        let flops = 2.0 * (m * n * k) as f64;
        rows.push(bench(gpu, o, label, Work::Flops(flops), || {
            x.linear(&w, Some(&b))
        })?);
    }

    // ---- conv2d 3x3, stride 1, padding 1 ------------------------------------------------
    for (label, n, ci, co, hw) in [
        ("conv2d 3x3 320->320 [2,320,64,64]", 2, 320, 320, 64),
        ("conv2d 3x3 640->640 [2,640,32,32]", 2, 640, 640, 32),
        ("conv2d 3x3 1280->1280 [2,1280,16,16]", 2, 1280, 1280, 16),
        ("conv2d 3x3 1280->1280 [2,1280,8,8]", 2, 1280, 1280, 8),
        (
            "conv2d 3x3 512->512 [1,512,128,128] (VAE)",
            1,
            512,
            512,
            128,
        ),
        (
            "conv2d 3x3 256->256 [1,256,256,256] (VAE)",
            1,
            256,
            256,
            256,
        ),
        (
            "conv2d 3x3 128->128 [1,128,512,512] (VAE)",
            1,
            128,
            128,
            512,
        ),
    ] {
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
        rows.push(bench(gpu, o, label, Work::Flops(flops), || {
            x.conv2d(&w, Some(&b), 1, 1)
        })?);
    }

    // ---- group norm + SiLU ------------------------------------------------------------
    for (label, shape) in [
        ("group_norm(32)+SiLU [2,320,64,64]", [2, 320, 64, 64]),
        (
            "group_norm(32)+SiLU [1,128,512,512] (VAE)",
            [1, 128, 512, 512],
        ),
    ] {
        let x = rng.randn_tensor(&shape, device)?;
        let c = shape[1];
        let gamma = Tensor::from_vec(vec![1.0; c], &[c], device)?;
        let beta = Tensor::from_vec(vec![0.0; c], &[c], device)?;
        // One read and one write of the tensor: the least traffic the op can have.
        let bytes = 2.0 * 4.0 * shape.iter().product::<usize>() as f64;
        rows.push(bench(gpu, o, label, Work::Bytes(bytes), || {
            x.group_norm(32, &gamma, &beta, 1e-5, true)
        })?);
    }

    // ---- attention: 4 * B * H * Lq * Lk * D ---------------------------------------------
    for (label, lq, lk, inner, heads) in [
        ("self-attention [2,4096,320] 8 heads", 4096, 4096, 320, 8),
        ("self-attention [2,1024,640] 8 heads", 1024, 1024, 640, 8),
        (
            "cross-attention q [2,4096,320] kv [2,77,320] 8h",
            4096,
            77,
            320,
            8,
        ),
    ] {
        let b = 2;
        let q = rng.randn_tensor(&[b, lq, inner], device)?;
        let k = rng.randn_tensor(&[b, lk, inner], device)?;
        let v = rng.randn_tensor(&[b, lk, inner], device)?;
        let flops = 4.0 * (b * heads * lq * lk) as f64 * (inner / heads) as f64;
        rows.push(bench(gpu, o, label, Work::Flops(flops), || {
            Tensor::attention(&q, &k, &v, heads, false)
        })?);
    }

    // ---- elementwise add ----------------------------------------------------------------
    {
        let shape = [2, 320, 64, 64];
        let a = rng.randn_tensor(&shape, device)?;
        let b = rng.randn_tensor(&shape, device)?;
        // Two reads and one write.
        let bytes = 3.0 * 4.0 * shape.iter().product::<usize>() as f64;
        rows.push(bench(
            gpu,
            o,
            "add [2,320,64,64]",
            Work::Bytes(bytes),
            || a.add(&b),
        )?);
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
        "{label:<46} {:>9.1} ms  (first {:.1} ms; output in [{:.3}, {:.3}]{})  peak host memory {}",
        r["median_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
        r["first_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
        r["output_min"].as_f64().unwrap_or(f64::NAN),
        r["output_max"].as_f64().unwrap_or(f64::NAN),
        if r["output_finite"].as_bool() == Some(true) {
            ""
        } else {
            ", NOT FINITE"
        },
        peak_text()
    );
}

/// SD 1.5's UNet and VAE decoder with random f32 weights (when no folder is given).
fn random_models(device: &Device) -> Result<(UNet2DConditionModel, VaeDecoder)> {
    let weights = Weights::random(0, device);
    let here = Path::new("sd15-random");
    let vae_config = VaeConfig {
        block_out_channels: vec![128, 256, 512, 512],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        layers_per_block: 2,
        ..VaeConfig::default()
    };
    Ok((
        UNet2DConditionModel::new(&UNetConfig::default(), &weights, here)?,
        VaeDecoder::new(&vae_config, &weights, here)?,
    ))
}

/// Stage 4: one guided UNet step and the VAE decode at two sizes.
fn stages(
    gpu: &GpuDevice,
    o: &Options,
    unet: &UNet2DConditionModel,
    vae: &VaeDecoder,
    device: &Device,
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    let mut rng = TorchRng::new(0);
    let l = o.latent;
    let sample = rng.randn_tensor(&[2, unet.config().in_channels, l, l], device)?;
    // The text encoder's width: every level's cross-attention takes the same context.
    let width =
        unet.config()
            .cross_attention_dim
            .expand(1, "cross_attention_dim", Path::new("unet"))?[0];
    let cond = Conditioning {
        context: rng.randn_tensor(&[2, 77, width], device)?,
        text_time: None,
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

    let factor = vae.config().downscale_factor();
    for side in [l, 2 * l] {
        let z = rng.randn_tensor(&[1, vae.config().latent_channels, side, side], device)?;
        let r = timed(gpu, o.runs, || vae.decode(&z))?;
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
    let size = o.image_size.unwrap_or(o.latent * sd.vae_scale_factor());
    let params = |steps| GenerateParams {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: None,
        steps,
        guidance_scale: 7.5,
        width: size,
        height: size,
        seed: 0,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
    };
    let mut out = Map::new();
    println!("\nwhole {size}x{size} images, guidance 7.5, the model's own scheduler");
    sd.generate(&params(2), &mut |_| std::ops::ControlFlow::Continue(()))?;
    for &steps in &o.image_steps {
        let mut evaluations = 0;
        let t = Instant::now();
        let g = sd.generate(&params(steps), &mut |_| {
            evaluations += 1;
            std::ops::ControlFlow::Continue(())
        })?;
        let total = t.elapsed().as_secs_f64();
        let pixels = &g.image.pixels;
        let mean = pixels.iter().map(|&p| p as f64).sum::<f64>() / pixels.len().max(1) as f64;
        let spread = pixels.iter().max().unwrap_or(&0) - pixels.iter().min().unwrap_or(&0);
        println!(
            "{:<46} {total:>9.2} s   text {:.3} s, {evaluations} UNet evaluations {:.3} s, VAE {:.3} s; \
             pixels mean {mean:.1}, range {spread}",
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
                "steps": steps,
                "unet_evaluations": evaluations,
                "text_encoder_s": g.timings.text_encoder.as_secs_f64(),
                "denoise_s": g.timings.denoise.as_secs_f64(),
                "vae_decode_s": g.timings.vae_decode.as_secs_f64(),
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
        let fixture = case["fixture"].as_str().unwrap_or("?").to_string();
        if !models.contains_key(&fixture) {
            let sd = StableDiffusion::load(&o.fixtures.join("models").join(&fixture), device)?;
            models.insert(fixture.clone(), sd);
        }
        match image_cases::run_case(&models[&fixture], case, &reference, &name) {
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
    if o.kernels {
        report.insert("kernels".into(), Value::Array(kernels(&gpu, &o, &device)?));
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
            Some(dir) => Some(StableDiffusion::load(dir, &device)?),
            None => None,
        };
        let random = match &sd {
            Some(_) => None,
            None => Some(random_models(&device)?),
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
                .unwrap_or_else(|| "random f32 SD 1.5 weights".into())
        );
        report.insert(
            "model".into(),
            json!({"source": o.model.as_ref().map(|d| d.display().to_string()), "load_s": load_s,
                   "f16_weights_kept": gpu.keeps_f16()}),
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
