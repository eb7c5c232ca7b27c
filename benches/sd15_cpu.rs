//! Full-size SD 1.5 or SDXL on the CPU backend: times the text encoder(s), one guided UNet
//! step (batch 2) at the model's size (SD 1.5 512x512, SDXL 1024x1024), one VAE decode and
//! one VAE encode (the image-to-image start) at that size, and prints seconds and the
//! process's peak memory.
//!
//! With no options it builds the architecture with random f32 weights (no download, no
//! Python) from the real configs, those of sd-wgpu's single-file presets
//! (src/model/presets/sd15, sdxl_base): `cargo bench --bench sd15_cpu` (add `-- --quick`
//! to skip the VAE decode and encode, `-- --arch sdxl` for SDXL base).
//!
//! Options (after `--`):
//!
//! * `--arch sd15|sdxl` (sd15): the architecture of the random weights, and of `--tiny`.
//!   SDXL's has two text encoders (CLIP ViT-L, OpenCLIP bigG with its pooled projection)
//!   and the text_time UNet, which also reads the pooled embedding and the size ids.
//! * `--model DIR`: load a diffusers folder (SD 1.x/2.x or SDXL, any precision its files
//!   have) instead; `--tiny` is `--model tests/fixtures/models/sd1` (`sdxl` with
//!   `--arch sdxl`), a seconds-long smoke run.
//! * `--latent N`: latent side of the generated inputs (default: the UNet's sample_size,
//!   64 for SD 1.5, 128 for SDXL, 16 for the tiny fixtures).
//! * `--inputs FILE`: a safetensors file with `ids` `[L]` (token ids as f32; SDXL's second
//!   tokenizer's in `ids_2`), `context` `[B, L, D]`, `latents` `[B, C, h, w]`, `timestep`
//!   `[1]`, `vae_latents` `[1, C, h, w]` (already divided by the VAE's scaling factor),
//!   and for a text_time UNet `text_embeds` `[B, P]` and `time_ids` `[B, 6]`, so that
//!   another implementation can be timed on the same inputs (tools/bench_vs_pytorch.py
//!   writes it).
//! * `--outputs FILE`: write the stages' results (`text_embeddings`, for SDXL
//!   `text_embeddings_2` and `pooled_text_embeds` too, `unet_out`, `image`, `latent_mean`)
//!   as f32 safetensors, to compare with another implementation.
//! * `--runs N` (1) timed runs after `--warmup W` (0) untimed ones; the median is reported.
//! * `--precision f32|bf16` (f32): the CPU products' precision, as the service's
//!   `--precision` (bf16 needs AMX-BF16 or AVX512_BF16).
//! * `--cpu-tuning auto|table|measure` (auto): where the convolutions' Winograd cut-offs
//!   come from, as the service's `--cpu-tuning` (auto: measured on this processor once and
//!   remembered; see `sd_wgpu::backend::cpu::tuning`). A first measurement (7.6-9.7 s on
//!   2 Zen 3 cores) counts in the load time.
//! * `--json`: one JSON object on stdout instead of the table.
//! * `--profile`: also the wall time of each op kind per run of each stage, or over the
//!   whole generation with `--image` (the same as `SD_CPU_PROFILE=1`; see
//!   `sd_wgpu::tensor::profile`).
//! * `--image`: a whole generation through `StableDiffusion::generate` instead (needs
//!   `--model`/`--tiny`): `--steps N` (2), `--size PX` and `--guidance G` (the model's
//!   defaults: SD 1.x 512 and 7.5, SDXL 1024 and 5), `--seed S` (0), `--prompt TEXT`;
//!   reports each stage's time (the denoising time also per UNet evaluation: PNDM makes
//!   `steps + 1`) and the peak memory. `--strength S` makes it image-to-image from a
//!   synthetic picture: the VAE encode is timed, and only strength's share of the steps
//!   runs.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

