//! `--model path/to/checkpoint.safetensors`: single-file checkpoints in the original Stable
//! Diffusion layout (tests/fixtures/models/{sd1,sd2,sdxl}_single.safetensors, written by
//! tools/fixtures/single_file.py and checked there with diffusers' own `from_single_file`)
//! give the same images as the diffusers folders they came from, on every device; bad files
//! fail with errors that name the file and the tensor.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};
use sd_wgpu::model::source::ModelSource;
use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::{DType, Device};

mod common;

fn single(name: &str) -> PathBuf {
    common::fixtures()
        .join("models")
        .join(format!("{name}_single.safetensors"))
}

/// A copy of a fixture folder without its weight files: configs, scheduler and tokenizer
/// only, as `--model-config` takes them.
fn config_only(name: &str) -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = common::copy_fixture(name);
    for c in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        if !dir.join(c).is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(dir.join(c)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    (tmp, dir)
}

/// The fixture folder at the precision its single file stores, for bit-for-bit comparisons:
/// sd1 (float32) and sd2 (float16) as they are; the float32 sdxl folder rewritten in float16,
/// rounded to nearest even as tools/fixtures/single_file.py rounded the sdxl single file
/// (which float32 would make 33 MB).
fn folder_as_stored(name: &str) -> (Option<tempfile::TempDir>, PathBuf) {
    if name != "sdxl" {
        return (None, common::model_dir(name));
    }
    let (tmp, dir) = common::copy_fixture(name);
    for c in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        for entry in std::fs::read_dir(dir.join(c)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let tensors: Vec<_> = st
                .tensors()
                .into_iter()
                .map(|(n, v)| {
                    assert_eq!(v.dtype(), Dtype::F32, "{} {n}", path.display());
                    let halves: Vec<u8> = v
                        .data()
                        .chunks_exact(4)
                        .flat_map(|b| {
                            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                            half::f16::from_f32(x).to_le_bytes()
                        })
                        .collect();
                    (n, Dtype::F16, v.shape().to_vec(), halves)
                })
                .collect();
            write_safetensors(&path, &tensors);
        }
    }
    (Some(tmp), dir)
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a single file".into(),
        negative_prompt: None,
        prompt_2: None,
        negative_prompt_2: None,
        steps: 3,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        seed: 7,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras: Vec::new(),
        prompt_syntax: Default::default(),
    }
}

fn pixels(sd: &StableDiffusion) -> Vec<u8> {
    sd.generate(&params(), &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .image
        .pixels
}

fn family(name: &str) -> &'static str {
    match name {
        "sd1" => "SD 1.x",
        "sd2" => "SD 2.x",
        _ => "SDXL",
    }
}

#[test]
fn single_file_gives_the_folders_images_on_every_device() {
    for (device_name, device) in common::devices() {
        for name in ["sd1", "sd2", "sdxl"] {
            let (_tmp, config) = config_only(name);
            let (_stored_tmp, stored) = folder_as_stored(name);
            let folder = StableDiffusion::load(&stored, &device).unwrap();
            let file = StableDiffusion::load_with(
                &single(name),
                &common::config_options(&config),
                &device,
            )
            .unwrap_or_else(|e| panic!("{name} single file on {device_name}: {e}"));
            assert_eq!(file.info().format, "single_file");
            assert_eq!(folder.info().format, "diffusers_folder");
            assert_eq!(file.info().family, Some(family(name)));
            assert!(file.info().tokenizer.contains("--model-config"));
            assert_eq!(
                file.info().tokenizer_2.as_deref(),
                (name == "sdxl").then_some("sdxl/tokenizer_2 (--model-config)")
            );
            let (a, b) = (pixels(&folder), pixels(&file));
            assert_eq!(
                a, b,
                "{name} on {device_name}: the single file's image differs from the folder's"
            );
        }
    }
}

