//! Image-to-image and inpainting through the real binary: /generate and /jobs with
//! `init_image`, `mask_image` and `strength` give the pipeline's own images (which
//! tests/images.rs holds to diffusers'), every bad image field is a 400 naming it, and an
//! inpainting model refuses what it cannot run before queueing.

use std::ops::ControlFlow;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use sd_wgpu::pipeline::{GenerateParams, InitImage, MaskImage, RgbImage, StableDiffusion};
use sd_wgpu::tensor::Device;

mod common;
use common::image_cases::{MAX_PIXEL_DIFF, MEAN_PIXEL_DIFF};
use common::model_dir;
use common::server::Server;

/// A structured `width` x `height` picture: gradients and a bright square.
fn picture(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let square = (width / 4..width / 2).contains(&x) && (height / 4..height / 2).contains(&y);
        if square {
            image::Rgb([240, 230, 40])
        } else {
            image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 90])
        }
    })
}

/// White (repaint) on the right half, black (keep) on the left.
fn right_half_mask(width: u32, height: u32) -> image::GrayImage {
    image::GrayImage::from_fn(width, height, |x, _| {
        image::Luma([if x >= width / 2 { 255 } else { 0 }])
    })
}

fn encode(image: impl Into<image::DynamicImage>, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.into().write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png(image: impl Into<image::DynamicImage>) -> Vec<u8> {
    encode(image, image::ImageFormat::Png)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The pixels of a base64 PNG from a response.
fn pixels(image_b64: &Value) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(image_b64.as_str().expect("a base64 image"))
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// `got` is `expected` within the image cases' pass rule.
fn assert_same_image(what: &str, got: &image::RgbImage, expected: &RgbImage) {
    assert_eq!(
        (got.width() as usize, got.height() as usize),
        (expected.width, expected.height),
        "{what}"
    );
    let diffs: Vec<u8> = got
        .as_raw()
        .iter()
        .zip(&expected.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    assert!(
        max <= MAX_PIXEL_DIFF && mean <= MEAN_PIXEL_DIFF,
        "{what}: max diff {max}, mean {mean}"
    );
}

#[test]
fn init_images_and_masks_give_the_pipelines_images() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let (w, h) = (64, 80);
    let init_png = png(picture(w, h));
    let mask_png = png(right_half_mask(w, h));

    let sd = StableDiffusion::load(&model_dir("sd1"), &Device::Cpu).unwrap();
    let expected = |mask: bool, strength: f64| {
        let params = GenerateParams {
            prompt: "a yellow box".into(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            steps: 5,
            guidance_scale: 7.5,
            width: w as usize,
            height: h as usize,
            seed: 11,
            scheduler: Some("euler_a".into()),
            scheduler_overrides: Default::default(),
            init: Some(InitImage {
                image: Arc::new(RgbImage::decode(&init_png, usize::MAX).unwrap()),
                mask: mask.then(|| Arc::new(MaskImage::decode(&mask_png, usize::MAX).unwrap())),
                strength,
            }),
            loras: Vec::new(),
            prompt_syntax: Default::default(),
        };
        sd.generate(&params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .image
    };
    let body = json!({"prompt": "a yellow box", "num_inference_steps": 5, "seed": 11,
                      "scheduler": "euler_a", "init_image": b64(&init_png)});

    // Image-to-image, width and height from the image, strength by default 0.8.
    let r = server.post_json("/generate", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        (&answer["width"], &answer["height"]),
        (&json!(w), &json!(h))
    );
    assert_same_image("img2img", &pixels(&answer["image"]), &expected(false, 0.8));

    // Inpainting with the image as a data URL and an explicit strength, through /jobs.
    let mut inpaint = body.clone();
    inpaint["init_image"] = json!(format!("data:image/png;base64,{}", b64(&init_png)));
    inpaint["mask_image"] = json!(b64(&mask_png));
    inpaint["strength"] = json!(0.6);
    inpaint["width"] = json!(w);
    let r = server.post_json("/jobs", &inpaint.to_string());
    assert_eq!(r.status, 202, "{}", r.text());
    let status_url = r.json()["status_url"].as_str().unwrap().to_string();
    let mut job = Value::Null;
    common::server::wait_until("the job", std::time::Duration::from_secs(120), || {
        job = server.get(&status_url).json();
        job["status"] != "queued" && job["status"] != "running"
    });
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_same_image(
        "inpaint",
        &pixels(&job["result"]["image"]),
        &expected(true, 0.6),
    );

    // A JPEG is read too (its pixels are the decoder's, so only the answer is checked).
    let mut jpeg = body.clone();
    jpeg["init_image"] = json!(b64(&encode(picture(w, h), image::ImageFormat::Jpeg)));
    jpeg["num_inference_steps"] = json!(2);
    let r = server.post_json("/generate", &jpeg.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn bad_image_fields_are_refused_naming_the_field() {
    let server = Server::start(&model_dir("sd1"), &["--max-pixels", "8192"]);
    server.wait_ready();
    let init = b64(&png(picture(64, 80)));
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"init_image": "not base64!"}),
            "`init_image` is not valid base64",
        ),
        (
            json!({"init_image": b64(b"hello")}),
            "`init_image`: not a PNG or JPEG",
        ),
        (
            json!({"init_image": 42}),
            "`init_image` must be a base64-encoded PNG or JPEG",
        ),
        (
            json!({"init_image": b64(&png(picture(60, 64)))}),
            "`init_image` is 60x64; its sides must be multiples of 8",
        ),
        (
            json!({"init_image": b64(&png(picture(128, 96)))}),
            "`init_image`: the image is 128x96 = 12288 pixels, more than the 8192 allowed",
        ),
        (
            json!({"init_image": format!("data:image/png,{init}")}),
            "`init_image` is a data URL without `;base64`",
        ),
        (
            json!({"init_image": init, "mask_image": b64(&png(right_half_mask(64, 64)))}),
            "`mask_image` is 64x64 but `init_image` is 64x80",
        ),
        (
            json!({"init_image": init, "strength": 0}),
            "`strength` must be above 0 and at most 1, got 0",
        ),
        (
            json!({"init_image": init, "strength": 1.5}),
            "`strength` must be above 0 and at most 1, got 1.5",
        ),
        (
            json!({"init_image": init, "strength": "high"}),
            "`strength` must be a number",
        ),
        (json!({"strength": 0.5}), "`strength` needs `init_image`"),
        (
            json!({"mask_image": init}),
            "`mask_image` needs `init_image`",
        ),
        (
            json!({"init_image": init, "width": 128}),
            "`width` is 128 but `init_image` is 64 pixels wide",
        ),
        // 0.1 of 5 steps is no step at all: the engine's check, before the queue.
        (
            json!({"init_image": init, "strength": 0.1, "num_inference_steps": 5}),
            "strength 0.1 of 5 steps runs no denoising step",
        ),
    ];
    for (mut body, expected) in cases {
        body["prompt"] = json!("a cat");
        let r = server.post_json("/generate", &body.to_string());
        assert_eq!(r.status, 400, "{expected}: {}", r.text());
        let error = r.error();
        assert!(
            error.contains(expected),
            "expected {expected:?} in {error:?}"
        );
    }
    // None of that hurt the server.
    let r = server.post_json(
        "/generate",
        &json!({"prompt": "a cat", "init_image": init, "num_inference_steps": 2}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn an_inpainting_model_needs_a_mask_and_uses_it() {
    let server = Server::start(&model_dir("sd1_inpaint"), &[]);
    server.wait_ready();
    let r = server.post_json(
        "/generate",
        r#"{"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.error()
            .contains("this is an inpainting model (its UNet takes 9 input channels)"),
        "{}",
        r.error()
    );
    let body = json!({"prompt": "a cat", "num_inference_steps": 3,
                      "init_image": b64(&png(picture(64, 64))),
                      "mask_image": b64(&png(right_half_mask(64, 64)))});
    let r = server.post_json("/generate", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
}
