//! Bad model folders and bad requests give errors that say what is wrong and where, never
//! a panic.

use std::path::Path;

use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::Device;
use sd_wgpu::Error;

mod common;
use common::copy_fixture;

fn load_error(dir: &Path) -> String {
    match StableDiffusion::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error {message:?} does not mention {part:?}"
        );
    }
}

const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";

#[test]
fn missing_folder_and_components_are_named() {
    let msg = load_error(Path::new("/nonexistent/model"));
    assert_mentions(&msg, &["/nonexistent/model", "does not exist"]);

    let (_tmp, dir) = copy_fixture("sd1");
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    assert_mentions(&load_error(&dir), &["model_index.json"]);

    let (_tmp, dir) = copy_fixture("sd1");
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    assert_mentions(&load_error(&dir), &["vae/"]);

    let (_tmp, dir) = copy_fixture("sd1");
    std::fs::remove_file(dir.join(UNET_WEIGHTS)).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["unet", "diffusion_pytorch_model.safetensors"],
    );

    let (_tmp, dir) = copy_fixture("sd1");
    std::fs::remove_file(dir.join("tokenizer/merges.txt")).unwrap();
    assert_mentions(&load_error(&dir), &["merges.txt"]);
}

#[test]
fn truncated_or_corrupt_weights_name_the_file() {
    let (_tmp, dir) = copy_fixture("sd1");
    let path = dir.join(UNET_WEIGHTS);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_error(&dir), &[UNET_WEIGHTS, "safetensors"]);

    std::fs::write(&path, b"definitely not a safetensors file").unwrap();
    assert_mentions(&load_error(&dir), &[UNET_WEIGHTS, "safetensors"]);

    std::fs::write(&path, b"").unwrap();
    assert_mentions(&load_error(&dir), &[UNET_WEIGHTS]);
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let (_tmp, dir) = copy_fixture("sd1");
    let path = dir.join(UNET_WEIGHTS);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "mid_block.attentions.0.proj_in.weight";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != dropped)
        .collect();
    std::fs::write(&path, safetensors::serialize(kept, None).unwrap()).unwrap();
    let msg = load_error(&dir);
    assert_mentions(&msg, &[UNET_WEIGHTS, dropped, "missing"]);
}

#[test]
fn tensor_with_wrong_shape_is_named_with_both_shapes() {
    let (_tmp, dir) = copy_fixture("sd1");
    // A config that disagrees with the weights: the first mismatching tensor is reported.
    let path = dir.join("unet/config.json");
    let mut config = common::read_json(&path);
    let width = config["cross_attention_dim"].as_u64().unwrap();
    config["cross_attention_dim"] = serde_json::json!(width + 16);
    std::fs::write(&path, config.to_string()).unwrap();
    let msg = load_error(&dir);
    assert_mentions(
        &msg,
        &[UNET_WEIGHTS, "attn2.to_k.weight", "has shape", "expected"],
    );
}

#[test]
fn bad_config_json_is_named() {
    let (_tmp, dir) = copy_fixture("sd1");
    std::fs::write(dir.join("vae/config.json"), "{ not json").unwrap();
    assert_mentions(&load_error(&dir), &["vae/config.json"]);

    let (_tmp, dir) = copy_fixture("sd1");
    let path = dir.join("scheduler/scheduler_config.json");
    let mut config = common::read_json(&path);
    config["_class_name"] = serde_json::json!("NoSuchScheduler");
    std::fs::write(&path, config.to_string()).unwrap();
    assert_mentions(&load_error(&dir), &["NoSuchScheduler"]);
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        steps: 2,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        seed: 0,
        scheduler: None,
        scheduler_overrides: Default::default(),
    }
}

#[test]
fn bad_requests_are_rejected_with_the_reason() {
    let sd = StableDiffusion::load(&common::model_dir("sd1"), &Device::Cpu).unwrap();
    let run =
        |p: GenerateParams| match sd.generate(&p, &mut |_| std::ops::ControlFlow::Continue(())) {
            Ok(_) => panic!("{p:?} was accepted"),
            Err(e) => e,
        };
    let factor = sd.vae_scale_factor();
    let e = run(GenerateParams {
        steps: 0,
        ..params()
    });
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_mentions(&e.to_string(), &["steps"]);

    let e = run(GenerateParams {
        width: 32 + factor + 1,
        ..params()
    });
    assert_mentions(&e.to_string(), &["multiple", &factor.to_string()]);

    let e = run(GenerateParams {
        scheduler: Some("warp-drive".into()),
        ..params()
    });
    assert_mentions(&e.to_string(), &["warp-drive"]);

    let e = run(GenerateParams {
        guidance_scale: f64::NAN,
        ..params()
    });
    assert_mentions(&e.to_string(), &["guidance"]);
}

#[test]
fn cancelling_stops_at_the_next_step() {
    let sd = StableDiffusion::load(&common::model_dir("sd1"), &Device::Cpu).unwrap();
    let mut seen = 0;
    let result = sd.generate(&params(), &mut |ev| {
        seen += 1;
        if ev.step == 1 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    });
    assert!(matches!(result, Err(Error::Cancelled)));
    assert_eq!(seen, 2);
}
