//! The `sd-wgpu` command line: `serve` (the HTTP API) and `generate` (one image to a file).

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use sd_wgpu::backend::cpu::precision::{set_precision, Precision};
use sd_wgpu::backend::cpu::tuning::{set_mode as set_tuning_mode, TuningMode};
use sd_wgpu::backend::{select_device, BackendChoice};
use sd_wgpu::engine::{Engine, EngineConfig};
use sd_wgpu::model::hub::DEFAULT_MODEL;
use sd_wgpu::model::lora::{LoraChoice, LoraFile};
use sd_wgpu::model::prompt_syntax::PromptSyntax;
use sd_wgpu::model::source::ModelOptions;
use sd_wgpu::pipeline::noise::random_seed;
use sd_wgpu::pipeline::{GenerateParams, InitImage, MaskImage, RgbImage, StableDiffusion};
use sd_wgpu::server::{ConnectionLimits, JobRetention, Limits, ServerConfig};
use sd_wgpu::tensor::Device;
use sd_wgpu::{Error, Result};

#[derive(Parser)]
#[command(
    name = "sd-wgpu",
    version,
    about = "Stable Diffusion on wgpu compute kernels or a pure-Rust CPU backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options both commands share.
#[derive(Args)]
struct ModelArgs {
    /// A diffusers model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
    /// a name under weights/, or a Hugging Face Hub id (org/name[@revision]), read from the local
    /// Hugging Face cache or downloaded into it on first use (see weights/README.md); or a
    /// single-file checkpoint in the original Stable Diffusion layout (SD 1.x / 2.x / SDXL
    /// .safetensors, as for AUTOMATIC1111 or ComfyUI).
    #[arg(long, env = "SD_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// For a single-file --model: the configs to use instead of the built-in preset the
    /// checkpoint is recognised as. A preset name (sd1.5, sd2.1-base, sd2.1, sdxl-base-1.0,
    /// sdxl-turbo) or a folder in diffusers layout (unet/, vae/, text_encoder/ config.json,
    /// scheduler/, and tokenizer/ if any; weights not needed), like diffusers'
    /// from_single_file(..., config=DIR).
    #[arg(long, env = "SD_MODEL_CONFIG")]
    model_config: Option<PathBuf>,
    /// A VAE in place of the model's (e.g. madebyollin/sdxl-vae-fp16-fix): a diffusers VAE
    /// folder (config.json + diffusion_pytorch_model.safetensors), a name under weights/ or a
    /// Hub id found and fetched as --model is, or one .safetensors file in diffusers' names or
    /// the original layout (AUTOMATIC1111's VAE files), read under the model's VAE config.
    #[arg(long, env = "SD_VAE")]
    vae: Option<PathBuf>,
    /// Keep the text encoders on the CPU when the model runs on a GPU (they run once per
    /// prompt): SDXL's take 1.5 GiB of GPU memory otherwise, which a card with 8 GB needs
    /// for the UNet and the VAE at 1024x1024 (see the README's GPU memory section).
    #[arg(long, env = "SD_TEXT_ENCODERS_ON_CPU")]
    text_encoders_on_cpu: bool,
    /// auto: a hardware GPU when there is one, else the CPU.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto, env = "SD_BACKEND")]
    backend: BackendChoice,
    /// Use the GPU adapter whose name contains this text (see the log for the names).
    #[arg(long, env = "SD_GPU_ADAPTER")]
    gpu_adapter: Option<String>,
    /// CPU backend: f32 (exact: the images match diffusers'), or bf16: every matrix product
    /// (linear, convolution, attention) in bfloat16 with f32 sums, on CPUs with AMX-BF16 or
    /// AVX512_BF16 (see the README for its speed and how far its images move).
    #[arg(long, value_enum, default_value_t = Precision::F32, env = "SD_PRECISION")]
    precision: Precision,
    /// CPU backend: how 3x3 convolutions choose between Winograd F(4x4), F(2x2) and im2col.
    /// auto: by the times measured on this processor when a full-size model first loads
    /// (about 10 s, once), remembered in $XDG_CACHE_HOME/sd-wgpu/cpu-tuning.json (else
    /// ~/.cache/sd-wgpu/); table: the built-in choices per vector level, the same on every
    /// machine with the same instructions; measure: measure again now.
    #[arg(long, value_enum, default_value_t = TuningMode::Auto, env = "SD_CPU_TUNING")]
    cpu_tuning: TuningMode,
}

