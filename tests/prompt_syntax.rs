//! AUTOMATIC1111's prompt syntax end to end (the parser and chunker have their tables in
//! src/model/prompt_syntax.rs): chunks and embeddings match A1111's code ported into
//! tools/fixtures/prompt_syntax.py, emphasis is A1111's arithmetic on the plain embeddings,
//! long prompts are their chunks' embeddings side by side, an unweighted short prompt is
//! exactly diffusers' encoding, and the service reads it where asked (and always on the
//! A1111 routes).

use std::ops::ControlFlow;

use serde_json::{json, Value};

use sd_wgpu::model::prompt_syntax::{chunks, PromptSyntax};
use sd_wgpu::pipeline::{GenerateParams, StableDiffusion};
use sd_wgpu::tensor::Device;

mod common;
use common::server::Server;

fn load(fixture: &str) -> StableDiffusion {
    StableDiffusion::load(&common::model_dir(fixture), &Device::Cpu).unwrap()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{what}: off by {worst}");
}

#[test]
fn emphasis_and_chunks_are_a1111s_arithmetic_on_the_plain_embeddings() {
    for fixture in ["sd1", "sd2", "sdxl"] {
        let sd = load(fixture);
        let encoder = sd.prompt_encoder();

        // No emphasis, under 75 tokens: diffusers' embeddings, bit for bit.
        let plain = encoder.encode("a photo of a cat, on a mat").unwrap();
        let a1111 = encoder
            .encode_with("a photo of a cat, on a mat", None, PromptSyntax::A1111)
            .unwrap();
        assert_eq!(
            a1111.context.to_vec().unwrap(),
            plain.context.to_vec().unwrap(),
            "{fixture}"
        );

        // `(cat:1.5)`: the plain states, the cat's row times 1.5, all scaled back to the
        // plain mean.
        let weighted = encoder
            .encode_with(
                "a photo of a (cat:1.5), on a mat",
                None,
                PromptSyntax::A1111,
            )
            .unwrap();
        let z = plain.context.to_vec().unwrap();
        let width = plain.context.dim(2);
        let tokenizer = &encoder.parts()[0].tokenizer;
        let cat = tokenizer.tokens("cat").unwrap()[0];
        let row = tokenizer
            .encode("a photo of a cat, on a mat")
            .unwrap()
            .ids
            .iter()
            .position(|&t| t == cat)
            .unwrap();
        let mut want = z.clone();
        // SDXL: the two encoders' states side by side, each weighted and rescaled alone.
        let mut offset = 0;
        for part in encoder.parts() {
            let w = part.encoder.config().hidden_size;
            let cols = offset..offset + w;
            let mean = |v: &[f32]| {
                v.chunks_exact(width)
                    .flat_map(|r| r[cols.clone()].iter())
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / (v.len() / width * w) as f64
            };
            let before = mean(&z);
            for c in cols.clone() {
                want[row * width + c] *= 1.5;
            }
            let factor = (before / mean(&want)) as f32;
            for r in want.chunks_exact_mut(width) {
                for c in cols.clone() {
                    r[c] *= factor;
                }
            }
            offset += w;
        }
        close(
            &format!("{fixture} (cat:1.5)"),
            &weighted.context.to_vec().unwrap(),
            &want,
        );
        // The pooled embedding is the plain one's (no weights reach it), as A1111's.
        if let (Some(a), Some(b)) = (&weighted.pooled, &plain.pooled) {
            assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{fixture} pooled");
        }

        // 100 words: two chunks of 77, each encoded on its own.
        let long = vec!["cat"; 100].join(" ");
        let both = encoder
            .encode_with(&long, None, PromptSyntax::A1111)
            .unwrap();
        assert_eq!(both.context.shape(), &[1, 154, width], "{fixture}");
        let pieces = chunks(tokenizer, &long).unwrap();
        assert_eq!(pieces.len(), 2);
        let first = encoder.encode(&long).unwrap().context.to_vec().unwrap();
        let all = both.context.to_vec().unwrap();
        assert_eq!(
            &all[..77 * width],
            first.as_slice(),
            "{fixture}: the first chunk is diffusers' cut prompt"
        );
        assert_ne!(&all[77 * width..], first.as_slice());
    }
}

