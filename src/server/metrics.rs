//! `GET /metrics` in Prometheus' text format (version 0.0.4): HTTP requests by route and
//! status, the queue, the model's state, and the engine's generations (counts by outcome,
//! a duration histogram, denoising speed).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::routes::AppState;
use crate::engine::stats::{Outcome, GENERATION_SECONDS_BUCKETS};
use crate::engine::ModelState;
use crate::tensor::Device;

/// Requests answered, by (route pattern, method, status). Routes are the patterns
/// (`/jobs/{id}`), and paths that match none count as `unmatched`, so a client cannot grow
/// the table without bound.
#[derive(Default)]
pub struct HttpCounts(Mutex<BTreeMap<(String, String, u16), u64>>);

impl HttpCounts {
    fn add(&self, route: String, method: String, status: u16) {
        // A map insert: a panic elsewhere cannot leave it half-changed.
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((route, method, status)).or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<(String, String, u16), u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Counts every response (the middleware sits inside routing, where the route is known).
pub async fn count_requests(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let response = next.run(req).await;
    app.http_counts
        .add(route, method, response.status().as_u16());
    response
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let engine = &app.engine;
    let mut out = String::new();

    family(
        &mut out,
        "sd_http_requests_total",
        "counter",
        "HTTP requests answered, by route pattern, method and status.",
    );
    for ((route, method, status), n) in app.http_counts.snapshot() {
        let route = escape(&route);
        line(&mut out, format_args!("sd_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"));
    }

    let gauges = [
        (
            "sd_queue_length",
            "Requests waiting for the engine (not the running one).",
            engine.queued(),
        ),
        (
            "sd_queue_capacity",
            "Requests that may wait.",
            engine.queue_capacity(),
        ),
        (
            "sd_busy",
            "1 while a generation runs.",
            usize::from(engine.busy()),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        line(&mut out, format_args!("{name} {value}"));
    }

    let state = engine.state();
    family(
        &mut out,
        "sd_model_state",
        "gauge",
        "The model's state: 1 for the current one.",
    );
    for (label, current) in [
        ("loading", matches!(state, ModelState::Loading)),
        ("ready", matches!(state, ModelState::Ready)),
        ("failed", matches!(state, ModelState::Failed(_))),
    ] {
        line(
            &mut out,
            format_args!("sd_model_state{{state=\"{label}\"}} {}", u8::from(current)),
        );
    }

    let stats = engine.stats();
    family(
        &mut out,
        "sd_generations_total",
        "counter",
        "Generations the engine ran, by how they ended.",
    );
    for (outcome, n) in Outcome::ALL.iter().zip(stats.finished) {
        line(
            &mut out,
            format_args!("sd_generations_total{{outcome=\"{}\"}} {n}", outcome.name()),
        );
    }
    family(
        &mut out,
        "sd_generation_seconds",
        "histogram",
        "Time of each succeeded generation, prompt to image.",
    );
    for (bound, n) in GENERATION_SECONDS_BUCKETS.iter().zip(stats.seconds_buckets) {
        line(
            &mut out,
            format_args!("sd_generation_seconds_bucket{{le=\"{bound}\"}} {n}"),
        );
    }
    let succeeded = stats.finished[0];
    line(
        &mut out,
        format_args!("sd_generation_seconds_bucket{{le=\"+Inf\"}} {succeeded}"),
    );
    line(
        &mut out,
        format_args!("sd_generation_seconds_sum {}", stats.seconds_sum),
    );
    line(
        &mut out,
        format_args!("sd_generation_seconds_count {succeeded}"),
    );
    family(
        &mut out,
        "sd_denoising_steps_total",
        "counter",
        "Denoising steps of succeeded generations.",
    );
    line(
        &mut out,
        format_args!("sd_denoising_steps_total {}", stats.steps_total),
    );
    if let Some(speed) = stats.last_steps_per_second {
        family(
            &mut out,
            "sd_denoising_steps_per_second",
            "gauge",
            "Denoising steps per second of the last succeeded generation.",
        );
        line(
            &mut out,
            format_args!("sd_denoising_steps_per_second {speed}"),
        );
    }
    if let Device::Gpu(gpu) = app.engine.device() {
        let memory = gpu.memory();
        family(
            &mut out,
            "sd_gpu_memory_bytes",
            "gauge",
            "Device memory of the GPU's tensors (in_use), its pool's idle buffers (pooled), and the most held at once (peak).",
        );
        for (kind, bytes) in [
            ("in_use", memory.in_use),
            ("pooled", memory.pooled),
            ("peak", memory.peak),
        ] {
            line(
                &mut out,
                format_args!("sd_gpu_memory_bytes{{kind=\"{kind}\"}} {bytes}"),
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn line(out: &mut String, text: std::fmt::Arguments) {
    let _ = writeln!(out, "{text}");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
