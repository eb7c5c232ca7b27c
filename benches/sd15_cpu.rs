//! Full-size SD 1.5 on the CPU backend: times the text encoder, one guided UNet step
//! (batch 2) at 512x512, one VAE decode at 512x512 and one VAE encode at 512x512 (the
//! image-to-image start), and prints seconds and the process's peak memory.
//!
//! With no options it builds the architecture with random weights (no download, no Python):
//! `cargo bench --bench sd15_cpu` (add `-- --quick` to skip the VAE decode and encode).
//!
//! Options (after `--`):
//!
//! * `--model DIR`: load a diffusers folder (any precision its files have) instead;
//!   `--tiny` is `--model tests/fixtures/models/sd1` (a seconds-long smoke run).
//! * `--inputs FILE`: a safetensors file with `ids` `[L]` (token ids as f32), `context`
//!   `[B, L, D]`, `latents` `[B, C, h, w]`, `timestep` `[1]` and `vae_latents`
//!   `[1, C, h, w]` (already divided by the VAE's scaling factor), so that another
//!   implementation can be timed on the same inputs (tools/bench_vs_pytorch.py writes it).
//! * `--outputs FILE`: write the stages' results (`text_embeddings`, `unet_out`, `image`)
//!   as f32 safetensors, to compare with another implementation.
//! * `--runs N` (1) timed runs after `--warmup W` (0) untimed ones; the median is reported.
//! * `--json`: one JSON object on stdout instead of the table.
//! * `--profile`: also the wall time of each op kind per run of each stage, or over the
//!   whole generation with `--image` (the same as `SD_CPU_PROFILE=1`; see
//!   `sd_wgpu::tensor::profile`).
//! * `--image`: a whole generation through `StableDiffusion::generate` instead (needs
//!   `--model`/`--tiny`): `--steps N` (2), `--size PX` (512), `--seed S` (0),
//!   `--prompt TEXT`, guidance 7.5; reports each stage's time (the denoising time also per
//!   UNet evaluation: PNDM makes `steps + 1`) and the peak memory. `--strength S` makes it
//!   image-to-image from a synthetic picture: the VAE encode is timed, and only strength's
//!   share of the steps runs.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

use sd_wgpu::model::clip::ClipTextModel;
use sd_wgpu::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use sd_wgpu::model::unet::{Conditioning, TextTime, UNet2DConditionModel};
use sd_wgpu::model::vae::VaeDecoder;
use sd_wgpu::model::vae_encoder::VaeEncoder;
use sd_wgpu::model::weights::Weights;
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::pipeline::{GenerateParams, InitImage, RgbImage, StableDiffusion};
use sd_wgpu::tensor::{profile, Device, Tensor};
use sd_wgpu::{Error, Result};

mod common;
use common::{peak_memory_mib, peak_text};

struct Options {
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
    size: usize,
    seed: u64,
    prompt: String,
    /// Image-to-image at this strength (`--image` only).
    strength: Option<f64>,
    /// Latent side of the generated inputs (64: 512x512 for SD 1.5; 16 with `--tiny`).
    latent_size: usize,
}

fn usage(message: String) -> Error {
    Error::InvalidArgument(format!(
        "{message}\nusage: sd15_cpu [--quick] [--model DIR | --tiny] [--inputs FILE] [--outputs FILE] \
         [--runs N] [--warmup W] [--json] [--profile] [--image [--steps N] [--size PX] [--seed S] [--prompt TEXT] [--strength S]]"
    ))
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
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
        size: 512,
        seed: 0,
        prompt: "a photograph of an astronaut riding a horse".into(),
        strength: None,
        latent_size: 64,
    };
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
            "--tiny" => {
                o.model =
                    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1"));
                o.latent_size = 16;
            }
            "--model" => o.model = Some(value("--model")?.into()),
            "--inputs" => o.inputs = Some(value("--inputs")?.into()),
            "--outputs" => o.outputs = Some(value("--outputs")?.into()),
            "--prompt" => o.prompt = value("--prompt")?,
            "--runs" => o.runs = number("--runs", value("--runs")?)?,
            "--warmup" => o.warmup = number("--warmup", value("--warmup")?)?,
            "--steps" => o.steps = number("--steps", value("--steps")?)?,
            "--size" => o.size = number("--size", value("--size")?)?,
            "--seed" => o.seed = number("--seed", value("--seed")?)?,
            "--strength" => o.strength = Some(number("--strength", value("--strength")?)?),
            other => return Err(usage(format!("unknown option `{other}`"))),
        }
    }
    if o.runs == 0 {
        return Err(usage("--runs must be at least 1".into()));
    }
    if o.image && o.model.is_none() {
        return Err(usage("--image needs --model DIR or --tiny".into()));
    }
    Ok(o)
}