use clap::ValueEnum;
use sd_wgpu::backend::cpu::precision::{set_precision, Precision};
use sd_wgpu::backend::cpu::tuning::{self, TuningMode};
use sd_wgpu::model::clip::{ClipTextModel, HiddenLayer};
use sd_wgpu::model::unet::{Conditioning, TextTime, UNet2DConditionModel};
use sd_wgpu::model::vae::VaeDecoder;
use sd_wgpu::model::vae_encoder::VaeEncoder;
use sd_wgpu::model::weights::Weights;
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::pipeline::{GenerateParams, InitImage, RgbImage, StableDiffusion};
use sd_wgpu::tensor::{profile, Device, Tensor};
use sd_wgpu::{Error, Result};

mod common;
use common::{peak_memory_mib, peak_text, Arch};

struct Options {
    arch: Arch,
    quick: bool,
    model: Option<PathBuf>,
    inputs: Option<PathBuf>,
    outputs: Option<PathBuf>,
    runs: usize,
    warmup: usize,
    json: bool,
    profile: bool,
    image: bool,
    steps: usize,
    /// Whole-image side and guidance (`--image`); `None`: the model's defaults.
    size: Option<usize>,
    guidance: Option<f64>,
    seed: u64,
    prompt: String,
    /// Image-to-image at this strength (`--image` only).
    strength: Option<f64>,
    /// Latent side of the generated inputs; `None`: the UNet's sample_size.
    latent_size: Option<usize>,
}

fn usage(message: String) -> Error {
    Error::InvalidArgument(format!(
        "{message}\nusage: sd15_cpu [--arch sd15|sdxl] [--quick] [--model DIR | --tiny] [--latent N] [--inputs FILE] \
         [--outputs FILE] [--runs N] [--warmup W] [--json] [--profile] \
         [--image [--steps N] [--size PX] [--guidance G] [--seed S] [--prompt TEXT] [--strength S]]"
    ))
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        arch: Arch::Sd15,
        quick: false,
        model: None,
        inputs: None,
        outputs: None,
        runs: 1,
        warmup: 0,
        json: false,
        profile: false,
        image: false,
        steps: 2,
        size: None,
        guidance: None,
        seed: 0,
        prompt: "a photograph of an astronaut riding a horse".into(),
        strength: None,
        latent_size: None,
    };
    let mut tiny = false;
    let mut cpu_tuning = TuningMode::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        fn number<T: std::str::FromStr>(name: &str, v: String) -> Result<T> {
            v.parse()
                .map_err(|_| usage(format!("{name}: `{v}` is not a number")))
        }
        match arg.as_str() {
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "--profile" => o.profile = true,
            "--image" => o.image = true,
            "--tiny" => tiny = true,
            "--arch" => o.arch = Arch::parse(&value("--arch")?)?,
            "--latent" => o.latent_size = Some(number("--latent", value("--latent")?)?),
            "--guidance" => o.guidance = Some(number("--guidance", value("--guidance")?)?),
            "--model" => o.model = Some(value("--model")?.into()),
            "--inputs" => o.inputs = Some(value("--inputs")?.into()),
            "--outputs" => o.outputs = Some(value("--outputs")?.into()),
            "--prompt" => o.prompt = value("--prompt")?,
            "--runs" => o.runs = number("--runs", value("--runs")?)?,
            "--warmup" => o.warmup = number("--warmup", value("--warmup")?)?,
            "--steps" => o.steps = number("--steps", value("--steps")?)?,
            "--size" => o.size = Some(number("--size", value("--size")?)?),
            "--seed" => o.seed = number("--seed", value("--seed")?)?,
            "--strength" => o.strength = Some(number("--strength", value("--strength")?)?),
            "--cpu-tuning" => {
                let v = value("--cpu-tuning")?;
                cpu_tuning = TuningMode::from_str(&v, true).map_err(|_| {
                    usage(format!("--cpu-tuning: `{v}` is not auto, table or measure"))
                })?;
            }
            "--precision" => {
                let v = value("--precision")?;
                let precision = Precision::from_str(&v, true)
                    .map_err(|_| usage(format!("--precision: `{v}` is not f32 or bf16")))?;
                set_precision(precision)?;
            }
            other => return Err(usage(format!("unknown option `{other}`"))),
        }
    }
    tuning::set_mode(cpu_tuning)?;
    if tiny {
        // The fixtures' UNets sample 16x16 latents (their sample_size).
        o.model = Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models")
                .join(o.arch.tiny_fixture()),
        );
    }
    if o.runs == 0 {
        return Err(usage("--runs must be at least 1".into()));
    }
    if o.image && o.model.is_none() {
        return Err(usage("--image needs --model DIR or --tiny".into()));
    }
    Ok(o)
}

