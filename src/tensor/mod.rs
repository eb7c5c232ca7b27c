//! The tensor type that all model code is written against.
//!
//! A `Tensor` is an immutable, contiguous, row-major array with a shape and a device-side
//! storage. Every op returns a new tensor; nothing is read back to the host until
//! [`Tensor::to_vec`] is called, so a GPU backend can keep whole networks on the device.
//! Activations are always f32; weights may stay in the f16/bf16 precision of their file
//! and are widened by the op that consumes them.

pub mod interrupt;
mod ops;
pub mod params;
pub mod profile;
#[cfg(test)]
pub(crate) mod testing;

pub use ops::{BinaryOp, UnaryOp};

use std::sync::Arc;

use half::{bf16, f16};

use crate::backend::cpu::CpuStorage;
use crate::backend::gpu::{GpuDevice, GpuStorage};
use crate::error::{Error, Result};

/// Where a tensor lives and where its ops run.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Gpu(GpuDevice),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Gpu(g) => write!(f, "gpu ({})", g.name()),
        }
    }
}

impl Device {
    /// Lets go of what the device keeps for tensors that may be gone for good (see
    /// [`GpuDevice::forget_bind_groups`]); nothing on the CPU.
    pub fn forget_cached_bindings(&self) {
        if let Device::Gpu(gpu) = self {
            gpu.forget_bind_groups();
        }
    }

    /// Frees memory the device keeps for reuse between ops (the GPU's idle pooled buffers),
    /// for when the next stage's tensors differ in size from the last one's; nothing on the
    /// CPU, whose freed memory the engine hands back when idle.
    pub fn release_idle_memory(&self) {
        if let Device::Gpu(gpu) = self {
            gpu.release_idle_memory();
        }
    }

    /// Runs `f`, a pass that runs once, with memory freed as it goes rather than kept for
    /// reuse (see [`GpuDevice::without_buffer_reuse`]); on the CPU just runs it.
    pub fn without_buffer_reuse<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Device::Gpu(gpu) => gpu.without_buffer_reuse(f),
            Device::Cpu => f(),
        }
    }

    /// The largest tensor the device can hold in one piece, in bytes (`None`: no limit
    /// but memory).
    pub fn max_buffer_bytes(&self) -> Option<u64> {
        match self {
            Device::Cpu => None,
            Device::Gpu(g) => Some(g.max_buffer_bytes()),
        }
    }
}

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    /// f32, or f16 for a weight on a device that keeps f16 weights (see
    /// [`Tensor::from_f16`] and `backend::gpu::storage`'s rule for ops reading them).
    Gpu(GpuStorage),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?}, {})",
            self.shape,
            self.dtype(),
            self.device()
        )
    }
}

fn check_len(op: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let numel: usize = shape.iter().product();
    if numel != len {
        return Err(Error::shape(
            op,
            format!("{len} elements do not fill shape {shape:?} ({numel} elements)"),
        ));
    }
    Ok(())
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>) -> Self {
        Tensor {
            shape,
            storage: Arc::new(storage),
        }
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The f32 host buffer of a CPU tensor nothing else holds, to write an op's result over
    /// (an op whose output has its input's shape, as a norm or a residual sum). Otherwise
    /// the tensor back, for the op to allocate its output as usual.
    pub(crate) fn into_unique_host_f32(
        self,
    ) -> std::result::Result<(Vec<f32>, Vec<usize>), Tensor> {
        match Arc::try_unwrap(self.storage) {
            Ok(Storage::Cpu(CpuStorage::F32(data))) => Ok((data, self.shape)),
            Ok(storage) => Err(Tensor::from_storage(storage, self.shape)),
            Err(storage) => Err(Tensor {
                shape: self.shape,
                storage,
            }),
        }
    }

    /// An f32 tensor from host data.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Self> {
        check_len("from_vec", data.len(), shape)?;
        Ok(match device {
            Device::Cpu => Self::from_storage(Storage::Cpu(CpuStorage::F32(data)), shape.to_vec()),
            Device::Gpu(g) => {
                Self::from_storage(Storage::Gpu(GpuStorage::from_f32(g, &data)), shape.to_vec())
            }
        })
    }

    /// An f16 tensor (weights kept in half precision).
    ///
    /// On a GPU that reads f16 ([`GpuDevice::keeps_f16`]) a tensor of rank 2 or more (a
    /// matrix, a convolution kernel, an embedding table) stays f16, read natively by the
    /// ops that consume weights (matmul's rhs, conv2d's weight, embedding). Vectors (biases,
    /// norm scales: a negligible share of the bytes) are widened to f32 at upload, so the
    /// ops that take them need no per-call conversion; so is everything on a GPU without
    /// f16 support.
    pub fn from_f16(data: Vec<f16>, shape: &[usize], device: &Device) -> Result<Self> {
        check_len("from_f16", data.len(), shape)?;
        Ok(match device {
            Device::Cpu => Self::from_storage(Storage::Cpu(CpuStorage::F16(data)), shape.to_vec()),
            Device::Gpu(g) if shape.len() >= 2 => {
                Self::from_storage(Storage::Gpu(GpuStorage::from_f16(g, &data)), shape.to_vec())
            }
            Device::Gpu(_) => {
                return Self::from_vec(data.iter().map(|v| v.to_f32()).collect(), shape, device)
            }
        })
    }

    /// A bf16 tensor (weights kept in bfloat16).
    pub fn from_bf16(data: Vec<bf16>, shape: &[usize], device: &Device) -> Result<Self> {
        check_len("from_bf16", data.len(), shape)?;
        Ok(match device {
            Device::Cpu => Self::from_storage(Storage::Cpu(CpuStorage::BF16(data)), shape.to_vec()),
            Device::Gpu(_) => {
                return Self::from_vec(data.iter().map(|v| v.to_f32()).collect(), shape, device)
            }
        })
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Self> {
        match device {
            Device::Cpu => Self::from_vec(vec![0.0; shape.iter().product()], shape, device),
            Device::Gpu(g) => Ok(Self::from_storage(
                Storage::Gpu(GpuStorage::zeros(g, shape.iter().product())),
                shape.to_vec(),
            )),
        }
    }

    /// The same values on `device` (shared when already there).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if &self.device() == device {
            return Ok(self.clone());
        }
        match (self.storage(), device) {
            // Half precision stays half precision where the target keeps it.
            (Storage::Cpu(CpuStorage::F16(v)), _) => Self::from_f16(v.clone(), &self.shape, device),
            _ => Self::from_vec(self.to_vec()?, &self.shape, device),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `d`; negative-free, panics are avoided by callers checking rank first.
    pub fn dim(&self, d: usize) -> usize {
        self.shape[d]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self.storage() {
            Storage::Cpu(s) => s.dtype(),
            Storage::Gpu(g) => g.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self.storage() {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(g) => Device::Gpu(g.device()),
        }
    }

    /// Copies the tensor to the host as f32 (the only read-back point).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match self.storage() {
            Storage::Cpu(s) => Ok(s.as_f32().into_owned()),
            Storage::Gpu(g) => g.to_f32(),
        }
    }

    /// Same data, new shape (free: storage is shared).
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        check_len("reshape", self.numel(), shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// Checks that the tensor has exactly `expected` as shape.
    pub(crate) fn expect_shape(&self, op: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::shape(
                op,
                format!("expected shape {expected:?}, got {:?}", self.shape),
            ));
        }
        Ok(())
    }

    pub(crate) fn expect_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if self.rank() != rank {
            return Err(Error::shape(
                op,
                format!("expected rank {rank}, got shape {:?}", self.shape),
            ));
        }
        Ok(())
    }
}
