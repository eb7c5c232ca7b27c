//! `--model org/name[@revision]` read from a local Hugging Face cache laid out as Python's
//! huggingface_hub writes it (refs/, snapshots/ of symlinks into blobs/), or downloaded into
//! it from a fake Hub served here (no network), through the real binary. The cache location
//! and the endpoint reach the child process only: tests run in parallel.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod common;

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
/// variables set, and returns the process output and the PNG written (if any). Without an
/// `HF_ENDPOINT` among them the child runs with `HF_HUB_OFFLINE=1`: no test reaches the
/// network.
fn generate(model: &str, cwd: &Path, env: &[(&str, &OsStr)]) -> (Output, Option<Vec<u8>>) {
    generate_with(model, &[], cwd, env)
}

/// [`generate`] with more arguments.
fn generate_with(
    model: &str,
    extra: &[&OsStr],
    cwd: &Path,
    env: &[(&str, &OsStr)],
) -> (Output, Option<Vec<u8>>) {
    let out_dir = tempfile::tempdir().unwrap();
    let png = out_dir.path().join("out.png");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd-wgpu"));
    cmd.current_dir(cwd)
        .args(["generate", "--backend", "cpu", "--model", model])
        .args(extra)
        .args(["--prompt", "a hub test", "--steps", "2", "--width", "32"])
        .args(["--height", "32", "--seed", "1", "-o"])
        .arg(&png);
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "SD_MODEL",
        "SD_VAE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
    ] {
        cmd.env_remove(var);
    }
    common::without_proxies(&mut cmd);
    if !env.iter().any(|(k, _)| *k == "HF_ENDPOINT") {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    let bytes = std::fs::read(&png).ok();
    (output, bytes)
}

