//! Whole runs against diffusers' pipelines, on the CPU and on llvmpipe:
//! - text-to-image: `StableDiffusionPipeline` images saved by tools/fixtures/make_fixtures.py
//!   (`reference/images.json` + `reference/images/*.png`): every scheduler, guidance on and
//!   off, negative prompts, several seeds and non-square sizes, for all three fixture models
//!   (fast512 at the API's default 512x512);
//! - image-to-image and inpainting: `StableDiffusionImg2ImgPipeline` and
//!   `StableDiffusionInpaintPipeline` images saved by tools/fixtures/img2img.py
//!   (`reference/img2img.json` + `reference/img2img/`): several strengths including 1,
//!   schedulers with state and randomness, masks of three kinds, the 9-channel inpainting
//!   UNet (sd1_inpaint) and the blended 4-channel one;
//! - SDXL: `StableDiffusionXLPipeline` images saved by tools/fixtures/sdxl.py
//!   (`reference/sdxl.json` + `reference/sdxl/`): zeroed, empty and given negative prompts,
//!   guidance off, non-square sizes, a prompt over 77 tokens, Turbo's trailing Euler
//!   ancestral in one step, DPM-Solver++.
//! - LoRA: `load_lora_weights` + `set_adapters` images saved by tools/fixtures/lora.py
//!   (`reference/lora.json` + `reference/lora/`): kohya files (attention, feed-forward,
//!   text encoder, LoCon convolutions) and PEFT files with diffusers' metadata, alpha !=
//!   rank, two LoRAs at once with their own scales, a negative scale, on sd1 and sd2; on
//!   SDXL kohya's original-UNet names with both text encoders, PEFT, and the two together.
//! - A replacement VAE (`--vae`): the pipeline given another `vae=`, saved by
//!   tools/fixtures/vae.py (`reference/vae.json` + `reference/vae/`): a diffusers VAE folder
//!   with its own scaling factor on SDXL, AUTOMATIC1111-style original-layout files under
//!   the model's VAE config on SDXL and SD 1.x.
//!
//! The cases and the pass rule live in common/image_cases.rs, which the GPU bench shares.

use std::collections::HashMap;

use sd_wgpu::pipeline::StableDiffusion;

mod common;
use common::image_cases::{describe, load_model, model_key, read_cases, run_case};

#[test]
fn images_match_diffusers_for_every_case() {
    all_cases_match("images.json", 23);
}

#[test]
fn image_to_image_and_inpainting_match_diffusers_for_every_case() {
    all_cases_match("img2img.json", 17);
}

#[test]
fn lora_images_match_diffusers_for_every_case() {
    all_cases_match("lora.json", 10);
}

#[test]
fn sdxl_images_match_diffusers_for_every_case() {
    all_cases_match("sdxl.json", 14);
}

#[test]
fn images_with_a_replacement_vae_match_diffusers_for_every_case() {
    all_cases_match("vae.json", 3);
}

/// Runs every case of `file` on every device; at least `min_cases` must be there.
fn all_cases_match(file: &str, min_cases: usize) {
    let reference = common::reference("");
    let cases = read_cases(&reference, file).unwrap();
    assert!(
        cases.len() >= min_cases,
        "only {} cases in {file}",
        cases.len()
    );

    // Each model is loaded once per device and shared by its cases.
    let mut models: HashMap<(String, String), StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    for (device_name, device) in common::devices() {
        for (index, case) in cases.iter().enumerate() {
            let name = format!("{} on {device_name}", describe(index, case));
            let sd = models
                .entry((model_key(case), device_name.clone()))
                .or_insert_with(|| {
                    load_model(case, &common::fixtures(), &device).unwrap_or_else(|e| panic!("{e}"))
                });
            if let Err(message) = run_case(sd, case, &reference, &name) {
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
