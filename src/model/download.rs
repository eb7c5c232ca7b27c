//! Fetching a model from the Hugging Face Hub into the standard Hugging Face cache (the
//! layout Python's `huggingface_hub` reads and writes, so nothing is downloaded twice):
//! only the files a text-to-image pipeline reads, the `fp16` weights when the repository has
//! them, never pickles (`.bin`, `.ckpt`) nor the safety checker.
//!
//! The file list comes from the Hub's model API (`/api/models/{id}/revision/{rev}`); the
//! files themselves are downloaded, resumably, with the `hf-hub` crate into
//! `blobs/<etag>`, linked from `snapshots/<commit>/`, and `refs/<revision>` records the
//! commit, as huggingface_hub does.
//!
//! The environment is read as huggingface_hub reads it: `HF_ENDPOINT`, `HF_TOKEN` (else the
//! token file `$HF_TOKEN_PATH` or `$HF_HOME/token` that `huggingface-cli login` writes) and
//! `HF_HUB_OFFLINE`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::hub::{hf_home_dir_from, HubId, INCLUDE};
use crate::error::{Error, Result};

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How long connecting to the Hub, and its first answer, may take before the error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The components whose weights are read, with their file stems (transformers names the
/// text encoder's `model`, diffusers the others `diffusion_pytorch_model`).
const WEIGHTS: [(&str, &str); 3] = [
    ("text_encoder", "model"),
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
];

/// SDXL's second text encoder (`CLIPTextModelWithProjection`) and its tokenizer: read when
/// the repository has `text_encoder_2/` (SD 1.x/2.x repositories have none).
const XL_WEIGHTS: (&str, &str) = ("text_encoder_2", "model");
const XL_CONFIG: &str = "text_encoder_2/config.json";

/// The weighted components of a repository with (`xl`) or without a second text encoder.
fn weights_of(xl: bool) -> Vec<(&'static str, &'static str)> {
    let mut all = WEIGHTS.to_vec();
    all.extend(xl.then_some(XL_WEIGHTS));
    all
}

/// The tokenizer folders of a repository with (`xl`) or without a second text encoder.
fn tokenizers_of(xl: bool) -> &'static [&'static str] {
    if xl {
        &["tokenizer", "tokenizer_2"]
    } else {
        &["tokenizer"]
    }
}

/// The single files always read.
const CONFIGS: [&str; 5] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
];

/// What a repository must hold to be used: a whole text-to-image pipeline in diffusers
/// layout (`--model`), or a VAE (`--vae`: `config.json` and
/// `diffusion_pytorch_model.safetensors` at its root, as madebyollin/sdxl-vae-fp16-fix has
/// them, or under a pipeline's `vae/`; see [`vae_dir`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Pipeline,
    Vae,
}

impl RepoKind {
    /// What it is called in messages.
    pub fn what(self) -> &'static str {
        match self {
            RepoKind::Pipeline => "model",
            RepoKind::Vae => "VAE",
        }
    }

    /// What a local copy of it is, in messages.
    pub fn folder(self) -> &'static str {
        match self {
            RepoKind::Pipeline => "diffusers model folder",
            RepoKind::Vae => {
                "diffusers VAE folder (config.json, diffusion_pytorch_model.safetensors)"
            }
        }
    }

    /// The files it needs, as `huggingface-cli download --include` patterns.
    pub fn include(self) -> &'static str {
        match self {
            RepoKind::Pipeline => INCLUDE,
            RepoKind::Vae => VAE_INCLUDE,
        }
    }

    /// Its weights files (`xl`: with SDXL's second text encoder; `vae_dir`: where a VAE
    /// repository keeps it, see [`vae_dir`]), each as its full-precision and its fp16 path in
    /// the repository.
    fn weight_files(self, xl: bool, vae_dir: &str) -> Vec<[String; 2]> {
        let pair = |dir: &str, stem: &str| {
            [
                format!("{dir}{stem}.safetensors"),
                format!("{dir}{stem}.fp16.safetensors"),
            ]
        };
        match self {
            RepoKind::Pipeline => weights_of(xl)
                .into_iter()
                .map(|(component, stem)| pair(&format!("{component}/"), stem))
                .collect(),
            RepoKind::Vae => vec![pair(vae_dir, VAE_STEM)],
        }
    }
}

