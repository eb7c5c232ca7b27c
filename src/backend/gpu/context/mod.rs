//! The wgpu device, by concern: [`adapter`] (adapter choice, capabilities, opening the
//! device), [`features`] (the shader features variants use and where each may be
//! selected), [`kernel`] (kernels and their variants), [`launch`] (pipelines, bind groups,
//! dispatches), [`submit`] (the pending command encoder, submission, errors, read-backs),
//! [`pool`] (the buffer pool, uploads) and [`tuning`] (launch shapes by kind of adapter). This module holds the state they share
//! ([`GpuContext`]) and the public handle ([`GpuDevice`]).

mod adapter;
mod features;
mod kernel;
mod launch;
mod pool;
mod submit;
mod tuning;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use adapter::{adapters, cooperative_matrices, is_software, names};
pub use features::{FeatureSupport, Selection, ShaderFeature, SHADER_FEATURES};
pub use kernel::{Kernel, WORKGROUP_1D};
#[cfg(test)]
pub(crate) use launch::dispatch_log;
use launch::BindCache;
pub use pool::GpuMemory;
use submit::Pending;
pub use submit::PASSES_PER_SUBMIT;
pub use tuning::{TileShape, Tuning};

use super::profile::Profiler;
use crate::error::Result;

/// One opened device and everything its modules share: the wgpu handles and limits, what
/// the kernels may use, the pending encoder, the caches and the buffer pool.
pub(crate) struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Everything the adapter offers (the device itself enables only what is used).
    pub adapter_features: wgpu::Features,
    /// The cooperative-matrix (tensor core) shapes and types the adapter reports.
    pub cooperative_matrices: Vec<wgpu::CooperativeMatrixProperties>,
    /// Whether the matrix products and convolutions run on cooperative matrices
    /// (gemm_coop.wgsl): see [`cooperative_matrices`].
    pub coop: bool,
    /// Whether f16 weights stay f16 on the device (the adapter has `SHADER_F16` and
    /// `SD_GPU_F16` is not `0`): see [`GpuDevice`].
    pub f16: bool,
    /// The features enabled and the variants chosen, for the log and /health.
    pub selection: Selection,
    /// The launch shapes the kernels take on this device.
    pub tuning: Tuning,
    pending: Mutex<Pending>,
    binds: Mutex<BindCache>,
    /// Each kernel's pipeline and its bind group layout (fetched once: wgpu makes a new
    /// handle on every `get_bind_group_layout`).
    pipelines: Mutex<HashMap<Kernel, (wgpu::ComputePipeline, wgpu::BindGroupLayout)>>,
    /// Shader modules by file and variant (f16 weights or not).
    modules: Mutex<HashMap<(&'static str, bool), wgpu::ShaderModule>>,
    /// Free kernel-output buffers by size in bytes. The first in wgpu's buffer order is
    /// handed out (not the last freed), so the buffers a step gets depend only on which
    /// are free, not on the order earlier steps freed them: each step binds the same
    /// buffers as the one before, and its bind groups come from the cache.
    pool: Mutex<HashMap<u64, std::collections::BTreeSet<wgpu::Buffer>>>,
    /// The device memory tensors hold and the pool keeps (see [`GpuMemory`]).
    memory: Mutex<GpuMemory>,
    /// Whether freed kernel outputs go to the pool (see [`GpuDevice::without_buffer_reuse`]).
    keep_freed: std::sync::atomic::AtomicBool,
    /// Record no kernel launches (see [`GpuDevice::set_dry_run`]).
    dry_run: std::sync::atomic::AtomicBool,
    /// The first error wgpu reported outside a call (validation, out of memory, device lost).
    error: Arc<Mutex<Option<String>>>,
    /// Why the device was lost, once it is (set by wgpu's device-lost callback).
    lost: Arc<Mutex<Option<String>>>,
    /// The per-kernel profile, when asked for and the adapter has timestamp queries.
    profiler: Option<Profiler>,
    /// Kernel launches recorded since the device opened (for the bench's per-step count).
    launches: std::sync::atomic::AtomicU64,
}

/// A handle on one GPU; cheap to clone. Tensors on it share its queue and buffer pool.
///
/// Weights that are f16 in their file stay f16 on the device (half the memory) when the
/// adapter supports `wgpu::Features::SHADER_F16`: matrix products, convolutions and
/// embedding lookups read them directly, accumulating in f32; every other op widens an f16
/// operand to f32 first (see `GpuStorage::as_f32`). Without the feature, or with the
/// environment variable `SD_GPU_F16=0` (for comparisons), they are widened to f32 at upload.
/// f32 weights always stay f32.
///
/// With the environment variable `SD_GPU_PROFILE=1` (read when the device opens) and an
/// adapter that has `wgpu::Features::TIMESTAMP_QUERY`, every compute pass is timed on the
/// GPU: [`GpuDevice::profile`] gives the calls and total time of each kernel entry point
/// (the work finished at the last wait: `synchronize` or a read-back). Without the variable
/// no timestamp queries are made; with it but without the feature, the log says so once and
/// the profile stays empty.
#[derive(Clone)]
pub struct GpuDevice(pub(crate) Arc<GpuContext>);

