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

/// One config field set to `value` in a copy of the sd1 fixture: the load fails and
/// the error names the file and each of `mentions` (the field first).
fn assert_bad_config(file: &str, field: &str, value: serde_json::Value, mentions: &[&str]) {
    let (_tmp, dir) = copy_fixture("sd1");
    common::set_json_field(&dir.join(file), field, value.clone());
    let msg = load_error(&dir);
    assert_mentions(&msg, &[file, field]);
    assert_mentions(&msg, mentions);
    assert!(!msg.contains("panicked"), "{field} = {value}: {msg}");
}

const UNET_CONFIG: &str = "unet/config.json";
const VAE_CONFIG: &str = "vae/config.json";
const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
const TEXT_ENCODER_CONFIG: &str = "text_encoder/config.json";

#[test]
fn unusable_config_values_are_named_with_their_file_and_field() {
    use serde_json::json;
    // Sizes that build no network, or one that cannot compute.
    assert_bad_config(UNET_CONFIG, "norm_num_groups", json!(0), &["at least 1"]);
    assert_bad_config(
        UNET_CONFIG,
        "norm_num_groups",
        json!(12),
        &["block_out_channels"],
    );
    assert_bad_config(UNET_CONFIG, "layers_per_block", json!(0), &[]);
    assert_bad_config(UNET_CONFIG, "in_channels", json!(0), &[]);
    assert_bad_config(UNET_CONFIG, "attention_head_dim", json!(3), &["heads"]);
    assert_bad_config(
        UNET_CONFIG,
        "block_out_channels",
        json!([32, 64]),
        &["down_block_types", "has 2"],
    );
    assert_bad_config(UNET_CONFIG, "norm_eps", json!(-1.0), &[]);
    assert_bad_config(VAE_CONFIG, "norm_num_groups", json!(0), &[]);
    assert_bad_config(VAE_CONFIG, "scaling_factor", json!(0), &["> 0"]);
    assert_bad_config(
        VAE_CONFIG,
        "up_block_types",
        json!([]),
        &["block_out_channels"],
    );
    assert_bad_config(TEXT_ENCODER_CONFIG, "num_attention_heads", json!(0), &[]);
    assert_bad_config(
        TEXT_ENCODER_CONFIG,
        "hidden_size",
        json!(33),
        &["num_attention_heads"],
    );
    // A schedule whose alphas leave (0, 1): NaN sigmas, black images.
    assert_bad_config(SCHEDULER_CONFIG, "beta_end", json!(2.0), &["beta_start"]);
    assert_bad_config(SCHEDULER_CONFIG, "beta_start", json!(0.0), &["beta_end"]);
    assert_bad_config(SCHEDULER_CONFIG, "beta_start", json!(0.1), &["beta_end"]);
    assert_bad_config(SCHEDULER_CONFIG, "num_train_timesteps", json!(0), &[]);
    assert_bad_config(SCHEDULER_CONFIG, "trained_betas", json!([0.5, 1.5]), &[]);
    // Prompts are padded to the tokenizer's length, which the encoder must have positions for.
    let (_tmp, dir) = copy_fixture("sd1");
    common::set_json_field(
        &dir.join("tokenizer/tokenizer_config.json"),
        "model_max_length",
        json!(100),
    );
    assert_mentions(
        &load_error(&dir),
        &[
            TEXT_ENCODER_CONFIG,
            "max_position_embeddings",
            "tokenizer/",
            "model_max_length",
        ],
    );
}

#[test]
fn model_config_folders_of_single_files_are_validated_the_same_way() {
    let (_tmp, config) = copy_fixture("sd1");
    common::set_json_field(
        &config.join(VAE_CONFIG),
        "scaling_factor",
        serde_json::json!(-0.5),
    );
    let single = common::model_dir("sd1_single.safetensors");
    let msg =
        match StableDiffusion::load_with(&single, &common::config_options(&config), &Device::Cpu) {
            Ok(_) => panic!("a --model-config with scaling_factor -0.5 loaded"),
            Err(e) => e.to_string(),
        };
    assert_mentions(
        &msg,
        &[
            &config.join(VAE_CONFIG).display().to_string(),
            "scaling_factor",
        ],
    );
}

#[test]
fn broken_model_index_is_named() {
    for text in ["{ not json", "[1, 2]", "{}", r#"{"_class_name": 3}"#] {
        let (_tmp, dir) = copy_fixture("sd1");
        std::fs::write(dir.join("model_index.json"), text).unwrap();
        assert_mentions(&load_error(&dir), &["model_index.json", "invalid config"]);
    }
}

#[test]
fn broken_tokenizer_files_name_the_file_that_is_wrong() {
    let broken = |file: &str, text: &str| {
        let (_tmp, dir) = copy_fixture("sd1");
        std::fs::write(dir.join("tokenizer").join(file), text).unwrap();
        load_error(&dir)
    };
    let msg = broken("merges.txt", "");
    assert_mentions(&msg, &["tokenizer/merges.txt", "no merges"]);
    let msg = broken("merges.txt", "#version: 0.2\n");
    assert_mentions(&msg, &["tokenizer/merges.txt", "no merges"]);
    for garbage in ["this is not a merges file\n", "zq xj\n", "\u{0}\u{1}\u{2}"] {
        let msg = broken("merges.txt", garbage);
        assert_mentions(&msg, &["tokenizer/merges.txt"]);
        assert!(!msg.contains("vocab.json:"), "{garbage:?}: {msg}");
    }
    for garbage in ["{ not json", "[1, 2]", r#"{"a": "b"}"#] {
        let msg = broken("vocab.json", garbage);
        assert_mentions(&msg, &["tokenizer/vocab.json"]);
        assert!(!msg.contains("merges.txt"), "{garbage:?}: {msg}");
    }
}

/// A copy of the sd1 fixture with one tensor all NaN: it loads, and generating fails
/// with an error that says so instead of returning a black image.
#[test]
fn nan_weights_fail_the_generation_on_every_device() {
    for (file, tensor, stage) in [
        (UNET_WEIGHTS, "conv_out.weight", "denoised latents"),
        (
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_out.weight",
            "decoded image",
        ),
    ] {
        let (_tmp, dir) = copy_fixture("sd1");
        common::poison_tensor(&dir.join(file), tensor);
        for (name, device) in common::devices() {
            let sd = StableDiffusion::load(&dir, &device)
                .unwrap_or_else(|e| panic!("{name}: NaN weights should load: {e}"));
            match sd.generate(&params(), &mut |_| std::ops::ControlFlow::Continue(())) {
                Ok(_) => panic!("{name}: {tensor} all NaN gave an image"),
                Err(e) => assert_mentions(&e.to_string(), &[stage, "NaN"]),
            }
        }
    }
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        prompt_2: None,
        negative_prompt_2: None,
        steps: 2,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        seed: 0,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras: Vec::new(),
        prompt_syntax: Default::default(),
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