/// Where a `--vae` repository keeps its VAE, by which files it `has`: at its root, as
/// madebyollin/sdxl-vae-fp16-fix does, or, in a whole pipeline repository (no `config.json`
/// at the root, a `vae/config.json`), under `vae/`, as diffusers'
/// `AutoencoderKL.from_pretrained(repo, subfolder="vae")` reads it and as a local pipeline
/// folder given to `--vae` lends its `vae/` (model::source).
fn vae_dir(has: impl Fn(&str) -> bool) -> &'static str {
    if !has("config.json") && has("vae/config.json") {
        "vae/"
    } else {
        ""
    }
}

/// The weights file stem of a VAE repository (diffusers' `AutoencoderKL`).
const VAE_STEM: &str = "diffusion_pytorch_model";
/// The files a VAE repository must have, as `huggingface-cli download --include` patterns.
const VAE_INCLUDE: &str = r#""config.json" "diffusion_pytorch_model.safetensors""#;

/// How to reach the Hub, from the environment.
#[derive(Clone, Debug)]
pub struct HubAccess {
    /// `https://huggingface.co` or `$HF_ENDPOINT`, without a trailing `/`.
    pub endpoint: String,
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
}

impl HubAccess {
    pub fn from_env() -> HubAccess {
        Self::from_vars(|key| {
            std::env::var_os(key)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.trim().is_empty())
        })
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubAccess {
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let file = match var("HF_TOKEN_PATH") {
                    Some(path) => PathBuf::from(path),
                    None => {
                        hf_home_dir_from(|k| var(k).map(std::ffi::OsString::from))?.join("token")
                    }
                };
                let text = std::fs::read_to_string(file).ok()?;
                Some(text.trim().to_string()).filter(|t| !t.is_empty())
            });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        });
        HubAccess {
            endpoint,
            token,
            offline,
        }
    }
}

/// The files of a snapshot folder that a repository of `kind` needs and that are not
/// there, by name (a weights file as `unet/diffusion_pytorch_model.fp16.safetensors (or
/// .safetensors)`). Empty when the folder is complete.
pub fn missing_in_snapshot(dir: &Path, kind: RepoKind) -> Vec<String> {
    let mut missing = Vec::new();
    let has = |rel: &str| dir.join(rel).is_file();
    // An SDXL snapshot has the second encoder's config once that was downloaded, and its
    // `model_index.json` names it from the start (it is downloaded last, though).
    let xl = has(XL_CONFIG)
        || std::fs::read_to_string(dir.join("model_index.json"))
            .is_ok_and(|index| index.contains("\"text_encoder_2\""));
    let vae_dir = vae_dir(has);
    let configs: Vec<String> = match kind {
        RepoKind::Pipeline => CONFIGS
            .iter()
            .copied()
            .chain(xl.then_some(XL_CONFIG))
            .map(str::to_string)
            .collect(),
        RepoKind::Vae => vec![format!("{vae_dir}config.json")],
    };
    for config in configs {
        if !has(&config) {
            missing.push(config);
        }
    }
    if kind == RepoKind::Pipeline {
        for tokenizer in tokenizers_of(xl) {
            let complete = has(&format!("{tokenizer}/tokenizer.json"))
                || has(&format!("{tokenizer}/vocab.json"))
                    && has(&format!("{tokenizer}/merges.txt"));
            if !complete {
                missing.push(format!(
                    "{tokenizer}/ (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)"
                ));
            }
        }
    }
    for [full, fp16] in kind.weight_files(xl, vae_dir) {
        if !has(&fp16) && !has(&full) {
            let stem = full.rsplit('/').next().unwrap_or(&full);
            missing.push(format!("{fp16} (or {stem})"));
        }
    }
    missing
}

/// The model API's answer: the commit and its files.
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Clone, Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    /// The git blob id: the file's etag and blob name when it is not stored with LFS.
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Clone, Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: Option<u64>,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().and_then(|l| l.size).or(self.size)
    }

    /// The name of its blob in the cache (`blobs/<etag>`): the LFS sha256, else the git
    /// blob id, as huggingface_hub names them.
    fn blob_name(&self) -> Option<&str> {
        let name = match &self.lfs {
            Some(lfs) => lfs.sha256.as_str(),
            None => self.blob_id.as_deref()?,
        };
        (!name.is_empty() && name.chars().all(|c| c.is_ascii_hexdigit())).then_some(name)
    }
}

