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
use crate::model::lora::{LayerRegistry, LayerWeight};
use crate::tensor::{Device, Tensor};

struct WeightFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// Where tensor data starts in the file (after the length and JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    /// The header's `__metadata__` strings.
    metadata: HashMap<String, String>,
}

/// Where tensors come from.
enum Source {
    File(Arc<WeightFile>),
    /// A file in another layout (a single-file checkpoint): each requested name is looked up
    /// through the map and read with its transform, one tensor at a time.
    Mapped(MappedFile),
    /// Deterministic random values of any requested shape: full-size architectures for
    /// benchmarks without multi-gigabyte files.
    Random {
        seed: u64,
    },
}

/// One component of a file in another layout: the component's tensors are stored under
/// `prefix` (`model.diffusion_model.`, `conditioner.embedders.1.model.`), where `map`
/// finds each of them by the component's own names, prefix left out.
struct MappedFile {
    file: Arc<WeightFile>,
    prefix: String,
    map: Arc<dyn TensorMap>,
}

impl MappedFile {
    /// Where the model tensor `name` is stored, by its full stored name.
    fn locate(&self, name: &str) -> Option<Located> {
        let stored = |n: &str| format!("{}{n}", self.prefix);
        self.map
            .locate(name, &|n| self.file.tensors.contains_key(&stored(n)))
            .map(|at| Located {
                name: stored(&at.name),
                part: at.part,
            })
    }
}