/// The networks, from a folder or with random weights.
enum Models {
    Loaded(Box<StableDiffusion>),
    Random {
        /// One text encoder (SD 1.5) or two (SDXL).
        text_encoders: Vec<ClipTextModel>,
        unet: Box<UNet2DConditionModel>,
        vae: Box<VaeDecoder>,
        vae_encoder: Box<VaeEncoder>,
    },
}

impl Models {
    /// `arch` at full size with random f32 weights, from its real configs.
    fn random(arch: Arch, device: &Device) -> Result<Self> {
        let weights = Weights::random(0, device);
        let here = Path::new("random");
        let configs = arch.configs()?;
        Ok(Models::Random {
            text_encoders: configs
                .text_encoders
                .iter()
                .map(|c| ClipTextModel::new(c, &weights, here))
                .collect::<Result<_>>()?,
            unet: Box::new(UNet2DConditionModel::new(&configs.unet, &weights, here)?),
            vae: Box::new(VaeDecoder::new(&configs.vae, &weights, here)?),
            vae_encoder: Box::new(VaeEncoder::new(&configs.vae, &weights, here)?),
        })
    }

    /// The text encoders in pipeline order (SDXL: CLIP ViT-L, then OpenCLIP bigG).
    fn text_encoders(&self) -> Vec<&ClipTextModel> {
        match self {
            Models::Loaded(sd) => sd
                .prompt_encoder()
                .parts()
                .iter()
                .map(|p| &p.encoder)
                .collect(),
            Models::Random { text_encoders, .. } => text_encoders.iter().collect(),
        }
    }

    fn unet(&self) -> &UNet2DConditionModel {
        match self {
            Models::Loaded(sd) => sd.unet(),
            Models::Random { unet, .. } => unet,
        }
    }

    fn vae(&self) -> &VaeDecoder {
        match self {
            Models::Loaded(sd) => sd.vae(),
            Models::Random { vae, .. } => vae,
        }
    }

    fn vae_encoder(&self) -> Result<&VaeEncoder> {
        match self {
            Models::Loaded(sd) => sd
                .vae_encoder()
                .ok_or_else(|| Error::Other("the model's VAE has no encoder weights".into())),
            Models::Random { vae_encoder, .. } => Ok(vae_encoder),
        }
    }
}

/// What each stage runs on.
struct Inputs {
    /// Token ids for each text encoder (SDXL's two tokenizers pad differently).
    ids: Vec<Vec<u32>>,
    cond: Conditioning,
    latents: Tensor,
    timestep: f32,
    vae_latents: Tensor,
}

