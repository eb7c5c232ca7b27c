//! The wgpu backend at SD 1.5 shapes: GFLOP/s (or GB/s) of each kernel family, then one
//! guided UNet step (batch 2) at 512x512 and one VAE decode at 512x512 with random weights.
//!
//! `cargo bench --bench sd15_gpu` (`SD_GPU_ADAPTER=name` picks an adapter by part of its
//! name). Ops only record work into the device's command encoder; every timed run ends with
//! `GpuDevice::synchronize()` (submit and wait), so the times cover the GPU's work.
//!
//! The full-model timings are skipped on a software adapter (llvmpipe runs a few GFLOP/s and
//! a UNet step is about 1.6 TFLOP) unless `-- --full` is given; `-- --quick` always skips them.
//!
//! With `SD_GPU_PROFILE=1` (and an adapter with timestamp queries) each section ends with
//! the GPU time of each kernel entry point: the kernel runs, the UNet runs, the VAE runs.

use std::time::{Duration, Instant};

use sd_wgpu::backend::gpu::{profile, GpuDevice};
use sd_wgpu::backend::{select_device, BackendChoice};
use sd_wgpu::model::config::{UNetConfig, VaeConfig};
use sd_wgpu::model::unet::UNet2DConditionModel;
use sd_wgpu::model::vae::VaeDecoder;
use sd_wgpu::model::weights::Weights;
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::tensor::{Device, Tensor};

/// How long the timed runs of one kernel may take in all (after the first, at least one
/// run is always timed).
const TARGET: Duration = Duration::from_millis(1500);
/// The most timed runs of one kernel.
const MAX_RUNS: usize = 200;

mod common;
use common::peak_text;

/// What one run of a kernel does: FLOPs (compute-bound) or bytes moved (memory-bound).
#[derive(Clone, Copy)]
enum Work {
    Flops(f64),
    Bytes(f64),
}

/// One warm-up run, then timed runs (each followed by a synchronize) until [`TARGET`] has
/// passed or [`MAX_RUNS`] were made; prints the mean, the best and the rate at the mean.
fn bench(
    gpu: &GpuDevice,
    name: &str,
    work: Work,
    mut op: impl FnMut() -> sd_wgpu::Result<Tensor>,
) -> sd_wgpu::Result<()> {
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
    let rate = match work {
        Work::Flops(f) => format!("{:>9.1} GFLOP/s", f / mean / 1e9),
        Work::Bytes(b) => format!("{:>9.1} GB/s   ", b / mean / 1e9),
    };
    println!(
        "{name:<46} {rate}  mean {:>9.2} ms  best {:>9.2} ms  n={n:<3}  warm-up {:>8.2} ms",
        mean * 1e3,
        best * 1e3,
        warmup.as_secs_f64() * 1e3,
    );
    Ok(())
}

/// A tensor of standard-normal values on `device`.
fn randn(rng: &mut TorchRng, shape: &[usize], device: &Device) -> sd_wgpu::Result<Tensor> {
    rng.randn_tensor(shape, device)
}

