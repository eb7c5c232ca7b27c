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

/// Where tensors come from.
enum Source {
    File(WeightFile),
    /// Deterministic random values of any requested shape: full-size architectures for
    /// benchmarks without multi-gigabyte files.
    Random {
        device: Device,
        seed: u64,
    },
}

/// A prefix into a weight source.
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
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
            source: Arc::new(Source::File(WeightFile {
                path: path.to_path_buf(),
                mmap,
                data_start: 8 + header_len,
                tensors,
                device: device.clone(),
            })),
            prefix: String::new(),
        })
    }

    /// Random weights for any name and shape, uniform in ±1/sqrt(fan-in) so activations
    /// stay bounded. Only for benchmarks: every lookup succeeds.
    pub fn random(seed: u64, device: &Device) -> Self {
        Weights {
            source: Arc::new(Source::Random {
                device: device.clone(),
                seed,
            }),
            prefix: String::new(),
        }
    }

    /// The view one module level down: `pp("resnets").pp(1)` → `resnets.1.`.
    pub fn pp(&self, name: impl Display) -> Weights {
        Weights {
            source: self.source.clone(),
            prefix: format!("{}{}.", self.prefix, name),
        }
    }

    /// Whether the tensor `name` exists under this prefix (always true for random weights).
    pub fn contains(&self, name: &str) -> bool {
        match self.source.as_ref() {
            Source::File(f) => f.tensors.contains_key(&format!("{}{name}", self.prefix)),
            Source::Random { .. } => true,
        }
    }

    /// The tensor `name` under this prefix, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        match self.source.as_ref() {
            Source::File(f) => f.get(full, shape),
            Source::Random { device, seed } => random_tensor(&full, *seed, shape, device),
        }
    }
}

/// SplitMix64: a fast, decent generator for benchmark weights.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_tensor(name: &str, seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut state = name.bytes().fold(seed, |h, b| h.rotate_left(5) ^ b as u64);
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    let bound = if shape.len() == 1 {
        0.1
    } else {
        1.0 / (fan_in as f32).sqrt()
    };
    let is_norm_weight = shape.len() == 1 && name.ends_with("weight");
    let data = (0..shape.iter().product::<usize>())
        .map(|_| {
            let u = (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
            let v = (2.0 * u - 1.0) * bound;
            if is_norm_weight {
                1.0 + v
            } else {
                v
            }
        })
        .collect();
    Tensor::from_vec(data, shape, device)
}

impl WeightFile {
    fn get(&self, full: String, shape: &[usize]) -> Result<Tensor> {
        let f = self;
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