impl Inputs {
    /// Seeded inputs shaped for `models`, `latent_size` latents a side (64: 512x512 for
    /// SD 1.5; SDXL 128: 1024x1024).
    fn generated(models: &Models, latent_size: usize, device: &Device) -> Result<Self> {
        let ids: Vec<u32> = (0..77)
            .map(|i| if i == 0 { 49406 } else { 320 + i })
            .collect();
        let mut rng = TorchRng::new(0);
        let channels = models.unet().config().in_channels;
        // SDXL's context joins both encoders' states along the width.
        let width = models
            .text_encoders()
            .iter()
            .map(|e| e.config().hidden_size)
            .sum();
        let latents = rng.randn_tensor(&[2, channels, latent_size, latent_size], device)?;
        let context = rng.randn_tensor(&[2, 77, width], device)?;
        let vae_channels = models.vae().config().latent_channels;
        let vae_latents = rng.randn_tensor(&[1, vae_channels, latent_size, latent_size], device)?;
        // SDXL's UNet also reads a pooled embedding and the image size.
        let side = (latent_size * models.vae().config().downscale_factor()) as f32;
        let text_time = match models.unet().text_time_pooled_dim() {
            Some(pooled) => Some(TextTime {
                text_embeds: rng.randn_tensor(&[2, pooled], device)?,
                time_ids: vec![vec![side, side, 0.0, 0.0, side, side]; 2],
            }),
            None => None,
        };
        Ok(Inputs {
            ids: vec![ids; models.text_encoders().len()],
            cond: Conditioning { context, text_time },
            latents,
            timestep: 999.0,
            vae_latents,
        })
    }

    /// The inputs another implementation wrote (see the module docs), for `models`.
    fn read(path: &Path, models: &Models, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
        let has = |name: &str| file.names().contains(&name);
        let get = |name: &str| -> Result<(Vec<f32>, Vec<usize>)> {
            let view = file
                .tensor(name)
                .map_err(|e| Error::Other(format!("{}: `{name}`: {e}", path.display())))?;
            if view.dtype() != Dtype::F32 {
                return Err(Error::Other(format!(
                    "{}: `{name}` is {:?}; expected F32",
                    path.display(),
                    view.dtype()
                )));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((data, view.shape().to_vec()))
        };
        let tensor = |name: &str| -> Result<Tensor> {
            let (data, shape) = get(name)?;
            Tensor::from_vec(data, &shape, device)
        };
        // `ids`, `ids_2`, ...: one per text encoder; a missing one repeats the last.
        let mut ids: Vec<Vec<u32>> = Vec::new();
        for i in 0..models.text_encoders().len() {
            let name = if i == 0 {
                "ids".to_string()
            } else {
                format!("ids_{}", i + 1)
            };
            if i == 0 || has(&name) {
                ids.push(get(&name)?.0.iter().map(|&v| v as u32).collect());
            } else {
                ids.push(ids[i - 1].clone());
            }
        }
        let (timestep, _) = get("timestep")?;
        let text_time = match models.unet().text_time_pooled_dim() {
            Some(_) => {
                let (values, shape) = get("time_ids")?;
                let columns = shape.last().copied().unwrap_or(0).max(1);
                Some(TextTime {
                    text_embeds: tensor("text_embeds")?,
                    time_ids: values.chunks(columns).map(<[f32]>::to_vec).collect(),
                })
            }
            None => None,
        };
        Ok(Inputs {
            ids,
            cond: Conditioning {
                context: tensor("context")?,
                text_time,
            },
            latents: tensor("latents")?,
            timestep: timestep[0],
            vae_latents: tensor("vae_latents")?,
        })
    }
}

/// A stage's results by the names `--outputs` writes them under.
type Outputs = Vec<(String, Tensor)>;

/// One stage's result: median seconds, each run's seconds, the last run's outputs, and
/// the op profile of the timed runs (empty unless profiling).
struct Timed {
    median: f64,
    runs: Vec<f64>,
    outputs: Outputs,
    ops: Vec<profile::OpTime>,
}

/// `runs` timed calls after `warmup` untimed ones.
fn time(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<Outputs>) -> Result<Timed> {
    for _ in 0..warmup {
        f()?;
    }
    profile::take();
    let mut seconds = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let out = f()?;
        seconds.push(t.elapsed().as_secs_f64());
        last = Some(out);
    }
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Ok(Timed {
        median,
        runs: seconds,
        outputs: last.expect("runs >= 1"),
        ops: profile::take(),
    })
}

