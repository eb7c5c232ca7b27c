//! Every scheduler against diffusers, from reference/schedulers.{json,safetensors} written by
//! tools/fixtures/schedulers.py: timesteps, `init_noise_sigma`, a full roll-out
//! (`scale_model_input` and `step` at every timestep, the Rust result fed forward), and the
//! config diffusers ends up with when a model folder's scheduler config builds another class.
//!
//! Each test collects every failing case and asserts once at the end, so one run shows them
//! all.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::pipeline::scheduler::{self, Scheduler};
use sd_wgpu::tensor::{Device, Tensor};
use serde_json::{Map, Value};

mod common;
use common::{check_close, load_tensors, read_json, reference, RefTensor};

/// Roll-out tensors (`scale_model_input`, `step`) are compared at 1e-4 of their scale.
const ROLLOUT_TOLERANCE: f64 = 1e-4;
/// Timesteps are integers or float32 interpolations: absolute tolerance.
const TIMESTEP_TOLERANCE: f64 = 1e-3;
/// `init_noise_sigma`: relative tolerance.
const SIGMA_TOLERANCE: f64 = 1e-5;
/// Config numbers (betas, ...) must come through as the same f64.
const CONFIG_TOLERANCE: f64 = 1e-12;

fn meta() -> Value {
    read_json(&reference("schedulers.json"))
}

fn to_tensor(t: &RefTensor) -> Tensor {
    Tensor::from_vec(t.f32(), &t.shape, &Device::Cpu).unwrap()
}

fn folder_config(fixture: &str) -> Map<String, Value> {
    let path = common::model_dir(fixture).join("scheduler/scheduler_config.json");
    match read_json(&path) {
        Value::Object(map) => map,
        other => panic!("{}: not an object: {other}", path.display()),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}

/// Checks one scheduler, freshly built for `case`, against the fixture: timesteps,
/// `init_noise_sigma`, then the roll-out. Returns the first mismatch.
fn check_rollout(
    sched: &mut dyn Scheduler,
    case: &Value,
    tensors: &HashMap<String, RefTensor>,
) -> Result<(), String> {
    let name = case["name"].as_str().unwrap();

    let expected_t: Vec<f64> = case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let got_t = sched.timesteps();
    if got_t.len() != expected_t.len() {
        return Err(format!(
            "{} timesteps, expected {}: got {got_t:?}, expected {expected_t:?}",
            got_t.len(),
            expected_t.len()
        ));
    }
    if let Some(i) =
        (0..got_t.len()).find(|&i| (got_t[i] as f64 - expected_t[i]).abs() > TIMESTEP_TOLERANCE)
    {
        return Err(format!(
            "timestep {i} is {}, expected {} (got {got_t:?}, expected {expected_t:?})",
            got_t[i], expected_t[i]
        ));
    }

    let expected_sigma = case["init_noise_sigma"].as_f64().unwrap();
    let got_sigma = sched.init_noise_sigma() as f64;
    if (got_sigma - expected_sigma).abs() > SIGMA_TOLERANCE * expected_sigma.abs() {
        return Err(format!(
            "init_noise_sigma {got_sigma}, expected {expected_sigma}"
        ));
    }

    let get = |key: String| {
        tensors
            .get(&key)
            .unwrap_or_else(|| panic!("schedulers.safetensors has no {key}"))
    };
    let seed = case["seed"].as_u64().unwrap();
    let mut rng = TorchRng::new(seed + 1);
    let mut x = to_tensor(get(format!("{name}_x0")));
    for (i, &t) in expected_t.iter().enumerate() {
        let scaled = sched
            .scale_model_input(&x, i)
            .map_err(|e| format!("scale_model_input at step {i} (t={t}) failed: {e}"))?;
        let expected = get(format!("{name}_scaled_{i}"));
        if scaled.shape() != expected.shape.as_slice() {
            return Err(format!(
                "scaled_{i}: shape {:?}, expected {:?}",
                scaled.shape(),
                expected.shape
            ));
        }
        check_close(
            &format!("scale_model_input at step {i} (t={t})"),
            &scaled.to_vec().unwrap(),
            &expected.data,
            ROLLOUT_TOLERANCE,
        )?;

        let model_output = to_tensor(get(format!("{name}_model_output_{i}")));
        x = sched
            .step(&model_output, i, &x, &mut rng)
            .map_err(|e| format!("step at step {i} (t={t}) failed: {e}"))?;
        let expected = get(format!("{name}_prev_{i}"));
        if x.shape() != expected.shape.as_slice() {
            return Err(format!(
                "prev_{i}: shape {:?}, expected {:?}",
                x.shape(),
                expected.shape
            ));
        }
        check_close(
            &format!("step at step {i} (t={t})"),
            &x.to_vec().unwrap(),
            &expected.data,
            ROLLOUT_TOLERANCE,
        )?;
    }
    Ok(())
}

/// Builds the scheduler with `build` and checks it, turning errors and panics into a message.
fn build_and_check(
    build: impl FnOnce() -> sd_wgpu::Result<Box<dyn Scheduler>>,
    case: &Value,
    tensors: &HashMap<String, RefTensor>,
) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        let mut sched = build().map_err(|e| format!("from_config failed: {e}"))?;
        check_rollout(sched.as_mut(), case, tensors)
    }))
    .unwrap_or_else(|payload| Err(format!("panicked: {}", panic_message(payload))))
}