/// The three networks, from a folder or with random weights.
enum Models {
    Loaded(Box<StableDiffusion>),
    Random {
        clip: Box<ClipTextModel>,
        unet: Box<UNet2DConditionModel>,
        vae: Box<VaeDecoder>,
        vae_encoder: Box<VaeEncoder>,
    },
}

impl Models {
    fn random(device: &Device) -> Result<Self> {
        let weights = Weights::random(0, device);
        let here = Path::new("sd15-random");
        let clip_config = ClipTextConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            ..ClipTextConfig::default()
        };
        let vae_config = VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            ..VaeConfig::default()
        };
        Ok(Models::Random {
            clip: Box::new(ClipTextModel::new(&clip_config, &weights, here)?),
            unet: Box::new(UNet2DConditionModel::new(
                &UNetConfig::default(),
                &weights,
                here,
            )?),
            vae: Box::new(VaeDecoder::new(&vae_config, &weights, here)?),
            vae_encoder: Box::new(VaeEncoder::new(
                &VaeConfig {
                    down_block_types: vec!["DownEncoderBlock2D".into(); 4],
                    ..vae_config
                },
                &weights,
                here,
            )?),
        })
    }

    fn clip(&self) -> &ClipTextModel {
        match self {
            Models::Loaded(sd) => sd.text_encoder(),
            Models::Random { clip, .. } => clip,
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
    ids: Vec<u32>,
    cond: Conditioning,
    latents: Tensor,
    timestep: f32,
    vae_latents: Tensor,
}

impl Inputs {
    /// Seeded inputs shaped for `models`, `latent_size` latents a side (64: 512x512).
    fn generated(models: &Models, latent_size: usize, device: &Device) -> Result<Self> {
        let ids: Vec<u32> = (0..77)
            .map(|i| if i == 0 { 49406 } else { 320 + i })
            .collect();
        let mut rng = TorchRng::new(0);
        let channels = models.unet().config().in_channels;
        let width = models.clip().config().hidden_size;
        let latents = rng.randn_tensor(&[2, channels, latent_size, latent_size], device)?;
        let context = rng.randn_tensor(&[2, 77, width], device)?;
        let vae_channels = models.vae().config().latent_channels;
        let vae_latents = rng.randn_tensor(&[1, vae_channels, latent_size, latent_size], device)?;
        // SDXL's UNet also reads a pooled embedding and the image size (8 pixels a latent).
        let side = (latent_size * 8) as f32;
        let text_time = match models.unet().text_time_pooled_dim() {
            Some(pooled) => Some(TextTime {
                text_embeds: rng.randn_tensor(&[2, pooled], device)?,
                time_ids: vec![vec![side, side, 0.0, 0.0, side, side]; 2],
            }),
            None => None,
        };
        Ok(Inputs {
            ids,
            cond: Conditioning { context, text_time },
            latents,
            timestep: 999.0,
            vae_latents,
        })
    }

    /// The inputs another implementation wrote (see the module docs).
    fn read(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
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
        let (ids, _) = get("ids")?;
        let (timestep, _) = get("timestep")?;
        Ok(Inputs {
            ids: ids.iter().map(|&v| v as u32).collect(),
            cond: Conditioning {
                context: tensor("context")?,
                text_time: None,
            },
            latents: tensor("latents")?,
            timestep: timestep[0],
            vae_latents: tensor("vae_latents")?,
        })
    }
}

/// One stage's result: median seconds, each run's seconds, the last output, and the op
/// profile of the timed runs (empty unless profiling).
struct Timed {
    median: f64,
    runs: Vec<f64>,
    output: Tensor,
    ops: Vec<profile::OpTime>,
}

/// `runs` timed calls after `warmup` untimed ones.
fn time(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<Timed> {
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
        output: last.expect("runs >= 1"),
        ops: profile::take(),
    })
}

