//! Where a `--model` argument points: a local folder, `weights/<name>/`, or a Hugging Face
//! Hub repository id (`org/name[@revision]`) already in the local Hugging Face cache, laid
//! out as Python's `huggingface_hub` writes it, so models Python downloaded are reused:
//!
//! ```text
//! <cache>/models--{org}--{name}/
//!   refs/main                 the commit hash `main` points to (other refs likewise)
//!   snapshots/<hash>/...      the repository's files, usually symlinks into blobs/
//!   blobs/<sha>               the file contents
//! ```
//!
//! `<cache>` is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
//! (with huggingface_hub's `HUGGINGFACE_HUB_CACHE` and `XDG_CACHE_HOME` fallbacks).
//! A Hub id that is not there, or only partly, is downloaded into it by
//! [`resolve`] (see [`super::download`]).

use std::path::{Path, PathBuf};

use super::download::{fetch, missing_in_snapshot, HubAccess, RepoKind};
use crate::error::{Error, Result};
use crate::user_dirs::{cache_home_from, env_var, expand_home};

/// The model `serve` and `generate` use when `--model` is not given: SD 1.5, which the API
/// guide's defaults (50 steps, guidance 7.5) are made for.
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

/// The files a text-to-image pipeline reads, as `huggingface-cli download --include` patterns.
pub(crate) const INCLUDE: &str = r#""model_index.json" "*/config.json" "scheduler/*" "tokenizer/*" "tokenizer_2/*" "text_encoder/model.fp16.safetensors" "text_encoder_2/model.fp16.safetensors" "unet/diffusion_pytorch_model.fp16.safetensors" "vae/diffusion_pytorch_model.fp16.safetensors""#;

/// The longest repository id the Hub accepts (huggingface_hub's `validate_repo_id`).
const MAX_ID_LEN: usize = 96;

/// A parsed Hub model id: `org/name`, with an optional `@revision` (a branch or tag name,
/// or a commit hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub org: String,
    pub name: String,
    pub revision: Option<String>,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`; `None` when `s` is not of that form.
    /// Both parts follow the Hub's rules: ASCII letters, digits, `-`, `_` and `.`, starting
    /// and ending with a letter, digit or `_`, no `--` or `..`, 96 characters at most.
    pub fn parse(s: &str) -> Option<HubId> {
        let (id, revision) = match s.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (s, None),
        };
        let (org, name) = id.split_once('/')?;
        if id.len() > MAX_ID_LEN
            || !valid_id_part(org)
            || !valid_id_part(name)
            || name.ends_with(".git")
        {
            return None;
        }
        if let Some(rev) = revision {
            if !valid_revision(rev) {
                return None;
            }
        }
        Some(HubId {
            org: org.to_string(),
            name: name.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// `org/name`, without the revision.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }

    /// The revision asked for, `main` when none was.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The repository's folder in the cache: `models--{org}--{name}`.
    pub fn cache_dir_name(&self) -> String {
        format!("models--{}--{}", self.org, self.name)
    }
}

fn valid_id_part(s: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    !s.is_empty()
        && s.chars().all(|c| word(c) || c == '-' || c == '.')
        && s.starts_with(word)
        && s.ends_with(word)
        && !s.contains("--")
        && !s.contains("..")
}

/// A branch or tag name (`main`, `fp16`, `refs/pr/1`) or a commit hash: nothing that could
/// leave the repository's folder once joined to `refs/` or `snapshots/`.
fn valid_revision(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && s.split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// The Hugging Face hub cache folder from the environment, as huggingface_hub computes it:
/// `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. `None` when none of
/// these is set, not even `HOME`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(env_var)
}

fn hub_cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(expand_home(dir, &var));
    }
    Some(hf_home_dir_from(&var)?.join("hub"))
}

/// huggingface_hub's home folder, where `huggingface-cli login` writes its `token`:
/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home_dir() -> Option<PathBuf> {
    hf_home_dir_from(env_var)
}

pub(crate) fn hf_home_dir_from(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    Some(match var("HF_HOME") {
        Some(dir) => expand_home(dir, &var),
        None => cache_home_from(&var)?.join("huggingface"),
    })
}

