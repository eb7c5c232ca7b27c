//! LoRA beyond the image cases (tests/images.rs runs those): the base model survives
//! LoRA requests that fail or are cancelled bit for bit, a set stays merged while it is
//! asked for again, malformed or mismatched files are refused naming the tensor, and the
//! real binary offers a LoRA folder to /generate, jobs, AUTOMATIC1111 clients (`webuiapi`)
//! and the CLI.

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
use common::programs::{python_script, run};
use common::server::Server;
use serde_json::{json, Value};

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
        prompt_2: None,
        negative_prompt_2: None,
        steps: 4,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        seed: 5,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras,
        prompt_syntax: Default::default(),
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
    // SDXL's second text encoder, and a block the model does not have.
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
                "lora_unet_input_blocks_12_1_proj_in.lora_down.weight",
                &[2, 32],
                0.1,
            ),
            t(
                "lora_unet_input_blocks_12_1_proj_in.lora_up.weight",
                &[32, 2],
                0.1,
            ),
        ],
    );
    let err = run(&p);
    assert!(
        err.contains("1 of its 1 layers name no layer of this model")
            && err.contains("lora_unet_input_blocks_12_1_proj_in.lora_down.weight"),
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

/// A --lora-dir with the sd1 fixtures' kohya file as `ink` and its LoCon file as `film`.
fn lora_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(lora_path("sd1_kohya"), dir.path().join("ink.safetensors")).unwrap();
    std::fs::copy(lora_path("sd1_locon"), dir.path().join("film.safetensors")).unwrap();
    dir
}

fn generate(server: &Server, body: Value) -> Value {
    let r = server.post_json("/generate", &body.to_string());
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()["image"].clone()
}

#[test]
fn the_service_offers_its_lora_folder_to_every_dialect() {
    let dir = lora_dir();
    let server = Server::start(
        &common::model_dir("sd1"),
        &["--lora-dir", dir.path().to_str().unwrap()],
    );
    server.wait_ready();
    assert_eq!(
        server.get("/health").json()["loras"],
        json!(["film", "ink"])
    );

    let body = |prompt: &str, loras: Value| {
        json!({"prompt": prompt, "loras": loras, "seed": 3, "num_inference_steps": 4,
               "width": 64, "height": 64})
    };
    let plain = generate(&server, body("a red door", json!([])));
    let ink = generate(
        &server,
        body("a red door", json!([{"name": "ink", "scale": 0.8}])),
    );
    assert_ne!(ink, plain);
    // The same LoRA named in the prompt (the tag leaves "a red door ", the same tokens).
    assert_eq!(
        generate(&server, body("a red door <lora:ink:0.8>", json!([]))),
        ink
    );
    // The library's image for the same request: what the service merged is the file.
    let sd = StableDiffusion::load(&common::model_dir("sd1"), &Device::Cpu).unwrap();
    let library = sd
        .generate(
            &GenerateParams {
                prompt: "a red door".into(),
                steps: 4,
                width: 64,
                height: 64,
                seed: 3,
                guidance_scale: 7.5,
                ..params(vec![choice("sd1_kohya", 0.8)])
            },
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap()
        .image;
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        ink.as_str().unwrap(),
    )
    .unwrap();
    let served = image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
    assert_eq!(served, library.pixels);
    // Two at once, and back to none: the base image again.
    let both = json!([{"name": "ink", "scale": 0.8}, {"name": "film"}]);
    assert_ne!(generate(&server, body("a red door", both)), ink);
    assert_eq!(generate(&server, body("a red door", json!([]))), plain);

    // Unknown names are 400s naming them and the choices.
    let r = server.post_json(
        "/generate",
        &body("a red door", json!([{"name": "none"}])).to_string(),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.error()
            .contains("`loras`: unknown LoRA `none`; the LoRAs are: film, ink"),
        "{}",
        r.error()
    );
    let r = server.post_json("/jobs", &body("a <lora:../ink>", json!([])).to_string());
    assert_eq!(r.status, 400);
    assert!(
        r.error().contains("`prompt`: unknown LoRA `../ink`"),
        "{}",
        r.error()
    );

    // AUTOMATIC1111's client: the list, a prompt tag, an unknown name.
    let port = server.addr.port().to_string();
    let out = python_script("a1111_webuiapi.py", &[port.as_str(), "lora"], &server.log());
    let names: Vec<&str> = out["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["film", "ink"]);
    assert!(out["loras"][1]["path"]
        .as_str()
        .unwrap()
        .ends_with("ink.safetensors"));
    let direct = generate(
        &server,
        json!({"prompt": "a red door", "loras": [{"name": "ink", "scale": 0.8}], "seed": 7,
               "num_inference_steps": 4, "guidance_scale": 7.0, "width": 64, "height": 64,
               "scheduler": "euler_a"}),
    );
    assert_eq!(out["images"][0], direct);
    assert_eq!(out["unknown"]["status"], 400, "{}", out["unknown"]);
    assert!(out["unknown"]["body"]["error"]
        .as_str()
        .unwrap()
        .contains("unknown LoRA `nothing`"));
}

#[test]
fn the_cli_takes_loras_with_their_weights() {
    let dir = tempfile::tempdir().unwrap();
    let reference = common::reference("");
    let case = &common::image_cases::read_cases(&reference, "lora.json").unwrap()[3];
    // Case 3: two LoRAs (kohya 0.7, PEFT 1.3) on sd1, PNDM.
    assert_eq!(case["loras"].as_array().unwrap().len(), 2, "{case}");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sd-wgpu"));
    command
        .args(["generate", "--backend", "cpu", "--model"])
        .arg(common::model_dir("sd1"));
    for key in ["prompt", "negative_prompt"] {
        command
            .arg(format!("--{}", key.replace('_', "-")))
            .arg(case[key].as_str().unwrap());
    }
    for (flag, key) in [
        ("--steps", "steps"),
        ("--guidance", "guidance"),
        ("--width", "width"),
        ("--height", "height"),
        ("--seed", "seed"),
    ] {
        command.arg(flag).arg(case[key].to_string());
    }
    for lora in case["loras"].as_array().unwrap() {
        let file = common::fixtures().join(lora["file"].as_str().unwrap());
        command
            .arg("--lora")
            .arg(format!("{}:{}", file.display(), lora["scale"]));
    }
    let out = dir.path().join("out.png");
    let output = run(
        command.arg("--output").arg(&out),
        std::time::Duration::from_secs(300),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(reference.join(case["png"].as_str().unwrap()))
        .unwrap()
        .to_rgb8();
    let worst = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert!(
        worst <= Some(common::image_cases::MAX_PIXEL_DIFF),
        "max diff {worst:?}"
    );

    // A file that is not there, and a scale that is not a number, name themselves.
    let output = run(
        std::process::Command::new(env!("CARGO_BIN_EXE_sd-wgpu")).args([
            "generate",
            "--prompt",
            "a",
            "--output",
            "x.png",
            "--lora",
            "/nowhere/x.safetensors:0.5",
        ]),
        std::time::Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("/nowhere/x.safetensors"),
        "{stderr}"
    );
}
