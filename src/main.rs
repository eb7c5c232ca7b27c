//! The `sd-wgpu` command line.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::Device;
use sd_wgpu::{Error, Result};

#[derive(Parser)]
#[command(name = "sd-wgpu", version, about = "Stable Diffusion on wgpu compute kernels or a pure-Rust CPU backend")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// A GPU when one is usable, otherwise the CPU.
    Auto,
    Cpu,
    Gpu,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one image from a text prompt and write it as PNG.
    Generate {
        /// A diffusers model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
        #[arg(long, env = "SD_MODEL")]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        negative_prompt: Option<String>,
        /// Denoising steps.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Classifier-free guidance scale (guidance is off at 1 or below).
        #[arg(long, default_value_t = 7.5)]
        guidance: f64,
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 512)]
        height: usize,
        /// Seed for torch-compatible noise; -1 picks a random one and prints it.
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        seed: i64,
        /// Scheduler class name or alias (pndm, ddim, euler, euler_a, dpm++2m, dpm++2m_karras, lms, lcm);
        /// default: the model folder's own.
        #[arg(long)]
        scheduler: Option<String>,
        #[arg(long, value_enum, default_value_t = Backend::Auto, env = "SD_BACKEND")]
        backend: Backend,
        #[arg(long, short)]
        output: PathBuf,
    },
}

fn device_for(backend: Backend) -> Result<Device> {
    match backend {
        Backend::Cpu | Backend::Auto => Ok(Device::Cpu),
        Backend::Gpu => Err(Error::InvalidArgument(
            "the GPU backend is not available in this build yet; use --backend cpu".into(),
        )),
    }
}

/// A seed from the OS's randomness, in torch's 32-bit seed range so it is easy to retype.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() & 0xffff_ffff
}

fn resolve_seed(seed: i64) -> Result<u64> {
    match seed {
        -1 => {
            let s = random_seed();
            println!("seed: {s}");
            Ok(s)
        }
        s if s >= 0 => Ok(s as u64),
        s => Err(Error::InvalidArgument(format!("seed must be -1 (random) or >= 0, got {s}"))),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            model,
            prompt,
            negative_prompt,
            steps,
            guidance,
            width,
            height,
            seed,
            scheduler,
            backend,
            output,
        } => {
            let seed = resolve_seed(seed)?;
            let device = device_for(backend)?;
            let t0 = std::time::Instant::now();
            tracing::info!("loading {} on {device}", model.display());
            let sd = StableDiffusion::load(&model, &device)?;
            let load_time = t0.elapsed();
            let params = GenerateParams {
                prompt,
                negative_prompt,
                steps,
                guidance_scale: guidance,
                width,
                height,
                seed,
                scheduler,
                scheduler_overrides: Default::default(),
            };
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})")
                    .expect("the template is a valid constant")
                    .progress_chars("=> "),
            );
            bar.set_message("denoising");
            let result = sd.generate(&params, &mut |ev| {
                bar.set_length(ev.total as u64);
                bar.set_position(ev.step as u64);
                ControlFlow::Continue(())
            });
            bar.finish_and_clear();
            let generated = result?;
            let png = generated.image.to_png()?;
            std::fs::write(&output, png).map_err(|e| Error::io(&output, e))?;
            let t = generated.timings;
            println!(
                "wrote {} ({}x{}, seed {}) in {:.2}s: load {:.2}s, text encoder {:.2}s, denoising {:.2}s ({:.2}s/step), VAE decode {:.2}s",
                output.display(),
                width,
                height,
                generated.seed,
                (load_time + t.total).as_secs_f64(),
                load_time.as_secs_f64(),
                t.text_encoder.as_secs_f64(),
                t.denoise.as_secs_f64(),
                t.denoise.as_secs_f64() / steps as f64,
                t.vae_decode.as_secs_f64(),
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
