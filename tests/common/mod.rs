//! Helpers shared by the integration tests: fixture paths, reading reference tensors, and
//! comparing against them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn reference(file: &str) -> PathBuf {
    fixtures().join("reference").join(file)
}

/// Loading options with `--model-config config`.
pub fn config_options(config: &Path) -> sd_wgpu::model::source::ModelOptions {
    sd_wgpu::model::source::ModelOptions {
        config: Some(config.to_path_buf()),
        vae: None,
        ..Default::default()
    }
}

/// Loading options with `--vae vae` (a path under tests/fixtures).
pub fn vae_options(vae: &str) -> sd_wgpu::model::source::ModelOptions {
    sd_wgpu::model::source::ModelOptions {
        config: None,
        vae: Some(fixtures().join(vae)),
        ..Default::default()
    }
}

/// A reference tensor: shape and values widened to f64 (ints included).
#[derive(Clone, Debug)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl RefTensor {
    pub fn f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

/// Every tensor of a safetensors file, by name.
pub fn load_tensors(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            use safetensors::Dtype;
            let b = view.data();
            let data: Vec<f64> = match view.dtype() {
                Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => b
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I32 => b
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{}: unsupported dtype {other:?} for {name}", path.display()),
            };
            (
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts `max |actual - expected| <= rel * max |expected|`: a relative tolerance on the
/// tensor's scale (an elementwise relative error is meaningless near zero).
pub fn assert_close(what: &str, actual: &[f32], expected: &[f64], rel: f64) {
    if let Err(message) = check_close(what, actual, expected, rel) {
        panic!("{message}");
    }
}

/// [`assert_close`]'s check, returning the failure message instead of panicking (for tests
/// that collect every failure before asserting).
pub fn check_close(what: &str, actual: &[f32], expected: &[f64], rel: f64) -> Result<(), String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    if let Some(i) = actual.iter().position(|a| a.is_nan()) {
        return Err(format!("{what}: NaN at {i}"));
    }
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let (mut worst, mut at) = (0f64, 0);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let d = (*a as f64 - e).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    if worst <= rel * scale {
        Ok(())
    } else {
        Err(format!(
            "{what}: max abs diff {worst:.3e} at index {at} (got {}, expected {}) exceeds {rel:e} x scale {scale:.3e}",
            actual[at], expected[at]
        ))
    }
}

/// A writable copy of a fixture model folder.
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&model_dir(name), &dir);
    (tmp, dir)
}

/// Sets `field` of a JSON config file to `value`.
pub fn set_json_field(path: &Path, field: &str, value: serde_json::Value) {
    let mut config = read_json(path);
    config[field] = value;
    std::fs::write(path, config.to_string()).unwrap();
}

/// Rewrites a safetensors file with every value of the f32 tensor `name` set to NaN: a
/// file that loads (names, shapes and dtypes are right) but cannot compute.
pub fn poison_tensor(path: &Path, name: &str) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let nan = f32::NAN.to_le_bytes();
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, view)| {
            let mut data = view.data().to_vec();
            if n == name {
                assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
                data = nan.repeat(data.len() / 4);
            }
            (n, view.dtype(), view.shape().to_vec(), data)
        })
        .collect();
    assert!(
        tensors.iter().any(|(n, ..)| n == name),
        "{}: no tensor {name}",
        path.display()
    );
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, dtype, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
            (n.as_str(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The devices the pipeline tests run on: the CPU, and the GPU wherever wgpu finds an
/// adapter (CI has Mesa's llvmpipe). Without one the GPU runs are skipped, loudly.
pub fn devices() -> Vec<(String, sd_wgpu::tensor::Device)> {
    use sd_wgpu::backend::{select_device, BackendChoice};
    use sd_wgpu::tensor::Device;
    let mut devices = vec![("cpu".to_string(), Device::Cpu)];
    match select_device(BackendChoice::Gpu, None) {
        Ok(gpu) => devices.push(("gpu".to_string(), gpu)),
        // CI installs Mesa's llvmpipe: there, a missing adapter is a broken setup, not a skip.
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI has no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("\n*** NO GPU ADAPTER: the GPU runs of this test are SKIPPED ({e}) ***\n")
        }
    }
    devices
}

pub mod programs;
pub mod server;

/// A command that talks to a loopback server must not go through a proxy from the
/// environment.
pub fn without_proxies(command: &mut std::process::Command) -> &mut std::process::Command {
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        command.env_remove(var);
    }
    command.env("no_proxy", "*").env("NO_PROXY", "*")
}
pub mod image_cases;
