//! Full-size SD 1.5 on the CPU backend with random weights (no model download): times the
//! text encoder, one guided UNet step (batch 2) at 512x512 and one VAE decode at 512x512,
//! and prints seconds and the process's peak memory.
//!
//! `cargo bench --bench sd15_cpu` (add `-- --quick` to skip the VAE decode).

use std::time::Instant;

use sd_wgpu::model::clip::ClipTextModel;
use sd_wgpu::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use sd_wgpu::model::unet::UNet2DConditionModel;
use sd_wgpu::model::vae::VaeDecoder;
use sd_wgpu::model::weights::Weights;
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::tensor::Device;

/// The process's peak resident memory (VmHWM), in MiB, where /proc has it.
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn report(stage: &str, seconds: f64) {
    let peak = peak_memory_mib()
        .map(|m| format!("{m:.0} MiB"))
        .unwrap_or_else(|| "n/a".into());
    println!("{stage:<28} {seconds:>8.2} s   peak memory so far {peak}");
}

fn main() -> sd_wgpu::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let device = Device::Cpu;
    let weights = Weights::random(0, &device);
    let here = std::path::Path::new("sd15-random");
    println!(
        "SD 1.5 architecture, random f32 weights, CPU backend, {} threads",
        rayon::current_num_threads()
    );

    let clip_config = ClipTextConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        ..ClipTextConfig::default()
    };
    let clip = ClipTextModel::new(&clip_config, &weights, here)?;
    let ids: Vec<u32> = (0..77)
        .map(|i| if i == 0 { 49406 } else { 320 + i })
        .collect();
    let t = Instant::now();
    clip.forward(&ids)?;
    report("text encoder (77 tokens)", t.elapsed().as_secs_f64());

    let unet = UNet2DConditionModel::new(&UNetConfig::default(), &weights, here)?;
    let mut rng = TorchRng::new(0);
    let sample = rng.randn_tensor(&[2, 4, 64, 64], &device)?;
    let context = rng.randn_tensor(&[2, 77, 768], &device)?;
    let t = Instant::now();
    unet.forward(&sample, 999.0, &context)?;
    report("UNet step, batch 2, 512x512", t.elapsed().as_secs_f64());

    if !quick {
        let vae_config = VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            ..VaeConfig::default()
        };
        let vae = VaeDecoder::new(&vae_config, &weights, here)?;
        let latents = rng.randn_tensor(&[1, 4, 64, 64], &device)?;
        let t = Instant::now();
        vae.decode(&latents)?;
        report("VAE decode, 512x512", t.elapsed().as_secs_f64());
    }
    Ok(())
}