#[test]
fn schedulers_match_diffusers_rollouts() {
    let meta = meta();
    let tensors = load_tensors(&reference("schedulers.safetensors"));
    let cases = meta["cases"].as_array().expect("a list of cases");
    assert!(cases.len() >= 40, "only {} scheduler cases", cases.len());

    let mut failures = Vec::new();
    let mut runs = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let class = case["class"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let label = format!("{name} ({class}, {steps} steps)");

        // As given: the case's config under its own class name.
        let mut config = case["config"]
            .as_object()
            .expect("config is an object")
            .clone();
        config.insert("_class_name".into(), Value::String(class.into()));
        runs += 1;
        if let Err(e) = build_and_check(
            || scheduler::from_config(&config, None, steps),
            case,
            &tensors,
        ) {
            failures.push(format!("{label}: {e}"));
        }

        // Cases whose config came from a model folder: also built from that folder's
        // scheduler_config.json, switching class when it differs (the pipeline's path).
        if let Some(fixture) = case["from_folder"].as_str() {
            let folder = folder_config(fixture);
            let own = folder["_class_name"].as_str() == Some(class);
            let override_class = if own { None } else { Some(class) };
            runs += 1;
            if let Err(e) = build_and_check(
                || scheduler::from_config(&folder, override_class, steps),
                case,
                &tensors,
            ) {
                let how = if own {
                    format!("from models/{fixture}/scheduler")
                } else {
                    format!("from models/{fixture}/scheduler switched to {class}")
                };
                failures.push(format!("{label} {how}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} scheduler runs differ from diffusers:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Compares one config value; `None` when equal.
fn config_value_mismatch(got: Option<&Value>, expected: &Value) -> Option<String> {
    let Some(got) = got else {
        return Some(format!("missing, expected {expected}"));
    };
    let equal = match (got, expected) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            (a - b).abs() <= CONFIG_TOLERANCE * b.abs().max(1.0)
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| config_value_mismatch(Some(x), y).is_none())
        }
        _ => got == expected,
    };
    (!equal).then(|| format!("{got}, expected {expected}"))
}

#[test]
fn scheduler_class_switch_merges_configs_like_diffusers() {
    let meta = meta();
    let switches = meta["switches"].as_array().expect("a list of switches");
    assert!(switches.len() >= 14, "only {} switches", switches.len());

    let mut failures = Vec::new();
    for switch in switches {
        let fixture = switch["fixture"].as_str().unwrap();
        let target = switch["target"].as_str().unwrap();
        let label = format!("models/{fixture}/scheduler -> {target}");
        let folder = folder_config(fixture);
        let got = match catch_unwind(AssertUnwindSafe(|| {
            scheduler::effective_config(&folder, Some(target))
        })) {
            Ok(Ok(map)) => map,
            Ok(Err(e)) => {
                failures.push(format!("{label}: effective_config failed: {e}"));
                continue;
            }
            Err(payload) => {
                failures.push(format!(
                    "{label}: effective_config panicked: {}",
                    panic_message(payload)
                ));
                continue;
            }
        };
        let expected = switch["config"].as_object().expect("config is an object");
        let mut wrong: Vec<String> = expected
            .iter()
            .filter_map(|(key, value)| {
                config_value_mismatch(got.get(key), value).map(|m| format!("{key}: {m}"))
            })
            .collect();
        // Non-finite defaults (lambda_min_clipped = -inf) have no JSON number: JSON null,
        // absent, or a string spelling of it are all fine.
        if let Some(nonfinite) = switch["nonfinite"].as_object() {
            for key in nonfinite.keys() {
                match got.get(key) {
                    None | Some(Value::Null) | Some(Value::String(_)) => {}
                    Some(other) => {
                        wrong.push(format!("{key}: {other}, expected a non-finite value"))
                    }
                }
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{label}: {}", wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} class switches differ from diffusers:\n  {}",
        failures.len(),
        switches.len(),
        failures.join("\n  ")
    );
}