/// Where a `--model` (`kind` [`RepoKind::Pipeline`]) or `--vae` ([`RepoKind::Vae`]: a Hub
/// repository holding a VAE at its root, `config.json` and
/// `diffusion_pytorch_model.safetensors`) argument points, in this order:
///
/// 1. an existing directory: returned unchanged;
/// 2. `weights/<name>/` under the current directory, for a bare `name` or the last
///    component of `org/name` (not when a `@revision` is given);
/// 3. for `org/name[@revision]`, the snapshot in the local Hugging Face cache
///    (see [`hub_cache_dir`]): `refs/<revision>` names the commit, or the revision is a
///    snapshot's commit hash itself;
/// 4. for `org/name[@revision]` not in the cache, or only partly (a file the pipeline reads
///    is missing from the snapshot), the missing files are downloaded from the Hub into the
///    cache ([`super::download::fetch`]), unless `HF_HUB_OFFLINE` is set.
///
/// The contents of a folder of 1 or 2 are not checked here: `ModelFolder` reports a
/// missing component by name. When nothing is found the error names every place looked at
/// and the command that fetches the model.
pub fn resolve(arg: &str, kind: RepoKind) -> Result<PathBuf> {
    resolve_or_fetch(
        arg,
        kind,
        Path::new("weights"),
        hub_cache_dir().as_deref(),
        &HubAccess::from_env(),
    )
}

/// [`resolve`] for a command-line path; one that is not UTF-8 cannot be a Hub id, so it is
/// a folder, a file or nothing.
pub fn resolve_path(arg: &Path, kind: RepoKind) -> Result<PathBuf> {
    match arg.to_str() {
        Some(text) => resolve(text, kind),
        None => Ok(arg.to_path_buf()),
    }
}

/// [`resolve`] with the `weights/` folder, the cache folder and the Hub given.
pub fn resolve_or_fetch(
    arg: &str,
    kind: RepoKind,
    weights: &Path,
    cache: Option<&Path>,
    access: &HubAccess,
) -> Result<PathBuf> {
    let local = resolve_model_in(arg, kind, weights, cache);
    let (Some(id), Some(cache)) = (HubId::parse(arg), cache) else {
        return local;
    };
    let repo_dir = cache.join(id.cache_dir_name());
    match local {
        Ok(dir) if !dir.starts_with(&repo_dir) || missing_in_snapshot(&dir, kind).is_empty() => {
            Ok(dir)
        }
        _ => fetch(&id, kind, cache, weights, access),
    }
}

/// [`resolve`] with the `weights/` folder and the cache folder given.
pub fn resolve_model_in(
    arg: &str,
    kind: RepoKind,
    weights: &Path,
    cache: Option<&Path>,
) -> Result<PathBuf> {
    let local = PathBuf::from(arg);
    // A model folder, or a single-file checkpoint (which the loader checks).
    if local.is_dir() || local.is_file() {
        return Ok(local);
    }
    let id = HubId::parse(arg);
    // A bare name (no path separator) or the name part of a Hub id.
    let short_name = match &id {
        Some(id) if id.revision.is_none() => Some(id.name.as_str()),
        Some(_) => None,
        None if valid_id_part(arg) => Some(arg),
        None => None,
    };
    let in_weights = short_name.map(|name| weights.join(name));
    if let Some(dir) = &in_weights {
        if dir.is_dir() {
            return Ok(dir.clone());
        }
    }

    let mut looked = vec![format!("no folder {arg}")];
    if let Some(dir) = &in_weights {
        looked.push(format!("no {}/", dir.display()));
    }
    let Some(id) = id else {
        return Err(Error::InvalidArgument(format!(
            "{} `{arg}` not found: {}; and it is not a Hugging Face Hub repository id \
             (org/name or org/name@revision). Put a {} at {}/ \
             (see weights/README.md) or pass its path",
            kind.what(),
            looked.join(", "),
            kind.folder(),
            weights.join(short_name.unwrap_or("<name>")).display(),
        )));
    };

    let cache_note = match cache {
        Some(cache) => match find_snapshot(cache, &id) {
            Ok(snapshot) => return Ok(snapshot),
            Err(why) => why,
        },
        None => {
            "no Hugging Face cache folder (HF_HUB_CACHE, HF_HOME and HOME are unset)".to_string()
        }
    };
    looked.push(cache_note);
    let revision = match &id.revision {
        Some(rev) => format!(" --revision {rev}"),
        None => String::new(),
    };
    Err(Error::InvalidArgument(format!(
        "{} `{arg}` not found: {}. Fetch it into the Hugging Face cache with the Python CLI \
         (pip install huggingface_hub):\n  huggingface-cli download {}{revision} --include {}\n\
         or put a {} at {}/ (add `--local-dir {}` to the command above).",
        kind.what(),
        looked.join(", "),
        id.repo_id(),
        kind.include(),
        kind.folder(),
        weights.join(&id.name).display(),
        weights.join(&id.name).display(),
    )))
}

