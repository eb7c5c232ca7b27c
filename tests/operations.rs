//! What operators and orchestrators read, on the real binary: `/metrics` parsed by
//! Prometheus' own Python parser (`prometheus_client`), `/livez` and `/readyz`.

mod common;

use serde_json::{json, Value};

use common::model_dir;
use common::programs::python_script;
use common::server::{Server, SMALL_JOB};

/// /metrics as `prometheus_client` reads it.
fn scrape(server: &Server) -> Value {
    let r = server.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), r.text()).unwrap();
    python_script(
        "prometheus_parse.py",
        &[file.path().to_str().unwrap()],
        &server.log(),
    )
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(families: &Value, family: &str, name: &str, labels: Value) -> f64 {
    let samples = families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family} in {families}"));
    samples
        .iter()
        .find(|s| {
            s[0] == name
                && labels
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| s[1][k] == *v)
        })
        .unwrap_or_else(|| panic!("no {name} {labels} in {samples:?}"))[2]
        .as_f64()
        .unwrap()
}

#[test]
fn metrics_count_requests_generations_and_the_queue() {
    let server = Server::start(&model_dir("sd1"), &["--queue-size", "3"]);
    server.wait_ready();
    assert_eq!(server.post_json("/generate", SMALL_JOB).status, 200);
    assert_eq!(server.post_json("/generate", "{}").status, 400);
    assert_eq!(server.get("/jobs/0123").status, 404);
    assert_eq!(server.get("/no/such/path").status, 404);

    let m = scrape(&server);
    for (family, kind) in [
        ("sd_http_requests", "counter"),
        ("sd_queue_length", "gauge"),
        ("sd_queue_capacity", "gauge"),
        ("sd_busy", "gauge"),
        ("sd_model_state", "gauge"),
        ("sd_generations", "counter"),
        ("sd_generation_seconds", "histogram"),
        ("sd_denoising_steps", "counter"),
        ("sd_denoising_steps_per_second", "gauge"),
    ] {
        assert_eq!(m[family]["type"], kind, "{family}: {}", m[family]);
    }
    let requests = |route: &str, method: &str, status: &str| {
        sample(
            &m,
            "sd_http_requests",
            "sd_http_requests_total",
            json!({"route": route, "method": method, "status": status}),
        )
    };
    assert_eq!(requests("/generate", "POST", "200"), 1.0);
    assert_eq!(requests("/generate", "POST", "400"), 1.0);
    // Route patterns, not paths: ids and unknown paths do not grow the table.
    assert_eq!(requests("/jobs/{id}", "GET", "404"), 1.0);
    assert_eq!(requests("unmatched", "GET", "404"), 1.0);

    let gauge = |family: &str| sample(&m, family, family, json!({}));
    assert_eq!(gauge("sd_queue_length"), 0.0);
    assert_eq!(gauge("sd_queue_capacity"), 3.0);
    assert_eq!(gauge("sd_busy"), 0.0);
    let state = |s: &str| sample(&m, "sd_model_state", "sd_model_state", json!({"state": s}));
    assert_eq!(
        (state("ready"), state("loading"), state("failed")),
        (1.0, 0.0, 0.0)
    );

    let generations = |outcome: &str| {
        sample(
            &m,
            "sd_generations",
            "sd_generations_total",
            json!({"outcome": outcome}),
        )
    };
    assert_eq!(generations("succeeded"), 1.0);
    assert_eq!(generations("failed"), 0.0);
    let count = sample(
        &m,
        "sd_generation_seconds",
        "sd_generation_seconds_count",
        json!({}),
    );
    let inf = sample(
        &m,
        "sd_generation_seconds",
        "sd_generation_seconds_bucket",
        json!({"le": "+Inf"}),
    );
    assert_eq!((count, inf), (1.0, 1.0));
    let sum = sample(
        &m,
        "sd_generation_seconds",
        "sd_generation_seconds_sum",
        json!({}),
    );
    assert!(sum > 0.0, "{sum}");
    // SMALL_JOB asks for 2 steps; the fixture's PNDM runs one more.
    assert_eq!(
        sample(
            &m,
            "sd_denoising_steps",
            "sd_denoising_steps_total",
            json!({})
        ),
        3.0
    );
    assert!(gauge("sd_denoising_steps_per_second") > 0.0);
    // GPU memory is a GPU server's only.
    assert!(
        m.get("sd_gpu_memory_bytes").is_none(),
        "{}",
        m["sd_gpu_memory_bytes"]
    );
}