fn success(model: &str, cwd: &Path, env: &[(&str, &OsStr)]) -> (Vec<u8>, String) {
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
    let env = [("HF_HUB_CACHE", cache.as_os_str())];
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
    let (png, _) = success("org/name", &cwd, &[("HF_HOME", hf_home.as_os_str())]);
    assert!(png == reference(), "$HF_HOME/hub: another image");

    let home = tmp.path().join("home");
    make_cache(&home.join(".cache/huggingface/hub"), "org", "other");
    let (png, _) = success("org/other", &cwd, &[("HOME", home.as_os_str())]);
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
        let (png, stderr) = success(model, &cwd, &[("HF_HUB_CACHE", empty.as_os_str())]);
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
    let env = [("HF_HUB_CACHE", cache.as_os_str())];

    let (output, png) = generate("org/missing", &cwd, &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && png.is_none(), "{stderr}");
    let repo = cache.join("models--org--missing");
    assert!(stderr.contains(&repo.display().to_string()), "{stderr}");
    assert!(stderr.contains("weights/missing"), "{stderr}");
    assert!(
        stderr.contains(
            r#"huggingface-cli download org/missing --include "model_index.json" "*/config.json" "scheduler/*" "tokenizer/*" "tokenizer_2/*" "text_encoder/model.fp16.safetensors" "text_encoder_2/model.fp16.safetensors" "unet/diffusion_pytorch_model.fp16.safetensors" "vae/diffusion_pytorch_model.fp16.safetensors""#
        ),
        "{stderr}"
    );
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");

    // A revision that was never downloaded names the ref and snapshot paths it belongs in.
    let (output, _) = generate("org/name@v2", &cwd, &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let repo = cache.join("models--org--name");
    assert!(
        stderr.contains(&repo.join("refs/v2").display().to_string())
            && stderr.contains(&repo.join("snapshots/<commit>").display().to_string()),
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
    let (output, _) = generate(
        "org/name",
        tmp.path(),
        &[("HF_HUB_CACHE", cache.as_os_str())],
    );
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
        &[("HF_HUB_CACHE", tmp.path().as_os_str())],
    );
    assert!(png == reference(), "absolute folder path: another image");
}

// ---------------------------------------------------------------------------------------
// Downloading from a fake Hugging Face Hub.

/// One request the fake Hub received.
#[derive(Clone, Debug)]
struct Request {
    /// Path and query, as sent.
    path: String,
    authorization: Option<String>,
    range: Option<String>,
}

/// A fake Hugging Face Hub serving one model repository at commit [`HASH`] over plain
/// HTTP on 127.0.0.1: the model API (`/api/models/{id}/revision/{rev}`, with `blobs=true`
/// sizes and LFS hashes) and `/{id}/resolve/{rev}/{file}` with the headers huggingface_hub
/// clients read (`x-repo-commit`, `etag` / `x-linked-etag`, `content-range`) and `Range`
/// support. As on the real Hub, an LFS file's `resolve` answers 302 to a storage URL
/// (`/cdn/<sha256>` here, absolute), which serves the bytes without the repository headers
/// and without asking for a token. Every request is recorded.
struct FakeHub {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

struct RepoFile {
    name: String,
    bytes: Vec<u8>,
}

impl RepoFile {
    fn is_lfs(&self) -> bool {
        self.name.ends_with(".safetensors")
            || self.name.ends_with(".bin")
            || self.name.ends_with(".ckpt")
    }

    /// The name of its blob in the cache: a made-up sha256 for LFS files, a made-up git
    /// blob id otherwise (content-derived, so the same bytes give the same blob).
    fn blob(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &self.bytes {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let hex = format!("{h:016x}").repeat(4);
        if self.is_lfs() {
            hex
        } else {
            hex[..40].to_string()
        }
    }
}

impl FakeHub {
    /// Serves `files` as repository `org/name`; with `token`, anything without
    /// `Authorization: Bearer <token>` gets 401 as a gated repository does.
    fn start(repo: &str, files: Vec<RepoFile>, token: Option<&str>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new((
            repo.to_string(),
            files,
            token.map(str::to_string),
            url.clone(),
        ));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (shared, log) = (shared.clone(), log.clone());
                std::thread::spawn(move || {
                    let (repo, files, token, base) = &*shared;
                    let hub = Served {
                        repo,
                        files,
                        token: token.as_deref(),
                        base,
                    };
                    let _ = serve_connection(stream, &hub, &log);
                });
            }
        });
        FakeHub { url, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// The files whose contents were asked for (a `Range` other than `bytes=0-0`).
    fn downloads(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .requests()
            .iter()
            .filter(|r| r.range.as_deref() != Some("bytes=0-0"))
            .filter_map(|r| {
                let (_, file) = r.path.split_once(&format!("/resolve/{HASH}/"))?;
                Some(file.to_string())
            })
            .collect();
        files.sort();
        files
    }

    /// Every file path that was asked about at all (metadata or contents).
    fn touched(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .requests()
            .iter()
            .filter_map(|r| {
                Some(
                    r.path
                        .split_once("/resolve/")?
                        .1
                        .split_once('/')?
                        .1
                        .to_string(),
                )
            })
            .collect();
        files.sort();
        files.dedup();
        files
    }

    fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }
}

/// What the fake Hub serves.
struct Served<'a> {
    repo: &'a str,
    files: &'a [RepoFile],
    token: Option<&'a str>,
    /// Its own `http://127.0.0.1:<port>`, for redirects.
    base: &'a str,
}

fn serve_connection(
    stream: TcpStream,
    hub: &Served,
    log: &Mutex<Vec<Request>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut authorization, mut range) = (None, None);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "authorization" => authorization = Some(v.trim().to_string()),
                    "range" => range = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        log.lock().unwrap().push(Request {
            path: path.clone(),
            authorization: authorization.clone(),
            range: range.clone(),
        });
        let (status, headers, body) = answer(hub, &path, authorization, range);
        let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        stream.flush()?;
    }
}

type Answer = (&'static str, Vec<(&'static str, String)>, Vec<u8>);