impl ModelArgs {
    fn options(&self) -> ModelOptions {
        ModelOptions {
            config: self.model_config.clone(),
            vae: self.vae.clone(),
            text_encoders_on_cpu: self.text_encoders_on_cpu,
        }
    }

    fn device(&self) -> Result<Device> {
        let for_the_cpu = || {
            Error::InvalidArgument(
                "--precision bf16 is for the CPU backend, and this run uses the GPU (add \
                 --backend cpu)"
                    .into(),
            )
        };
        // Refused before looking for a GPU, so that this is the reason given.
        if self.backend == BackendChoice::Gpu && self.precision != Precision::F32 {
            return Err(for_the_cpu());
        }
        let device = select_device(self.backend, self.gpu_adapter.as_deref())?;
        match &device {
            Device::Cpu => {
                set_precision(self.precision)?;
                set_tuning_mode(self.cpu_tuning)?;
            }
            Device::Gpu(_) if self.precision != Precision::F32 => return Err(for_the_cpu()),
            Device::Gpu(_) => {}
        }
        tracing::info!("backend: {device}");
        Ok(device)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (POST /generate, GET /health, jobs with progress, the AUTOMATIC1111
    /// and OpenAI dialects, /metrics, /openapi.json, a page at /).
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "127.0.0.1", env = "SD_HOST")]
        host: String,
        /// 0 picks a free port (logged at start).
        #[arg(long, default_value_t = 5000, env = "SD_PORT")]
        port: u16,
        /// Requests that may wait while one generates; more get 503 with Retry-After.
        #[arg(long, default_value_t = 8, env = "SD_QUEUE_SIZE")]
        queue_size: usize,
        /// Seconds one request may take, queueing included (0: no limit).
        #[arg(long, default_value_t = 3600, env = "SD_REQUEST_TIMEOUT")]
        request_timeout: u64,
        /// Origins allowed to call the API from a browser, comma-separated (such as
        /// http://localhost:3000); "*" for any.
        #[arg(
            long,
            default_value = "*",
            value_delimiter = ',',
            env = "SD_CORS_ORIGINS"
        )]
        cors_origins: Vec<String>,
        /// Host names answered besides localhost, 127.0.0.1 and [::1], comma-separated; "*" for
        /// any. Bound to a loopback address, requests naming another host get 403 (against DNS
        /// rebinding); bound to another address, any host is answered unless this lists some.
        #[arg(long, value_delimiter = ',', env = "SD_ALLOWED_HOSTS")]
        allowed_hosts: Vec<String>,
        /// Connections open at once; more are answered 503 and closed.
        #[arg(long, default_value_t = ConnectionLimits::default().max_connections, env = "SD_MAX_CONNECTIONS")]
        max_connections: usize,
        /// Seconds a client may take to send a request's head or body, and a keep-alive
        /// connection may stay idle.
        #[arg(long, default_value_t = ConnectionLimits::default().header_timeout.as_secs(), env = "SD_CLIENT_TIMEOUT")]
        client_timeout: u64,
        /// Seconds shutdown waits for open requests to be answered before closing them.
        #[arg(long, default_value_t = ConnectionLimits::default().shutdown_timeout.as_secs(), env = "SD_SHUTDOWN_TIMEOUT")]
        shutdown_timeout: u64,
        /// Seconds a finished job (POST /jobs) stays readable.
        #[arg(long, default_value_t = JobRetention::default().keep_for.as_secs(), env = "SD_JOBS_KEPT_FOR")]
        jobs_kept_for: u64,
        /// Finished jobs kept at most; the oldest go first.
        #[arg(long, default_value_t = JobRetention::default().keep_count, env = "SD_JOBS_KEPT")]
        jobs_kept: usize,
        /// A folder of LoRA .safetensors files that requests may name (`loras`, or
        /// `<lora:name:weight>` in the prompt), by file name without the extension.
        #[arg(long, env = "SD_LORA_DIR")]
        lora_dir: Option<PathBuf>,
        /// Largest request body in bytes. 16 MiB holds an init image of the largest size
        /// (2048x2048, a photo is 6-9 MB as PNG, a third more in base64) and its mask.
        #[arg(long, default_value_t = 16 * 1024 * 1024, env = "SD_BODY_LIMIT")]
        body_limit: usize,
        /// Longest prompt or negative prompt, in characters.
        #[arg(long, default_value_t = 2000, env = "SD_MAX_PROMPT_CHARS")]
        max_prompt_chars: usize,
        /// Most denoising steps a request may ask for.
        #[arg(long, default_value_t = 150, env = "SD_MAX_STEPS")]
        max_steps: u64,
        /// Largest width x height a request may ask for.
        #[arg(long, default_value_t = 2048 * 2048, env = "SD_MAX_PIXELS")]
        max_pixels: u64,
        /// num_inference_steps when a request leaves it out; default: the model's (50;
        /// Turbo models, recognised by name: 1).
        #[arg(long, env = "SD_DEFAULT_STEPS")]
        default_steps: Option<u64>,
        /// guidance_scale when a request leaves it out; default: the model's (7.5; SDXL:
        /// 5.0; Turbo models: 0).
        #[arg(long, env = "SD_DEFAULT_GUIDANCE")]
        default_guidance: Option<f64>,
    },
    /// Generate one image from a text prompt and write it as PNG.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        negative_prompt: Option<String>,
        /// SDXL: the prompt its second text encoder reads (diffusers' prompt_2); default
        /// --prompt.
        #[arg(long = "prompt-2")]
        prompt_2: Option<String>,
        /// SDXL: the second text encoder's negative prompt; default --negative-prompt.
        #[arg(long = "negative-prompt-2")]
        negative_prompt_2: Option<String>,
        /// Denoising steps; default: the model's (50; Turbo models: 1).
        #[arg(long)]
        steps: Option<usize>,
        /// Classifier-free guidance scale (guidance is off at 1 or below); default: the
        /// model's (7.5; SDXL: 5.0; Turbo models: 0).
        #[arg(long)]
        guidance: Option<f64>,
        /// Pixels; default: the init image's width, else the model's (512; SDXL: 1024).
        #[arg(long)]
        width: Option<usize>,
        /// Pixels; default: the init image's height, else the model's (512; SDXL: 1024).
        #[arg(long)]
        height: Option<usize>,
        /// Image-to-image: the PNG or JPEG to start from (its size is the output's).
        #[arg(long)]
        init_image: Option<PathBuf>,
        /// Inpainting (with --init-image): a mask of the same size, white where the image
        /// is repainted, black where it is kept.
        #[arg(long, requires = "init_image")]
        mask_image: Option<PathBuf>,
        /// With --init-image: how much of the schedule runs, in (0, 1]; default 0.8, or 1.0
        /// with --mask-image (diffusers' defaults).
        #[arg(long, requires = "init_image")]
        strength: Option<f64>,
        /// Seed for torch-compatible noise; -1 picks a random one and prints it.
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        seed: i64,
        /// Scheduler class name or alias (pndm, ddim, euler, euler_a, dpm++2m, dpm++2m_karras, lms, lcm);
        /// default: the model folder's own.
        #[arg(long)]
        scheduler: Option<String>,
        /// A LoRA .safetensors file (kohya/AUTOMATIC1111 or PEFT/diffusers format) and its
        /// weight, PATH or PATH:SCALE (default 1.0); repeat for several at once.
        #[arg(long = "lora", value_name = "PATH[:SCALE]")]
        loras: Vec<String>,
        /// How prompts are read: `diffusers` (the text as written, cut at 75 tokens; the
        /// images match diffusers') or `a1111` (AUTOMATIC1111's (emphasis:1.2), [less],
        /// BREAK, and prompts of any length in chunks of 75 tokens).
        #[arg(long, default_value = "diffusers", value_parser = parse_prompt_syntax)]
        prompt_syntax: PromptSyntax,
        #[arg(long, short)]
        output: PathBuf,
    },
}

