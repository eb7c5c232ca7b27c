//! LoRA beyond the image cases (tests/images.rs runs those): the base model survives
//! LoRA requests that fail or are cancelled bit for bit, a set stays merged while it is
//! asked for again, and malformed or mismatched files are refused naming the tensor.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sd_wgpu::model::lora::{LoraChoice, LoraFile};
use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::Device;
use sd_wgpu::Error;

mod common;

fn lora_path(name: &str) -> PathBuf {
    common::fixtures()
        .join("loras")
        .join(format!("{name}.safetensors"))
}

fn choice(name: &str, scale: f32) -> LoraChoice {
    LoraChoice {
        lora: Arc::new(LoraFile::open(&lora_path(name), name).unwrap()),
        scale,
    }
}

fn params(loras: Vec<LoraChoice>) -> GenerateParams {
    GenerateParams {
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        steps: 4,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        seed: 5,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras,
    }
}

fn image(sd: &StableDiffusion, loras: Vec<LoraChoice>) -> Vec<u8> {
    sd.generate(&params(loras), &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .image
        .pixels
}

#[test]
fn the_base_model_survives_cancelled_and_failed_lora_requests_bit_for_bit() {
    for (device_name, device) in common::devices() {
        let sd = StableDiffusion::load(&common::model_dir("sd1"), &device).unwrap();
        let base = image(&sd, vec![]);

        let kohya = choice("sd1_kohya", 1.0);
        let with_lora = image(&sd, vec![kohya.clone()]);
        assert_ne!(with_lora, base, "{device_name}: the LoRA changed nothing");
        assert_eq!(sd.active_loras(), vec![kohya.clone()]);
        // The same set again: still merged, the same image.
        assert_eq!(image(&sd, vec![kohya.clone()]), with_lora, "{device_name}");

        // Cancelled after the merge, during denoising.
        let other = choice("sd1_locon", 0.5);
        let mut steps = 0;
        let cancelled = sd.generate(&params(vec![other]), &mut |_| {
            steps += 1;
            if steps > 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(matches!(cancelled, Err(Error::Cancelled)), "{device_name}");
        assert_eq!(
            image(&sd, vec![]),
            base,
            "{device_name}: after a cancelled LoRA request"
        );
        assert!(sd.active_loras().is_empty());

        // Failed while merging: the second file is SD 2.x's, whose layers do not fit.
        let wrong = choice("sd2_kohya", 1.0);
        let err = sd
            .generate(&params(vec![kohya.clone(), wrong]), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sd2_kohya") && err.contains("another model"),
            "{err}"
        );
        assert!(
            sd.active_loras().is_empty(),
            "{device_name}: a failed merge left a set active"
        );
        assert_eq!(
            image(&sd, vec![]),
            base,
            "{device_name}: after a failed LoRA request"
        );
        // And the LoRA still gives its image after all that.
        assert_eq!(image(&sd, vec![kohya]), with_lora, "{device_name}");
    }
}

/// A LoRA file of `tensors` (name, shape, values as f32) in a temporary folder.
type Stored = (String, Vec<usize>, Vec<f32>);

fn t(name: impl Into<String>, shape: &[usize], value: f32) -> Stored {
    let n = shape.iter().product();
    (name.into(), shape.to_vec(), vec![value; n])
}

fn write_lora(dir: &Path, file: &str, tensors: &[Stored]) -> PathBuf {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors.iter().zip(&bytes).map(|((name, shape, _), b)| {
        (
            name.to_string(),
            TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
        )
    });
    let path = dir.join(file);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn open_err(path: &Path) -> String {
    match LoraFile::open(path, "test") {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_files_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let down = |name: String| t(name, &[2, 32], 0.1);
    let up = |name: String| t(name, &[32, 2], 0.1);
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

    let p = write_lora(
        dir.path(),
        "half.safetensors",
        &[down(format!("{q}.lora_down.weight"))],
    );
    let err = open_err(&p);
    assert!(
        err.contains(&format!("`{q}.lora_down.weight` has no matching up tensor")),
        "{err}"
    );

    let p = write_lora(
        dir.path(),
        "dora.safetensors",
        &[
            down(format!("{q}.lora_down.weight")),
            up(format!("{q}.lora_up.weight")),
            t(format!("{q}.dora_scale"), &[32], 1.0),
        ],
    );
    let err = open_err(&p);
    assert!(err.contains("dora_scale") && err.contains("DoRA"), "{err}");

    let p = write_lora(
        dir.path(),
        "loha.safetensors",
        &[t(format!("{q}.hada_w1_a"), &[2, 2], 0.0)],
    );
    let err = open_err(&p);
    assert!(
        err.contains("hada_w1_a") && err.contains("LyCORIS"),
        "{err}"
    );

    let p = write_lora(
        dir.path(),
        "flat.safetensors",
        &[
            down(format!("{q}.lora_down.weight")),
            t(format!("{q}.lora_up.weight"), &[64], 0.1),
        ],
    );
    let err = open_err(&p);
    assert!(err.contains("not a low-rank pair"), "{err}");

    // Pickles are never opened.
    let ckpt = dir.path().join("old.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let err = open_err(&ckpt);
    assert!(
        err.contains("only .safetensors") && err.contains("pickle"),
        "{err}"
    );
}

#[test]
fn loras_for_other_models_are_refused_naming_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let sd = StableDiffusion::load(&common::model_dir("sd1"), &Device::Cpu).unwrap();
    let run = |path: &Path| {
        let lora = LoraChoice {
            lora: Arc::new(LoraFile::open(path, "other").unwrap()),
            scale: 1.0,
        };
        sd.generate(&params(vec![lora]), &mut |_| ControlFlow::Continue(()))
            .unwrap_err()
            .to_string()
    };
    // SDXL's layout: a second text encoder, and kohya's sgm UNet names.
    let p = write_lora(
        dir.path(),
        "xl.safetensors",
        &[
            t(
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                &[2, 32],
                0.1,
            ),
            t(
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                &[37, 2],
                0.1,
            ),
        ],
    );
    let err = run(&p);
    assert!(
        err.contains("text_encoder_2") && err.contains("another model family"),
        "{err}"
    );
    let p = write_lora(
        dir.path(),
        "sgm.safetensors",
        &[
            t(
                "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
                &[2, 32],
                0.1,
            ),
            t(
                "lora_unet_input_blocks_4_1_proj_in.lora_up.weight",
                &[32, 2],
                0.1,
            ),
        ],
    );
    let err = run(&p);
    assert!(
        err.contains("1 of its 1 layers name no layer of this model")
            && err.contains("lora_unet_input_blocks_4_1_proj_in.lora_down.weight"),
        "{err}"
    );
    // The right names with the wrong widths.
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let p = write_lora(
        dir.path(),
        "wide.safetensors",
        &[
            t(format!("{q}.lora_down.weight"), &[2, 320], 0.1),
            t(format!("{q}.lora_up.weight"), &[320, 2], 0.1),
        ],
    );
    let err = run(&p);
    assert!(
        err.contains(&format!("`{q}.lora_down.weight` [2, 320]")) && err.contains("[32, 32]"),
        "{err}"
    );
    assert!(sd.active_loras().is_empty());
}
