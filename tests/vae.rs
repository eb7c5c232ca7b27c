//! `--vae`: a VAE in place of the model's. Its images against diffusers are in
//! tests/images.rs (`reference/vae.json`); here, that every form of the same weights gives
//! the same image, that the CLI and the service take it and say so, and that what is not a
//! VAE fails naming the file.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use sd_wgpu::model::source::ModelOptions;
use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::Device;

mod common;
use common::server::Server;

fn vae(rel: &str) -> PathBuf {
    common::fixtures().join("vaes").join(rel)
}

fn load(model: &str, vae: Option<&Path>) -> sd_wgpu::Result<StableDiffusion> {
    let options = ModelOptions {
        config: None,
        vae: vae.map(Path::to_path_buf),
        ..Default::default()
    };
    StableDiffusion::load_with(&common::model_dir(model), &options, &Device::Cpu)
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a lighthouse in a storm".into(),
        steps: 2,
        guidance_scale: 5.0,
        width: 32,
        height: 32,
        seed: 11,
        ..Default::default()
    }
}

fn pixels(sd: &StableDiffusion) -> Vec<u8> {
    sd.generate(&params(), &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .image
        .pixels
}

fn load_err(model: &str, vae: &Path) -> String {
    match load(model, Some(vae)) {
        Ok(_) => panic!("--vae {} was accepted", vae.display()),
        Err(e) => e.to_string(),
    }
}

/// A safetensors file of f32 tensors (name, shape), every value `value`.
fn write_file(path: &Path, tensors: &[(&str, &[usize])], value: f32) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            std::iter::repeat_n(value.to_le_bytes(), n)
                .flatten()
                .collect()
        })
        .collect();
    let views = tensors.iter().zip(&bytes).map(|((name, shape), b)| {
        (
            name.to_string(),
            TensorView::new(Dtype::F32, shape.to_vec(), b).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn every_form_of_one_vae_gives_the_same_image() {
    // The folder's weights file on its own (diffusers' names, read under the model's
    // config), the same weights in the original layout, bare and under a checkpoint's
    // prefix: one image, bit for bit.
    let original = pixels(&load("sdxl", Some(&vae("sdxl_alt.safetensors"))).unwrap());
    let named = pixels(
        &load(
            "sdxl",
            Some(&vae("sdxl_alt/diffusion_pytorch_model.safetensors")),
        )
        .unwrap(),
    );
    assert!(named == original, "diffusers' names vs the original layout");
    let tmp = tempfile::tempdir().unwrap();
    let prefixed = tmp.path().join("prefixed.safetensors");
    let bytes = std::fs::read(vae("sdxl_alt.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("first_stage_model.{name}"), view))
        .collect::<Vec<_>>();
    safetensors::serialize_to_file(file, None, &prefixed).unwrap();
    let under_prefix = pixels(&load("sdxl", Some(&prefixed)).unwrap());
    assert!(under_prefix == original, "under first_stage_model.");

    // The folder brings its own config (scaling factor 0.1, not the model's 0.13025): a
    // different image from the same weights.
    let folder = load("sdxl", Some(&vae("sdxl_alt"))).unwrap();
    assert!(pixels(&folder) != original, "the folder's config is read");
    let info = folder.info().vae.clone().unwrap();
    assert!(info.contains("sdxl_alt (its own config)"), "{info}");

    // A pipeline folder lends its vae/: the model's own VAE, the model's own image.
    let own = pixels(&load("sdxl", None).unwrap());
    let lent = load("sdxl", Some(&common::model_dir("sdxl"))).unwrap();
    assert!(pixels(&lent) == own, "a pipeline folder's vae/");
}

#[test]
fn what_is_not_a_vae_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let e = load_err("sd1", &missing);
    assert!(e.contains("no such file or folder"), "{e}");

    // A folder without config.json.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = load_err("sd1", &empty);
    assert!(e.contains("config.json") && e.contains("empty"), "{e}");

    // A folder with a config but only a pickle.
    let pickled = tmp.path().join("pickled");
    std::fs::create_dir(&pickled).unwrap();
    std::fs::copy(vae("sdxl_alt/config.json"), pickled.join("config.json")).unwrap();
    std::fs::write(pickled.join("diffusion_pytorch_model.bin"), b"PK\x03\x04").unwrap();
    let e = load_err("sd1", &pickled);
    assert!(e.contains("pickles"), "{e}");

    // A pickle file, by name.
    let ckpt = tmp.path().join("vae.pt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let e = load_err("sd1", &ckpt);
    assert!(e.contains("pickle") && e.contains("vae.pt"), "{e}");

    // A safetensors file of something else (a LoRA) names what it found.
    let lora = common::fixtures().join("loras/sd1_kohya.safetensors");
    let e = load_err("sd1", &lora);
    assert!(
        e.contains("not a VAE") && e.contains("sd1_kohya.safetensors") && e.contains("lora_"),
        "{e}"
    );

    // An original-layout VAE of another architecture: the tensor that does not fit.
    let small = tmp.path().join("small.safetensors");
    write_file(
        &small,
        &[("decoder.up.0.block.0.conv1.weight", &[8, 8, 3, 3])],
        0.0,
    );
    let e = load_err("sd1", &small);
    assert!(e.contains("small.safetensors"), "{e}");
}

#[test]
fn the_cli_and_the_service_take_a_vae() {
    // `generate --vae` gives the library's image.
    let expected = load("sd1", Some(&vae("sd1_alt.safetensors"))).unwrap();
    let want = pixels(&expected);
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("out.png");
    let p = params();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sd-wgpu"))
        .args(["generate", "--backend", "cpu", "--model"])
        .arg(common::model_dir("sd1"))
        .arg("--vae")
        .arg(vae("sd1_alt.safetensors"))
        .args(["--prompt", &p.prompt, "--steps", "2", "--guidance", "5"])
        .args(["--width", "32", "--height", "32", "--seed", "11", "-o"])
        .arg(&png)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success());
    let got = image::open(&png).unwrap().to_rgb8().into_raw();
    assert!(got == want, "the CLI's --vae image");

    // `serve --vae`: /health says which VAE.
    let server = Server::start(
        &common::model_dir("sd1"),
        &["--vae", vae("sd1_alt.safetensors").to_str().unwrap()],
    );
    let health = server.wait_ready().get("/health").json();
    let named = health["model_info"]["vae"].as_str().unwrap_or_default();
    assert!(
        named.contains("sd1_alt.safetensors (under the model's VAE config)"),
        "{health}"
    );
}
