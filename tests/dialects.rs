//! The AUTOMATIC1111 (/sdapi/v1) and OpenAI (/v1) routes on the real binary, driven by the
//! clients people use with them: the `webuiapi` and `openai` packages from PyPI (scripts in
//! tests/clients/). Their images must be /generate's for the same parameters and seeds.

mod common;

use serde_json::{json, Value};

use common::model_dir;
use common::programs::python_script;
use common::server::{request, Server};

/// Runs tests/clients/`script` with the server's port and `args`.
fn python_client(server: &Server, script: &str, args: &[&str]) -> Value {
    let port = server.addr.port().to_string();
    let args: Vec<&str> = [port.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    python_script(script, &args, &server.log())
}

/// The base64 PNG /generate answers for `body`.
fn generate_image(server: &Server, body: Value) -> Value {
    let r = server.post_json("/generate", &body.to_string());
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()["image"].clone()
}

#[test]
fn webuiapi_lists_the_model_and_txt2img_matches_generate() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let out = python_client(&server, "a1111_webuiapi.py", &["txt2img"]);

    assert_eq!(out["models"], json!(["sd1"]));
    assert_eq!(out["current_model"], "sd1");
    assert_eq!(
        out["samplers"],
        json!(["DDIM", "DPM++ 2M", "Euler", "Euler a", "LCM", "LMS", "PLMS"])
    );
    assert_eq!(out["schedulers"], json!(["automatic", "karras"]));
    assert_eq!(out["idle_progress"]["progress"], 0.0);
    assert_eq!(out["idle_progress"]["state"]["job_count"], 0);

    // batch_size 2: seeds 7 and 8, each the /generate image for its seed.
    let karras = &out["karras"];
    assert_eq!(karras["sizes"], json!([[64, 64], [64, 64]]));
    let info = &karras["info"];
    assert_eq!(info["all_seeds"], json!([7, 8]));
    assert_eq!(info["seed"], 7);
    assert_eq!(
        (&info["sampler_name"], &info["scheduler"]),
        (&json!("DPM++ 2M"), &json!("Karras"))
    );
    assert_eq!(
        (
            &info["steps"],
            &info["cfg_scale"],
            &info["width"],
            &info["height"]
        ),
        (&json!(4), &json!(6.0), &json!(64), &json!(64))
    );
    assert_eq!(info["prompt"], "a red door");
    assert_eq!(info["negative_prompt"], "blurry");
    for (i, seed) in [7, 8].into_iter().enumerate() {
        let direct = generate_image(
            &server,
            json!({"prompt": "a red door", "negative_prompt": "blurry", "seed": seed,
                   "num_inference_steps": 4, "guidance_scale": 6.0, "width": 64, "height": 64,
                   "scheduler": "dpm++2m_karras"}),
        );
        assert_eq!(karras["images"][i], direct, "image {i} (seed {seed})");
    }

    // The legacy combined name, n_iter 2 and A1111's default guidance (7.0).
    let legacy = &out["legacy"];
    assert_eq!(legacy["info"]["all_seeds"], json!([9, 10]));
    assert_eq!(legacy["info"]["scheduler"], "Karras");
    let direct = generate_image(
        &server,
        json!({"prompt": "a red door", "seed": 10, "num_inference_steps": 3,
               "guidance_scale": 7.0, "width": 64, "height": 64,
               "scheduler": "dpm++2m_karras"}),
    );
    assert_eq!(legacy["images"][1], direct);

    let unknown = &out["unknown_sampler"];
    assert_eq!(unknown["status"], 400, "{unknown}");
    let message = unknown["body"]["error"].as_str().unwrap();
    assert!(
        message.contains("sampler_name") && message.contains("Euler a"),
        "{message}"
    );
}

#[test]
fn webuiapi_img2img_restyles_and_inpaints_as_generate_does() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let out = python_client(&server, "a1111_webuiapi.py", &["img2img"]);
    let restyled = &out["restyled"];
    assert_eq!(restyled["sizes"], json!([[64, 64]]));
    assert_eq!(restyled["info"]["denoising_strength"], 0.6);
    assert_eq!(restyled["info"]["sampler_name"], "Euler");
    let direct = generate_image(
        &server,
        json!({"prompt": "a yellow box", "seed": 5, "num_inference_steps": 4,
               "guidance_scale": 7.0, "scheduler": "euler", "strength": 0.6,
               "init_image": out["init"]}),
    );
    assert_eq!(
        restyled["images"][0], direct,
        "img2img and /generate differ"
    );
    // The 96x80 picture and its mask were resized to the 64x64 asked for.
    let inpainted = &out["inpainted"];
    assert_eq!(inpainted["sizes"], json!([[64, 64]]));
    assert_eq!(inpainted["info"]["denoising_strength"], 1.0);
    assert_eq!(inpainted["info"]["seed"], 6);
}

#[test]
fn webuiapi_interrupt_stops_the_batch_and_skip_moves_to_the_next_image() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let out = python_client(&server, "a1111_webuiapi.py", &["interrupt"]);
    let running = &out["running"];
    assert!(running["progress"].as_f64().unwrap() > 0.0, "{running}");
    assert_eq!(running["state"]["sampling_steps"], 40);
    assert_eq!(running["state"]["job_count"], 1);
    // Stopped within the first image: no image, the batch not continued.
    assert_eq!(out["images"], json!([]), "{}", out["info"]);
    assert_eq!(out["after"]["state"]["job_count"], 0);
    server.wait_for_log("stopped a running job");

    let out = python_client(&server, "a1111_webuiapi.py", &["skip"]);
    // The first image was skipped; the second (seed 21) was made.
    assert_eq!(out["info"]["all_seeds"], json!([21]), "{}", out["info"]);
    let direct = generate_image(
        &server,
        json!({"prompt": "a long job", "seed": 21, "num_inference_steps": 40,
               "guidance_scale": 7.0, "width": 64, "height": 64, "scheduler": "euler"}),
    );
    assert_eq!(out["images"], json!([direct]));

    // A browser page cannot interrupt without a preflight: it must say JSON.
    let r = request(
        server.addr,
        "POST",
        "/sdapi/v1/interrupt",
        &[("Origin", "http://evil.example")],
        b"",
    );
    assert_eq!(r.status, 415, "{}", r.text());
}

#[test]
fn the_openai_package_generates_images_and_reads_errors() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let out = python_client(&server, "openai_images.py", &[]);
    assert_eq!(out["models"], json!(["sd1"]));
    assert!(out["created"].as_u64().unwrap() > 1_700_000_000);
    for (i, seed) in [5, 6].into_iter().enumerate() {
        let direct = generate_image(
            &server,
            json!({"prompt": "a red door", "negative_prompt": "blurry", "seed": seed,
                   "num_inference_steps": 3, "guidance_scale": 6.0, "width": 64,
                   "height": 64}),
        );
        assert_eq!(out["images"][i], direct, "image {i} (seed {seed})");
    }
    for (case, param) in [
        ("size", "size"),
        ("response_format", "response_format"),
        ("n", "n"),
        ("steps", "num_inference_steps"),
    ] {
        let error = &out["errors"][case];
        assert_eq!(error["status"], 400, "{case}: {error}");
        assert_eq!(error["body"]["param"], param, "{case}: {error}");
        assert_eq!(
            error["body"]["type"], "invalid_request_error",
            "{case}: {error}"
        );
        assert!(error["body"]["message"].as_str().unwrap().contains(param));
    }
}