/// Weight formats that are never downloaded: pickles and other frameworks' files.
fn is_unread_weights(name: &str) -> bool {
    [
        ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack", ".onnx", ".h5",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

/// Picks from a repository's files those a repository of `kind` is read from. A pipeline:
/// `model_index.json`, the scheduler, tokenizer and component configs, and one safetensors
/// file per weighted component; a VAE: its weights and `config.json`. The `fp16` variant of
/// each weights file when there is one. Files are in download order, with
/// `model_index.json` (a VAE's `config.json`) last, so a download cut short never looks
/// complete.
fn choose_files(
    repo: &str,
    files: &[Sibling],
    kind: RepoKind,
) -> std::result::Result<Vec<Sibling>, String> {
    let find = |name: &str| files.iter().find(|f| f.rfilename == name);
    let mut chosen = Vec::new();
    let mut problems = Vec::new();
    let xl = kind == RepoKind::Pipeline && find(XL_CONFIG).is_some();
    let vae_dir = vae_dir(|name| find(name).is_some());
    for [full, fp16] in kind.weight_files(xl, vae_dir) {
        if let Some(f) = find(&fp16).or_else(|| find(&full)) {
            chosen.push(f.clone());
            continue;
        }
        // `unet/` for a pipeline's component, the repository itself for a VAE.
        let (dir, stem) = match full.rsplit_once('/') {
            Some((dir, file)) => (format!("{dir}/"), file.trim_end_matches(".safetensors")),
            None => (String::new(), full.trim_end_matches(".safetensors")),
        };
        let place = if dir.is_empty() {
            "the repository".to_string()
        } else {
            dir.clone()
        };
        let others: Vec<&str> = files
            .iter()
            .map(|f| f.rfilename.as_str())
            .filter(|n| {
                let here = if dir.is_empty() {
                    !n.contains('/')
                } else {
                    n.starts_with(dir.as_str())
                };
                here && !n.ends_with(".json") && !n.ends_with(".md") && !n.starts_with('.')
            })
            .collect();
        problems.push(if others.iter().any(|n| n.ends_with(".safetensors")) {
            format!(
                "{place} has no {stem}.safetensors or {stem}.fp16.safetensors (only {}: sharded or \
                 other safetensors files are not read)",
                others.join(", ")
            )
        } else if others.iter().any(|n| is_unread_weights(n)) {
            format!(
                "{place} has only {} and no safetensors weights: PyTorch pickles can run code \
                 when loaded and are not read",
                others.join(", ")
            )
        } else {
            format!("{place} has no {stem}.safetensors or {stem}.fp16.safetensors")
        });
    }
    if kind == RepoKind::Vae {
        match find(&format!("{vae_dir}config.json")) {
            Some(f) => chosen.push(f.clone()),
            None => problems.insert(0, "there is no config.json".into()),
        }
        return if problems.is_empty() {
            Ok(chosen)
        } else {
            Err(format!(
                "{repo} is not a VAE in diffusers layout that sd-wgpu reads: {}",
                problems.join("; ")
            ))
        };
    }
    for config in CONFIGS
        .iter()
        .skip(1)
        .copied()
        .chain(xl.then_some(XL_CONFIG))
    {
        match find(config) {
            Some(f) => chosen.push(f.clone()),
            None => problems.push(format!("there is no {config}")),
        }
    }
    for dir in tokenizers_of(xl) {
        let tokenizer: Vec<&Sibling> = files
            .iter()
            .filter(|f| {
                f.rfilename
                    .strip_prefix(dir)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|rest| {
                        !rest.is_empty()
                            && !rest.starts_with('.')
                            && rest
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    })
            })
            .collect();
        let names: HashSet<&str> = tokenizer.iter().map(|f| f.rfilename.as_str()).collect();
        let has = |file: &str| names.contains(format!("{dir}/{file}").as_str());
        if has("tokenizer.json") || (has("vocab.json") && has("merges.txt")) {
            chosen.extend(tokenizer.into_iter().cloned());
        } else {
            problems.push(format!(
                "{dir}/ has no tokenizer.json, nor vocab.json and merges.txt"
            ));
        }
    }
    match find("model_index.json") {
        Some(f) => chosen.push(f.clone()),
        None => problems.insert(0, "there is no model_index.json".into()),
    }
    if problems.is_empty() {
        Ok(chosen)
    } else {
        Err(format!(
            "{repo} is not a Stable Diffusion pipeline in diffusers layout that sd-wgpu reads: {}",
            problems.join("; ")
        ))
    }
}

/// A shared progress bar for all the files of one fetch, fed by hf-hub.
struct Bar(ProgressBar);

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, _size: usize, filename: &str) {
        self.0.set_message(filename.to_string());
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {}
}

