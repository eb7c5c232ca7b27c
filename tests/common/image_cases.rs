//! The whole-image cases of `reference/images.json` (written by
//! tools/fixtures/make_fixtures.py with diffusers' `StableDiffusionPipeline`) and
//! `reference/img2img.json` (tools/fixtures/img2img.py: `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline`) and `reference/lora.json` (tools/fixtures/lora.py:
//! `load_lora_weights` + `set_adapters`), `reference/sdxl.json` (tools/fixtures/sdxl.py) and
//! `reference/vae.json` (tools/fixtures/vae.py: a pipeline given another `vae=`), and the
//! rule an image must meet to match diffusers'.
//! Shared by tests/images.rs, tests/img2img.rs and the GPU bench (`sd15_gpu --images`),
//! which runs them on a real GPU outside the tests.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_wgpu::model::lora::{LoraChoice, LoraFile};
use sd_wgpu::pipeline::{GenerateParams, InitImage, MaskImage, RgbImage, StableDiffusion};

/// The case files under `reference/`: text-to-image, image-to-image and inpainting, LoRA,
/// SDXL, replacement VAEs.
pub const CASE_FILES: [&str; 5] = [
    "images.json",
    "img2img.json",
    "lora.json",
    "sdxl.json",
    "vae.json",
];

/// No pixel channel may differ from diffusers' by more than this many levels of 255.
pub const MAX_PIXEL_DIFF: u8 = 3;
/// The mean absolute difference over all channels of an image must stay within this.
pub const MEAN_PIXEL_DIFF: f64 = 0.5;

/// The cases of `<reference>/<file>`.
pub fn read_cases(reference: &Path, file: &str) -> Result<Vec<serde_json::Value>, String> {
    let path = reference.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cases: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    cases
        .as_array()
        .cloned()
        .ok_or_else(|| format!("{}: not a list of cases", path.display()))
}

/// Which model a case runs on: its fixture, and the replacement VAE if it names one.
pub fn model_key(case: &serde_json::Value) -> String {
    let fixture = case["fixture"].as_str().unwrap_or("?");
    match case["vae"].as_str() {
        Some(vae) => format!("{fixture} with --vae {vae}"),
        None => fixture.to_string(),
    }
}

/// Loads the model of [`model_key`]: the fixture folder under `<fixtures>/models`, with
/// the case's `vae` (a folder or file under `fixtures`) in place of its own.
pub fn load_model(
    case: &serde_json::Value,
    fixtures: &Path,
    device: &sd_wgpu::tensor::Device,
) -> Result<StableDiffusion, String> {
    let fixture = case["fixture"].as_str().ok_or("case has no fixture")?;
    let options = sd_wgpu::model::source::ModelOptions {
        config: None,
        vae: case["vae"].as_str().map(|vae| fixtures.join(vae)),
        ..Default::default()
    };
    StableDiffusion::load_with(&fixtures.join("models").join(fixture), &options, device)
        .map_err(|e| format!("{}: loading on {device} failed: {e}", model_key(case)))
}