/// A random `[out, in]` weight scaled as a layer's (±1/sqrt(in)) and a bias.
fn linear_weights(
    rng: &mut TorchRng,
    out_f: usize,
    in_f: usize,
    device: &Device,
) -> sd_wgpu::Result<(Tensor, Tensor)> {
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

fn kernels(gpu: &GpuDevice, device: &Device) -> sd_wgpu::Result<()> {
    let mut rng = TorchRng::new(0);
    println!("\nkernels (one warm-up run, then timed runs each ending in synchronize)");

    // ---- linear: x [m, k] @ w [n, k]^T + b -------------------------------------------
    for (label, m, n, k) in [
        (
            "linear [8192,320] x [320,320]^T (attn proj)",
            2 * 4096,
            320,
            320,
        ),
        ("linear [154,768] x [3072,768]^T", 2 * 77, 3072, 768),
        (
            "linear [8192,320] x [2560,320]^T (GEGLU)",
            2 * 4096,
            2560,
            320,
        ),
    ] {
        let x = randn(&mut rng, &[m, k], device)?;
        let (w, b) = linear_weights(&mut rng, n, k, device)?;
        let flops = 2.0 * (m * n * k) as f64;
        bench(gpu, label, Work::Flops(flops), || x.linear(&w, Some(&b)))?;
    }

    // ---- conv2d 3x3, stride 1, padding 1 ------------------------------------------------
    for (label, n, c, hw) in [
        ("conv2d 3x3 320->320 [2,320,64,64]", 2, 320, 64),
        ("conv2d 3x3 512->512 [1,512,128,128] (VAE)", 1, 512, 128),
    ] {
        let x = randn(&mut rng, &[n, c, hw, hw], device)?;
        let scale = 1.0 / ((c * 9) as f32).sqrt();
        let w: Vec<f32> = rng
            .randn(c * c * 9)
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let w = Tensor::from_vec(w, &[c, c, 3, 3], device)?;
        let b = Tensor::from_vec(rng.randn(c), &[c], device)?;
        let flops = 2.0 * (n * c * hw * hw) as f64 * (c * 9) as f64;
        bench(gpu, label, Work::Flops(flops), || {
            x.conv2d(&w, Some(&b), 1, 1)
        })?;
    }

    // ---- group norm + SiLU ------------------------------------------------------------
    {
        let shape = [2, 320, 64, 64];
        let x = randn(&mut rng, &shape, device)?;
        let gamma = Tensor::from_vec(vec![1.0; 320], &[320], device)?;
        let beta = Tensor::from_vec(vec![0.0; 320], &[320], device)?;
        // One read and one write of the tensor: the least traffic the op can have.
        let bytes = 2.0 * 4.0 * shape.iter().product::<usize>() as f64;
        bench(
            gpu,
            "group_norm(32)+SiLU [2,320,64,64]",
            Work::Bytes(bytes),
            || x.group_norm(32, &gamma, &beta, 1e-5, true),
        )?;
    }

    // ---- attention: 4 * B * H * Lq * Lk * D ---------------------------------------------
    for (label, lq, lk) in [
        ("self-attention [2,4096,320] 8 heads", 4096, 4096),
        ("cross-attention q [2,4096,320] kv [2,77,320] 8h", 4096, 77),
    ] {
        let (b, heads, inner) = (2, 8, 320);
        let q = randn(&mut rng, &[b, lq, inner], device)?;
        let k = randn(&mut rng, &[b, lk, inner], device)?;
        let v = randn(&mut rng, &[b, lk, inner], device)?;
        let flops = 4.0 * (b * heads * lq * lk) as f64 * (inner / heads) as f64;
        bench(gpu, label, Work::Flops(flops), || {
            Tensor::attention(&q, &k, &v, heads, false)
        })?;
    }

    // ---- elementwise add ----------------------------------------------------------------
    {
        let shape = [2, 320, 64, 64];
        let a = randn(&mut rng, &shape, device)?;
        let b = randn(&mut rng, &shape, device)?;
        // Two reads and one write.
        let bytes = 3.0 * 4.0 * shape.iter().product::<usize>() as f64;
        bench(gpu, "add [2,320,64,64]", Work::Bytes(bytes), || a.add(&b))?;
    }
    // ---- the fixed cost of one kernel launch ------------------------------------------
    {
        // Tiny adds, so the time is the host's recording plus the driver's per-pass cost:
        // a guided SD 1.5 step records about 1400 passes.
        let x = Tensor::from_vec(vec![1.0; 64], &[64], device)?;
        let mut y = x.add(&x)?;
        gpu.synchronize()?;
        let launches = 4000;
        let start = std::time::Instant::now();
        for _ in 0..launches {
            y = y.add(&x)?;
        }
        let recorded = start.elapsed();
        gpu.synchronize()?;
        println!(
            "{:<52} {:>8.1} us each to record, {:.1} us with execution",
            "launch overhead (tiny adds)",
            recorded.as_secs_f64() * 1e6 / launches as f64,
            start.elapsed().as_secs_f64() * 1e6 / launches as f64
        );
        let (hits, misses) = gpu.bind_group_reuse();
        println!("bind groups so far: {hits} reused, {misses} made");
    }
    println!("peak host memory so far {}", peak_text());
    Ok(())
}

/// Prints the kernel profile gathered since the last call (when profiling), and resets it.
fn print_profile(gpu: &GpuDevice, what: &str) {
    let rows = gpu.profile();
    gpu.reset_profile();
    if !rows.is_empty() {
        println!(
            "\nGPU time by kernel, {what} (SD_GPU_PROFILE=1):\n{}",
            profile::table(&rows)
        );
    }
}

/// Times `f` (which records work) through its completion on the GPU.
fn timed(gpu: &GpuDevice, f: impl FnOnce() -> sd_wgpu::Result<Tensor>) -> sd_wgpu::Result<f64> {
    let t = Instant::now();
    let out = f()?;
    gpu.synchronize()?;
    let s = t.elapsed().as_secs_f64();
    drop(out);
    Ok(s)
}

fn report(stage: &str, seconds: f64) {
    println!(
        "{stage:<46} {seconds:>8.2} s   peak host memory so far {}",
        peak_text()
    );
}

/// One UNet step and one VAE decode; on a hardware adapter each is run twice, the first
/// including pipeline creation.
fn full_models(gpu: &GpuDevice, device: &Device) -> sd_wgpu::Result<()> {
    let twice = !gpu.is_software();
    let weights = Weights::random(0, device);
    let here = std::path::Path::new("sd15-random");
    let mut rng = TorchRng::new(0);
    gpu.reset_profile();

    println!("\nfull models (random weights uploaded to the GPU)");
    let t = Instant::now();
    let unet = UNet2DConditionModel::new(&UNetConfig::default(), &weights, here)?;
    gpu.synchronize()?;
    report(
        "UNet weights, creation and upload",
        t.elapsed().as_secs_f64(),
    );
    let sample = rng.randn_tensor(&[2, 4, 64, 64], device)?;
    let context = rng.randn_tensor(&[2, 77, 768], device)?;
    let mut s = timed(gpu, || unet.forward(&sample, 999.0, &context))?;
    report("UNet step, batch 2, 512x512 (first)", s);
    if twice {
        s = timed(gpu, || unet.forward(&sample, 999.0, &context))?;
        report("UNet step, batch 2, 512x512", s);
    }
    println!(
        "{:<46} {:>8.1} GFLOP/s (at about 1.61 TFLOP a step)",
        "",
        1.61e12 / s / 1e9
    );
    print_profile(
        gpu,
        "UNet weight upload and step(s), batch 2, 512x512 (random weights)",
    );
    drop(unet);

    let vae_config = VaeConfig {
        block_out_channels: vec![128, 256, 512, 512],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        layers_per_block: 2,
        ..VaeConfig::default()
    };
    let t = Instant::now();
    let vae = VaeDecoder::new(&vae_config, &weights, here)?;
    gpu.synchronize()?;
    report(
        "VAE weights, creation and upload",
        t.elapsed().as_secs_f64(),
    );
    let latents = rng.randn_tensor(&[1, 4, 64, 64], device)?;
    let s = timed(gpu, || vae.decode(&latents))?;
    report("VAE decode, 512x512 (first)", s);
    if twice {
        let s = timed(gpu, || vae.decode(&latents))?;
        report("VAE decode, 512x512", s);
    }
    print_profile(
        gpu,
        "VAE weight upload and decode(s), 512x512 (random weights)",
    );
    Ok(())
}

fn main() -> sd_wgpu::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let full = args.iter().any(|a| a == "--full");
    let wanted = std::env::var("SD_GPU_ADAPTER").ok();

    let device = match select_device(BackendChoice::Gpu, wanted.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            println!("no usable GPU adapter, nothing to benchmark: {e}");
            println!("(install a Vulkan driver, e.g. Mesa's llvmpipe, or set SD_GPU_ADAPTER)");
            return Ok(());
        }
    };
    let Device::Gpu(gpu) = device.clone() else {
        println!("select_device did not return a GPU: nothing to benchmark");
        return Ok(());
    };
    println!(
        "SD 1.5 shapes on {device}{}",
        if gpu.is_software() {
            ", a software adapter"
        } else {
            ""
        }
    );

    gpu.reset_profile();
    kernels(&gpu, &device)?;
    print_profile(&gpu, "the kernel runs above (warm-up runs included)");

    if quick {
        println!("\nfull-model timings skipped (--quick)");
    } else if gpu.is_software() && !full {
        println!(
            "\nfull-model timings skipped: {} is a software adapter (a few GFLOP/s; a UNet \
             step is about 1.6 TFLOP, so tens of minutes). Pass `-- --full` to run them anyway.",
            gpu.name()
        );
    } else {
        full_models(&gpu, &device)?;
    }
    println!("peak host memory {}", peak_text());
    Ok(())
}