fn answer(
    hub: &Served,
    path: &str,
    authorization: Option<String>,
    range: Option<String>,
) -> Answer {
    let (repo, files) = (hub.repo, hub.files);
    let not_found = |code: &str| {
        (
            "404 Not Found",
            vec![("x-error-code", code.to_string())],
            b"{\"error\": \"not found\"}".to_vec(),
        )
    };
    if let Some(blob) = path.strip_prefix("/cdn/") {
        return match files.iter().find(|f| f.is_lfs() && f.blob() == blob) {
            Some(file) => ranged(file, Vec::new(), range),
            None => not_found("NoSuchKey"),
        };
    }
    if let Some(token) = hub.token {
        if authorization.as_deref() != Some(&format!("Bearer {token}")) {
            return (
                "401 Unauthorized",
                vec![("x-error-code", "GatedRepo".to_string())],
                b"{\"error\": \"Access to this model is restricted\"}".to_vec(),
            );
        }
    }
    let json = vec![("content-type", "application/json".to_string())];
    if let Some(rest) = path.strip_prefix(&format!("/api/models/{repo}/revision/")) {
        let (revision, query) = rest.split_once('?').unwrap_or((rest, ""));
        if revision != "main" && revision != HASH {
            return not_found("RevisionNotFound");
        }
        assert!(query.contains("blobs=true"), "sizes are asked for: {path}");
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({
                    "rfilename": f.name,
                    "size": f.bytes.len(),
                    "blobId": f.blob()[..40].to_string(),
                });
                if f.is_lfs() {
                    v["lfs"] = serde_json::json!({
                        "sha256": f.blob(), "size": f.bytes.len(), "pointerSize": 134,
                    });
                }
                v
            })
            .collect();
        let info = serde_json::json!({ "id": repo, "sha": HASH, "siblings": siblings });
        return ("200 OK", json, info.to_string().into_bytes());
    }
    let Some(rest) = path.strip_prefix(&format!("/{repo}/resolve/")) else {
        return not_found("RepoNotFound");
    };
    let (revision, name) = rest.split_once('/').unwrap_or((rest, ""));
    if revision != "main" && revision != HASH {
        return not_found("RevisionNotFound");
    }
    let Some(file) = files.iter().find(|f| f.name == name) else {
        return not_found("EntryNotFound");
    };
    let mut headers = vec![
        ("x-repo-commit", HASH.to_string()),
        ("etag", format!("\"{}\"", &file.blob()[..40])),
    ];
    if file.is_lfs() {
        headers.push(("x-linked-etag", format!("\"{}\"", file.blob())));
        headers.push(("x-linked-size", file.bytes.len().to_string()));
        headers.push(("location", format!("{}/cdn/{}", hub.base, file.blob())));
        return ("302 Found", headers, Vec::new());
    }
    ranged(file, headers, range)
}

/// The file, or the part of it `range` asks for.
fn ranged(
    file: &RepoFile,
    mut headers: Vec<(&'static str, String)>,
    range: Option<String>,
) -> Answer {
    headers.push(("accept-ranges", "bytes".to_string()));
    let len = file.bytes.len();
    match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (start, end) = r.split_once('-').unwrap();
            let start: usize = start.parse().unwrap();
            let end: usize = if end.is_empty() {
                len - 1
            } else {
                end.parse::<usize>().unwrap().min(len - 1)
            };
            headers.push(("content-range", format!("bytes {start}-{end}/{len}")));
            let body = file.bytes[start.min(len)..=end].to_vec();
            ("206 Partial Content", headers, body)
        }
        None => ("200 OK", headers, file.bytes.clone()),
    }
}

/// The sd1 fixture as repository files, plus what a real SD 1.5 repository has and a
/// pipeline must not fetch. With `fp16`, each weights file also comes as the `.fp16`
/// variant (the fixture's tensors) while the full-precision file holds bytes that are not
/// safetensors: the image is right only if the fp16 file is the one used.
fn repo_files(fp16: bool) -> Vec<RepoFile> {
    let mut rels = Vec::new();
    files_under(&fixture(), Path::new(""), &mut rels);
    let mut files = Vec::new();
    for rel in rels {
        let name = rel.to_str().unwrap().to_string();
        let bytes = std::fs::read(fixture().join(&rel)).unwrap();
        if fp16 && name.ends_with(".safetensors") {
            files.push(RepoFile {
                name: name.replace(".safetensors", ".fp16.safetensors"),
                bytes,
            });
            files.push(RepoFile {
                name,
                bytes: b"the full-precision file is not the one to fetch".to_vec(),
            });
        } else {
            files.push(RepoFile { name, bytes });
        }
    }
    for name in [
        ".gitattributes",
        "README.md",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "v1-5-pruned-emaonly.ckpt",
        "v1-5-pruned-emaonly.safetensors",
    ] {
        files.push(RepoFile {
            name: name.to_string(),
            bytes: format!("unwanted {name}").into_bytes(),
        });
    }
    files
}