/// The pipeline arguments of one case, as the fixture generator passed them (its init
/// image and mask are files under `reference`).
pub fn params(case: &serde_json::Value, reference: &Path) -> Result<GenerateParams, String> {
    let read = |field: &str| -> Result<Option<Vec<u8>>, String> {
        let Some(file) = case[field].as_str() else {
            return Ok(None);
        };
        let path = reference.join(file);
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let init = match read("init_image")? {
        None => None,
        Some(bytes) => Some(InitImage {
            image: Arc::new(RgbImage::decode(&bytes, usize::MAX).map_err(|e| e.to_string())?),
            mask: match read("mask_image")? {
                Some(bytes) => Some(Arc::new(
                    MaskImage::decode(&bytes, usize::MAX).map_err(|e| e.to_string())?,
                )),
                None => None,
            },
            strength: case["strength"].as_f64().ok_or("case has no strength")?,
        }),
    };
    let int = |name: &str| {
        case[name]
            .as_u64()
            .ok_or_else(|| format!("case field {name} is not an integer: {case}"))
    };
    Ok(GenerateParams {
        prompt: case["prompt"]
            .as_str()
            .ok_or("case has no prompt")?
            .to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        prompt_2: case["prompt_2"].as_str().map(str::to_string),
        negative_prompt_2: case["negative_prompt_2"].as_str().map(str::to_string),
        steps: int("steps")? as usize,
        guidance_scale: case["guidance"].as_f64().ok_or("case has no guidance")?,
        width: int("width")? as usize,
        height: int("height")? as usize,
        seed: int("seed")?,
        scheduler: case["scheduler"].as_str().map(str::to_string),
        scheduler_overrides: case["scheduler_overrides"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
        init,
        loras: loras(case, reference)?,
        prompt_syntax: Default::default(),
    })
}

/// The case's LoRA files (`loras: [{file, scale}]`, files under the fixtures folder, the
/// reference folder's parent), each read afresh.
fn loras(case: &serde_json::Value, reference: &Path) -> Result<Vec<LoraChoice>, String> {
    let Some(list) = case["loras"].as_array() else {
        return Ok(Vec::new());
    };
    let fixtures = reference.parent().unwrap_or(reference);
    list.iter()
        .map(|entry| {
            let file = entry["file"].as_str().ok_or("a LoRA entry has no file")?;
            let scale = entry["scale"].as_f64().ok_or("a LoRA entry has no scale")?;
            let lora = LoraFile::open(&fixtures.join(file), file).map_err(|e| e.to_string())?;
            Ok(LoraChoice {
                lora: Arc::new(lora),
                scale: scale as f32,
            })
        })
        .collect()
}

/// A short name for the log: `07 sd1 DPMSolverMultistepScheduler {...} 32x32 seed 7`
/// (with the pipeline and strength for image-to-image and inpainting).
pub fn describe(index: usize, case: &serde_json::Value) -> String {
    let scheduler = case["scheduler"].as_str().unwrap_or("default");
    let overrides = match case["scheduler_overrides"].as_object() {
        Some(o) if !o.is_empty() => format!(" {}", serde_json::Value::Object(o.clone())),
        _ => String::new(),
    };
    let pipeline = match case["pipeline"].as_str() {
        Some(p) => format!(" {p} strength {}", case["strength"]),
        None => String::new(),
    };
    format!(
        "{index:02}{pipeline} {} {scheduler}{overrides} {}x{} steps {} guidance {} seed {}",
        case["fixture"].as_str().unwrap_or("?"),
        case["width"],
        case["height"],
        case["steps"],
        case["guidance"],
        case["seed"],
    )
}

/// How far one generated image is from diffusers'.
pub struct PixelDiff {
    pub max: u8,
    pub mean: f64,
    /// The index of the largest difference in the pixel values.
    pub at: usize,
}

/// diffusers' image of a case.
pub fn case_png(case: &serde_json::Value, reference: &Path) -> Result<PathBuf, String> {
    Ok(reference.join(case["png"].as_str().ok_or("case has no png")?))
}

/// Generates one case's image, checking that every denoising step ran.
pub fn generate_case(
    sd: &StableDiffusion,
    case: &serde_json::Value,
    reference: &Path,
    name: &str,
) -> Result<RgbImage, String> {
    let p = params(case, reference).map_err(|e| format!("{name}: {e}"))?;
    let mut last_event = None;
    let generated = sd
        .generate(&p, &mut |event| {
            last_event = Some((event.step, event.total));
            ControlFlow::Continue(())
        })
        .map_err(|e| format!("{name}: generate failed: {e}"))?;

    // The pipeline runs the UNet once per entry of the scheduler's timesteps, and its last
    // event says all of them are done.
    if let Some(timesteps) = case["timesteps"].as_array() {
        let (done, total) = last_event.unwrap_or_default();
        if (done, total) != (timesteps.len(), timesteps.len()) {
            return Err(format!(
                "{name}: {done} of {total} denoising steps done, diffusers ran {}",
                timesteps.len()
            ));
        }
    }

    Ok(generated.image)
}

/// Runs one case and compares its image with the PNG under `reference`; `Err` says why it
/// does not match (or could not run). `Ok` carries the difference, within the limits.
pub fn run_case(
    sd: &StableDiffusion,
    case: &serde_json::Value,
    reference: &Path,
    name: &str,
) -> Result<PixelDiff, String> {
    let image = generate_case(sd, case, reference, name)?;
    let (diff, expected) = diff_with_png(&image, &case_png(case, reference)?, name)?;
    println!("{name}: max diff {}, mean diff {:.4}", diff.max, diff.mean);
    if diff.max > MAX_PIXEL_DIFF || diff.mean > MEAN_PIXEL_DIFF {
        let at = diff.at;
        let (pixel, channel) = (at / 3, at % 3);
        return Err(format!(
            "{name}: max diff {} (limit {MAX_PIXEL_DIFF}) at pixel ({}, {}) channel {channel}: got {}, expected {}; mean diff {:.4} (limit {MEAN_PIXEL_DIFF})",
            diff.max,
            pixel % image.width,
            pixel / image.width,
            image.pixels[at],
            expected.pixels[at],
            diff.mean,
        ));
    }
    Ok(diff)
}

/// How far `image` is from diffusers' PNG at `png`, and that PNG.
pub fn diff_with_png(
    image: &RgbImage,
    png: &Path,
    name: &str,
) -> Result<(PixelDiff, RgbImage), String> {
    let expected = image::open(png)
        .map_err(|e| format!("{}: {e}", png.display()))?
        .to_rgb8();
    if (image.width, image.height) != (expected.width() as usize, expected.height() as usize) {
        return Err(format!(
            "{name}: image is {}x{}, expected {}x{}",
            image.width,
            image.height,
            expected.width(),
            expected.height()
        ));
    }
    let expected = RgbImage {
        width: expected.width() as usize,
        height: expected.height() as usize,
        pixels: expected.into_raw(),
    };
    Ok((pixel_diff(image, &expected), expected))
}

/// The largest and mean channel difference of two images of the same size (`max` 255
/// when the sizes differ), and where the largest is.
pub fn pixel_diff(a: &RgbImage, b: &RgbImage) -> PixelDiff {
    if (a.width, a.height, a.pixels.len()) != (b.width, b.height, b.pixels.len()) {
        return PixelDiff {
            max: u8::MAX,
            mean: f64::INFINITY,
            at: 0,
        };
    }
    let (mut max, mut at, mut sum) = (0u8, 0, 0u64);
    for (i, (x, y)) in a.pixels.iter().zip(&b.pixels).enumerate() {
        let d = x.abs_diff(*y);
        sum += d as u64;
        if d > max {
            max = d;
            at = i;
        }
    }
    PixelDiff {
        max,
        mean: sum as f64 / a.pixels.len().max(1) as f64,
        at,
    }
}
