//! Each component against diffusers / transformers / torch outputs saved by
//! tools/fixtures/make_fixtures.py: noise, tokenizer ids, text embeddings, UNet, VAE (for
//! the sd1, sd2 and fast512 fixture models), and by tools/fixtures/sdxl.py for SDXL's two
//! text encoders, its prompt embeddings and its `text_time` UNet.

use std::collections::HashMap;

use sd_wgpu::model::clip::HiddenLayer;
use sd_wgpu::model::tokenizer::ClipTokenizer;
use sd_wgpu::model::unet::{Conditioning, TextTime};
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::pipeline::StableDiffusion;
use sd_wgpu::tensor::{Device, Tensor};

mod common;
use common::{assert_close, load_tensors, read_json, reference, RefTensor};

/// Component tensors are compared at 1e-4 of their scale.
const COMPONENT_TOLERANCE: f64 = 1e-4;

#[test]
fn randn_matches_torch_for_every_seed_and_length() {
    let tensors = load_tensors(&reference("randn.safetensors"));
    let mut checked = 0;
    for (key, expected) in &tensors {
        let Some(rest) = key.strip_prefix("seed") else {
            continue;
        };
        let (seed, n) = rest.split_once("_n").expect("keys are seed{S}_n{N}");
        let (seed, n): (u64, usize) = (seed.parse().unwrap(), n.parse().unwrap());
        let got = TorchRng::new(seed).randn(n);
        assert_close(key, &got, &expected.data, 1e-6);
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} randn cases found");

    // One generator, three draws in a row: the state carries over exactly.
    let mut rng = TorchRng::new(42);
    for (i, shape) in [[1, 4, 8, 8], [1, 4, 8, 8], [1, 4, 5, 7]]
        .iter()
        .enumerate()
    {
        let key = format!("seq42_{i}");
        let expected = &tensors[&key];
        let got = rng.randn_tensor(shape, &Device::Cpu).unwrap();
        assert_eq!(got.shape(), expected.shape.as_slice());
        assert_close(&key, &got.to_vec().unwrap(), &expected.data, 1e-6);
    }
}

#[test]
fn tokenizer_ids_match_transformers_for_unicode_prompts() {
    let cases = read_json(&reference("tokenizer.json"));
    let mut tokenizers: HashMap<String, ClipTokenizer> = HashMap::new();
    let cases = cases.as_array().expect("a list of cases");
    assert!(cases.len() >= 50, "only {} tokenizer cases", cases.len());
    for case in cases {
        let fixture = case["fixture"].as_str().unwrap();
        let tokenizer = tokenizers.entry(fixture.to_string()).or_insert_with(|| {
            ClipTokenizer::from_dir(&common::model_dir(fixture).join("tokenizer")).unwrap()
        });
        let prompt = case["prompt"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(prompt).unwrap();
        assert_eq!(got.ids, expected, "{fixture}: ids of {prompt:?}");
        let untruncated = case["untruncated_len"].as_u64().unwrap() as usize;
        assert_eq!(
            got.dropped,
            untruncated.saturating_sub(tokenizer.max_length()),
            "{fixture}: tokens of {prompt:?} cut"
        );
    }
}

fn to_tensor(t: &RefTensor, device: &Device) -> Tensor {
    Tensor::from_vec(t.f32(), &t.shape, device).unwrap()
}

/// The reference tensors of one fixture, and the model folder loaded on each test device
/// (the CPU, and the GPU where there is one) the way the pipeline loads it.
fn load_fixture(name: &str) -> (Vec<(String, StableDiffusion)>, HashMap<String, RefTensor>) {
    let models = common::devices()
        .into_iter()
        .map(|(device_name, device)| {
            let sd = StableDiffusion::load(&common::model_dir(name), &device).unwrap_or_else(|e| {
                panic!("{name}: loading the model folder on {device} failed: {e}")
            });
            (format!("{name} on {device_name}"), sd)
        })
        .collect();
    let tensors = load_tensors(&reference(&format!("{name}_components.safetensors")));
    (models, tensors)
}

/// Prints the largest difference relative to the tensor's scale, then checks it against
/// [`COMPONENT_TOLERANCE`].
fn compare(what: &str, got: &Tensor, expected: &RefTensor) {
    assert_eq!(got.shape(), expected.shape.as_slice(), "{what}: shape");
    let got = got.to_vec().unwrap();
    let scale = expected.data.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&expected.data)
        .fold(0f64, |m, (a, e)| m.max((*a as f64 - e).abs()));
    println!(
        "{what}: max |diff| {worst:.3e}, scale {scale:.3e}, relative {:.3e}",
        worst / scale.max(1e-12)
    );
    assert_close(what, &got, &expected.data, COMPONENT_TOLERANCE);
}