/// The files a pipeline needs from [`repo_files`], sorted.
fn wanted(fp16: bool) -> Vec<String> {
    let mut rels = Vec::new();
    files_under(&fixture(), Path::new(""), &mut rels);
    let mut names: Vec<String> = rels
        .iter()
        .map(|r| {
            let name = r.to_str().unwrap().to_string();
            if fp16 {
                name.replace(".safetensors", ".fp16.safetensors")
            } else {
                name
            }
        })
        .collect();
    names.sort();
    names
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn a_hub_id_is_downloaded_once_fp16_first_and_gives_the_folder_image() {
    let hub = FakeHub::start("org/name", repo_files(true), None);
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let env = [
        ("HF_ENDPOINT", os(&hub.url)),
        ("HF_HOME", hf_home.as_os_str()),
    ];
    let (png, stderr) = success("org/name", &cwd, &env);
    assert!(
        png == reference(),
        "downloaded model: another image\n{stderr}"
    );
    assert_eq!(
        hub.downloads(),
        wanted(true),
        "exactly the needed files, fp16"
    );
    assert_eq!(hub.touched(), wanted(true), "nothing else asked about");
    assert!(
        hub.requests().iter().all(|r| r.authorization.is_none()),
        "no token, none sent"
    );

    // The standard cache layout, shared with huggingface_hub.
    let repo = hf_home.join("hub/models--org--name");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        HASH
    );
    assert!(
        !repo.join(format!("refs/{HASH}")).exists(),
        "only refs/main"
    );
    let snapshot = repo.join("snapshots").join(HASH);
    assert!(stderr.contains(&snapshot.display().to_string()), "{stderr}");
    for name in wanted(true) {
        let link = snapshot.join(&name);
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.is_relative(), "{name} -> {}", target.display());
        let blob = std::fs::canonicalize(&link).unwrap();
        assert_eq!(
            blob.parent().unwrap(),
            std::fs::canonicalize(repo.join("blobs")).unwrap()
        );
    }
    let unet = repo_files(true)
        .into_iter()
        .find(|f| f.name == "unet/diffusion_pytorch_model.fp16.safetensors")
        .unwrap();
    assert!(repo.join("blobs").join(unet.blob()).is_file());

    // A second run asks nothing: the snapshot is complete.
    hub.clear();
    let (png, _) = success("org/name", &cwd, &env);
    assert!(png == reference());
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    // A partial download completes: a .part file is resumed, and a file whose blob is
    // still there is linked again without a download.
    std::fs::remove_file(snapshot.join("vae/config.json")).unwrap();
    let unet_link = snapshot.join(&unet.name);
    std::fs::remove_file(&unet_link).unwrap();
    let blob = repo.join("blobs").join(unet.blob());
    std::fs::remove_file(&blob).unwrap();
    std::fs::write(blob.with_extension("part"), &unet.bytes[..1000]).unwrap();
    hub.clear();
    let (png, _) = success("org/name", &cwd, &env);
    assert!(png == reference(), "completed model: another image");
    assert_eq!(hub.downloads(), std::slice::from_ref(&unet.name));
    assert!(snapshot.join("vae/config.json").is_file());
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.path.ends_with(&unet.name) && r.range.as_deref() == Some("bytes=1000-")),
        "the .part file is resumed: {:?}",
        hub.requests()
    );
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.path == format!("/cdn/{}", unet.blob())
                && r.range.as_deref() == Some("bytes=1000-")),
        "the range follows the redirect to storage: {:?}",
        hub.requests()
    );
}

#[test]
fn full_precision_when_the_repo_has_no_fp16_and_blobs_are_reused() {
    let hub = FakeHub::start("org/name", repo_files(false), None);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let env = [
        ("HF_ENDPOINT", os(&hub.url)),
        ("HF_HUB_CACHE", cache.as_os_str()),
    ];
    let (png, _) = success("org/name", tmp.path(), &env);
    assert!(png == reference());
    assert_eq!(hub.downloads(), wanted(false));

    // A commit pinned with @ is fetched the same, and no refs/ file is written for it.
    let pinned = tmp.path().join("pinned");
    let pinned_env = [
        ("HF_ENDPOINT", os(&hub.url)),
        ("HF_HUB_CACHE", pinned.as_os_str()),
    ];
    let (png, _) = success(&format!("org/name@{HASH}"), tmp.path(), &pinned_env);
    assert!(png == reference());
    let refs = pinned.join("models--org--name/refs");
    assert!(
        !refs.exists() || std::fs::read_dir(&refs).unwrap().next().is_none(),
        "no refs for a commit"
    );

    // Blobs already in the cache (another revision, or Python) are linked, not fetched.
    let repo = cache.join("models--org--name");
    std::fs::remove_dir_all(repo.join("snapshots")).unwrap();
    std::fs::remove_dir_all(repo.join("refs")).unwrap();
    hub.clear();
    let (png, _) = success("org/name", tmp.path(), &env);
    assert!(png == reference());
    assert_eq!(hub.downloads(), Vec::<String>::new());
    assert!(
        hub.requests().len() == 1,
        "only the file list: {:?}",
        hub.requests()
    );
}