fn write_outputs(path: &Path, outputs: &[(&str, &Tensor)]) -> Result<()> {
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
    let params = GenerateParams {
        prompt: o.prompt.clone(),
        negative_prompt: None,
        steps: o.steps,
        guidance_scale: 7.5,
        width: o.size,
        height: o.size,
        seed: o.seed,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: o.strength.map(|strength| InitImage {
            image: std::sync::Arc::new(picture(o.size)),
            mask: None,
            strength,
        }),
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
        "threads": rayon::current_num_threads(),
        "size": o.size,
        "steps": o.steps,
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
                "whole {0}x{0} image, {1} steps{3}, {threads} threads, {2} ({4} UNet evaluations)",
                o.size,
                o.steps,
                dir.display(),
                o.strength
                    .map(|s| format!(", image-to-image at strength {s}"))
                    .unwrap_or_default(),
                result["unet_evaluations"],
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
        Some(dir) => (
            Models::Loaded(Box::new(StableDiffusion::load(dir, &device)?)),
            dir.display().to_string(),
        ),
        None => (Models::random(&device)?, "random f32 weights".to_string()),
    };
    let load_s = t.elapsed().as_secs_f64();
    let peak_after_load = peak_memory_mib();
    let inputs = match &o.inputs {
        Some(path) => Inputs::read(path, &device)?,
        None => Inputs::generated(&models, o.latent_size, &device)?,
    };
    if !o.json {
        println!(
            "SD 1.5 architecture, {source}, CPU backend, {threads} threads; \
             median of {} run(s) after {} warm-up(s)",
            o.runs, o.warmup
        );
    }

    if o.profile {
        profile::set_enabled(true);
    }
    let runs = o.runs as f64;
    let mut stages: Vec<(&str, String, Timed)> = Vec::new();
    let mut report = |key: &'static str, label: String, r: Timed| {
        if !o.json {
            println!(
                "{label:<32} {:>8.2} s   peak memory so far {}",
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

    let clip = models.clip();
    let r = time(o.warmup, o.runs, || clip.forward(&inputs.ids))?;
    report(
        "text_encoder",
        format!("text encoder ({} tokens)", inputs.ids.len()),
        r,
    );

    let unet = models.unet();
    let r = time(o.warmup, o.runs, || {
        unet.forward(&inputs.latents, inputs.timestep, &inputs.cond)
    })?;
    let s = inputs.latents.shape();
    report(
        "unet",
        format!("UNet step, batch {}, {}x{} latents", s[0], s[2], s[3]),
        r,
    );

    if !o.quick {
        let vae = models.vae();
        let r = time(o.warmup, o.runs, || vae.decode(&inputs.vae_latents))?;
        let s = r.output.shape().to_vec();
        report("vae", format!("VAE decode, {}x{}", s[2], s[3]), r);

        let encoder = models.vae_encoder()?;
        let [h, w] = [s[2], s[3]];
        let image = TorchRng::new(1)
            .randn_tensor(&[1, 3, h, w], &device)?
            .clamp(-1.0, 1.0)?;
        let r = time(o.warmup, o.runs, || Ok(encoder.encode(&image)?.mean))?;
        report("vae_encoder", format!("VAE encode, {w}x{h}"), r);
    }

    if let Some(path) = &o.outputs {
        let names: HashMap<&str, &str> = [
            ("text_encoder", "text_embeddings"),
            ("unet", "unet_out"),
            ("vae", "image"),
            ("vae_encoder", "latent_mean"),
        ]
        .into();
        let outs: Vec<(&str, &Tensor)> = stages
            .iter()
            .map(|(key, _, r)| (names[key], &r.output))
            .collect();
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
                    key.to_string(),
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