/// tools/fixtures/prompt_syntax.py: A1111's own code paths (ported) on diffusers' text
/// encoders. The chunks' ids and weights are equal; the embeddings within float rounding.
#[test]
fn chunks_and_embeddings_match_the_fixture_scripts_a1111() {
    let records = common::read_json(&common::reference("prompt_syntax.json"));
    let tensors = common::load_tensors(&common::reference("prompt_syntax.safetensors"));
    let prompts = records["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 4);
    for fixture in ["sd1", "sd2"] {
        let sd = load(fixture);
        let encoder = sd.prompt_encoder();
        let tokenizer = &encoder.parts()[0].tokenizer;
        for (i, prompt) in prompts.iter().enumerate() {
            let prompt = prompt.as_str().unwrap();
            let want = &records["fixtures"][fixture][i];
            let got = chunks(tokenizer, prompt).unwrap();
            let ids: Vec<Vec<u32>> = serde_json::from_value(want["ids"].clone()).unwrap();
            let weights: Vec<Vec<f64>> = serde_json::from_value(want["weights"].clone()).unwrap();
            assert_eq!(
                got.iter().map(|c| c.ids.clone()).collect::<Vec<_>>(),
                ids,
                "{fixture} {prompt:?}"
            );
            for (c, w) in got.iter().zip(&weights) {
                let close = c
                    .weights
                    .iter()
                    .zip(w)
                    .all(|(a, b)| (*a as f64 - b).abs() < 1e-6);
                assert!(
                    close,
                    "{fixture} {prompt:?}: weights {:?}, expected {w:?}",
                    c.weights
                );
            }
            let context = encoder
                .encode_with(prompt, None, PromptSyntax::A1111)
                .unwrap()
                .context;
            let expected = &tensors[&format!("{fixture}_{i}")];
            assert_eq!(
                context.shape(),
                expected.shape.as_slice(),
                "{fixture} {prompt:?}"
            );
            // 1e-5, not the text encoder tests' 1e-6: the rescale's means are summed in f32
            // by torch and in f64 here, 2.1e-6 apart (of the scale) on the long prompt.
            common::assert_close(
                &format!("{fixture} {prompt:?}"),
                &context.to_vec().unwrap(),
                &expected.data,
                1e-5,
            );
        }
    }
}

fn image(sd: &StableDiffusion, prompt: &str, negative: &str, syntax: PromptSyntax) -> Vec<u8> {
    let params = GenerateParams {
        prompt: prompt.into(),
        negative_prompt: Some(negative.into()),
        prompt_2: None,
        negative_prompt_2: None,
        steps: 3,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        seed: 4,
        scheduler: None,
        scheduler_overrides: Default::default(),
        init: None,
        loras: Vec::new(),
        prompt_syntax: syntax,
    };
    sd.generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .image
        .pixels
}

#[test]
fn generations_read_the_syntax_on_every_device() {
    for (device_name, device) in common::devices() {
        let sd = StableDiffusion::load(&common::model_dir("sd1"), &device).unwrap();
        let plain = image(&sd, "a red door", "blurry", PromptSyntax::Plain);
        assert_eq!(
            image(&sd, "a red door", "blurry", PromptSyntax::A1111),
            plain,
            "{device_name}"
        );
        assert_ne!(
            image(&sd, "a (red:1.4) door", "blurry", PromptSyntax::A1111),
            plain
        );
        // A prompt of three chunks against a negative of one: padded with empty chunks.
        let long = vec!["a red door"; 60].join(", ");
        let three = image(&sd, &long, "blurry", PromptSyntax::A1111);
        assert_ne!(
            three,
            image(&sd, &long, "blurry", PromptSyntax::Plain),
            "{device_name}"
        );
    }
}

fn generate(server: &Server, body: Value) -> Value {
    let r = server.post_json("/generate", &body.to_string());
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()["image"].clone()
}

#[test]
fn the_service_reads_a1111_syntax_where_asked_and_on_a1111_routes() {
    let server = Server::start(&common::model_dir("sd1"), &[]);
    server.wait_ready();
    let body = |syntax: Value| {
        json!({"prompt": "a (red:1.4) door", "seed": 7, "num_inference_steps": 3,
               "guidance_scale": 7.0, "width": 64, "height": 64, "scheduler": "euler_a",
               "prompt_syntax": syntax})
    };
    let plain = generate(&server, body(Value::Null));
    assert_eq!(generate(&server, body(json!("diffusers"))), plain);
    let a1111 = generate(&server, body(json!("a1111")));
    assert_ne!(a1111, plain);

    let r = server.post_json("/generate", &body(json!("comfy")).to_string());
    assert_eq!(r.status, 400);
    assert!(
        r.error()
            .contains("`prompt_syntax` must be \"diffusers\" or \"a1111\""),
        "{}",
        r.error()
    );

    // A1111's txt2img reads its own syntax: the same image as /generate's a1111.
    let r = server.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a (red:1.4) door", "seed": 7, "steps": 3, "width": 64,
                "height": 64, "sampler_name": "Euler a"})
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["images"][0], a1111);
}