fn parse_prompt_syntax(name: &str) -> std::result::Result<PromptSyntax, String> {
    PromptSyntax::parse(name)
        .ok_or_else(|| format!("`{name}`: the syntaxes are diffusers and a1111"))
}

/// `--lora PATH[:SCALE]`: the file, read, and its weight (1.0 when not given). A suffix
/// that is not a number belongs to the path.
fn read_lora(arg: &str) -> Result<LoraChoice> {
    let (path, scale) = match arg.rsplit_once(':') {
        Some((path, scale)) if !path.is_empty() => match scale.parse::<f32>() {
            Ok(s) if s.is_finite() => (path, s),
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "--lora {arg}: the scale must be a finite number"
                )))
            }
            Err(_) => (arg, 1.0),
        },
        _ => (arg, 1.0),
    };
    let path = Path::new(path);
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    Ok(LoraChoice {
        lora: Arc::new(LoraFile::open(path, &name)?),
        scale,
    })
}

fn resolve_seed(seed: i64) -> Result<u64> {
    match seed {
        -1 => {
            let s = random_seed();
            println!("seed: {s}");
            Ok(s)
        }
        s if s >= 0 => Ok(s as u64),
        s => Err(Error::InvalidArgument(format!(
            "seed must be -1 (random) or >= 0, got {s}"
        ))),
    }
}

