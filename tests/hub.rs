//! `--model org/name[@revision]` read from a local Hugging Face cache laid out as Python's
//! huggingface_hub writes it (refs/, snapshots/ of symlinks into blobs/), through the real
//! binary. The cache location reaches the child process only: tests run in parallel.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const HASH: &str = "1d0c4ebf6ff58a5caecab40fa1406526bca4b5b9";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1")
}

fn files_under(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let rel = rel.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            files_under(dir, &rel, out);
        } else {
            out.push(rel);
        }
    }
}

/// `<cache>/models--{org}--{name}` holding the sd1 fixture as commit [`HASH`]: `refs/main`,
/// `snapshots/<HASH>/...` as relative symlinks into `blobs/<sha>`, as huggingface_hub does.
fn make_cache(cache: &Path, org: &str, name: &str) -> PathBuf {
    let repo = cache.join(format!("models--{org}--{name}"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    let snapshot = repo.join("snapshots").join(HASH);
    let mut files = Vec::new();
    files_under(&fixture(), Path::new(""), &mut files);
    assert!(files.len() >= 10, "the sd1 fixture has its files");
    for (i, rel) in files.iter().enumerate() {
        let sha = format!("{:064x}", 0xb10b_0000_u64 + i as u64);
        std::fs::copy(fixture().join(rel), repo.join("blobs").join(&sha)).unwrap();
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        // From snapshots/<hash>/<dirs...>/ back up to the repository folder.
        let up = "../".repeat(rel.components().count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{sha}"), &link).unwrap();
        assert!(link.is_file(), "{} resolves", link.display());
    }
    snapshot
}

/// Runs `sd-wgpu generate` on `model` in `cwd` with only the given Hugging Face
/// variables set, and returns the process output and the PNG written (if any).
fn generate(model: &str, cwd: &Path, env: &[(&str, &Path)]) -> (Output, Option<Vec<u8>>) {
    let out_dir = tempfile::tempdir().unwrap();
    let png = out_dir.path().join("out.png");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd-wgpu"));
    cmd.current_dir(cwd)
        .args(["generate", "--backend", "cpu", "--model", model])
        .args(["--prompt", "a hub test", "--steps", "2", "--width", "32"])
        .args(["--height", "32", "--seed", "1", "-o"])
        .arg(&png);
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "SD_MODEL",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    let bytes = std::fs::read(&png).ok();
    (output, bytes)
}

fn success(model: &str, cwd: &Path, env: &[(&str, &Path)]) -> (Vec<u8>, String) {
    let (output, png) = generate(model, cwd, env);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "--model {model} failed:\n{stderr}");
    (png.expect("a PNG was written"), stderr)
}

/// The image from `--model tests/fixtures/models/sd1`, a plain relative folder path.
fn reference() -> &'static [u8] {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| {
        success(
            "tests/fixtures/models/sd1",
            Path::new(env!("CARGO_MANIFEST_DIR")),
            &[],
        )
        .0
    })
}

#[test]
fn hub_id_resolves_to_the_cached_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let snapshot = make_cache(&cache, "org", "name");
    // A fresh empty working directory: no weights/ to find first.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let env = [("HF_HUB_CACHE", cache.as_path())];
    for model in [
        "org/name".to_string(),
        format!("org/name@{HASH}"),
        "org/name@main".to_string(),
    ] {
        let (png, stderr) = success(&model, &cwd, &env);
        assert!(png == reference(), "--model {model}: another image");
        assert!(
            stderr.contains(&snapshot.display().to_string()),
            "the log names the snapshot used:\n{stderr}"
        );
    }
}

#[test]
fn hf_home_and_home_are_fallbacks() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();

    let hf_home = tmp.path().join("hf_home");
    make_cache(&hf_home.join("hub"), "org", "name");
    let (png, _) = success("org/name", &cwd, &[("HF_HOME", &hf_home)]);
    assert!(png == reference(), "$HF_HOME/hub: another image");

    let home = tmp.path().join("home");
    make_cache(&home.join(".cache/huggingface/hub"), "org", "other");
    let (png, _) = success("org/other", &cwd, &[("HOME", &home)]);
    assert!(
        png == reference(),
        "~/.cache/huggingface/hub: another image"
    );
}

#[test]
fn weights_name_is_searched_before_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(cwd.join("weights")).unwrap();
    std::os::unix::fs::symlink(fixture(), cwd.join("weights/tiny")).unwrap();
    let empty = tmp.path().join("empty-cache");
    for model in ["tiny", "org/tiny"] {
        let (png, stderr) = success(model, &cwd, &[("HF_HUB_CACHE", &empty)]);
        assert!(png == reference(), "--model {model}: another image");
        assert!(stderr.contains("weights/tiny"), "{stderr}");
    }
}

#[test]
fn a_missing_repo_says_where_it_looked_and_how_to_fetch_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    make_cache(&cache, "org", "name");
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let env = [("HF_HUB_CACHE", cache.as_path())];

    let (output, png) = generate("org/missing", &cwd, &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && png.is_none(), "{stderr}");
    let repo = cache.join("models--org--missing");
    assert!(stderr.contains(&repo.display().to_string()), "{stderr}");
    assert!(stderr.contains("weights/missing"), "{stderr}");
    assert!(
        stderr.contains(
            r#"huggingface-cli download org/missing --include "model_index.json" "*/config.json" "scheduler/*" "tokenizer/*" "text_encoder/model.fp16.safetensors" "unet/diffusion_pytorch_model.fp16.safetensors" "vae/diffusion_pytorch_model.fp16.safetensors""#
        ),
        "{stderr}"
    );
    assert!(stderr.contains("not implemented yet"), "{stderr}");

    // A revision that was never downloaded names the ref and snapshot paths it tried.
    let (output, _) = generate("org/name@v2", &cwd, &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let repo = cache.join("models--org--name");
    assert!(
        stderr.contains(&repo.join("refs/v2").display().to_string())
            && stderr.contains(&repo.join("snapshots/v2").display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains("huggingface-cli download org/name --revision v2 --include"),
        "{stderr}"
    );
}

#[test]
fn a_snapshot_with_a_missing_component_is_named_by_component() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let snapshot = make_cache(&cache, "org", "name");
    std::fs::remove_dir_all(snapshot.join("vae")).unwrap();
    let (output, _) = generate("org/name", tmp.path(), &[("HF_HUB_CACHE", cache.as_path())]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("vae"), "{stderr}");
}

#[test]
fn a_local_folder_path_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    // An absolute path, from a directory with its own (empty) cache.
    let (png, _) = success(
        fixture().to_str().unwrap(),
        tmp.path(),
        &[("HF_HUB_CACHE", tmp.path())],
    );
    assert!(png == reference(), "absolute folder path: another image");
}