/// A prefix into a weight source.
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
    prefix: String,
    /// Where the layers built from these weights enter their weight for LoRA, if anywhere.
    layers: Option<LayerRegistry>,
    /// Where the tensors are made.
    device: Device,
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
            source: Arc::new(Source::File(Arc::new(WeightFile {
                path: path.to_path_buf(),
                mmap,
                data_start: 8 + header_len,
                tensors,
                metadata: metadata.metadata().clone().unwrap_or_default(),
            }))),
            prefix: String::new(),
            layers: None,
            device: device.clone(),
        })
    }

    /// Random weights for any name and shape, uniform in ±1/sqrt(fan-in) so activations
    /// stay bounded. Only for benchmarks: every lookup succeeds.
    pub fn random(seed: u64, device: &Device) -> Self {
        Weights {
            source: Arc::new(Source::Random { seed }),
            prefix: String::new(),
            layers: None,
            device: device.clone(),
        }
    }

    /// The view one module level down: `pp("resnets").pp(1)` → `resnets.1.`.
    pub fn pp(&self, name: impl Display) -> Weights {
        Weights {
            prefix: format!("{}{}.", self.prefix, name),
            ..self.clone()
        }
    }

    /// The same weights, their tensors made on `device` (SDXL's text encoders on the CPU
    /// beside a UNet on a GPU: `--text-encoders-on-cpu`).
    pub fn on(&self, device: &Device) -> Weights {
        Weights {
            device: device.clone(),
            ..self.clone()
        }
    }

    /// The same weights, whose layers enter their weight in `layers` (by their full name,
    /// prefix without its last dot), so that a LoRA can find and change them.
    pub fn registering(&self, layers: &LayerRegistry) -> Weights {
        Weights {
            layers: Some(layers.clone()),
            ..self.clone()
        }
    }

    /// The `weight` of a Linear or Conv2d layer at this prefix, exactly `shape`, entered in
    /// the registry if these weights have one.
    pub fn layer_weight(&self, shape: &[usize]) -> Result<LayerWeight> {
        let weight = LayerWeight::new(self.get("weight", shape)?);
        if let Some(layers) = &self.layers {
            layers.enter(self.prefix.trim_end_matches('.'), &weight);
        }
        Ok(weight)
    }

    /// A `__metadata__` string of the file's header.
    pub fn file_metadata(&self, key: &str) -> Option<&str> {
        match self.source.as_ref() {
            Source::File(f) | Source::Mapped(MappedFile { file: f, .. }) => {
                f.metadata.get(key).map(String::as_str)
            }
            Source::Random { .. } => None,
        }
    }

    /// One component of the file seen through `map`: `get(name)` reads the tensor `map`
    /// says holds `name`, its name taken as under `prefix` (where the file keeps the
    /// component), so one map serves every place a layout puts the component in. Only for
    /// a view of a whole file (no prefix) opened with [`Weights::open`].
    pub fn mapped(&self, prefix: &str, map: Arc<dyn TensorMap>) -> Result<Weights> {
        match self.source.as_ref() {
            Source::File(file) if self.prefix.is_empty() => Ok(Weights {
                source: Arc::new(Source::Mapped(MappedFile {
                    file: file.clone(),
                    prefix: prefix.to_string(),
                    map,
                })),
                prefix: String::new(),
                layers: self.layers.clone(),
                device: self.device.clone(),
            }),
            _ => Err(Error::Other(
                "Weights::mapped needs a whole weight file".into(),
            )),
        }
    }

    /// The file behind these weights (`None` for random weights).
    pub fn path(&self) -> Option<&Path> {
        match self.source.as_ref() {
            Source::File(f) | Source::Mapped(MappedFile { file: f, .. }) => Some(&f.path),
            Source::Random { .. } => None,
        }
    }

    /// Every tensor name in the file, as stored (unmapped), sorted.
    pub fn file_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = match self.source.as_ref() {
            Source::File(f) | Source::Mapped(MappedFile { file: f, .. }) => {
                f.tensors.keys().map(String::as_str).collect()
            }
            Source::Random { .. } => Vec::new(),
        };
        names.sort_unstable();
        names
    }

    /// The shape of the stored tensor `name` (unmapped, no prefix), if there is one.
    pub fn file_shape(&self, name: &str) -> Option<&[usize]> {
        match self.source.as_ref() {
            Source::File(f) | Source::Mapped(MappedFile { file: f, .. }) => {
                f.tensors.get(name).map(|i| i.shape.as_slice())
            }
            Source::Random { .. } => None,
        }
    }

    /// Whether the tensor `name` exists under this prefix (always true for random weights).
    pub fn contains(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        match self.source.as_ref() {
            Source::File(f) => f.tensors.contains_key(&full),
            Source::Mapped(m) => m
                .locate(&full)
                .is_some_and(|at| m.file.tensors.contains_key(&at.name)),
            Source::Random { .. } => true,
        }
    }

    /// The tensor `name` under this prefix, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        match self.source.as_ref() {
            Source::File(f) => f.get(full, shape, &self.device),
            Source::Mapped(m) => {
                m.file
                    .get_mapped(m.locate(&full), m.map.layout(), &full, shape, &self.device)
            }
            Source::Random { seed } => random_tensor(&full, *seed, shape, &self.device),
        }
    }
}

/// How a model's tensor names (diffusers') are found in a file of another layout, for one
/// component wherever the file keeps it: names on both sides leave out the component's
/// prefix ([`Weights::mapped`] adds it).
pub trait TensorMap: Send + Sync {
    /// The stored tensor holding `name`, and which part of it; `None` when this layout has
    /// no such tensor. `exists` says whether the file holds a stored name (for names whose
    /// place depends on the file, like an upsampler after an optional attention).
    fn locate(&self, name: &str, exists: &dyn Fn(&str) -> bool) -> Option<Located>;

    /// What the layout is called in errors ("the original Stable Diffusion layout").
    fn layout(&self) -> &str;
}

/// Where a model tensor is in a file: a stored tensor, or a part of one.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    pub name: String,
    pub part: Part,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    /// The stored tensor as it is.
    Whole,
    /// The stored tensor without its trailing size-1 dimensions after the first two
    /// (a 1x1 convolution kernel `[out, in, 1, 1]` read as a linear weight `[out, in]`).
    DropTrailingOnes,
    /// Rows `start..start + len` of the first dimension (to the end when `len` is `None`):
    /// one of q, k, v in a fused `in_proj` weight.
    Rows { start: usize, len: Option<usize> },
    /// The stored 2-D tensor transposed: OpenCLIP's `text_projection` `[width, projection]`
    /// (applied as `x @ P`) read as the linear weight `[projection, width]` transformers
    /// keeps (diffusers' `convert_open_clip_checkpoint` stores `P.T`).
    Transposed,
}

