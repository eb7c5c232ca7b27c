//! The HTTP service as a client sees it: the real binary on a loopback port with the tiny
//! fixture model. Errors, loading, queueing, disconnects, time limits and shutdown.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

mod common;
use common::server::{
    busy, post_json_in_background, post_on_connection, request, send_raw, start_long_job,
    wait_until, Server, LONG_JOB, SMALL_JOB,
};
use common::{copy_fixture, model_dir};

fn png_size(b64: &str) -> (u32, u32) {
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 image");
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).expect("a PNG");
    (img.width(), img.height())
}

#[test]
fn generate_returns_the_cli_image_and_its_parameters() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let body = r#"{"prompt": "a red bicycle", "negative_prompt": "blurry", "num_inference_steps": 3,
                  "guidance_scale": 6.5, "width": 64, "height": 80, "seed": 1234}"#;
    let r = server.post_json("/generate", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let json = r.json();
    assert_eq!(json["seed"], 1234);
    assert_eq!(
        (json["width"].as_u64(), json["height"].as_u64()),
        (Some(64), Some(80))
    );
    assert_eq!(json["num_inference_steps"], 3);
    assert_eq!(json["guidance_scale"], 6.5);
    assert!(json["time_taken"].as_f64().unwrap() > 0.0);
    let b64 = json["image"].as_str().unwrap();
    assert!(
        !b64.starts_with("data:"),
        "the guide's clients add the data: prefix themselves"
    );
    assert_eq!(png_size(b64), (64, 80));

    // The same inputs through `sd-wgpu generate` give the same pixels.
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("cli.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sd-wgpu"))
        .args([
            "generate",
            "--backend",
            "cpu",
            "--prompt",
            "a red bicycle",
            "--negative-prompt",
            "blurry",
        ])
        .args([
            "--steps",
            "3",
            "--guidance",
            "6.5",
            "--width",
            "64",
            "--height",
            "80",
            "--seed",
            "1234",
        ])
        .arg("--model")
        .arg(model_dir("sd1"))
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    use base64::Engine as _;
    let served = image::load_from_memory(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap();
    let cli = image::open(&png).unwrap();
    assert_eq!(served.to_rgb8().into_raw(), cli.to_rgb8().into_raw());

    // Seed -1 (and no seed) picks one and says which.
    let r = server.post_json(
        "/generate",
        r#"{"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["seed"].as_u64().is_some());

    // One log line per request: method, path, status.
    let log = server.log();
    assert!(log.contains("POST /generate 200"), "{log}");
    assert!(log.contains("GET /health 200"), "{log}");
}

#[test]
fn every_error_is_json_with_the_right_status() {
    let server = Server::start(
        &model_dir("sd1"),
        &[
            "--max-prompt-chars",
            "50",
            "--max-steps",
            "40",
            "--default-steps",
            "2",
            "--max-pixels",
            "262144",
            "--body-limit",
            "2048",
        ],
    );
    server.wait_ready();
    let cases: &[(&str, u16, &str)] = &[
        (r#"{"negative_prompt": "x"}"#, 400, "`prompt` is required"),
        (r#"{"prompt": ""}"#, 400, "`prompt` must not be empty"),
        (r#"{"prompt": 42}"#, 400, "`prompt` must be a string"),
        (
            r#"{"prompt": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            400,
            "`prompt` is 56 characters",
        ),
        (
            r#"{"prompt": "a", "negative_prompt": 7}"#,
            400,
            "`negative_prompt` must be a string",
        ),
        (
            r#"{"prompt": "a", "prompt_2": "b"}"#,
            400,
            "prompt_2 is for SDXL's second text encoder; this model has one text encoder",
        ),
        (
            r#"{"prompt": "a", "negative_prompt_2": "b"}"#,
            400,
            "negative_prompt_2 is for SDXL's second text encoder",
        ),
        (
            r#"{"prompt": "a", "prompt_2": ["b"]}"#,
            400,
            "`prompt_2` must be a string",
        ),
        (
            r#"{"prompt": "a", "num_inference_steps": "30"}"#,
            400,
            "`num_inference_steps` must be an integer",
        ),
        (
            r#"{"prompt": "a", "num_inference_steps": 0}"#,
            400,
            "`num_inference_steps` must be between 1 and 40",
        ),
        (
            r#"{"prompt": "a", "num_inference_steps": 41}"#,
            400,
            "`num_inference_steps` must be between 1 and 40",
        ),
        (
            r#"{"prompt": "a", "guidance_scale": "7.5"}"#,
            400,
            "`guidance_scale` must be a number",
        ),
        (
            r#"{"prompt": "a", "guidance_scale": 30.5}"#,
            400,
            "`guidance_scale` must be a number between 0 and 30",
        ),
        (
            r#"{"prompt": "a", "guidance_scale": 1e999}"#,
            400,
            "not valid JSON",
        ),
        (
            r#"{"prompt": "a", "width": 100}"#,
            400,
            "`width` must be a multiple of 8",
        ),
        (
            r#"{"prompt": "a", "height": 56}"#,
            400,
            "`height` must be a multiple of 8 between 64 and 2048",
        ),
        (
            r#"{"prompt": "a", "height": 2056}"#,
            400,
            "`height` must be a multiple of 8 between 64 and 2048",
        ),
        (
            r#"{"prompt": "a", "width": 1024, "height": 512}"#,
            400,
            "over this server's limit of 262144 pixels",
        ),
        (
            r#"{"prompt": "a", "seed": "42"}"#,
            400,
            "`seed` must be an integer",
        ),
        (
            r#"{"prompt": "a", "seed": 4.5}"#,
            400,
            "`seed` must be an integer",
        ),
        (
            r#"{"prompt": "a", "seed": -2}"#,
            400,
            "`seed` must be -1 (random) or a non-negative integer",
        ),
        (
            r#"{"prompt": "a", "steps": 30}"#,
            400,
            "unknown field `steps`",
        ),
        (
            r#"{"prompt": "a", "scheduler": "warp-drive"}"#,
            400,
            "unknown scheduler `warp-drive`",
        ),
        (r#"{"prompt": "a", "#, 400, "not valid JSON"),
        ("prompt=a+cat", 400, "not valid JSON"),
        ("[\"a cat\"]", 400, "must be a JSON object"),
        ("", 400, "the request body is empty"),
    ];
    for (body, status, message) in cases {
        let r = server.post_json("/generate", body);
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        let error = r.error();
        assert!(
            error.contains(message),
            "{body}: {error:?} does not contain {message:?}"
        );
    }

    let r = server.get("/no/such/path");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/no/such/path"));
    let r = server.get("/generate");
    assert_eq!(r.status, 405);
    assert!(r.error().contains("GET is not allowed on /generate"));
    let r = request(server.addr, "DELETE", "/health", &[], b"");
    assert_eq!(r.status, 405);
    r.error();

    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(4000));
    let r = server.post_json("/generate", &big);
    assert_eq!(r.status, 413);
    assert!(r.error().contains("2048 bytes"));
    // Without a Content-Length (chunked), the limit still holds.
    let chunked = format!(
        "POST /generate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let r = send_raw(server.addr, chunked.as_bytes());
    assert_eq!(r.status, 413, "{}", r.text());
    r.error();

    // None of that hurt the server.
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn health_says_loading_until_the_model_is_ready() {
    // The loader blocks on a FIFO in place of a tokenizer config until the test feeds it.
    let (_tmp, dir) = copy_fixture("sd1");
    let config = dir.join("tokenizer/tokenizer_config.json");
    let content = std::fs::read(&config).unwrap();
    std::fs::remove_file(&config).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&config)
        .status()
        .expect("mkfifo (coreutils)");
    assert!(made.success());

    let server = Server::start(&dir, &[]);
    let health = server.get("/health").json();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["model_loaded"], false);
    assert_eq!(health["model_state"], "loading");
    assert_eq!(server.get("/readyz").status, 503);
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert!(r.error().contains("loading"));

    std::fs::OpenOptions::new()
        .write(true)
        .open(&config)
        .unwrap()
        .write_all(&content)
        .unwrap();
    server.wait_ready();
    assert_eq!(server.get("/readyz").json()["ready"], true);
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// /health says how the CPU computes: its vector level, the products' precision and where
/// the convolutions' Winograd cut-offs come from. The tiny fixture's layers are below the
/// sizes the measurement is for, so `--cpu-tuning auto` (the default) measures nothing
/// and its convolutions keep the table.
#[test]
fn health_names_the_cpu_level_precision_and_convolution_tuning() {
    let server = Server::start(&model_dir("sd1"), &["--cpu-tuning", "auto"]);
    let health = server.wait_ready().get("/health").json();
    let cpu = &health["cpu"];
    assert_eq!(cpu["precision"], "f32", "{cpu}");
    let simd = cpu["simd"].as_str().expect("cpu.simd");
    assert!(["baseline", "avx2", "avx512"].contains(&simd), "{cpu}");
    let convolutions = &cpu["convolutions"];
    assert_eq!(convolutions["mode"], "auto", "{cpu}");
    assert_eq!(convolutions["source"], "table", "{cpu}");
    // Where it is remembered is the log's, not HTTP clients'.
    assert!(convolutions.get("file").is_none(), "{cpu}");
    for field in ["f4_tiles", "f2_tiles"] {
        let tiles = convolutions["cutoffs"][field].as_u64();
        assert!(tiles.is_some_and(|t| t > 0), "{field}: {cpu}");
    }
    assert!(
        convolutions["machine"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{cpu}"
    );
    assert!(
        !server.log().contains("measuring the CPU convolutions"),
        "{}",
        server.log()
    );
}

/// /health says what the GPU runs: the backend, the features the device enabled and the
/// kernel variants chosen (the log's startup line says the same); nothing of it on the CPU.
#[test]
fn health_names_the_gpu_backend_its_features_and_kernel_variants() {
    let cpu = Server::start(&model_dir("sd1"), &[]);
    assert_eq!(
        cpu.wait_ready().get("/health").json()["gpu"],
        serde_json::Value::Null
    );
    if !common::devices().iter().any(|(name, _)| name == "gpu") {
        return; // common::devices() said loudly why there is no GPU run.
    }
    let server = Server::start_on("gpu", &model_dir("sd1"), &[]);
    let health = server.wait_ready().get("/health").json();
    let gpu = &health["gpu"];
    let backend = gpu["backend"].as_str().expect("gpu.backend");
    assert!(["Vulkan", "Metal", "Dx12"].contains(&backend), "{gpu}");
    let enabled: Vec<&str> = gpu["features_enabled"]
        .as_array()
        .expect("gpu.features_enabled")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    let shader: Vec<&str> = gpu["shader_features"]
        .as_array()
        .expect("gpu.shader_features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    // Each choice agrees with the features the device was opened with.
    let f16 = shader.contains(&"f16");
    assert_eq!(f16, enabled.contains(&"SHADER_F16"), "{gpu}");
    assert_eq!(
        f16,
        gpu["weights"].as_str().unwrap().starts_with("f16"),
        "{gpu}"
    );
    let coop = shader.contains(&"cooperative_matrix");
    assert_eq!(
        coop,
        enabled.contains(&"EXPERIMENTAL_COOPERATIVE_MATRIX"),
        "{gpu}"
    );
    let products = gpu["matrix_products"].as_str().unwrap();
    assert_eq!(coop, products.starts_with("cooperative"), "{gpu}");
    assert_eq!(!coop, products.starts_with("SIMT"), "{gpu}");
    let log = server.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("GPU: "))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("on {backend}")), "{line}");
    assert!(line.contains(products), "{line}");
}

#[test]
fn a_model_that_fails_to_load_is_reported_and_the_server_stays_up() {
    let (_tmp, dir) = copy_fixture("sd1");
    std::fs::write(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let mut server = Server::start(&dir, &[]);
    wait_until("the load fails", Duration::from_secs(30), || {
        server.get("/health").json()["model_state"] == "failed"
    });
    let health = server.get("/health").json();
    assert_eq!(health["model_loaded"], false);
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["ready"], false);
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.error().contains("failed to load"));
    assert!(
        health["model_error"]
            .as_str()
            .unwrap()
            .contains("diffusion_pytorch_model.safetensors"),
        "{health}"
    );
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 503);
    assert!(r.error().contains("failed to load"));
    assert!(server.is_running());
}

#[test]
fn a_model_that_cannot_be_found_is_reported_in_health() {
    let mut server = Server::start(std::path::Path::new("no-such-org/no-such-model"), &[]);
    wait_until("the load fails", Duration::from_secs(30), || {
        server.get("/health").json()["model_state"] == "failed"
    });
    let error = server.get("/health").json()["model_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("models--no-such-org--no-such-model"),
        "{error}"
    );
    assert!(
        error.contains("huggingface-cli download no-such-org/no-such-model"),
        "{error}"
    );
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 503);
    assert!(server.is_running());
}

#[test]
fn a_failing_generation_is_a_500_and_the_next_request_works() {
    // A text encoder whose vocabulary is smaller than the tokenizer's: loading works, but
    // the end-of-text id every prompt carries is outside the embedding table.
    let (_tmp, dir) = copy_fixture("sd1");
    let path = dir.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut rows_kept = 0;
    for (name, view) in st.tensors() {
        let (mut shape, mut data) = (view.shape().to_vec(), view.data().to_vec());
        if name.ends_with("token_embedding.weight") {
            rows_kept = shape[0] - 8;
            data.truncate(rows_kept * shape[1] * 4);
            shape[0] = rows_kept;
        }
        tensors.push((name, shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let config_path = dir.join("text_encoder/config.json");
    let mut config = common::read_json(&config_path);
    config["vocab_size"] = serde_json::json!(rows_kept);
    std::fs::write(&config_path, config.to_string()).unwrap();

    let server = Server::start(&dir, &[]);
    server.wait_ready();
    for _ in 0..2 {
        let r = server.post_json("/generate", SMALL_JOB);
        assert_eq!(r.status, 500, "{}", r.text());
        assert!(r.error().contains("generation failed"), "{}", r.text());
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let server = Server::start(&model_dir("sd1"), &["--queue-size", "1"]);
    server.wait_ready();
    let running = start_long_job(&server);
    // One more may wait...
    let waiting = post_json_in_background(&server, "/generate", SMALL_JOB);
    wait_until("the second job is queued", Duration::from_secs(10), || {
        server.get("/health").json()["queue_length"] == 1
    });
    // ...the next is refused at once.
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
    assert!(r.error().contains("queue is full"));
    // The long job's client leaves: the waiting job runs and succeeds.
    drop(running);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_client_that_disconnects_frees_the_engine() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();

    // Gone while waiting: dropped from the queue without running.
    let running = start_long_job(&server);
    let queued = post_on_connection(&server, SMALL_JOB);
    wait_until("a job is queued", Duration::from_secs(10), || {
        server.get("/health").json()["queue_length"] == 1
    });
    drop(queued);
    // Gone while running: stopped within one op.
    drop(running);
    wait_until("the engine is free", Duration::from_secs(10), || {
        !busy(&server)
    });
    let log = server.log();
    assert!(log.contains("a waiting job left the queue"), "{log}");
    assert!(log.contains("stopped a running job"), "{log}");

    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn many_clients_at_once_get_200_or_503_and_nothing_breaks() {
    let server = Server::start(&model_dir("sd1"), &["--queue-size", "2"]);
    server.wait_ready();
    let rss_before = server.rss_kib();
    let addr = server.addr;
    let clients: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"prompt": "client {i}", "width": 64, "height": 64, "num_inference_steps": 2, "seed": {i}}}"#
                );
                request(addr, "POST", "/generate", &[("Content-Type", "application/json")], body.as_bytes())
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for client in clients {
        let r = client.join().unwrap();
        match r.status {
            200 => {
                assert_eq!(png_size(r.json()["image"].as_str().unwrap()), (64, 64));
                ok += 1;
            }
            503 => {
                assert!(r.error().contains("queue is full"));
                refused += 1;
            }
            other => panic!("status {other}: {}", r.text()),
        }
    }
    // At least the queue's worth is served (more when the engine picks jobs up meanwhile).
    assert!(ok >= 2, "{ok} succeeded, {refused} refused");
    assert!(
        refused >= 1,
        "12 clients at once against a queue of 2: some must be refused"
    );
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 200, "{}", r.text());
    let grown = server.rss_kib().saturating_sub(rss_before);
    assert!(grown < 512 * 1024, "memory grew by {grown} KiB");
}

#[test]
fn sigterm_cancels_the_running_job_and_exits_cleanly() {
    let mut server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let client = post_json_in_background(&server, "/generate", LONG_JOB);
    wait_until("the long job runs", Duration::from_secs(30), || {
        busy(&server)
    });
    let status = server
        .terminate(Duration::from_secs(20))
        .expect("the server exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    let r = client.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("shutting down"));
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "still accepting after shutdown"
    );
}
