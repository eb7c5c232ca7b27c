//! Whole text-to-image runs against diffusers' `StableDiffusionPipeline` images saved by
//! tools/fixtures/make_fixtures.py (`reference/images.json` + `reference/images/*.png`):
//! every scheduler, guidance on and off, negative prompts, several seeds and non-square
//! sizes, for all three fixture models (fast512 at the API's default 512x512). The cases
//! and the pass rule live in common/image_cases.rs, which the GPU bench shares.

use std::collections::HashMap;

use sd_wgpu::pipeline::StableDiffusion;

mod common;
use common::image_cases::{describe, read_cases, run_case};

#[test]
fn images_match_diffusers_for_every_case() {
    let reference = common::reference("");
    let cases = read_cases(&reference).unwrap();
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
