//! The user's folders from the environment, as Python's tools find them (the Hugging Face
//! cache follows huggingface_hub; sd-wgpu's own remembered measurements sit beside it).
//! Each takes the variables as a function, so that tests pass their own.

use std::ffi::OsString;
use std::path::PathBuf;

/// The process's environment, empty values as unset.
pub(crate) fn env_var(key: &str) -> Option<OsString> {
    std::env::var_os(key).filter(|v| !v.is_empty())
}

/// `$HOME`, else `%USERPROFILE%`.
pub(crate) fn home_dir(var: &impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    var("HOME")
        .or_else(|| var("USERPROFILE"))
        .map(PathBuf::from)
}

/// A variable's folder with a leading `~` expanded, as Python's `os.path.expanduser` does
/// (huggingface_hub applies it to its variables).
pub(crate) fn expand_home(v: OsString, var: &impl Fn(&str) -> Option<OsString>) -> PathBuf {
    match v.to_str() {
        Some("~") => home_dir(var).unwrap_or_else(|| PathBuf::from(&v)),
        Some(s) if s.starts_with("~/") => match home_dir(var) {
            Some(h) => h.join(&s[2..]),
            None => PathBuf::from(&v),
        },
        _ => PathBuf::from(v),
    }
}

/// `$XDG_CACHE_HOME`, else `~/.cache`; `None` when neither that nor a home is set.
pub(crate) fn cache_home_from(var: &impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    match var("XDG_CACHE_HOME") {
        Some(dir) => Some(expand_home(dir, var)),
        None => Some(home_dir(var)?.join(".cache")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.into())
        }
    }

    #[test]
    fn the_cache_home_is_xdg_cache_home_else_under_home() {
        let xdg = env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/home/u")]);
        assert_eq!(cache_home_from(&xdg), Some("/x".into()));
        let tilde = env(&[("XDG_CACHE_HOME", "~/c"), ("HOME", "/home/u")]);
        assert_eq!(cache_home_from(&tilde), Some("/home/u/c".into()));
        let home = env(&[("HOME", "/home/u")]);
        assert_eq!(cache_home_from(&home), Some("/home/u/.cache".into()));
        let windows = env(&[("USERPROFILE", "C:/Users/u")]);
        assert_eq!(cache_home_from(&windows), Some("C:/Users/u/.cache".into()));
        assert_eq!(cache_home_from(&env(&[])), None);
    }
}