fn check_text_encoder(fixture: &str) {
    let (models, tensors) = load_fixture(fixture);
    let meta = read_json(&reference(&format!("{fixture}_components.json")));
    let prompts = meta["text_encoder"]["prompts"]
        .as_array()
        .expect("a list of prompts");
    assert_eq!(prompts.len(), 3, "{fixture}: expected 3 prompts");
    for (name, sd) in &models {
        for (i, prompt) in prompts.iter().enumerate() {
            let prompt = prompt.as_str().unwrap();
            let expected_ids: Vec<u32> = tensors[&format!("token_ids_{i}")]
                .data
                .iter()
                .map(|&v| v as u32)
                .collect();
            let tokens = sd.tokenizer().encode(prompt).unwrap();
            assert_eq!(
                tokens.ids, expected_ids,
                "{name}: token ids of prompt {i} ({prompt:?})"
            );

            let key = format!("text_embeddings_{i}");
            let expected = &tensors[&key];
            let got = sd.text_encoder().forward(&tokens.ids).unwrap();
            compare(&format!("{name}: {key}"), &got, expected);
            // The pipeline's own path (tokenizer + encoder) gives the same tensor.
            let via_pipeline = sd.encode_prompt(prompt).unwrap();
            assert!(
                via_pipeline.pooled.is_none(),
                "{name}: SD has no pooled embedding"
            );
            compare(
                &format!("{name}: encode_prompt({i})"),
                &via_pipeline.context,
                expected,
            );
        }
    }
}

fn check_unet(fixture: &str) {
    let (models, tensors) = load_fixture(fixture);
    for (name, sd) in &models {
        let device = sd.device();
        let sample = to_tensor(&tensors["unet_sample"], device);
        let cond = Conditioning {
            context: to_tensor(&tensors["unet_encoder_hidden_states"], device),
            text_time: None,
        };
        for (t, key) in [
            (999.0, "unet_output_t999"),
            (500.0, "unet_output_t500"),
            (377.5, "unet_output_t377_5"),
        ] {
            let got = sd.unet().forward(&sample, t, &cond).unwrap();
            compare(&format!("{name}: {key}"), &got, &tensors[key]);
        }
    }
}

fn check_vae(fixture: &str) {
    let (models, tensors) = load_fixture(fixture);
    for (name, sd) in &models {
        let latents = to_tensor(&tensors["vae_latents"], sd.device());
        let got = sd.vae().decode(&latents).unwrap();
        compare(
            &format!("{name}: vae_decoded"),
            &got,
            &tensors["vae_decoded"],
        );
    }
}

#[test]
fn sd1_text_encoder_matches_transformers() {
    check_text_encoder("sd1");
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    check_text_encoder("sd2");
}

#[test]
fn sd1_unet_matches_diffusers() {
    check_unet("sd1");
}

#[test]
fn sd2_unet_matches_diffusers() {
    check_unet("sd2");
}

/// The sd1 UNet with `downsample_padding: 0` in its config (same weights): diffusers'
/// Downsample2D then pads one zero row and column after the input before its stride-2
/// convolution (down levels 12x10 -> 6x5 -> 3x2 on this sample, not 3x3), against
/// reference/sd1_downsample_padding0.safetensors.
#[test]
fn sdxl_text_encoders_and_prompt_embeddings_match_diffusers() {
    let (models, tensors) = load_fixture("sdxl");
    let ids = |key: &str| -> Vec<u32> { tensors[key].data.iter().map(|&v| v as u32).collect() };
    for (name, sd) in &models {
        let parts = sd.prompt_encoder().parts();
        assert_eq!(parts.len(), 2, "{name}: two text encoders");
        for (i, prompt) in ["a photo of a cat", ""].iter().enumerate() {
            for (part, n) in parts.iter().zip(1..) {
                let tokens = part.tokenizer.encode(prompt).unwrap();
                assert_eq!(
                    tokens.ids,
                    ids(&format!("token_ids{n}_{i}")),
                    "{name}: tokenizer {n}"
                );
                let out = part
                    .encoder
                    .encode(&tokens.ids, HiddenLayer::Penultimate)
                    .unwrap();
                let key = format!("hidden{n}_penultimate_{i}");
                compare(&format!("{name}: {key}"), &out.hidden, &tensors[&key]);
                if n == 2 {
                    let key = format!("text_embeds2_{i}");
                    compare(
                        &format!("{name}: {key}"),
                        out.pooled.as_ref().unwrap(),
                        &tensors[&key],
                    );
                }
            }
            let embeddings = sd.encode_prompt(prompt).unwrap();
            let key = format!("prompt_embeds_{i}");
            compare(
                &format!("{name}: {key}"),
                &embeddings.context,
                &tensors[&key],
            );
            let key = format!("pooled_prompt_embeds_{i}");
            let pooled = embeddings
                .pooled
                .as_ref()
                .expect("SDXL has a pooled embedding");
            compare(&format!("{name}: {key}"), pooled, &tensors[&key]);
        }
    }
}