#[test]
fn hf_token_is_sent_and_a_refusal_says_to_accept_the_licence() {
    let hub = FakeHub::start("org/gated", repo_files(true), Some("hf_secret"));
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    let env = [
        ("HF_ENDPOINT", os(&hub.url)),
        ("HF_HOME", hf_home.as_os_str()),
    ];

    // Without a token: 401, and what to do about it.
    let (output, png) = generate("org/gated", tmp.path(), &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && png.is_none(), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(stderr.contains("licence"), "{stderr}");
    assert!(stderr.contains("HF_TOKEN"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}/org/gated", hub.url)),
        "{stderr}"
    );
    assert!(hub.downloads().is_empty());

    // HF_TOKEN arrives as a bearer token on every request.
    hub.clear();
    let with_token = [env[0], env[1], ("HF_TOKEN", os("hf_secret"))];
    let (png, stderr) = success("org/gated", tmp.path(), &with_token);
    assert!(png == reference(), "{stderr}");
    assert!(!hub.requests().is_empty());
    for r in hub
        .requests()
        .iter()
        .filter(|r| !r.path.starts_with("/cdn/"))
    {
        assert_eq!(
            r.authorization.as_deref(),
            Some("Bearer hf_secret"),
            "{}",
            r.path
        );
    }

    // The token file `huggingface-cli login` writes, $HF_HOME/token, is read too.
    let hf_home2 = tmp.path().join("hf2");
    std::fs::create_dir_all(&hf_home2).unwrap();
    std::fs::write(hf_home2.join("token"), "hf_secret\n").unwrap();
    hub.clear();
    let (png, _) = success(
        "org/gated",
        tmp.path(),
        &[
            ("HF_ENDPOINT", os(&hub.url)),
            ("HF_HOME", hf_home2.as_os_str()),
        ],
    );
    assert!(png == reference());
    assert_eq!(hub.downloads(), wanted(true));
}

#[test]
fn offline_with_an_empty_cache_names_the_missing_files_and_where_they_go() {
    let hub = FakeHub::start("org/name", repo_files(true), None);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let (output, png) = generate(
        "org/name",
        tmp.path(),
        &[
            ("HF_ENDPOINT", os(&hub.url)),
            ("HF_HUB_CACHE", cache.as_os_str()),
            ("HF_HUB_OFFLINE", os("1")),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && png.is_none(), "{stderr}");
    assert!(hub.requests().is_empty(), "offline: {:?}", hub.requests());
    for needed in [
        "HF_HUB_OFFLINE",
        "model_index.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "vae/config.json",
        "weights/name/",
        "--local-dir weights/name",
        "huggingface-cli download org/name --include",
    ] {
        assert!(stderr.contains(needed), "{needed}:\n{stderr}");
    }
    let snapshots = cache.join("models--org--name/snapshots");
    assert!(
        stderr.contains(&snapshots.display().to_string()),
        "{stderr}"
    );
    assert!(!cache.exists(), "nothing written offline");
}

#[test]
fn an_unreachable_hub_fails_quickly_and_clearly() {
    // A port that was free a moment ago: connecting is refused.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let t0 = Instant::now();
    let (output, _) = generate(
        "org/name",
        tmp.path(),
        &[
            ("HF_ENDPOINT", os(&closed)),
            ("HF_HUB_CACHE", cache.as_os_str()),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(stderr.contains("cannot be reached"), "{stderr}");
    assert!(stderr.contains(&closed), "{stderr}");
    assert!(stderr.contains("model_index.json"), "{stderr}");
    assert!(
        stderr.contains(&cache.join("models--org--name").display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("weights/name/"), "{stderr}");
}

#[test]
fn a_repo_with_only_pickles_is_refused_by_name() {
    let files: Vec<RepoFile> = repo_files(false)
        .into_iter()
        .filter(|f| f.name != "unet/diffusion_pytorch_model.safetensors")
        .collect();
    let hub = FakeHub::start("org/old", files, None);
    let tmp = tempfile::tempdir().unwrap();
    let (output, _) = generate(
        "org/old",
        tmp.path(),
        &[
            ("HF_ENDPOINT", os(&hub.url)),
            ("HF_HUB_CACHE", tmp.path().as_os_str()),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("unet/diffusion_pytorch_model.bin"),
        "{stderr}"
    );
    assert!(stderr.contains("pickles"), "{stderr}");
    assert!(hub.downloads().is_empty());
}

#[test]
fn the_default_model_is_sd15_from_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sd-wgpu"))
        .current_dir(tmp.path())
        .args([
            "generate",
            "--backend",
            "cpu",
            "--prompt",
            "x",
            "-o",
            "out.png",
        ])
        .env_remove("SD_MODEL")
        .env("HF_HUB_CACHE", tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("model `stable-diffusion-v1-5/stable-diffusion-v1-5`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("models--stable-diffusion-v1-5--stable-diffusion-v1-5"),
        "{stderr}"
    );
}

/// `--vae org/name`: a repository holding one VAE at its root, as
/// madebyollin/sdxl-vae-fp16-fix does, or a whole pipeline repository, whose `vae/` it
/// lends (as `AutoencoderKL.from_pretrained(repo, subfolder="vae")`), is fetched as a model
/// is, but only the VAE's config and weights (not the original-layout copy, the pickle, or
/// the pipeline's other files), and gives the image of the same folder given by path.
#[test]
fn a_vae_repository_is_fetched_with_its_config_and_weights_only() {
    let folder = common::fixtures().join("vaes/sdxl_alt");
    let model = common::model_dir("sdxl");
    let model = model.to_str().unwrap();
    let run = |vae: &OsStr, cwd: &Path, env: &[(&str, &OsStr)]| {
        let (output, png) = generate_with(model, &[os("--vae"), vae], cwd, env);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "--vae {vae:?} failed:\n{stderr}");
        png.expect("a PNG was written")
    };
    let local_tmp = tempfile::tempdir().unwrap();
    let local = run(folder.as_os_str(), local_tmp.path(), &[]);
    let root_extras = [
        ".gitattributes",
        "README.md",
        "diffusion_pytorch_model.bin",
        "sdxl_vae.safetensors",
        "images/example.png",
    ];
    let pipeline_extras = [
        "model_index.json",
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "sd_xl_base_1.0.safetensors",
    ];
    for (repo, dir, extras) in [
        ("org/vae", "", &root_extras[..]),
        ("org/pipeline", "vae/", &pipeline_extras[..]),
    ] {
        let vae_files = [
            format!("{dir}config.json"),
            format!("{dir}diffusion_pytorch_model.safetensors"),
        ];
        let mut files: Vec<RepoFile> = vae_files
            .iter()
            .map(|name| RepoFile {
                name: name.clone(),
                bytes: std::fs::read(folder.join(name.trim_start_matches(dir))).unwrap(),
            })
            .collect();
        for name in extras {
            files.push(RepoFile {
                name: name.to_string(),
                bytes: format!("unwanted {name}").into_bytes(),
            });
        }
        let hub = FakeHub::start(repo, files, None);
        let tmp = tempfile::tempdir().unwrap();
        let env = [
            ("HF_ENDPOINT", os(&hub.url)),
            ("HF_HUB_CACHE", tmp.path().as_os_str()),
        ];
        let fetched = run(os(repo), tmp.path(), &env);
        assert_eq!(hub.downloads(), vae_files, "{repo}");
        assert_eq!(hub.touched(), vae_files, "{repo}");
        assert!(
            fetched == local,
            "{repo}: the fetched VAE gives the folder's image"
        );

        // From the cache the second time, asking nothing.
        hub.clear();
        assert!(run(os(repo), tmp.path(), &env) == local, "{repo}");
        assert!(hub.requests().is_empty(), "{repo}: {:?}", hub.requests());
    }
}
