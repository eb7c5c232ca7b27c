//! SDXL beyond the pipeline's images (tests/images.rs checks those against diffusers): the
//! real `serve` binary on the tiny SDXL fixture with the model's own defaults (its images
//! are the pipeline's), Turbo's defaults by name, and
//! the load-time checks an SDXL folder gets (the refiner, a pooled width that does not fit).

use std::ops::ControlFlow;
use std::path::Path;

use base64::Engine as _;
use serde_json::json;

use sd_wgpu::pipeline::{GenerateParams, RgbImage, StableDiffusion};
use sd_wgpu::tensor::Device;

mod common;
use common::image_cases::{pixel_diff, MAX_PIXEL_DIFF, MEAN_PIXEL_DIFF};
use common::server::Server;

fn load_error(dir: &Path) -> String {
    match StableDiffusion::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The pixels of a base64 PNG from a response.
fn image_of(b64: &serde_json::Value) -> RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().expect("a base64 image"))
        .expect("valid base64");
    let decoded = image::load_from_memory(&bytes).expect("a PNG").to_rgb8();
    RgbImage {
        width: decoded.width() as usize,
        height: decoded.height() as usize,
        pixels: decoded.into_raw(),
    }
}

#[test]
fn an_sdxl_folder_is_served_with_its_own_defaults() {
    // sample_size 32 x VAE factor 2: a 64x64 default, the API's smallest side (the
    // fixture's own 16 gives 32, below it; tests/images.rs checks those sizes against
    // diffusers through the pipeline).
    let (_tmp, dir) = common::copy_fixture("sdxl");
    common::set_json_field(&dir.join("unet/config.json"), "sample_size", json!(32));
    let server = Server::start(&dir, &[]);
    let health = server.wait_ready().get("/health").json();
    assert_eq!(health["model_family"], "SDXL", "{health}");
    assert_eq!(
        health["defaults"],
        json!({"width": 64, "height": 64, "num_inference_steps": 50, "guidance_scale": 5.0}),
        "{health}"
    );
    // No size, guidance or negative prompt: SDXL's defaults, with zero negative embeddings.
    let r = server.post_json(
        "/generate",
        r#"{"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 4}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        (
            &answer["width"],
            &answer["height"],
            &answer["guidance_scale"]
        ),
        (&json!(64), &json!(64), &json!(5.0)),
        "{answer}"
    );
    let sd = StableDiffusion::load(&dir, &Device::Cpu).unwrap();
    let params = GenerateParams {
        prompt: "a lighthouse".into(),
        negative_prompt: None,
        prompt_2: None,
        negative_prompt_2: None,
        steps: 3,
        guidance_scale: 5.0,
        width: 64,
        height: 64,
        seed: 4,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras: Vec::new(),
        prompt_syntax: Default::default(),
    };
    let expected = sd
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .image;
    let got = image_of(&answer["image"]);
    let diff = pixel_diff(&got, &expected);
    assert!(
        diff.max <= MAX_PIXEL_DIFF && diff.mean <= MEAN_PIXEL_DIFF,
        "POST /generate differs from the pipeline: max {} mean {}",
        diff.max,
        diff.mean
    );
    // An empty negative prompt is encoded, not zeroed: another image.
    let r = server.post_json(
        "/generate",
        r#"{"prompt": "a lighthouse", "negative_prompt": "", "num_inference_steps": 3, "seed": 4}"#,
    );
    let other = image_of(&r.json()["image"]);
    assert!(pixel_diff(&other, &expected).max > MAX_PIXEL_DIFF);

    // prompt_2 and negative_prompt_2 reach the second text encoder, as the pipeline's.
    let r = server.post_json(
        "/generate",
        r#"{"prompt": "a lighthouse", "prompt_2": "a watercolour", "negative_prompt": "fog",
            "negative_prompt_2": "blurry", "num_inference_steps": 3, "seed": 4}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let second = GenerateParams {
        prompt_2: Some("a watercolour".into()),
        negative_prompt: Some("fog".into()),
        negative_prompt_2: Some("blurry".into()),
        ..params
    };
    let expected_2 = sd
        .generate(&second, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .image;
    let got_2 = image_of(&r.json()["image"]);
    let diff = pixel_diff(&got_2, &expected_2);
    assert!(
        diff.max <= MAX_PIXEL_DIFF && diff.mean <= MEAN_PIXEL_DIFF,
        "prompt_2: POST /generate differs from the pipeline: max {} mean {}",
        diff.max,
        diff.mean
    );
    assert!(pixel_diff(&got_2, &expected).max > MAX_PIXEL_DIFF);
}