impl PartialEq for GpuDevice {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for GpuDevice {}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuDevice({})", self.name())
    }
}

impl GpuDevice {
    pub fn name(&self) -> String {
        self.0.info.name.clone()
    }

    pub fn is_software(&self) -> bool {
        is_software(&self.0.info)
    }

    /// The largest buffer the device allocates, in bytes: no one tensor may be larger.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.0.limits.max_buffer_size
    }

    /// Kernel launches so far whose bind group came from the cache, and those that made
    /// one.
    pub fn bind_group_reuse(&self) -> (u64, u64) {
        let cache = lock(&self.0.binds);
        (cache.hits, cache.misses)
    }

    /// Forgets the cached bind groups, which hold their buffers alive: for when tensors
    /// that many of them bind are replaced for good (a LoRA's merged weights), so the old
    /// buffers go now rather than when the cache fills.
    pub fn forget_bind_groups(&self) {
        lock(&self.0.binds).forget_groups();
    }

    /// The device memory tensors hold now, the pool keeps, and the most held at once.
    pub fn memory(&self) -> GpuMemory {
        *lock(&self.0.memory)
    }

    /// Starts [`GpuMemory::peak`] again from what is held now.
    pub fn reset_memory_peak(&self) {
        let mut memory = lock(&self.0.memory);
        memory.peak = memory.in_use + memory.pooled;
    }

    /// Frees the pool's idle buffers (see [`GpuContext::release_pool`]).
    pub fn release_idle_memory(&self) {
        self.0.release_pool();
    }

    /// Runs `f` with freed kernel outputs released instead of pooled, then frees the pool:
    /// for a pass that runs once (the VAE), whose maps change size from level to level, so
    /// that buffers kept for reuse would sit idle beside the live ones. A whole SDXL
    /// 1024x1024 image (random fp16 weights, llvmpipe, the GPU bench's `--memory-only`,
    /// 2026-12-07): peak 11,497 MiB with the VAE pooling -> 8,673 MiB, of which 6,621 MiB
    /// are weights. Denoising steps repeat their shapes and keep the pool.
    pub fn without_buffer_reuse<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Pools again when dropped, whether `f` returned or unwound.
        struct Restore<'a>(&'a GpuContext);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.keep_freed(true);
                self.0.release_pool();
            }
        }
        self.0.release_pool();
        self.0.keep_freed(false);
        let _restore = Restore(&self.0);
        f()
    }

    /// With `true`, kernel launches are counted but not recorded: every op allocates its
    /// outputs as it would, and their values are garbage. For measuring a model's memory
    /// on an adapter too slow to run it (the GPU bench's `--memory-only`).
    pub fn set_dry_run(&self, dry: bool) {
        self.0
            .dry_run
            .store(dry, std::sync::atomic::Ordering::Relaxed);
    }

    /// Kernel launches recorded since the device opened.
    pub fn launches(&self) -> u64 {
        self.0.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the device is gone (driver reset, GPU removed, or [`Self::lose_for_test`]):
    /// every later job on it fails, so the model must be loaded onto a new device.
    pub fn is_lost(&self) -> bool {
        lock(&self.0.lost).is_some()
    }

    /// Destroys the device, as a driver reset would: for tests of what follows.
    #[cfg(test)]
    pub(crate) fn lose_for_test(&self) {
        self.0.device.destroy();
    }

    /// Whether matrix products and convolutions run on cooperative matrices.
    pub fn uses_cooperative_matrices(&self) -> bool {
        self.0.coop
    }

    /// Its backend, the features it enabled and the kernel variants it selects.
    pub fn selection(&self) -> &Selection {
        &self.0.selection
    }

    /// Whether f16 weights stay f16 on this device (see the type's documentation).
    pub fn keeps_f16(&self) -> bool {
        self.0.f16
    }

    /// Submits everything recorded so far and waits for the GPU to finish it.
    pub fn synchronize(&self) -> Result<()> {
        self.0.flush();
        self.0.wait()
    }

    /// Whether kernels are being timed (`SD_GPU_PROFILE=1` and the adapter can).
    pub fn is_profiling(&self) -> bool {
        self.0.profiler.is_some()
    }

    /// Each kernel entry point's calls and total GPU time, the longest total first: the
    /// passes the GPU finished by the last wait (`synchronize` or a read-back) since the
    /// device opened or [`GpuDevice::reset_profile`]. Empty unless profiling (see the type's
    /// documentation).
    pub fn profile(&self) -> Vec<(String, u64, std::time::Duration)> {
        self.0
            .profiler
            .as_ref()
            .map(Profiler::profile)
            .unwrap_or_default()
    }

    /// Forgets the profile so far.
    pub fn reset_profile(&self) {
        if let Some(p) = &self.0.profiler {
            p.reset();
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
