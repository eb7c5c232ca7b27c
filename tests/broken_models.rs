//! Models that load but cannot work, as a client of the real server sees them: a config
//! that cannot build a network fails the load (`/health` says why, `/generate` answers
//! 503), and weights that compute NaN fail each generation with a 500 that says so while
//! the server keeps serving.

use std::time::{Duration, Instant};

mod common;
use common::copy_fixture;
use common::server::Server;

const SMALL_JOB: &str =
    r#"{"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}"#;

fn wait_for_state(server: &Server, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = server.get("/health").json();
        if health["model_state"] == state {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "model_state is not {state:?} after 60 s: {health}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_config_that_cannot_build_the_model_fails_the_load_with_file_and_field() {
    let (_tmp, dir) = copy_fixture("sd1");
    common::set_json_field(
        &dir.join("unet/config.json"),
        "norm_num_groups",
        serde_json::json!(0),
    );
    let mut server = Server::start(&dir, &[]);
    let health = wait_for_state(&server, "failed");
    assert_eq!(health["model_loaded"], false, "{health}");
    let reason = health["model_error"].as_str().unwrap_or_default();
    for part in ["unet/config.json", "norm_num_groups"] {
        assert!(reason.contains(part), "{part}: {health}");
    }
    let r = server.post_json("/generate", SMALL_JOB);
    assert_eq!(r.status, 503, "{}", r.text());
    let error = r.error();
    assert!(error.contains("failed to load"), "{error}");
    assert!(error.contains(reason), "{error}");
    assert!(server.is_running());
}

#[test]
fn nan_weights_fail_each_generation_with_500_and_the_server_keeps_serving() {
    let (_tmp, dir) = copy_fixture("sd1");
    common::poison_tensor(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        "conv_out.weight",
    );
    let mut server = Server::start(&dir, &[]);
    server.wait_ready();
    for _ in 0..2 {
        let r = server.post_json("/generate", SMALL_JOB);
        assert_eq!(r.status, 500, "{}", r.text());
        let error = r.error();
        for part in ["generation failed", "NaN", "latents"] {
            assert!(error.contains(part), "{part}: {error}");
        }
    }
    let health = server.get("/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["model_state"], "ready", "{}", health.text());
    assert!(server.is_running());
}
