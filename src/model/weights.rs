//! Weights from safetensors files, looked up by diffusers' module names.
//!
//! A [`Weights`] is a view at a name prefix (`down_blocks.0.resnets.1`), built with
//! [`Weights::pp`] the way the module tree is walked, so every block fetches its tensors by
//! its own short names. Files are memory-mapped; a tensor is copied out only when a block
//! asks for it, in the file's own precision (f16 stays f16).

use std::collections::HashMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

struct WeightFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// Where tensor data starts in the file (after the length and JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    device: Device,
}

/// A prefix into one safetensors file.
#[derive(Clone)]
pub struct Weights {
    file: Arc<WeightFile>,
    prefix: String,
}

fn weights_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Weights {
    /// Maps a safetensors file and checks its header and that its data is all there.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; like every mmap user we rely on the model
        // file not being truncated by another process while it is loaded.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Full validation (header JSON, offsets, total length) before trusting any offset.
        SafeTensors::deserialize(&mmap)
            .map_err(|e| weights_error(path, format!("not a valid safetensors file: {e}")))?;
        let (header_len, metadata): (usize, Metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| weights_error(path, format!("not a valid safetensors file: {e}")))?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Weights {
            file: Arc::new(WeightFile {
                path: path.to_path_buf(),
                mmap,
                data_start: 8 + header_len,
                tensors,
                device: device.clone(),
            }),
            prefix: String::new(),
        })
    }

    /// The view one module level down: `pp("resnets").pp(1)` → `resnets.1.`.
    pub fn pp(&self, name: impl Display) -> Weights {
        Weights {
            file: self.file.clone(),
            prefix: format!("{}{}.", self.prefix, name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.file.tensors.contains_key(&format!("{}{name}", self.prefix))
    }

    /// Shape of a tensor under this prefix, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.file
            .tensors
            .get(&format!("{}{name}", self.prefix))
            .map(|i| i.shape.clone())
    }

    /// The tensor `name` under this prefix, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let f = &self.file;
        let info = f.tensors.get(&full).ok_or_else(|| Error::MissingTensor {
            path: f.path.clone(),
            name: full.clone(),
        })?;
        if info.shape != shape {
            return Err(Error::TensorShape {
                path: f.path.clone(),
                name: full,
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        // In bounds: `deserialize` checked every offset against the file length.
        let bytes = &f.mmap[f.data_start + start..f.data_start + end];
        match info.dtype {
            Dtype::F32 => Tensor::from_vec(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                shape,
                &f.device,
            ),
            Dtype::F16 => Tensor::from_f16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
                shape,
                &f.device,
            ),
            Dtype::BF16 => Tensor::from_bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
                shape,
                &f.device,
            ),
            other => Err(weights_error(
                &f.path,
                format!("tensor `{full}` has dtype {other:?}; expected F32, F16 or BF16"),
            )),
        }
    }
}
