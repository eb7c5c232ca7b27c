//! Whole text-to-image runs against diffusers' `StableDiffusionPipeline` images saved by
//! tools/fixtures/make_fixtures.py (`reference/images.json` + `reference/images/*.png`):
//! every scheduler, guidance on and off, negative prompts, several seeds and non-square
//! sizes, for all three fixture models (fast512 at the API's default 512x512).

use std::collections::HashMap;
use std::ops::ControlFlow;

use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};

mod common;
use common::{read_json, reference};

/// No pixel channel may differ from diffusers' by more than this many levels of 255.
const MAX_PIXEL_DIFF: u8 = 3;
/// The mean absolute difference over all channels of an image must stay within this.
const MEAN_PIXEL_DIFF: f64 = 0.5;

/// The pipeline arguments of one `images.json` case, as the fixture generator passed them.
fn params(case: &serde_json::Value) -> GenerateParams {
    let usize_field = |name: &str| {
        case[name]
            .as_u64()
            .unwrap_or_else(|| panic!("case field {name} is not an integer: {case}"))
            as usize
    };
    GenerateParams {
        prompt: case["prompt"].as_str().expect("prompt").to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        steps: usize_field("steps"),
        guidance_scale: case["guidance"].as_f64().expect("guidance"),
        width: usize_field("width"),
        height: usize_field("height"),
        seed: case["seed"].as_u64().expect("seed"),
        scheduler: case["scheduler"].as_str().map(str::to_string),
        scheduler_overrides: case["scheduler_overrides"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
    }
}

/// A short name for the log: `07 sd1 DPMSolverMultistepScheduler {...} 32x32 seed 7`.
fn describe(index: usize, case: &serde_json::Value) -> String {
    let scheduler = case["scheduler"].as_str().unwrap_or("default");
    let overrides = match case["scheduler_overrides"].as_object() {
        Some(o) if !o.is_empty() => format!(" {}", serde_json::Value::Object(o.clone())),
        _ => String::new(),
    };
    format!(
        "{index:02} {} {scheduler}{overrides} {}x{} steps {} guidance {} seed {}",
        case["fixture"].as_str().unwrap_or("?"),
        case["width"],
        case["height"],
        case["steps"],
        case["guidance"],
        case["seed"],
    )
}

/// Runs one case; `Err` describes why it does not match (or could not run).
fn run_case(sd: &StableDiffusion, case: &serde_json::Value, name: &str) -> Result<(), String> {
    let p = params(case);
    let mut evaluations = 0;
    let generated = sd
        .generate(&p, &mut |_| {
            evaluations += 1;
            ControlFlow::Continue(())
        })
        .map_err(|e| format!("{name}: generate failed: {e}"))?;

    // The pipeline runs the UNet once per entry of the scheduler's timesteps.
    if let Some(timesteps) = case["timesteps"].as_array() {
        if evaluations != timesteps.len() {
            return Err(format!(
                "{name}: {evaluations} denoising steps, diffusers ran {}",
                timesteps.len()
            ));
        }
    }

    let png = reference(case["png"].as_str().expect("png"));
    let expected = image::open(&png)
        .unwrap_or_else(|e| panic!("{}: {e}", png.display()))
        .to_rgb8();
    let image = &generated.image;
    if (image.width, image.height) != (expected.width() as usize, expected.height() as usize) {
        return Err(format!(
            "{name}: image is {}x{}, expected {}x{}",
            image.width,
            image.height,
            expected.width(),
            expected.height()
        ));
    }
    let expected = expected.as_raw();
    assert_eq!(
        image.pixels.len(),
        expected.len(),
        "{name}: pixel buffer size"
    );
    let (mut max, mut at, mut sum) = (0u8, 0, 0u64);
    for (i, (a, e)) in image.pixels.iter().zip(expected).enumerate() {
        let d = a.abs_diff(*e);
        sum += d as u64;
        if d > max {
            max = d;
            at = i;
        }
    }
    let mean = sum as f64 / expected.len() as f64;
    println!("{name}: max diff {max}, mean diff {mean:.4}");
    if max > MAX_PIXEL_DIFF || mean > MEAN_PIXEL_DIFF {
        let (pixel, channel) = (at / 3, at % 3);
        return Err(format!(
            "{name}: max diff {max} (limit {MAX_PIXEL_DIFF}) at pixel ({}, {}) channel {channel}: got {}, expected {}; mean diff {mean:.4} (limit {MEAN_PIXEL_DIFF})",
            pixel % image.width,
            pixel / image.width,
            image.pixels[at],
            expected[at],
        ));
    }
    Ok(())
}

#[test]
fn images_match_diffusers_for_every_case() {
    let cases = read_json(&reference("images.json"));
    let cases = cases.as_array().expect("a list of cases");
    assert!(cases.len() >= 23, "only {} image cases", cases.len());

    // Each fixture model is loaded once per device and shared by its cases.
    let mut models: HashMap<(String, String), StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    for (device_name, device) in common::devices() {
        for (index, case) in cases.iter().enumerate() {
            let name = format!("{} on {device_name}", describe(index, case));
            let fixture = case["fixture"].as_str().expect("fixture");
            let sd = models
                .entry((fixture.to_string(), device_name.clone()))
                .or_insert_with(|| {
                    StableDiffusion::load(&common::model_dir(fixture), &device).unwrap_or_else(
                        |e| panic!("{fixture}: loading the model folder on {device} failed: {e}"),
                    )
                });
            if let Err(message) = run_case(sd, case, &name) {
                println!("FAILED {message}");
                failures.push(message);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} image cases differ from diffusers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