impl Located {
    pub fn whole(name: impl Into<String>) -> Self {
        Located {
            name: name.into(),
            part: Part::Whole,
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
    /// Drops the mapping's pages of bytes `start..end` (whole pages inside it) from this
    /// process's memory once a tensor has been copied out of them, so loading holds one copy
    /// of the weights (the tensors), not two (the tensors and the touched file pages). A
    /// later read of the range faults the same bytes back in from the file.
    fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let (first, last) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
            if last > first {
                // SAFETY: the mapping is read-only and file-backed, so dropping its pages
                // only makes the next access read the file again; no slice into the range
                // is alive here. A page size other than 4 KiB makes madvise fail, harmlessly.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }

    fn get(&self, full: String, shape: &[usize], device: &Device) -> Result<Tensor> {
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
        let tensor = f.decode(bytes, info.dtype, shape, &full, device);
        f.release(f.data_start + start, f.data_start + end);
        tensor
    }

    /// The model tensor `name`, stored where `at` says (`None`: nowhere in `layout`): the
    /// stored tensor, or the part of it, checked against `shape` and copied out in the
    /// file's precision. Errors name the file, the stored tensor and the model's name for it.
    fn get_mapped(
        &self,
        at: Option<Located>,
        layout: &str,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let f = self;
        let at = at.ok_or_else(|| {
            weights_error(
                &f.path,
                format!("the model asks for `{name}`, which has no counterpart in {layout}"),
            )
        })?;
        let stored = &at.name;
        let info = f.tensors.get(stored).ok_or_else(|| {
            weights_error(
                &f.path,
                format!("tensor `{stored}` is missing (it holds diffusers' `{name}`)"),
            )
        })?;
        let elem = info.dtype.bitsize() / 8;
        let (start, end) = info.data_offsets;
        let mut bytes = &f.mmap[f.data_start + start..f.data_start + end];
        let mut view = info.shape.clone();
        let mut what = format!("`{stored}`");
        match at.part {
            Part::Whole => {}
            Part::DropTrailingOnes => {
                if view.len() > 2 && view[2..].iter().all(|&d| d == 1) {
                    view.truncate(2);
                }
            }
            Part::Rows { start, len } => {
                let rows = view.first().copied().unwrap_or(0);
                let end = len.map_or(rows, |l| start + l);
                if view.is_empty() || end > rows || start > end {
                    return Err(weights_error(
                        &f.path,
                        format!(
                            "tensor `{stored}` has shape {:?}: no rows {start}..{end} to hold diffusers' `{name}`",
                            info.shape
                        ),
                    ));
                }
                let row_bytes = elem * view[1..].iter().product::<usize>();
                bytes = &bytes[start * row_bytes..end * row_bytes];
                view[0] = end - start;
                what = format!("rows {start}..{end} of `{stored}` {:?}", info.shape);
            }
            Part::Transposed => {
                let &[rows, cols] = view.as_slice() else {
                    return Err(weights_error(
                        &f.path,
                        format!(
                            "tensor `{stored}` has shape {:?}: expected a matrix to transpose into diffusers' `{name}`",
                            info.shape
                        ),
                    ));
                };
                view = vec![cols, rows];
                what = format!("`{stored}` {:?} transposed", info.shape);
            }
        }
        if view != shape {
            return Err(weights_error(
                &f.path,
                format!(
                    "tensor {what} (diffusers' `{name}`) has shape {view:?}, expected {shape:?}"
                ),
            ));
        }
        let range = (
            bytes.as_ptr() as usize - f.mmap.as_ptr() as usize,
            bytes.len(),
        );
        let tensor = if at.part == Part::Transposed {
            // Element by element: `[r, c]` becomes `[c, r]` whatever the element size.
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let mut out = Vec::with_capacity(bytes.len());
            for c in 0..cols {
                for r in 0..rows {
                    let at = (r * cols + c) * elem;
                    out.extend_from_slice(&bytes[at..at + elem]);
                }
            }
            f.decode(&out, info.dtype, shape, stored, device)
        } else {
            f.decode(bytes, info.dtype, shape, stored, device)
        };
        f.release(range.0, range.0 + range.1);
        tensor
    }

    /// A tensor's bytes as a tensor of `shape`, in its stored precision.
    fn decode(
        &self,
        bytes: &[u8],
        dtype: Dtype,
        shape: &[usize],
        name: &str,
        device: &Device,
    ) -> Result<Tensor> {
        let f = self;
        match dtype {
            Dtype::F32 => Tensor::from_vec(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                shape,
                device,
            ),
            Dtype::F16 => Tensor::from_f16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
                shape,
                device,
            ),
            Dtype::BF16 => Tensor::from_bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
                shape,
                device,
            ),
            other => Err(weights_error(
                &f.path,
                format!("tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// `proj` is stored transposed as `stored_proj`, `bias` as `stored_bias`; `late` only
    /// where the file has `there` (as an upsampler placed by what the file holds).
    struct TestMap;

    impl TensorMap for TestMap {
        fn locate(&self, name: &str, exists: &dyn Fn(&str) -> bool) -> Option<Located> {
            match name {
                "proj.weight" => Some(Located {
                    name: "stored_proj".into(),
                    part: Part::Transposed,
                }),
                "bias" => Some(Located {
                    name: "stored_bias".into(),
                    part: Part::Transposed,
                }),
                "late" => exists("there").then(|| Located::whole("there")),
                _ => None,
            }
        }

        fn layout(&self) -> &str {
            "the test layout"
        }
    }

    #[test]
    fn mapped_reads_under_the_prefix_and_transposes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let matrix: Vec<u8> = (0..6)
            .flat_map(|v| f16::from_f32(v as f32).to_le_bytes())
            .collect();
        let bias: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = [
            (
                "outer.stored_proj",
                TensorView::new(Dtype::F16, vec![2, 3], &matrix),
            ),
            (
                "outer.stored_bias",
                TensorView::new(Dtype::F32, vec![2], &bias),
            ),
            ("outer.there", TensorView::new(Dtype::F32, vec![2], &bias)),
        ]
        .map(|(n, v)| (n.to_string(), v.unwrap()));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let file = Weights::open(&path, &Device::Cpu).unwrap();
        let w = file.mapped("outer.", Arc::new(TestMap)).unwrap();

        // [[0, 1, 2], [3, 4, 5]] read as [[0, 3], [1, 4], [2, 5]], still f16.
        let t = w.pp("proj").get("weight", &[3, 2]).unwrap();
        assert_eq!(t.dtype(), crate::tensor::DType::F16);
        assert_eq!(t.to_vec().unwrap(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        // The map's `exists` sees the file's names under the prefix.
        assert!(w.contains("late"));
        assert_eq!(
            w.get("late", &[2]).unwrap().to_vec().unwrap(),
            vec![1.0, 2.0]
        );
        let other = file.mapped("elsewhere.", Arc::new(TestMap)).unwrap();
        assert!(!other.contains("late") && !other.contains("proj.weight"));

        // The errors name the stored tensor, its shape and the model's name for it.
        let err = w.get("proj.weight", &[2, 3]).unwrap_err().to_string();
        assert!(
            err.contains("`outer.stored_proj` [2, 3] transposed"),
            "{err}"
        );
        assert!(err.contains("expected [2, 3]"), "{err}");
        let err = w.get("bias", &[2]).unwrap_err().to_string();
        assert!(err.contains("expected a matrix to transpose"), "{err}");
        let err = other.get("proj.weight", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("`elsewhere.stored_proj` is missing"), "{err}");
        let err = w.get("nothing", &[1]).unwrap_err().to_string();
        assert!(err.contains("no counterpart in the test layout"), "{err}");
    }
}
