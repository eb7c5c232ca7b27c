//! The LoRAs a server offers: the `.safetensors` files of one folder (`--lora-dir`), by
//! file name without the extension, as AUTOMATIC1111's `models/Lora` folder works. Files are
//! read when first asked for and kept while they are used, so a request that asks again for
//! the merged set finds the same loaded files (and nothing is merged again).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::model::lora::LoraFile;

/// Loaded files kept for reuse. A LoRA is typically 10-200 MB as f32 here; a request uses
/// a few, so this keeps the last few requests' worth.
const KEPT: usize = 8;

/// One LoRA file of the folder.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoraEntry {
    pub name: String,
    pub path: PathBuf,
}

pub struct LoraLibrary {
    dir: Option<PathBuf>,
    /// Files read, most recently used last.
    kept: Mutex<Vec<Kept>>,
}

/// A file read: its name, its modification time then, and its layers.
struct Kept {
    name: String,
    modified: Option<SystemTime>,
    file: Arc<LoraFile>,
}

impl LoraLibrary {
    /// The LoRAs of `dir`; `None`: a server without LoRAs (every name is unknown).
    pub fn new(dir: Option<PathBuf>) -> Result<Self> {
        if let Some(dir) = &dir {
            if !dir.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "--lora-dir {}: not a folder",
                    dir.display()
                )));
            }
        }
        Ok(LoraLibrary {
            dir,
            kept: Mutex::new(Vec::new()),
        })
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The folder's LoRA files now, by name. Read on each call, so files added or removed
    /// while the server runs are seen (AUTOMATIC1111's "refresh" is a no-op here).
    pub fn entries(&self) -> Vec<LoraEntry> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut entries: Vec<LoraEntry> = read
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|path| {
                let name = path.file_stem()?.to_str()?.to_string();
                Some(LoraEntry { name, path })
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    /// The LoRA called `name`, read (or the copy kept from an earlier request while the
    /// file is unchanged). Only names of the folder's files are looked up, so a name cannot
    /// reach a path outside it.
    pub fn get(&self, name: &str) -> Result<Arc<LoraFile>> {
        let entries = self.entries();
        let Some(entry) = entries.iter().find(|e| e.name == name) else {
            let known: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            return Err(Error::InvalidArgument(match &self.dir {
                None => format!(
                    "unknown LoRA `{name}`: this server offers none (start it with --lora-dir)"
                ),
                Some(dir) if known.is_empty() => format!(
                    "unknown LoRA `{name}`: {} has no .safetensors files",
                    dir.display()
                ),
                Some(_) => format!("unknown LoRA `{name}`; the LoRAs are: {}", known.join(", ")),
            }));
        };
        let modified = std::fs::metadata(&entry.path)
            .and_then(|m| m.modified())
            .ok();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = kept.iter().position(|k| k.name == name) {
            let found = kept.remove(at);
            if found.modified == modified && modified.is_some() {
                let file = found.file.clone();
                kept.push(found);
                return Ok(file);
            }
        }
        let file = Arc::new(LoraFile::open(&entry.path, name)?);
        if kept.len() >= KEPT {
            kept.remove(0);
        }
        kept.push(Kept {
            name: name.to_string(),
            modified,
            file: file.clone(),
        });
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/loras")
            .join(format!("{name}.safetensors"))
    }

    #[test]
    fn names_are_the_folders_files_and_loaded_files_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("sd1_kohya"), dir.path().join("style.safetensors")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a LoRA").unwrap();
        let library = LoraLibrary::new(Some(dir.path().to_path_buf())).unwrap();
        let names: Vec<String> = library.entries().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["style"]);

        let first = library.get("style").unwrap();
        assert!(Arc::ptr_eq(&first, &library.get("style").unwrap()));
        for bad in ["notes", "../style", "style.safetensors", ""] {
            let err = library.get(bad).err().unwrap().to_string();
            assert!(err.contains("the LoRAs are: style"), "{bad}: {err}");
        }
        let none = LoraLibrary::new(None).unwrap();
        let err = none.get("style").err().unwrap().to_string();
        assert!(err.contains("--lora-dir"), "{err}");
        assert!(LoraLibrary::new(Some(dir.path().join("missing"))).is_err());
    }
}