#[test]
fn sdxl_unet_with_text_time_conditioning_matches_diffusers() {
    let (models, tensors) = load_fixture("sdxl");
    for (name, sd) in &models {
        let device = sd.device();
        let sample = to_tensor(&tensors["unet_sample"], device);
        let ids = &tensors["unet_time_ids"];
        let row = ids.shape[1];
        let cond = Conditioning {
            context: to_tensor(&tensors["unet_encoder_hidden_states"], device),
            text_time: Some(TextTime {
                text_embeds: to_tensor(&tensors["unet_text_embeds"], device),
                time_ids: ids.f32().chunks(row).map(<[f32]>::to_vec).collect(),
            }),
        };
        let got = sd.unet().forward(&sample, 500.0, &cond).unwrap();
        compare(
            &format!("{name}: unet_output_t500"),
            &got,
            &tensors["unet_output_t500"],
        );
        // Without the pooled embedding and the time ids, an SDXL UNet says what it lacks.
        let bare = Conditioning {
            context: cond.context.clone(),
            text_time: None,
        };
        let err = sd.unet().forward(&sample, 500.0, &bare).unwrap_err();
        assert!(err.to_string().contains("text_time"), "{err}");
    }
}

#[test]
fn sd1_unet_with_downsample_padding_0_matches_diffusers() {
    let (_tmp, dir) = common::copy_fixture("sd1");
    let config_path = dir.join("unet/config.json");
    let mut config = read_json(&config_path);
    assert_eq!(config["downsample_padding"], 1, "sd1's own config");
    config["downsample_padding"] = 0.into();
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let inputs = load_tensors(&reference("sd1_components.safetensors"));
    let expected = load_tensors(&reference("sd1_downsample_padding0.safetensors"));
    for (device_name, device) in common::devices() {
        let sd = StableDiffusion::load(&dir, &device).unwrap_or_else(|e| {
            panic!("sd1 with downsample_padding 0: loading on {device} failed: {e}")
        });
        let sample = to_tensor(&inputs["unet_sample"], &device);
        let cond = Conditioning {
            context: to_tensor(&inputs["unet_encoder_hidden_states"], &device),
            text_time: None,
        };
        let got = sd.unet().forward(&sample, 500.0, &cond).unwrap();
        compare(
            &format!("sd1 (downsample_padding 0) on {device_name}: unet_output_t500"),
            &got,
            &expected["unet_output_t500"],
        );
    }
}

#[test]
fn sd1_vae_decoder_matches_diffusers() {
    check_vae("sd1");
}

#[test]
fn sd2_vae_decoder_matches_diffusers() {
    check_vae("sd2");
}

#[test]
fn fast512_text_encoder_matches_transformers() {
    check_text_encoder("fast512");
}

#[test]
fn fast512_unet_matches_diffusers() {
    check_unet("fast512");
}

#[test]
fn fast512_vae_decoder_matches_diffusers() {
    check_vae("fast512");
}