#[test]
fn turbo_models_default_to_one_step_without_guidance_and_flags_override() {
    // The same weights under a Turbo name, as the Hub cache names sdxl-turbo's folder.
    let tmp = tempfile::tempdir().unwrap();
    let turbo = tmp.path().join("models--stabilityai--sdxl-turbo");
    std::os::unix::fs::symlink(common::model_dir("sdxl"), &turbo).unwrap();
    let server = Server::start(&turbo, &[]);
    let health = server.wait_ready().get("/health").json();
    assert_eq!(
        health["defaults"],
        json!({"width": 32, "height": 32, "num_inference_steps": 1, "guidance_scale": 0.0}),
        "{health}"
    );
    let r = server.post_json(
        "/generate",
        r#"{"prompt": "a cat", "seed": 3, "width": 64, "height": 64}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        (
            answer["num_inference_steps"].clone(),
            answer["guidance_scale"].clone()
        ),
        (json!(1), json!(0.0)),
        "{answer}"
    );
    drop(server);

    let server = Server::start(
        &turbo,
        &["--default-steps", "2", "--default-guidance", "1.5"],
    );
    let health = server.wait_ready().get("/health").json();
    assert_eq!(health["defaults"]["num_inference_steps"], 2, "{health}");
    assert_eq!(health["defaults"]["guidance_scale"], 1.5, "{health}");
}

#[test]
fn the_refiner_and_mismatched_sdxl_parts_are_refused_naming_the_cause() {
    let (_tmp, dir) = common::copy_fixture("sdxl");
    common::set_json_field(
        &dir.join("model_index.json"),
        "requires_aesthetics_score",
        json!(true),
    );
    let err = load_error(&dir);
    assert!(
        err.contains("refiner") && err.contains("not supported"),
        "{err}"
    );

    // The UNet's add_embedding reads the pooled width plus 6 time ids' features (72 =
    // 24 + 6 x 8); with 4 features an id it would expect a 48-wide pooled embedding.
    let (_tmp, dir) = common::copy_fixture("sdxl");
    common::set_json_field(
        &dir.join("unet/config.json"),
        "addition_time_embed_dim",
        json!(4),
    );
    let err = load_error(&dir);
    assert!(
        err.contains("unet/config.json") && err.contains("pooled"),
        "{err}"
    );

    // Without its second encoder the folder is a one-encoder model whose UNet wants what
    // it cannot get.
    let (_tmp, dir) = common::copy_fixture("sdxl");
    std::fs::remove_dir_all(dir.join("text_encoder_2")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("72-wide") || err.contains("pooled"), "{err}");
}

/// `--text-encoders-on-cpu` on a GPU: the text encoders' weights stay off the device (its
/// account holds that much less after loading) and the SDXL cases still match diffusers'
/// images, the embeddings going up to the UNet's device.
#[test]
fn text_encoders_on_the_cpu_beside_a_gpu_give_diffusers_images() {
    use common::image_cases::{describe, read_cases, run_case};
    let devices = common::devices();
    let Some((_, Device::Gpu(shared))) = devices.iter().find(|(name, _)| name == "gpu") else {
        return; // common::devices() said loudly why there is no GPU run.
    };
    let reference = common::reference("");
    let cases = read_cases(&reference, "sdxl.json").unwrap();
    let fixture = cases[0]["fixture"].as_str().unwrap();
    let dir = common::fixtures().join("models").join(fixture);
    // Each on a device of its own, so that the account holds this model only.
    let load = |on_cpu: bool| {
        let gpu = sd_wgpu::backend::gpu::GpuDevice::new(Some(&shared.name())).unwrap();
        let options = sd_wgpu::model::source::ModelOptions {
            text_encoders_on_cpu: on_cpu,
            ..Default::default()
        };
        let sd = StableDiffusion::load_with(&dir, &options, &Device::Gpu(gpu.clone())).unwrap();
        let held = gpu.memory().in_use;
        (sd, held)
    };
    let (_, all_on_gpu) = load(false);
    let (sd, held) = load(true);
    assert!(
        held < all_on_gpu,
        "{held} bytes on the GPU with the text encoders on the CPU, {all_on_gpu} without"
    );
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        if case["fixture"].as_str() != Some(fixture) || case["vae"].is_string() {
            continue;
        }
        let name = format!(
            "{} with the text encoders on the CPU",
            describe(index, case)
        );
        if let Err(message) = run_case(&sd, case, &reference, &name) {
            failures.push(message);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