/// On a GPU, /metrics and /health carry the backend's account of device memory: the
/// weights in use, the peak at least that, and once the server is idle nothing pooled.
#[test]
fn a_gpu_server_reports_its_device_memory() {
    if !common::devices().iter().any(|(name, _)| name == "gpu") {
        return; // common::devices() said loudly why there is no GPU run.
    }
    let server = Server::start_on("gpu", &model_dir("sd1"), &[]);
    server.wait_ready();
    let loaded = server.get("/health").json()["gpu_memory"].clone();
    let weights = loaded["in_use"].as_f64().expect("gpu_memory.in_use");
    assert!(weights > 0.0, "{loaded}");
    assert_eq!(server.post_json("/generate", SMALL_JOB).status, 200);
    // The engine empties the pool as it finds the queue empty.
    common::server::wait_until("an empty pool", std::time::Duration::from_secs(30), || {
        server.get("/health").json()["gpu_memory"]["pooled"] == 0
    });
    let m = scrape(&server);
    let family = &m["sd_gpu_memory_bytes"];
    assert_eq!(family["type"], "gauge", "{family}");
    let bytes = |kind: &str| {
        sample(
            &m,
            "sd_gpu_memory_bytes",
            "sd_gpu_memory_bytes",
            json!({"kind": kind}),
        )
    };
    assert_eq!(
        bytes("in_use"),
        weights,
        "the job left tensors on the device"
    );
    assert_eq!(bytes("pooled"), 0.0);
    assert!(bytes("peak") > weights, "{}", bytes("peak"));
}

#[test]
fn liveness_holds_while_readiness_follows_the_model() {
    let server = Server::start(&model_dir("no-such-model"), &[]);
    common::server::wait_until(
        "the model fails",
        std::time::Duration::from_secs(30),
        || server.get("/health").json()["model_state"] == "failed",
    );
    let live = server.get("/livez");
    assert_eq!(live.status, 200, "{}", live.text());
    assert_eq!(live.json()["alive"], true);
    assert_eq!(server.get("/readyz").status, 503);
    let m = scrape(&server);
    assert_eq!(
        sample(
            &m,
            "sd_model_state",
            "sd_model_state",
            json!({"state": "failed"})
        ),
        1.0
    );
}

#[test]
fn the_openapi_document_is_valid_and_lists_what_the_server_answers() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let r = server.get("/openapi.json");
    assert_eq!(r.status, 200);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), r.text()).unwrap();
    let doc = python_script(
        "openapi_validate.py",
        &[file.path().to_str().unwrap()],
        &server.log(),
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");

    // Every documented operation is routed: none of them is the fallback's 404 or a 405.
    let operations = doc["operations"].as_object().unwrap();
    for path in [
        "/generate",
        "/health",
        "/jobs/{id}/events",
        "/sdapi/v1/txt2img",
        "/v1/images/generations",
        "/metrics",
    ] {
        assert!(operations.contains_key(path), "{path} is not documented");
    }
    for (path, methods) in operations {
        let concrete = path.replace("{id}", "0123456789abcdef");
        for method in methods.as_array().unwrap() {
            let method = method.as_str().unwrap().to_ascii_uppercase();
            // An empty JSON object: POSTs answer 400 or 200, never "no such endpoint".
            let (headers, body): (&[(&str, &str)], &[u8]) = match method.as_str() {
                "POST" => (&[("Content-Type", "application/json")], b"{}"),
                _ => (&[], b""),
            };
            let answer = common::server::request(server.addr, &method, &concrete, headers, body);
            let status = answer.status;
            assert!(
                status != 405 && !(status == 404 && answer.text().contains("no such endpoint")),
                "{method} {path}: {status} {}",
                answer.text()
            );
        }
    }

    // The answers have the documented fields; a text-to-image answer all but `strength`,
    // which only image-to-image answers carry.
    let documented = |schema: &str| doc["schemas"][schema]["properties"].clone();
    let answer = server.post_json("/generate", SMALL_JOB).json();
    let mut fields: Vec<&str> = answer
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    fields.push("strength");
    fields.sort();
    assert_eq!(json!(fields), documented("GenerateResponse"));
    assert_eq!(
        doc["schemas"]["GenerateBody"]["required"],
        json!(["prompt"])
    );
}