fn write_outputs(path: &Path, outputs: &[&(String, Tensor)]) -> Result<()> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = outputs
        .iter()
        .map(|(name, t)| {
            let bytes = t.to_vec()?.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name.to_string(), bytes, t.shape().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(name, bytes, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Other(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(views, None, path)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

fn whole_image(o: &Options, dir: &Path, device: &Device) -> Result<Value> {
    let t = Instant::now();
    let sd = StableDiffusion::load(dir, device)?;
    let load_s = t.elapsed().as_secs_f64();
    let peak_after_load = peak_memory_mib();
    // The model's own defaults (SD 1.x 512 and 7.5, SDXL 1024 and 5) unless given.
    let defaults = sd.defaults();
    let size = o.size.unwrap_or(defaults.width);
    let guidance = o.guidance.unwrap_or(defaults.guidance_scale);
    let params = GenerateParams {
        prompt: o.prompt.clone(),
        negative_prompt: None,
        prompt_2: None,
        negative_prompt_2: None,
        steps: o.steps,
        guidance_scale: guidance,
        width: size,
        height: size,
        seed: o.seed,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: o.strength.map(|strength| InitImage {
            image: std::sync::Arc::new(picture(size)),
            mask: None,
            strength,
        }),
        loras: Vec::new(),
        prompt_syntax: Default::default(),
    };
    if o.profile {
        profile::set_enabled(true);
    }
    // UNet evaluations as the scheduler counts them: PNDM runs one more than `steps` (its
    // PLMS warm-up repeats a timestep); image-to-image runs strength's share.
    let mut evaluations = 0;
    let generated = sd.generate(&params, &mut |event| {
        evaluations = event.total;
        ControlFlow::Continue(())
    })?;
    let ops: Vec<Value> = profile::take()
        .iter()
        .map(|op| json!({"op": op.op, "s": op.time.as_secs_f64(), "calls": op.calls}))
        .collect();
    let t = generated.timings;
    if let Some(path) = &o.outputs {
        let png = generated.image.to_png()?;
        std::fs::write(path, png).map_err(|e| Error::io(path, e))?;
    }
    Ok(json!({
        "mode": "image",
        "model": dir.display().to_string(),
        "family": if sd.is_xl() { "SDXL" } else { "SD 1.x/2.x" },
        "threads": rayon::current_num_threads(),
        "precision": sd_wgpu::backend::cpu::precision::current(),
        "convolutions": tuning::current(),
        "size": size,
        "steps": o.steps,
        "guidance": guidance,
        "strength": o.strength,
        "load_s": load_s,
        "text_encoder_s": t.text_encoder.as_secs_f64(),
        "vae_encode_s": t.vae_encode.as_secs_f64(),
        "denoise_s": t.denoise.as_secs_f64(),
        "unet_evaluations": evaluations,
        "step_s": t.denoise.as_secs_f64() / evaluations.max(1) as f64,
        "vae_decode_s": t.vae_decode.as_secs_f64(),
        "total_s": t.total.as_secs_f64(),
        "peak_after_load_mib": peak_after_load,
        "peak_mib": peak_memory_mib(),
        "ops": ops,
    }))
}

/// A `size` x `size` picture to start image-to-image from: gradients and a square.
fn picture(size: usize) -> RgbImage {
    let pixels = (0..size * size)
        .flat_map(|i| {
            let (x, y) = (i % size, i / size);
            let square = (size / 4..size / 2).contains(&x) && (size / 4..size / 2).contains(&y);
            if square {
                [240, 230, 40]
            } else {
                [(x * 255 / size) as u8, (y * 255 / size) as u8, 90]
            }
        })
        .collect();
    RgbImage {
        width: size,
        height: size,
        pixels,
    }
}

fn main() -> Result<()> {
    sd_wgpu::backend::cpu::keep_freed_memory();
    let o = parse_args()?;
    let device = Device::Cpu;
    let threads = rayon::current_num_threads();

    if o.image {
        let dir = o.model.as_deref().expect("checked in parse_args");
        // On the main thread, like the service's engine (see src/main.rs).
        let result = whole_image(&o, dir, &device)?;
        if o.json {
            println!("{result}");
        } else {
            println!(
                "whole {0}x{0} {5} image, {1} steps, guidance {6}{3}, {threads} threads, {2} ({4} UNet evaluations)",
                result["size"],
                o.steps,
                dir.display(),
                o.strength
                    .map(|s| format!(", image-to-image at strength {s}"))
                    .unwrap_or_default(),
                result["unet_evaluations"],
                result["family"].as_str().unwrap_or("?"),
                result["guidance"],
            );
            for (label, key) in [
                ("load", "load_s"),
                ("text encoder (2 prompts)", "text_encoder_s"),
                ("VAE encode (image-to-image)", "vae_encode_s"),
                ("denoise", "denoise_s"),
                ("per UNet evaluation", "step_s"),
                ("VAE decode + to RGB", "vae_decode_s"),
                ("total", "total_s"),
            ] {
                println!(
                    "{label:<28} {:>8.2} s",
                    result[key].as_f64().unwrap_or(f64::NAN)
                );
            }
            println!(
                "peak memory: {:.0} MiB after load, {:.0} MiB in all",
                result["peak_after_load_mib"].as_f64().unwrap_or(f64::NAN),
                result["peak_mib"].as_f64().unwrap_or(f64::NAN)
            );
            for op in result["ops"].as_array().into_iter().flatten() {
                println!(
                    "    {:<32} {:>8.3} s  {:>6} calls",
                    op["op"].as_str().unwrap_or("?"),
                    op["s"].as_f64().unwrap_or(f64::NAN),
                    op["calls"]
                );
            }
        }
        return Ok(());
    }

    let t = Instant::now();
    let (models, source) = match &o.model {
        Some(dir) => {
            let sd = StableDiffusion::load(dir, &device)?;
            let family = if sd.is_xl() { "SDXL" } else { "SD 1.x/2.x" };
            let source = format!("{family} folder {}", dir.display());
            (Models::Loaded(Box::new(sd)), source)
        }
        None => (
            Models::random(o.arch, &device)?,
            format!("{} architecture, random f32 weights", o.arch.name()),
        ),
    };
    // A loaded model has done this as it loaded; random weights do it here.
    let unet_channels = &models.unet().config().block_out_channels;
    tuning::prepare(unet_channels.iter().copied().max().unwrap_or(0));
    let load_s = t.elapsed().as_secs_f64();
    let peak_after_load = peak_memory_mib();
    let inputs = match &o.inputs {
        Some(path) => Inputs::read(path, &models, &device)?,
        None => {
            let side = o
                .latent_size
                .or(models.unet().config().sample_size)
                .unwrap_or(64);
            Inputs::generated(&models, side, &device)?
        }
    };
    if !o.json {
        println!(
            "{source}, CPU backend, {threads} threads; median of {} run(s) after {} warm-up(s)",
            o.runs, o.warmup
        );
        let tuned = tuning::current();
        println!(
            "3x3 convolutions of 256+ channels: {} ({})",
            tuned.cutoffs, tuned.source
        );
    }

    if o.profile {
        profile::set_enabled(true);
    }
    let runs = o.runs as f64;
    let mut stages: Vec<(String, String, Timed)> = Vec::new();
    let mut report = |key: String, label: String, r: Timed| {
        if !o.json {
            println!(
                "{label:<36} {:>8.2} s   peak memory so far {}",
                r.median,
                peak_text()
            );
            let total: f64 = r.ops.iter().map(|op| op.time.as_secs_f64()).sum();
            for op in &r.ops {
                let s = op.time.as_secs_f64();
                println!(
                    "    {:<32} {:>8.3} s {:>5.1}%  {:>6} calls  (per run)",
                    op.op,
                    s / runs,
                    100.0 * s / total,
                    op.calls as f64 / runs
                );
            }
        }
        stages.push((key, label, r));
    };

    // Each text encoder as its pipeline reads it: one encoder, `last_hidden_state`
    // (SD 1.x/2.x); two, each one's penultimate states and the second's pooled projection
    // (SDXL), as `PromptEncoder::encode` does.
    let encoders = models.text_encoders();
    let layer = match encoders.len() {
        1 => HiddenLayer::Last,
        _ => HiddenLayer::Penultimate,
    };
    for (i, encoder) in encoders.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!("_{}", i + 1)
        };
        let ids = &inputs.ids[i];
        let pooled = encoders.len() > 1 && i + 1 == encoders.len();
        let r = time(o.warmup, o.runs, || {
            let out = encoder.encode(ids, layer)?;
            let mut named = vec![(format!("text_embeddings{suffix}"), out.hidden)];
            if let (true, Some(p)) = (pooled, out.pooled) {
                named.push(("pooled_text_embeds".into(), p));
            }
            Ok(named)
        })?;
        let number = if i == 0 {
            String::new()
        } else {
            format!(" {}", i + 1)
        };
        report(
            format!("text_encoder{suffix}"),
            format!("text encoder{number} ({} tokens)", ids.len()),
            r,
        );
    }

    let unet = models.unet();
    let r = time(o.warmup, o.runs, || {
        let out = unet.forward(&inputs.latents, inputs.timestep, &inputs.cond)?;
        Ok(vec![("unet_out".into(), out)])
    })?;
    let s = inputs.latents.shape();
    report(
        "unet".into(),
        format!("UNet step, batch {}, {}x{} latents", s[0], s[2], s[3]),
        r,
    );

    if !o.quick {
        let vae = models.vae();
        let r = time(o.warmup, o.runs, || {
            Ok(vec![("image".into(), vae.decode(&inputs.vae_latents)?)])
        })?;
        let s = r.outputs[0].1.shape().to_vec();
        report("vae".into(), format!("VAE decode, {}x{}", s[3], s[2]), r);

        let encoder = models.vae_encoder()?;
        let [h, w] = [s[2], s[3]];
        let image = TorchRng::new(1)
            .randn_tensor(&[1, 3, h, w], &device)?
            .clamp(-1.0, 1.0)?;
        let r = time(o.warmup, o.runs, || {
            Ok(vec![("latent_mean".into(), encoder.encode(&image)?.mean)])
        })?;
        report("vae_encoder".into(), format!("VAE encode, {w}x{h}"), r);
    }

    if let Some(path) = &o.outputs {
        let outs: Vec<&(String, Tensor)> = stages.iter().flat_map(|(_, _, r)| &r.outputs).collect();
        write_outputs(path, &outs)?;
    }
    if o.json {
        let stage_json: serde_json::Map<String, Value> = stages
            .iter()
            .map(|(key, label, r)| {
                let ops: Vec<Value> = r
                    .ops
                    .iter()
                    .map(|op| {
                        json!({
                            "op": op.op,
                            "s_per_run": op.time.as_secs_f64() / runs,
                            "calls_per_run": op.calls as f64 / runs,
                        })
                    })
                    .collect();
                (
                    key.clone(),
                    json!({"label": label, "median_s": r.median, "runs_s": r.runs, "ops": ops}),
                )
            })
            .collect();
        println!(
            "{}",
            json!({
                "mode": "stages",
                "model": source,
                "threads": threads,
                "precision": sd_wgpu::backend::cpu::precision::current(),
                "convolutions": tuning::current(),
                "simd": format!("{:?}", sd_wgpu::backend::cpu::simd::level()),
                "runs": o.runs,
                "warmup": o.warmup,
                "load_s": load_s,
                "stages": stage_json,
                "peak_after_load_mib": peak_after_load,
                "peak_mib": peak_memory_mib(),
            })
        );
    }
    Ok(())
}