/// The snapshot folder of `id` in the cache at `cache`, or why there is none (naming the
/// exact path).
fn find_snapshot(cache: &Path, id: &HubId) -> std::result::Result<PathBuf, String> {
    let repo = cache.join(id.cache_dir_name());
    if !repo.is_dir() {
        return Err(format!(
            "nothing in the Hugging Face cache at {}",
            repo.display()
        ));
    }
    let revision = id.revision();
    let ref_file = repo.join("refs").join(revision);
    let commit = if ref_file.is_file() {
        let text = std::fs::read_to_string(&ref_file)
            .map_err(|e| format!("{} cannot be read: {e}", ref_file.display()))?;
        let commit = text.trim().to_string();
        if !valid_revision(&commit) || commit.contains('/') {
            return Err(format!(
                "{} does not hold a commit hash",
                ref_file.display()
            ));
        }
        commit
    } else if id.revision.is_some() && !revision.contains('/') {
        // A commit hash given directly, as huggingface_hub accepts it.
        revision.to_string()
    } else {
        return Err(format!(
            "no {} in the Hugging Face cache (revision `{revision}` was never downloaded)",
            ref_file.display()
        ));
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else if ref_file.is_file() {
        Err(format!(
            "{} names commit {commit}, but there is no {}",
            ref_file.display(),
            snapshot.display()
        ))
    } else {
        Err(format!(
            "neither {} nor {} is in the Hugging Face cache",
            ref_file.display(),
            snapshot.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn id(org: &str, name: &str, revision: Option<&str>) -> Option<HubId> {
        Some(HubId {
            org: org.into(),
            name: name.into(),
            revision: revision.map(Into::into),
        })
    }

    #[test]
    fn parses_hub_ids() {
        assert_eq!(
            HubId::parse("stable-diffusion-v1-5/stable-diffusion-v1-5"),
            id("stable-diffusion-v1-5", "stable-diffusion-v1-5", None)
        );
        assert_eq!(
            HubId::parse("stabilityai/stable-diffusion-2-1-base"),
            id("stabilityai", "stable-diffusion-2-1-base", None)
        );
        assert_eq!(
            HubId::parse("stabilityai/sd-turbo"),
            id("stabilityai", "sd-turbo", None)
        );
        assert_eq!(HubId::parse("a_b/c.d_1"), id("a_b", "c.d_1", None));
        let p = HubId::parse("stabilityai/sd-turbo").unwrap();
        assert_eq!(p.cache_dir_name(), "models--stabilityai--sd-turbo");
        assert_eq!(p.repo_id(), "stabilityai/sd-turbo");
        assert_eq!(p.revision(), "main");
    }

    #[test]
    fn parses_revisions() {
        let hash = "1d0c4ebf6ff58a5caecab40fa1406526bca4b5b9";
        assert_eq!(
            HubId::parse(&format!("org/name@{hash}")),
            id("org", "name", Some(hash))
        );
        assert_eq!(
            HubId::parse("org/name@main"),
            id("org", "name", Some("main"))
        );
        assert_eq!(
            HubId::parse("org/name@fp16"),
            id("org", "name", Some("fp16"))
        );
        assert_eq!(
            HubId::parse("org/name@refs/pr/1"),
            id("org", "name", Some("refs/pr/1"))
        );
        assert_eq!(HubId::parse("org/name@v1.0").unwrap().revision(), "v1.0");
        for bad in [
            "org/name@",
            "org/name@../x",
            "org/name@a/../b",
            "org/name@/abs",
            "org/name@a//b",
            "org/name@a b",
            "org/name@x@y",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_hub_id() {
        let long = format!("org/{}", "a".repeat(MAX_ID_LEN));
        for bad in [
            "",
            "name",
            "/name",
            "org/",
            "org/name/x",
            "./name",
            "../name",
            "/abs/path",
            "weights/sd15/",
            "org//name",
            "-org/name",
            "org/name-",
            "org/.name",
            "org/name.",
            "org/na--me",
            "org/na..me",
            "org/na me",
            "org/náme",
            "org\\name",
            "org/name.git",
            long.as_str(),
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all: &'static [(&str, &str)] = &[
            ("HF_HUB_CACHE", "/c"),
            ("HF_HOME", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(hub_cache_dir_from(env(all)), Some("/c".into()));
        assert_eq!(hub_cache_dir_from(env(&all[1..])), Some("/h/hub".into()));
        assert_eq!(
            hub_cache_dir_from(env(&all[2..])),
            Some("/x/huggingface/hub".into())
        );
        assert_eq!(
            hub_cache_dir_from(env(&all[3..])),
            Some("/home/u/.cache/huggingface/hub".into())
        );
        assert_eq!(hub_cache_dir_from(env(&[])), None);
        assert_eq!(
            hub_cache_dir_from(env(&[("HF_HOME", "~/hf"), ("HOME", "/home/u")])),
            Some("/home/u/hf/hub".into())
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HUGGINGFACE_HUB_CACHE", "/legacy")])),
            Some("/legacy".into())
        );
    }

    #[test]
    fn resolves_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("weights");
        let cache = tmp.path().join("cache");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.join("models--org--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), hash).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
        let snapshot = repo.join("snapshots").join(hash);

        let resolve = |arg: &str| resolve_model_in(arg, RepoKind::Pipeline, &weights, Some(&cache));
        assert_eq!(resolve("org/name").unwrap(), snapshot);
        assert_eq!(resolve("org/name@main").unwrap(), snapshot);
        assert_eq!(resolve(&format!("org/name@{hash}")).unwrap(), snapshot);
        assert!(resolve("org/name@other").is_err());
        assert!(resolve("org/other").is_err());

        // weights/<name> wins over the cache, but not over a pinned revision.
        std::fs::create_dir_all(weights.join("name")).unwrap();
        assert_eq!(resolve("org/name").unwrap(), weights.join("name"));
        assert_eq!(resolve("name").unwrap(), weights.join("name"));
        assert_eq!(resolve("org/name@main").unwrap(), snapshot);

        // An existing folder wins over everything, returned unchanged.
        let dir = tmp.path().join("org/name");
        std::fs::create_dir_all(&dir).unwrap();
        let arg = dir.to_str().unwrap();
        assert_eq!(resolve(arg).unwrap(), dir);
    }

    #[test]
    fn not_found_says_where_it_looked() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("weights");
        let cache = tmp.path().join("cache");
        let err = resolve_model_in("org/missing", RepoKind::Pipeline, &weights, Some(&cache))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no folder org/missing"), "{err}");
        assert!(
            err.contains(&weights.join("missing").display().to_string()),
            "{err}"
        );
        assert!(
            err.contains(&cache.join("models--org--missing").display().to_string()),
            "{err}"
        );
        assert!(
            err.contains("huggingface-cli download org/missing --include"),
            "{err}"
        );

        let err = resolve_model_in("org/missing@v2", RepoKind::Pipeline, &weights, Some(&cache))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("huggingface-cli download org/missing --revision v2"),
            "{err}"
        );

        let err = resolve_model_in("./no/such/dir", RepoKind::Pipeline, &weights, Some(&cache))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a Hugging Face Hub repository id"),
            "{err}"
        );
    }
}