/// Where a fetch stands when it cannot go on: the error names the repository, the
/// missing files, the cache folder they belong in and the other ways to provide them.
struct Unavailable<'a> {
    id: &'a HubId,
    repo_dir: PathBuf,
    commit: Option<String>,
    missing: Vec<String>,
    weights: &'a Path,
    kind: RepoKind,
}

impl Unavailable<'_> {
    fn error(&self, reason: &str) -> Error {
        let id = self.id;
        let snapshot = self
            .repo_dir
            .join("snapshots")
            .join(self.commit.as_deref().unwrap_or("<commit>"));
        let revision = match &id.revision {
            Some(rev) => format!(" --revision {rev}"),
            None => String::new(),
        };
        let folder = self.weights.join(&id.name);
        let kind = self.kind;
        Error::InvalidArgument(format!(
            "{} `{}` is not in the Hugging Face cache and was not downloaded: {reason}. \
             Missing: {}; they belong in {}/ (with {} naming the commit). Fetch them where \
             the Hub can be reached, with the Python CLI (pip install huggingface_hub):\n  \
             huggingface-cli download {}{revision} --include {}\n\
             and copy {} into this cache; or put a {} at {}/ (add \
             `--local-dir {}` to the command above) and it is used from there",
            kind.what(),
            id.repo_id()
                + &id
                    .revision
                    .as_ref()
                    .map(|r| format!("@{r}"))
                    .unwrap_or_default(),
            self.missing.join(", "),
            snapshot.display(),
            self.repo_dir.join("refs").join(id.revision()).display(),
            id.repo_id(),
            kind.include(),
            self.repo_dir.display(),
            kind.folder(),
            folder.display(),
            folder.display(),
        ))
    }
}