#[test]
fn weights_keep_their_stored_precision() {
    let (_tmp, config) = config_only("sd2");
    let source = ModelSource::open(&single("sd2"), Some(&config), &Device::Cpu).unwrap();
    // Read through the mapping, the f16 checkpoint's tensors stay f16, fused q/k/v included.
    let unet = source.unet().unwrap().weights;
    assert_eq!(
        unet.get("conv_in.weight", &[32, 4, 3, 3]).unwrap().dtype(),
        DType::F16
    );
    let text = source.text_encoder().unwrap().weights;
    let k = text
        .get(
            "text_model.encoder.layers.1.self_attn.k_proj.weight",
            &[32, 32],
        )
        .unwrap();
    assert_eq!(k.dtype(), DType::F16);
    let folder = sd_wgpu::model::weights::Weights::open(
        &common::model_dir("sd2").join("text_encoder/model.fp16.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want = folder
        .get("encoder.layers.1.self_attn.k_proj.weight", &[32, 32])
        .unwrap();
    assert_eq!(k.to_vec().unwrap(), want.to_vec().unwrap());
}

/// Every tensor of the SDXL folder, read by its diffusers name through the single file's
/// mapping (prefixes, fused q/k/v, `label_emb`, the transposed `text_projection`), is the
/// folder's in float16, bit for bit.
#[test]
fn sdxl_single_file_holds_every_folder_tensor() {
    let (_tmp, config) = config_only("sdxl");
    let (_stored_tmp, stored) = folder_as_stored("sdxl");
    let source = ModelSource::open(&single("sdxl"), Some(&config), &Device::Cpu).unwrap();
    let (text_2, _) = source.text_encoder_2().unwrap().unwrap();
    let components = [
        (
            "unet/diffusion_pytorch_model",
            source.unet().unwrap().weights,
        ),
        ("vae/diffusion_pytorch_model", source.vae().unwrap().weights),
        ("text_encoder/model", source.text_encoder().unwrap().weights),
        ("text_encoder_2/model", text_2.weights),
    ];
    for (file, mapped) in components {
        let folder = sd_wgpu::model::weights::Weights::open(
            &stored.join(format!("{file}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let names = folder.file_names();
        assert!(names.len() > 40, "{file}: {} tensors", names.len());
        for name in names {
            let shape = folder.file_shape(name).unwrap();
            let want = folder.get(name, shape).unwrap().to_vec().unwrap();
            // transformers 5 saves CLIPTextModel without `text_model.`; the mapping
            // answers the names diffusers' conversion gives (with it).
            let asked = if file == "text_encoder/model" {
                format!("text_model.{name}")
            } else {
                name.to_string()
            };
            let got = mapped
                .get(&asked, shape)
                .unwrap_or_else(|e| panic!("{file} {name}: {e}"));
            assert_eq!(got.dtype(), DType::F16, "{file} {name}");
            assert_eq!(got.to_vec().unwrap(), want, "{file} {name}");
        }
    }
}

#[test]
fn sdxl_tokenizers_default_to_the_built_in_ones() {
    // Configs without tokenizers: the preset's built-in BPE files with SDXL's special tokens
    // (the fixture's tokenizer pads with the end token, tokenizer_2 with `!`, as SDXL's).
    let (_tmp, config) = config_only("sdxl");
    std::fs::remove_dir_all(config.join("tokenizer")).unwrap();
    std::fs::remove_dir_all(config.join("tokenizer_2")).unwrap();
    let file = StableDiffusion::load_with(
        &single("sdxl"),
        &common::config_options(&config),
        &Device::Cpu,
    )
    .unwrap();
    let info = file.info();
    assert!(info.tokenizer.contains("built-in"), "{info:?}");
    assert_eq!(
        info.tokenizer_2.as_deref(),
        Some("built-in CLIP BPE files with sdxl-base-1.0's tokenizer_2 special tokens")
    );
    let (_stored_tmp, stored) = folder_as_stored("sdxl");
    let folder = StableDiffusion::load(&stored, &Device::Cpu).unwrap();
    assert_eq!(pixels(&folder), pixels(&file));
}

/// Runs `sd-wgpu generate --backend cpu` with the given model arguments.
fn generate(model_args: &[&std::ffi::OsStr]) -> (Output, Option<Vec<u8>>) {
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("out.png");
    let output = Command::new(env!("CARGO_BIN_EXE_sd-wgpu"))
        .args(["generate", "--backend", "cpu"])
        .args(model_args)
        .args(["--prompt", "a single file", "--steps", "2", "--width", "32"])
        .args(["--height", "32", "--seed", "3", "-o"])
        .arg(&png)
        .env_remove("SD_MODEL")
        .env_remove("SD_MODEL_CONFIG")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let bytes = std::fs::read(&png).ok();
    (output, bytes)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn failure(model_args: &[&std::ffi::OsStr]) -> String {
    let (output, _) = generate(model_args);
    let err = stderr(&output);
    assert!(
        !output.status.success(),
        "succeeded although broken:\n{err}"
    );
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    err
}

fn os(s: &(impl AsRef<std::ffi::OsStr> + ?Sized)) -> &std::ffi::OsStr {
    s.as_ref()
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} does not mention {part:?}"
        );
    }
}

#[test]
fn cli_single_file_with_model_config_matches_the_folder() {
    for name in ["sd1", "sd2", "sdxl"] {
        let (_tmp, config) = config_only(name);
        let (_stored_tmp, folder) = folder_as_stored(name);
        let (a, png_a) = generate(&[os("--model"), os(&folder)]);
        assert!(a.status.success(), "{}", stderr(&a));
        let file = single(name);
        let (b, png_b) = generate(&[os("--model"), os(&file), os("--model-config"), os(&config)]);
        let log = stderr(&b);
        assert!(b.status.success(), "{log}");
        assert_eq!(png_a, png_b, "{name}: the PNGs differ");
        assert_mentions(
            &log,
            &["single-file checkpoint", family(name), "--model-config"],
        );
    }
}

#[test]
fn family_is_recognised_and_presets_check_the_shapes() {
    // Without --model-config the tiny checkpoints meet the real presets' widths: the
    // error names the file, the original tensor and the preset's shape.
    let cases = [
        (
            "sd1",
            "SD 1.x",
            "built-in preset sd1.5",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "[49408, 768]",
        ),
        (
            "sd2",
            "SD 2.x",
            "built-in preset sd2.1",
            "cond_stage_model.model.token_embedding.weight",
            "[49408, 1024]",
        ),
        (
            "sdxl",
            "SDXL",
            "built-in preset sdxl-base-1.0",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "[49408, 768]",
        ),
    ];
    for (name, family, preset, tensor, shape) in cases {
        let file = single(name);
        let err = failure(&[os("--model"), os(&file)]);
        assert_mentions(
            &err,
            &[
                family,
                preset,
                "built-in CLIP BPE",
                &file.display().to_string(),
                tensor,
                shape,
            ],
        );
    }
    // SD 2.x defaults to 2.1 (768, v_prediction) like diffusers, and says how to choose.
    let err = failure(&[os("--model"), os(&single("sd2"))]);
    assert_mentions(&err, &["--model-config sd2.1-base"]);
    let err = failure(&[
        os("--model"),
        os(&single("sd2")),
        os("--model-config"),
        os("sd2.1-base"),
    ]);
    assert_mentions(&err, &["built-in preset sd2.1-base"]);
    // Where the checkpoint has the probe bias (full-size SD 2.x UNets do), its spread picks
    // v_prediction (2.1) or epsilon (2.x-base, SD-Turbo), as ComfyUI tells them apart.
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(single("sd2")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (spread, preset) in [
        (0.2f32, "v_prediction: SD 2.1 768x768"),
        (0.01, "epsilon: SD 2.1-base 512x512"),
    ] {
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        let probe: Vec<u8> = (0..320)
            .flat_map(|i| (if i % 2 == 0 { spread } else { -spread }).to_le_bytes())
            .collect();
        tensors.push((
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias".into(),
            Dtype::F32,
            vec![320],
            probe,
        ));
        let path = tmp.path().join(format!("probe_{spread}.safetensors"));
        write_safetensors(&path, &tensors);
        assert_mentions(&failure(&[os("--model"), os(&path)]), &[preset]);
    }
    let err = failure(&[
        os("--model"),
        os(&single("sd1")),
        os("--model-config"),
        os("/nonexistent/config"),
    ]);
    assert_mentions(
        &err,
        &[
            "/nonexistent/config",
            "sd1.5, sd2.1-base, sd2.1, sdxl-base-1.0, sdxl-turbo",
        ],
    );

    // SDXL: SDXL-Turbo's preset when the file name says so, else the base's; the second
    // tokenizer is the preset's built-in one.
    let err = failure(&[os("--model"), os(&single("sdxl"))]);
    assert_mentions(
        &err,
        &[
            "CLIP and OpenCLIP text encoders",
            "tokenizer_2: built-in CLIP BPE files with sdxl-base-1.0's tokenizer_2 special tokens",
            "which picks sdxl-turbo",
        ],
    );
    let turbo = tmp.path().join("sd_xl_turbo_1.0.safetensors");
    std::fs::copy(single("sdxl"), &turbo).unwrap();
    assert_mentions(
        &failure(&[os("--model"), os(&turbo)]),
        &[
            "preset sdxl-turbo",
            "because the file name contains \"turbo\"",
            "built-in preset sdxl-turbo (stabilityai/sdxl-turbo",
        ],
    );
    // The configs must be for as many text encoders as the file has.
    let err = failure(&[
        os("--model"),
        os(&single("sdxl")),
        os("--model-config"),
        os("sd1.5"),
    ]);
    assert_mentions(
        &err,
        &[
            "an SDXL checkpoint (two text encoders)",
            "built-in preset sd1.5",
            "sdxl-base-1.0, sdxl-turbo",
        ],
    );
    let (_cfg_tmp, sdxl_config) = config_only("sdxl");
    let err = failure(&[
        os("--model"),
        os(&single("sd1")),
        os("--model-config"),
        os(&sdxl_config),
    ]);
    assert_mentions(
        &err,
        &[
            "an SD 1.x checkpoint (one text encoder)",
            "configs for SDXL",
            "sd1.5, sd2.1-base, sd2.1",
        ],
    );
}

#[test]
fn a_tokenizer_folder_beside_the_checkpoint_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    std::fs::copy(single("sd1"), &file).unwrap();
    let (_cfg_tmp, config) = config_only("sd1");
    // Configs from a folder that has no tokenizer/: the one beside the file is taken.
    std::fs::rename(config.join("tokenizer"), tmp.path().join("tokenizer")).unwrap();
    let (out, png) = generate(&[os("--model"), os(&file), os("--model-config"), os(&config)]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(png.is_some());
    assert_mentions(&log, &["tokenizer: tokenizer/ beside the checkpoint"]);
    // A broken one is reported, not skipped.
    std::fs::remove_file(tmp.path().join("tokenizer/merges.txt")).unwrap();
    let err = failure(&[os("--model"), os(&file), os("--model-config"), os(&config)]);
    assert_mentions(&err, &["merges.txt"]);
}

#[test]
fn pickles_are_refused_with_how_to_convert() {
    let tmp = tempfile::tempdir().unwrap();
    for ext in ["ckpt", "pt", "pth", "bin"] {
        let path = tmp.path().join(format!("v1-5-pruned-emaonly.{ext}"));
        std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
        let err = failure(&[os("--model"), os(&path)]);
        assert_mentions(
            &err,
            &[
                &path.display().to_string(),
                "pickle",
                "arbitrary code",
                "weights_only=True",
                "save_file",
                "from_single_file",
            ],
        );
    }
    // A pickle under a .safetensors name is recognised too.
    let path = tmp.path().join("renamed.safetensors");
    std::fs::write(&path, b"PK\x03\x04 a torch zip").unwrap();
    assert_mentions(&failure(&[os("--model"), os(&path)]), &["pickle"]);
}

/// Writes a safetensors file of the given tensors (name, dtype, shape, bytes).
fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The sd1 single file's tensors, changed by `edit` (which may drop one by returning None).
fn edited_sd1(
    path: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    edited("sd1", path, edit)
}

/// A single file's tensors, changed by `edit` (which may drop one by returning None).
fn edited(
    name: &str,
    path: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(single(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            let dtype = v.dtype();
            edit(&n, v.shape().to_vec(), v.data().to_vec()).map(|(n, s, b)| (n, dtype, s, b))
        })
        .collect();
    write_safetensors(path, &tensors);
}

#[test]
fn bad_files_name_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (_cfg_tmp, config) = config_only("sd1");
    let with_config =
        |path: &Path| failure(&[os("--model"), os(path), os("--model-config"), os(&config)]);

    // Truncated.
    let path = tmp.path().join("truncated.safetensors");
    let bytes = std::fs::read(single("sd1")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &with_config(&path),
        &[&path.display().to_string(), "not a valid safetensors file"],
    );

    // Corrupt header.
    let path = tmp.path().join("corrupt.safetensors");
    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"not json");
    std::fs::write(&path, &corrupt).unwrap();
    assert_mentions(&with_config(&path), &[&path.display().to_string()]);

    // Unrelated names: an unknown layout.
    let path = tmp.path().join("unrelated.safetensors");
    write_safetensors(
        &path,
        &[
            (
                "encoder.layer.0.weight".into(),
                Dtype::F32,
                vec![2],
                vec![0; 8],
            ),
            ("lm_head.weight".into(), Dtype::F32, vec![2], vec![0; 8]),
        ],
    );
    assert_mentions(
        &with_config(&path),
        &[
            &path.display().to_string(),
            "no UNet",
            "model.diffusion_model.",
            "2 tensors",
        ],
    );

    // A wrong shape: the original tensor and diffusers' name for it.
    let target = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    let path = tmp.path().join("wrong_shape.safetensors");
    edited_sd1(&path, |n, s, b| {
        if n == target {
            let half = s[0] / 2;
            let row = b.len() / s[0];
            Some((
                n.into(),
                vec![half, s[1], s[2], s[3]],
                b[..half * row].to_vec(),
            ))
        } else {
            Some((n.into(), s, b))
        }
    });
    assert_mentions(
        &with_config(&path),
        &[
            &path.display().to_string(),
            target,
            "down_blocks.0.attentions.0.proj_in.weight",
            "[16, 32, 1, 1]",
            "expected [32, 32, 1, 1]",
        ],
    );

    // A missing tensor.
    let target = "model.diffusion_model.output_blocks.2.1.conv.bias";
    let path = tmp.path().join("missing.safetensors");
    edited_sd1(&path, |n, s, b| (n != target).then(|| (n.into(), s, b)));
    assert_mentions(
        &with_config(&path),
        &[
            &path.display().to_string(),
            target,
            "is missing",
            "up_blocks.0.upsamplers.0.conv.bias",
        ],
    );

    // An unexpected dtype.
    let target = "first_stage_model.decoder.conv_out.bias";
    let path = tmp.path().join("dtype.safetensors");
    let bytes = std::fs::read(single("sd1")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let dtype = if n == target { Dtype::I32 } else { v.dtype() };
            (n, dtype, v.shape().to_vec(), v.data().to_vec())
        })
        .collect();
    write_safetensors(&path, &tensors);
    assert_mentions(
        &with_config(&path),
        &[&path.display().to_string(), target, "I32"],
    );

    // A missing component.
    let path = tmp.path().join("no_vae.safetensors");
    edited_sd1(&path, |n, s, b| {
        (!n.starts_with("first_stage_model.")).then(|| (n.into(), s, b))
    });
    assert_mentions(
        &with_config(&path),
        &[&path.display().to_string(), "no VAE"],
    );
    let path = tmp.path().join("no_text_encoder.safetensors");
    edited_sd1(&path, |n, s, b| {
        (!n.starts_with("cond_stage_model.")).then(|| (n.into(), s, b))
    });
    assert_mentions(
        &with_config(&path),
        &[&path.display().to_string(), "no text encoder"],
    );

    // SDXL's refiner: OpenCLIP ViT-bigG alone, at conditioner.embedders.0.model.
    let path = tmp.path().join("refiner.safetensors");
    edited("sd2", &path, |n, s, b| {
        Some((
            n.replace("cond_stage_model.", "conditioner.embedders.0."),
            s,
            b,
        ))
    });
    assert_mentions(
        &with_config(&path),
        &[
            &path.display().to_string(),
            "the SDXL refiner is not supported yet",
            "conditioner.embedders.0.model.*",
        ],
    );
    // SDXL-style names without SDXL's OpenCLIP encoder, or without its CLIP one.
    let path = tmp.path().join("sdxl_clip_only.safetensors");
    edited_sd1(&path, |n, s, b| {
        Some((
            n.replace("cond_stage_model.", "conditioner.embedders.0."),
            s,
            b,
        ))
    });
    assert_mentions(
        &with_config(&path),
        &[
            &path.display().to_string(),
            "without SDXL's OpenCLIP ViT-bigG",
        ],
    );
    let path = tmp.path().join("sdxl_no_clip.safetensors");
    edited("sdxl", &path, |n, s, b| {
        (!n.starts_with("conditioner.embedders.0.")).then(|| (n.into(), s, b))
    });
    assert_mentions(
        &with_config(&path),
        &[
            &path.display().to_string(),
            "not its first text encoder, CLIP ViT-L (`conditioner.embedders.0.transformer.*`)",
        ],
    );
    // Without the projection there is no pooled embedding: named in both layouts.
    let (_xl_tmp, xl_config) = config_only("sdxl");
    let target = "conditioner.embedders.1.model.text_projection";
    let path = tmp.path().join("sdxl_no_projection.safetensors");
    edited("sdxl", &path, |n, s, b| {
        (n != target).then(|| (n.into(), s, b))
    });
    assert_mentions(
        &failure(&[
            os("--model"),
            os(&path),
            os("--model-config"),
            os(&xl_config),
        ]),
        &[
            &path.display().to_string(),
            target,
            "has no",
            "text_projection.weight",
        ],
    );
    let path = tmp.path().join("inpainting.safetensors");
    let target = "model.diffusion_model.input_blocks.0.0.weight";
    edited_sd1(&path, |n, s, b| {
        if n == target {
            let more = vec![0u8; s[0] * 9 * s[2] * s[3] * 4];
            Some((n.into(), vec![s[0], 9, s[2], s[3]], more))
        } else {
            Some((n.into(), s, b))
        }
    });
    // An inpainting checkpoint (9 input channels) is told by its UNet's first convolution,
    // whatever the config says: it needs a mask, and inpaints with one.
    assert_mentions(
        &with_config(&path),
        &["this is an inpainting model (its UNet takes 9 input channels)"],
    );
    let (init, mask) = (tmp.path().join("init.png"), tmp.path().join("mask.png"));
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90]))
        .save(&init)
        .unwrap();
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 0 } else { 255 }]))
        .save(&mask)
        .unwrap();
    let (output, png) = generate(&[
        os("--model"),
        os(&path),
        os("--model-config"),
        os(&config),
        os("--init-image"),
        os(&init),
        os("--mask-image"),
        os(&mask),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(png.is_some());
    assert_mentions(
        &stderr(&output),
        &["takes 9 input channels (an inpainting model)"],
    );

    // A diffusers component file is not a single-file checkpoint.
    let unet = common::model_dir("sd1").join("unet/diffusion_pytorch_model.safetensors");
    assert_mentions(
        &failure(&[os("--model"), os(&unet)]),
        &["diffusers", "model_index.json"],
    );

    // --model-config is for single files only.
    assert_mentions(
        &failure(&[
            os("--model"),
            os(&common::model_dir("sd1")),
            os("--model-config"),
            os(&config),
        ]),
        &["only applies to single-file checkpoints"],
    );
}

#[test]
fn health_says_it_is_a_single_file() {
    let (_tmp, config) = config_only("sd1");
    let server = common::server::Server::start(
        &single("sd1"),
        &["--model-config", config.to_str().unwrap()],
    );
    server.wait_ready();
    let health = server.get("/health").json();
    assert_eq!(health["model_info"]["format"], "single_file", "{health}");
    assert_eq!(health["model_info"]["family"], "SD 1.x", "{health}");
}