/// sd2 ships only fp16 files: on a GPU that reads f16 its matrices and kernels stay f16
/// (half the device memory), its vectors are widened; elsewhere everything is f32. Prints
/// the device bytes of its weights both ways.
#[test]
fn sd2_weights_stay_f16_on_a_gpu_that_reads_f16() {
    use sd_wgpu::model::weights::Weights;
    use sd_wgpu::tensor::DType;
    for (device_name, device) in common::devices() {
        let keeps = matches!(&device, Device::Gpu(g) if g.keeps_f16());
        let (mut as_f32, mut held, mut f16_tensors) = (0usize, 0usize, 0usize);
        for part in [
            "text_encoder/model",
            "unet/diffusion_pytorch_model",
            "vae/diffusion_pytorch_model",
        ] {
            let path = common::model_dir("sd2").join(format!("{part}.fp16.safetensors"));
            let bytes = std::fs::read(&path).unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let weights = Weights::open(&path, &device).unwrap();
            for (name, view) in file.tensors() {
                assert_eq!(view.dtype(), safetensors::Dtype::F16, "{part}: {name}");
                let t = weights.get(&name, view.shape()).unwrap();
                let want = if device == Device::Cpu || (keeps && t.rank() >= 2) {
                    DType::F16
                } else {
                    DType::F32
                };
                assert_eq!(
                    t.dtype(),
                    want,
                    "{device_name}: {part}: {name} {:?}",
                    t.shape()
                );
                as_f32 += t.numel() * 4;
                held += t.numel() * if t.dtype() == DType::F16 { 2 } else { 4 };
                f16_tensors += (t.dtype() == DType::F16) as usize;
            }
        }
        println!(
            "sd2 on {device_name} (keeps f16: {keeps}): {held} bytes of weights \
             ({f16_tensors} tensors in f16), {as_f32} bytes all in f32"
        );
        if keeps {
            assert!(held * 10 < as_f32 * 6, "{held} of {as_f32} bytes");
        }
        // The UNet's first convolution, looked up the way the model does.
        let unet = Weights::open(
            &common::model_dir("sd2").join("unet/diffusion_pytorch_model.fp16.safetensors"),
            &device,
        )
        .unwrap();
        let w = unet.pp("conv_in").get("weight", &[32, 4, 3, 3]).unwrap();
        println!("sd2 unet conv_in.weight on {device_name}: {:?}", w.dtype());
        if keeps {
            assert_eq!(w.dtype(), DType::F16);
        }
    }
}

/// The VAE encoder (image-to-image's first stage) against `vae.encode(image).latent_dist`
/// of tools/fixtures/vae_encoder.py: mean, std and a seeded sample, for each fixture model
/// at a non-square size, on each test device.
#[test]
fn vae_encoder_matches_diffusers() {
    use sd_wgpu::model::source::ModelSource;
    use sd_wgpu::model::vae_encoder::VaeEncoder;
    let tensors = load_tensors(&reference("vae_encoder.safetensors"));
    let cases = read_json(&reference("vae_encoder.json"));
    let cases = cases["cases"].as_array().expect("a list of cases");
    assert_eq!(cases.len(), 3);
    for (device_name, device) in common::devices() {
        for case in cases {
            let model = case["model"].as_str().unwrap();
            let source = ModelSource::open(&common::model_dir(model), None, &device).unwrap();
            let vae = source.vae().unwrap();
            let encoder = VaeEncoder::new(&vae.config, &vae.weights, &vae.config_path).unwrap();
            let image = to_tensor(&tensors[&format!("{model}_image")], &device);
            // Whole, and in row bands under a buffer limit that needs three or more.
            let dims = [1, 3, image.dim(2), image.dim(3)];
            let small = (1..)
                .map(|kib| kib << 10)
                .find(|&limit| encoder.bands_needed(dims, Some(limit)).is_ok())
                .unwrap();
            let bands = encoder.bands_needed(dims, Some(small)).unwrap();
            assert!(bands >= 3, "{model}: {bands} bands at the smallest limit");
            for limit in [None, Some(small)] {
                let dist = encoder.encode_within(&image, limit).unwrap();
                let what =
                    |part: &str| format!("{device_name}: {model} (buffer limit {limit:?}): {part}");
                compare(
                    &what("mean"),
                    &dist.mean,
                    &tensors[&format!("{model}_mean")],
                );
                compare(
                    &what("std"),
                    &dist.std().unwrap(),
                    &tensors[&format!("{model}_std")],
                );
                let seed = case["seed"].as_u64().unwrap();
                let noise = TorchRng::new(seed)
                    .randn_tensor(dist.mean.shape(), &device)
                    .unwrap();
                let sample = dist.sample_with(&noise).unwrap();
                compare(
                    &what("sample"),
                    &sample,
                    &tensors[&format!("{model}_sample")],
                );
            }
        }
    }
}