/// The commit `refs/<revision>` names in the cache, or the revision itself when it looks
/// like a commit hash.
fn cached_commit(repo_dir: &Path, id: &HubId) -> Option<String> {
    let text = std::fs::read_to_string(repo_dir.join("refs").join(id.revision())).ok();
    let commit = match text {
        Some(t) => t.trim().to_string(),
        None => id.revision.clone()?,
    };
    is_commit_hash(&commit).then_some(commit)
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The answer to a refused request, with what to do about it.
fn refused(id: &HubId, access: &HubAccess, status: u16, code: Option<&str>) -> Error {
    let page = format!("{}/{}", access.endpoint, id.repo_id());
    let message = match status {
        401 | 403 => {
            let token = if access.token.is_some() {
                "the token sent (HF_TOKEN or the token file) was refused or has no access to it"
            } else {
                "no token was sent"
            };
            format!(
                "the Hugging Face Hub refused access to {} (HTTP {status}{}): {token}. The \
                 repository is gated or private, or does not exist: check the id, accept the \
                 model's licence on {page} while logged in, then create an access token at \
                 {}/settings/tokens and set HF_TOKEN=<token> (or run `huggingface-cli login`)",
                id.repo_id(),
                code.map(|c| format!(", {c}")).unwrap_or_default(),
                access.endpoint,
            )
        }
        404 if code == Some("RevisionNotFound") => format!(
            "the Hugging Face Hub has no revision `{}` in {} (see {page})",
            id.revision(),
            id.repo_id()
        ),
        404 => format!(
            "the Hugging Face Hub has no repository {} (HTTP 404{}); check the id at {page}",
            id.repo_id(),
            code.map(|c| format!(", {c}")).unwrap_or_default(),
        ),
        _ => format!(
            "the Hugging Face Hub answered HTTP {status} for {}",
            id.repo_id()
        ),
    };
    Error::InvalidArgument(message)
}

/// The snapshot folder of `id` in `cache`, completed from the Hub: what is already in the
/// cache is kept, a blob already there is linked rather than downloaded, and only the
/// missing files are fetched. `weights` is only named in errors, as the other place a model
/// can be put.
pub fn fetch(
    id: &HubId,
    kind: RepoKind,
    cache: &Path,
    weights: &Path,
    access: &HubAccess,
) -> Result<PathBuf> {
    let repo_dir = cache.join(id.cache_dir_name());
    let mut unavailable = Unavailable {
        id,
        repo_dir: repo_dir.clone(),
        commit: cached_commit(&repo_dir, id),
        missing: Vec::new(),
        weights,
        kind,
    };
    let cached_missing = |commit: &Option<String>| {
        let snapshot = commit.as_ref().map(|c| repo_dir.join("snapshots").join(c));
        match snapshot {
            Some(dir) if dir.is_dir() => missing_in_snapshot(&dir, kind),
            _ => missing_in_snapshot(Path::new(""), kind),
        }
    };
    if access.offline {
        unavailable.missing = cached_missing(&unavailable.commit);
        return Err(unavailable.error("HF_HUB_OFFLINE is set, so the Hub is not asked"));
    }

    // The file list of the revision, at one commit.
    let url = format!(
        "{}/api/models/{}/revision/{}",
        access.endpoint,
        id.repo_id(),
        id.revision().replace('/', "%2F")
    );
    tracing::info!("asking {} for {}", access.endpoint, id.repo_id());
    let mut request = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_recv_body(Some(RESPONSE_TIMEOUT))
        .user_agent(concat!("sd-wgpu/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
        .get(&url)
        .query("blobs", "true");
    if let Some(token) = &access.token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let info: RepoInfo = match request.call() {
        Ok(mut response) => {
            let status = response.status().as_u16();
            if status != 200 {
                let code = response
                    .headers()
                    .get("x-error-code")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                return Err(refused(id, access, status, code.as_deref()));
            }
            let body = response.body_mut().read_to_string().map_err(|e| {
                unavailable.missing = cached_missing(&unavailable.commit);
                unavailable.error(&format!("reading {url} failed: {e}"))
            })?;
            serde_json::from_str(&body).map_err(|e| {
                Error::Other(format!("{url} did not answer a model's file list: {e}"))
            })?
        }
        Err(e) => {
            unavailable.missing = cached_missing(&unavailable.commit);
            return Err(unavailable.error(&format!("{} cannot be reached ({e})", access.endpoint)));
        }
    };
    if !is_commit_hash(&info.sha) {
        return Err(Error::Other(format!(
            "{url} named no commit (sha `{}`)",
            info.sha
        )));
    }
    let wanted =
        choose_files(&id.repo_id(), &info.siblings, kind).map_err(Error::InvalidArgument)?;
    let vae_dir = vae_dir(|name| info.siblings.iter().any(|f| f.rfilename == name));

    let commit = info.sha;
    let snapshot = repo_dir.join("snapshots").join(&commit);
    unavailable.commit = Some(commit.clone());
    // refs/<revision> names the commit as soon as it is known, as huggingface_hub does, so
    // that a download cut short is found and completed next time.
    if id.revision() != commit {
        let ref_file = repo_dir.join("refs").join(id.revision());
        std::fs::create_dir_all(ref_file.parent().expect("refs/<revision> has a parent"))
            .and_then(|()| std::fs::write(&ref_file, &commit))
            .map_err(|e| Error::io(&ref_file, e))?;
    }

    // What the snapshot lacks; a weights file of either precision already there will do.
    let present = |rel: &str| snapshot.join(rel).is_file();
    let mut todo: Vec<Sibling> = wanted
        .into_iter()
        .filter(|f| {
            let alternatives = kind
                .weight_files(true, vae_dir)
                .into_iter()
                .find(|pair| pair.contains(&f.rfilename));
            match alternatives {
                Some(names) => !names.iter().any(|n| present(n)),
                None => !present(&f.rfilename),
            }
        })
        .collect();
    if todo.is_empty() {
        return Ok(snapshot);
    }

    // A blob that another revision (or Python) already downloaded is linked, not fetched.
    let blobs = repo_dir.join("blobs");
    todo.retain(|f| {
        let Some(blob) = f.blob_name().map(|b| blobs.join(b)) else {
            return true;
        };
        let complete = match (std::fs::metadata(&blob), f.size()) {
            (Ok(meta), Some(size)) => meta.is_file() && meta.len() == size,
            _ => false,
        };
        !(complete && link_blob(&blob, &snapshot.join(&f.rfilename)).is_ok())
    });
    if todo.is_empty() {
        return Ok(snapshot);
    }

    let total: u64 = todo.iter().filter_map(Sibling::size).sum();
    tracing::info!(
        "downloading {} file(s), {}, of {} at commit {commit} into {}",
        todo.len(),
        HumanBytes(total),
        id.repo_id(),
        snapshot.display()
    );
    for f in &todo {
        tracing::info!(
            "  {} ({})",
            f.rfilename,
            f.size()
                .map_or("size unknown".into(), |s| HumanBytes(s).to_string())
        );
    }

    let refs_commit = repo_dir.join("refs").join(&commit);
    let had_commit_ref = refs_commit.exists();
    let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_endpoint(access.endpoint.clone())
        .with_token(access.token.clone())
        .with_progress(false)
        .with_retries(2)
        .build()
        .map_err(|e| Error::Other(format!("Hugging Face Hub client: {e}")))?;
    // Downloads are made at the commit itself, so every file is of the same one.
    let repo = api.repo(Repo::with_revision(
        id.repo_id(),
        RepoType::Model,
        commit.clone(),
    ));
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta})",
        )
        .expect("the template is a valid constant")
        .progress_chars("=> "),
    );
    let mut result = Ok(());
    for (i, f) in todo.iter().enumerate() {
        match repo.download_with_progress(&f.rfilename, Bar(bar.clone())) {
            Ok(path) if path == snapshot.join(&f.rfilename) => {}
            Ok(path) => {
                result = Err(Error::Other(format!(
                    "{} was downloaded to {}, not into the snapshot of commit {commit}: the \
                     Hub answered another commit",
                    f.rfilename,
                    path.display()
                )));
                break;
            }
            Err(e) => {
                result = Err(match status_of(&e) {
                    Some(status) => refused(id, access, status, None),
                    None => {
                        unavailable.missing =
                            todo[i..].iter().map(|f| f.rfilename.clone()).collect();
                        unavailable.error(&format!("downloading {} failed: {e}", f.rfilename))
                    }
                });
                break;
            }
        }
    }
    bar.finish_and_clear();
    // hf-hub records every download's commit as refs/<commit>, which huggingface_hub
    // never writes.
    if !had_commit_ref {
        let _ = std::fs::remove_file(&refs_commit);
    }
    result?;
    tracing::info!("downloaded {} in {}", id.repo_id(), snapshot.display());
    Ok(snapshot)
}