/// `--init-image`, `--mask-image` and `--strength` as the pipeline takes them.
fn read_init_image(
    image: Option<PathBuf>,
    mask: Option<PathBuf>,
    strength: Option<f64>,
) -> Result<Option<InitImage>> {
    let Some(image) = image else {
        return Ok(None);
    };
    // The file's name on every error: a missing file, or one that is not a PNG or JPEG.
    fn load<T>(path: &Path, decode: impl Fn(&[u8], usize) -> Result<T>) -> Result<Arc<T>> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode(&bytes, usize::MAX)
            .map(Arc::new)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }
    let image_file = load(&image, RgbImage::decode)?;
    let mask = mask
        .map(|path| load(&path, MaskImage::decode))
        .transpose()?;
    // diffusers' defaults: 0.8 for image-to-image, 1.0 for inpainting.
    let strength = strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
    Ok(Some(InitImage {
        image: image_file,
        mask,
        strength,
    }))
}

/// `--width` and `--height`: the init image's size, which they may only repeat, else the
/// model's `default` (width, height).
fn output_size(
    width: Option<usize>,
    height: Option<usize>,
    init: Option<&InitImage>,
    default: (usize, usize),
) -> Result<(usize, usize)> {
    let Some(init) = init else {
        return Ok((width.unwrap_or(default.0), height.unwrap_or(default.1)));
    };
    let size = (init.image.width, init.image.height);
    if width.unwrap_or(size.0) != size.0 || height.unwrap_or(size.1) != size.1 {
        return Err(Error::InvalidArgument(format!(
            "--width/--height ask for {}x{} but the init image is {}x{}: the output has the init image's size",
            width.unwrap_or(size.0),
            height.unwrap_or(size.1),
            size.0,
            size.1
        )));
    }
    Ok(size)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            model,
            host,
            port,
            queue_size,
            request_timeout,
            cors_origins,
            allowed_hosts,
            max_connections,
            client_timeout,
            shutdown_timeout,
            jobs_kept_for,
            jobs_kept,
            lora_dir,
            body_limit,
            max_prompt_chars,
            max_steps,
            max_pixels,
            default_steps,
            default_guidance,
        } => {
            if let Some(default_steps) = default_steps.filter(|s| !(1..=max_steps).contains(s)) {
                return Err(Error::InvalidArgument(format!(
                    "--default-steps {default_steps} must be between 1 and --max-steps {max_steps}"
                )));
            }
            if let Some(default_guidance) = default_guidance.filter(|g| !(0.0..=30.0).contains(g)) {
                return Err(Error::InvalidArgument(format!(
                    "--default-guidance {default_guidance} must be between 0 and 30"
                )));
            }
            // The model is resolved by the engine as it loads, so that a model that cannot
            // be found leaves the service up, reporting why in /health.
            let device = model.device()?;
            let (engine, worker) = Engine::new(EngineConfig {
                model_options: model.options(),
                model: model.model,
                device,
                queue_capacity: queue_size,
                measure_step_cost: request_timeout > 0,
            });
            let config = ServerConfig {
                host,
                port,
                limits: Limits {
                    max_prompt_chars,
                    max_steps,
                    max_pixels,
                    default_steps,
                    default_guidance,
                    ..Limits::default()
                },
                time_limit: (request_timeout > 0).then(|| Duration::from_secs(request_timeout)),
                cors_origins,
                allowed_hosts,
                body_limit,
                connections: ConnectionLimits {
                    max_connections,
                    header_timeout: Duration::from_secs(client_timeout.max(1)),
                    shutdown_timeout: Duration::from_secs(shutdown_timeout),
                },
                job_retention: JobRetention {
                    keep_for: Duration::from_secs(jobs_kept_for),
                    keep_count: jobs_kept,
                },
                lora_dir,
            };
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| Error::Other(format!("tokio runtime: {e}")))?;
            // The model runs on this, the main thread, and HTTP on another: glibc serves the
            // main thread's large blocks from a heap it reuses and other threads' from fresh
            // mappings (see keep_freed_memory), which made CPU generation 8-25% slower.
            // The server thread ends the process once it has shut down.
            std::thread::Builder::new()
                .name("http".into())
                .spawn(move || {
                    let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        runtime.block_on(sd_wgpu::server::serve(config, engine))
                    }));
                    let code = match served {
                        Ok(Ok(())) => 0,
                        Ok(Err(e)) => {
                            eprintln!("error: {e}");
                            1
                        }
                        // The panic message is already on stderr.
                        Err(_) => 101,
                    };
                    std::process::exit(code)
                })
                .map_err(|e| Error::Other(format!("cannot start the server thread: {e}")))?;
            worker.run();
            // The model could not be loaded: /health reports why until the server stops.
            loop {
                std::thread::park();
            }
        }
        Command::Generate {
            model,
            prompt,
            negative_prompt,
            prompt_2,
            negative_prompt_2,
            steps,
            guidance,
            width,
            height,
            init_image,
            mask_image,
            strength,
            seed,
            scheduler,
            loras,
            prompt_syntax,
            output,
        } => {
            let seed = resolve_seed(seed)?;
            let init = read_init_image(init_image, mask_image, strength)?;
            let loras = loras
                .iter()
                .map(|arg| read_lora(arg))
                .collect::<Result<Vec<_>>>()?;
            // Checked before the minutes of loading a model.
            output_size(width, height, init.as_ref(), (0, 0))?;
            let device = model.device()?;
            let t0 = Instant::now();
            tracing::info!("loading {} on {device}", model.model.display());
            let sd = StableDiffusion::load_named(&model.model, &model.options(), &device)?;
            let load_time = t0.elapsed();
            let defaults = sd.defaults();
            let (width, height) = output_size(
                width,
                height,
                init.as_ref(),
                (defaults.width, defaults.height),
            )?;
            let params = GenerateParams {
                prompt,
                negative_prompt,
                prompt_2,
                negative_prompt_2,
                steps: steps.unwrap_or(defaults.steps),
                guidance_scale: guidance.unwrap_or(defaults.guidance_scale),
                width,
                height,
                seed,
                scheduler,
                scheduler_overrides: Default::default(),
                init,
                loras,
                prompt_syntax,
            };
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})",
                )
                .expect("the template is a valid constant")
                .progress_chars("=> "),
            );
            bar.set_message("denoising");
            let mut denoising_steps = 0;
            let result = sd.generate(&params, &mut |ev| {
                bar.set_length(ev.total as u64);
                bar.set_position(ev.step as u64);
                denoising_steps = ev.total;
                ControlFlow::Continue(())
            });
            bar.finish_and_clear();
            let generated = result?;
            let png = generated.image.to_png()?;
            std::fs::write(&output, png).map_err(|e| Error::io(&output, e))?;
            let t = generated.timings;
            let encode = if params.init.is_some() {
                format!(", VAE encode {:.2}s", t.vae_encode.as_secs_f64())
            } else {
                String::new()
            };
            println!(
                "wrote {} ({}x{}, seed {}) in {:.2}s: load {:.2}s, text encoder {:.2}s{encode}, denoising {:.2}s ({denoising_steps} steps, {:.2}s/step), VAE decode {:.2}s",
                output.display(),
                width,
                height,
                generated.seed,
                (load_time + t.total).as_secs_f64(),
                load_time.as_secs_f64(),
                t.text_encoder.as_secs_f64(),
                t.denoise.as_secs_f64(),
                t.denoise.as_secs_f64() / denoising_steps.max(1) as f64,
                t.vae_decode.as_secs_f64(),
            );
            if let Device::Gpu(gpu) = &device {
                let (reused, made) = gpu.bind_group_reuse();
                tracing::info!("GPU bind groups: {reused} reused from the cache, {made} made");
                let profile = gpu.profile();
                if !profile.is_empty() {
                    println!(
                        "GPU time by kernel (SD_GPU_PROFILE=1), loading included:\n{}",
                        sd_wgpu::backend::gpu::profile::table(&profile)
                    );
                }
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before any other thread starts.
    sd_wgpu::backend::cpu::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