/// The HTTP status of a refused download, if that is what failed.
fn status_of(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::StatusCode(status) => Some(*status),
            _ => None,
        },
        ApiError::TooManyRetries(inner) => status_of(inner),
        _ => None,
    }
}

/// `snapshot_file` as a relative symlink to `blob`, as huggingface_hub makes them (a copy
/// where symlinks cannot be made).
fn link_blob(blob: &Path, snapshot_file: &Path) -> std::io::Result<()> {
    let dir = snapshot_file.parent().expect("a file in the snapshot");
    std::fs::create_dir_all(dir)?;
    // snapshots/<commit>/<dirs...>/file -> ../../<dirs...>/blobs/<blob>
    let repo_dir = blob
        .parent()
        .and_then(Path::parent)
        .expect("blobs/<name> in a repository folder");
    let depth = snapshot_file
        .strip_prefix(repo_dir)
        .map(|rel| rel.components().count() - 1)
        .unwrap_or(0);
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().expect("a blob file name"));
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, snapshot_file)
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, snapshot_file).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> Sibling {
        Sibling {
            rfilename: name.into(),
            size: Some(1),
            blob_id: None,
            lfs: None,
        }
    }

    fn names(files: &[Sibling]) -> Vec<&str> {
        files.iter().map(|f| f.rfilename.as_str()).collect()
    }

    const SD15: &[&str] = &[
        ".gitattributes",
        "README.md",
        "feature_extractor/preprocessor_config.json",
        "model_index.json",
        "safety_checker/config.json",
        "safety_checker/model.fp16.safetensors",
        "safety_checker/model.safetensors",
        "safety_checker/pytorch_model.bin",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "v1-5-pruned-emaonly.ckpt",
        "v1-5-pruned-emaonly.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ];

    #[test]
    fn a_vae_repository_gives_its_weights_then_its_config() {
        // madebyollin/sdxl-vae-fp16-fix's files.
        let repo = [
            ".gitattributes",
            "README.md",
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "images/sdxl-vae-fp16-fix.png",
            "sdxl.vae.safetensors",
            "sdxl_vae.safetensors",
        ];
        let files: Vec<Sibling> = repo.iter().map(|n| file(n)).collect();
        let chosen = choose_files("org/vae", &files, RepoKind::Vae).unwrap();
        assert_eq!(
            names(&chosen),
            ["diffusion_pytorch_model.safetensors", "config.json"]
        );
        // The fp16 variant first, as for a pipeline.
        let mut with_fp16 = files.clone();
        with_fp16.push(file("diffusion_pytorch_model.fp16.safetensors"));
        let chosen = choose_files("org/vae", &with_fp16, RepoKind::Vae).unwrap();
        assert_eq!(
            names(&chosen)[0],
            "diffusion_pytorch_model.fp16.safetensors"
        );
        // Only a pickle, or no config: refused, saying what is there.
        let pickle: Vec<Sibling> = ["config.json", "diffusion_pytorch_model.bin", "README.md"]
            .iter()
            .map(|n| file(n))
            .collect();
        let err = choose_files("org/vae", &pickle, RepoKind::Vae).unwrap_err();
        assert!(
            err.contains("not a VAE") && err.contains("only diffusion_pytorch_model.bin"),
            "{err}"
        );
        let no_config: Vec<Sibling> = files
            .iter()
            .filter(|f| f.rfilename != "config.json")
            .cloned()
            .collect();
        let err = choose_files("org/vae", &no_config, RepoKind::Vae).unwrap_err();
        assert!(err.contains("there is no config.json"), "{err}");
        // A pipeline repository lends its vae/ (the fp16 weights, as for the pipeline).
        let pipeline: Vec<Sibling> = SD15.iter().map(|n| file(n)).collect();
        let chosen = choose_files("org/name", &pipeline, RepoKind::Vae).unwrap();
        assert_eq!(
            names(&chosen),
            [
                "vae/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json"
            ]
        );
        // One with neither a root config.json nor vae/: refused as before.
        let no_vae: Vec<Sibling> = SD15
            .iter()
            .filter(|n| !n.starts_with("vae/"))
            .map(|n| file(n))
            .collect();
        let err = choose_files("org/name", &no_vae, RepoKind::Vae).unwrap_err();
        assert!(err.contains("there is no config.json"), "{err}");
    }

    #[test]
    fn chooses_fp16_safetensors_and_nothing_else() {
        let files: Vec<Sibling> = SD15.iter().map(|n| file(n)).collect();
        let chosen = choose_files("org/name", &files, RepoKind::Pipeline).unwrap();
        let mut got = names(&chosen);
        assert_eq!(got.last(), Some(&"model_index.json"), "index comes last");
        got.sort();
        assert_eq!(
            got,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ]
        );
    }

    #[test]
    fn sdxl_repositories_bring_their_second_text_encoder_and_tokenizer() {
        let mut listing: Vec<String> = SD15.iter().map(|n| n.to_string()).collect();
        for (sd, xl) in [
            ("text_encoder/", "text_encoder_2/"),
            ("tokenizer/", "tokenizer_2/"),
        ] {
            let second: Vec<String> = listing
                .iter()
                .filter_map(|n| n.strip_prefix(sd).map(|rest| format!("{xl}{rest}")))
                .collect();
            listing.extend(second);
        }
        let files: Vec<Sibling> = listing.iter().map(|n| file(n)).collect();
        let chosen = choose_files("org/name", &files, RepoKind::Pipeline).unwrap();
        let got = names(&chosen);
        for wanted in [
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_2/special_tokens_map.json",
        ] {
            assert!(got.contains(&wanted), "{wanted} not chosen: {got:?}");
        }
        // Without its weights the repository is refused, naming what is missing.
        let files: Vec<Sibling> = listing
            .iter()
            .filter(|n| !n.starts_with("text_encoder_2/model"))
            .map(|n| file(n))
            .collect();
        let err = choose_files("org/name", &files, RepoKind::Pipeline).unwrap_err();
        assert!(
            err.contains(
                "text_encoder_2/ has only text_encoder_2/pytorch_model.bin and no safetensors"
            ),
            "{err}"
        );

        // A snapshot folder lacks the second encoder's files while it has only the rest.
        let dir = tempfile::tempdir().unwrap();
        for name in SD15.iter().filter(|n| !n.ends_with(".bin")) {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "{}").unwrap();
        }
        assert!(missing_in_snapshot(dir.path(), RepoKind::Pipeline).is_empty());
        std::fs::write(
            dir.path().join("model_index.json"),
            r#"{"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}"#,
        )
        .unwrap();
        let missing = missing_in_snapshot(dir.path(), RepoKind::Pipeline).join("; ");
        for wanted in [
            "text_encoder_2/config.json",
            "tokenizer_2/",
            "text_encoder_2/model.fp16",
        ] {
            assert!(missing.contains(wanted), "{wanted} not missing: {missing}");
        }
    }

    #[test]
    fn full_precision_when_there_is_no_fp16() {
        let files: Vec<Sibling> = SD15
            .iter()
            .filter(|n| !n.contains(".fp16."))
            .map(|n| file(n))
            .collect();
        let chosen = choose_files("org/name", &files, RepoKind::Pipeline).unwrap();
        let got = names(&chosen);
        assert!(got.contains(&"unet/diffusion_pytorch_model.safetensors"));
        assert!(got.contains(&"text_encoder/model.safetensors"));
        assert!(!got
            .iter()
            .any(|n| n.ends_with(".bin") || n.contains("safety")));
    }

    #[test]
    fn pickles_only_is_an_error_naming_them() {
        let files: Vec<Sibling> = SD15
            .iter()
            .filter(|n| !(n.starts_with("unet/") && n.ends_with(".safetensors")))
            .map(|n| file(n))
            .collect();
        let err = choose_files("org/name", &files, RepoKind::Pipeline).unwrap_err();
        assert!(err.contains("unet/diffusion_pytorch_model.bin"), "{err}");
        assert!(err.contains("pickles"), "{err}");
        assert!(err.contains("org/name"), "{err}");

        let files: Vec<Sibling> = ["README.md", "model.safetensors"]
            .iter()
            .map(|n| file(n))
            .collect();
        let err = choose_files("org/name", &files, RepoKind::Pipeline).unwrap_err();
        assert!(err.contains("no model_index.json"), "{err}");
    }

    #[test]
    fn blob_names_follow_huggingface_hub() {
        let mut f = file("unet/x.safetensors");
        assert_eq!(f.blob_name(), None);
        f.blob_id = Some("abc123".into());
        assert_eq!(f.blob_name(), Some("abc123"));
        f.lfs = Some(Lfs {
            sha256: "ff00".into(),
            size: Some(7),
        });
        assert_eq!(f.blob_name(), Some("ff00"));
        assert_eq!(f.size(), Some(7));
        f.lfs = Some(Lfs {
            sha256: "../x".into(),
            size: None,
        });
        assert_eq!(f.blob_name(), None, "never a path");
    }

    #[test]
    fn environment_as_huggingface_hub_reads_it() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let a = HubAccess::from_vars(vars(&[
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_TOKEN", " hf_abc\n"),
            ("HF_HUB_OFFLINE", "true"),
            ("HF_TOKEN_PATH", "/nonexistent"),
        ]));
        assert_eq!(a.endpoint, "http://127.0.0.1:9");
        assert_eq!(a.token.as_deref(), Some("hf_abc"));
        assert!(a.offline);
        let a = HubAccess::from_vars(vars(&[
            ("HF_HUB_OFFLINE", "0"),
            ("HF_TOKEN_PATH", "/nonexistent"),
        ]));
        assert_eq!(a.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(a.token, None);
        assert!(!a.offline);

        let tmp = tempfile::tempdir().unwrap();
        let token_file = tmp.path().join("token");
        std::fs::write(&token_file, "hf_from_file\n").unwrap();
        let path: &'static str = Box::leak(token_file.display().to_string().into_boxed_str());
        let pairs: &'static [(&str, &str)] = Box::leak(Box::new([("HF_TOKEN_PATH", path)]));
        let a = HubAccess::from_vars(vars(pairs));
        assert_eq!(a.token.as_deref(), Some("hf_from_file"));
    }

    #[test]
    fn missing_in_snapshot_names_files() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = missing_in_snapshot(tmp.path(), RepoKind::Pipeline);
        assert_eq!(missing.len(), CONFIGS.len() + 1 + WEIGHTS.len());
        assert!(missing.contains(&"model_index.json".to_string()));
        assert!(missing
            .iter()
            .any(|m| m.starts_with("unet/diffusion_pytorch_model.fp16.safetensors")));
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1");
        assert_eq!(
            missing_in_snapshot(&fixture, RepoKind::Pipeline),
            Vec::<String>::new()
        );
    }
}
