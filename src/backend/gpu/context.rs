//! The wgpu device: adapter choice, limits, the pending command encoder, the pipeline cache
//! and the buffer pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::profile::{self, Batch, Profiler};
use crate::error::{Error, Result};

/// Passes recorded before the encoder is submitted: few submits per step, but not one
/// unbounded command buffer.
pub const PASSES_PER_SUBMIT: usize = 256;

/// Threads per workgroup of the one-dimensional kernels (elementwise and layout): every
/// shader that uses it declares `@workgroup_size(256)`.
pub const WORKGROUP_1D: u32 = 256;

/// What a WGSL kernel is: its file's source, the entry point and the variant it is built as.
/// Compared and hashed by (file, entry point, variant), never by the source text: the
/// pipeline cache looks a kernel up on every launch.
///
/// Variants come from one mechanism: the module is the file's source after a header the
/// host generates ([`Kernel::header`]) with the `enable` directives and type aliases the
/// variant needs. Every shader reads weights through `alias W`.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub file: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    /// Built with half-precision weights: see [`Kernel::with_f16_weights`].
    pub f16_weights: bool,
    /// Uses cooperative matrices (and f16): only for devices with `GpuContext::coop`.
    pub cooperative: bool,
    /// A pipeline-overridable constant (`override NAME: u32`) and its value: loop lengths
    /// fixed per variant when the pipeline is built, so the driver can unroll them.
    pub constant: Option<(&'static str, u32)>,
}

impl Kernel {
    fn identity(
        &self,
    ) -> (
        &'static str,
        &'static str,
        bool,
        Option<(&'static str, u32)>,
    ) {
        (self.file, self.entry, self.f16_weights, self.constant)
    }
}

impl PartialEq for Kernel {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for Kernel {}

impl std::hash::Hash for Kernel {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state)
    }
}

/// One of the shader files, by name: `shader!("elementwise")`.
#[macro_export]
macro_rules! shader {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/shaders/",
                $name,
                ".wgsl"
            )),
        )
    };
}

impl Kernel {
    pub const fn new(file: (&'static str, &'static str), entry: &'static str) -> Self {
        Kernel {
            file: file.0,
            source: file.1,
            entry,
            f16_weights: false,
            cooperative: false,
            constant: None,
        }
    }

    /// This kernel with `override name: u32` set to `value`.
    pub const fn with_constant(self, name: &'static str, value: u32) -> Self {
        Kernel {
            constant: Some((name, value)),
            ..self
        }
    }

    /// A kernel on cooperative matrices (f16 x f16 -> f32 blocks of 16 x 16): its module is
    /// built with `enable f16; enable wgpu_cooperative_matrix;`.
    pub const fn cooperative(file: (&'static str, &'static str), entry: &'static str) -> Self {
        Kernel {
            cooperative: true,
            ..Kernel::new(file, entry)
        }
    }

    /// The variant reading f16 weights: one WGSL source serves both element types. A
    /// shader that takes weights reads them as `f32(w[i])` (or `vec4<f32>(w4[i])`) through
    /// `alias W`, accumulating in f32; this variant's header enables f16 and declares
    /// `alias W = f16;`. Only for devices with f16 storage (`GpuContext::f16`), the only
    /// ones that hold f16 tensors.
    pub const fn with_f16_weights(self) -> Self {
        Kernel {
            f16_weights: true,
            ..self
        }
    }

    /// The lines the module starts with: `enable` directives, then `alias W`.
    pub fn header(&self) -> String {
        let mut h = String::new();
        if self.f16_weights || self.cooperative {
            h.push_str("enable f16;\n");
        }
        if self.cooperative {
            h.push_str("enable wgpu_cooperative_matrix;\n");
        }
        h.push_str(if self.f16_weights {
            "alias W = f16;\n"
        } else {
            "alias W = f32;\n"
        });
        h
    }

    /// The WGSL this kernel compiles from.
    pub fn wgsl(&self) -> String {
        format!("{}{}", self.header(), self.source)
    }
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    passes: usize,
    /// The timestamp queries of the encoder's passes (only when profiling).
    timestamps: Option<Batch>,
}

/// A bind group's identity: the kernel and each binding's (buffer, offset, size).
#[derive(Clone, PartialEq, Eq, Hash)]
struct BindKey {
    kernel: Kernel,
    bindings: Vec<(wgpu::Buffer, u64, Option<u64>)>,
}

/// The most parameter blocks and bind groups kept; past it both caches start over (a
/// generation of a given size needs a few hundred of each, steady from step to step).
const MAX_CACHED: usize = 8192;

/// Parameter buffers by content and bind groups by their bindings: a denoising step
/// repeats the previous step's launches with the same shapes, and the buffer pool hands
/// out the same buffers in the same order, so after the first step nearly every launch
/// reuses both instead of creating them.
#[derive(Default)]
struct BindCache {
    params: HashMap<Vec<u8>, wgpu::Buffer>,
    groups: HashMap<BindKey, wgpu::BindGroup>,
    hits: u64,
    misses: u64,
}

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
    /// (gemm_coop.wgsl): see [`cooperative_matrices_usable`].
    pub coop: bool,
    /// Whether f16 weights stay f16 on the device (the adapter has `SHADER_F16` and
    /// `SD_GPU_F16` is not `0`): see [`GpuDevice`].
    pub f16: bool,
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

/// Vulkan, Metal and DX12 (`WGPU_BACKEND` may choose others).
fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu sees, best first: discrete, integrated, virtual, other, software.
pub fn adapters() -> Vec<wgpu::Adapter> {
    let mut all = pollster::block_on(instance().enumerate_adapters(backends()));
    all.sort_by_key(|a| rank(&a.get_info()));
    all
}

fn rank(info: &wgpu::AdapterInfo) -> u8 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Whether gemm_coop.wgsl's kernels can run on `adapter`, and are wanted: it has
/// cooperative matrices with 16x16x16 f16 -> f32 blocks, f16 and subgroups, and its
/// subgroups are always 32 wide (the kernels split a 256-thread workgroup into 8
/// subgroups); `SD_GPU_COOP=0` turns them off (the SIMT kernels then run, all in f32).
pub fn cooperative_matrices_usable(adapter: &wgpu::Adapter) -> bool {
    let off = std::env::var("SD_GPU_COOP").is_ok_and(|v| v.trim() == "0");
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP;
    let info = adapter.get_info();
    let shape = adapter.cooperative_matrix_properties().iter().any(|m| {
        (m.m_size, m.n_size, m.k_size) == (16, 16, 16)
            && m.ab_type == wgpu::CooperativeScalarType::F16
            && m.cr_type == wgpu::CooperativeScalarType::F32
    });
    !off && adapter.features().contains(needed)
        && shape
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
}

/// Whether an adapter is a software rasteriser (llvmpipe, SwiftShader, WARP).
pub fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

impl GpuDevice {
    /// Opens the best adapter, or the first whose name contains `name` (any case).
    pub fn new(name: Option<&str>) -> Result<Self> {
        let all = adapters();
        let adapter = match name {
            Some(want) => all
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&want.to_lowercase()))
                .ok_or_else(|| Error::Gpu(format!("no GPU adapter named like {want:?}; found: {}", names())))?,
            None => all.into_iter().next().ok_or_else(|| {
                Error::Gpu(
                    "no GPU adapter found (install a Vulkan driver, e.g. Mesa's mesa-vulkan-drivers, or use the CPU backend)"
                        .into(),
                )
            })?,
        };
        Self::open(adapter, profile::requested())
    }

    /// Opens `adapter`, profiling its kernels if `profile` and the adapter can (see the
    /// type's documentation).
    pub(crate) fn open(adapter: wgpu::Adapter, profile: bool) -> Result<Self> {
        let info = adapter.get_info();
        // The adapter's own limits, not WebGPU's defaults (128 MiB bindings, small buffers).
        let limits = adapter.limits();
        let f16_off = std::env::var("SD_GPU_F16").is_ok_and(|v| v.trim() == "0");
        let f16 = adapter.features().contains(wgpu::Features::SHADER_F16) && !f16_off;
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        if profile && !timestamps {
            tracing::warn!(
                "SD_GPU_PROFILE: {} has no TIMESTAMP_QUERY, so there is no kernel profile",
                info.name
            );
        }
        let profile = profile && timestamps;
        let coop = cooperative_matrices_usable(&adapter);
        let mut required_features = wgpu::Features::empty();
        if f16 || coop {
            required_features |= wgpu::Features::SHADER_F16;
        }
        if coop {
            required_features |=
                wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP;
        }
        if profile {
            required_features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sd-wgpu"),
            required_features,
            required_limits: limits.clone(),
            // SAFETY: the one experimental feature asked for is cooperative matrices, used
            // only by gemm_coop.wgsl's kernels within the shapes the adapter reports
            // (16x16x16 f16 -> f32), which the GPU bench checks against the CPU backend.
            experimental_features: if coop {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        }))
        .map_err(|e| Error::Gpu(format!("{}: cannot open the device: {e}", info.name)))?;
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            tracing::error!("GPU device lost ({reason:?}): {message}");
            *lock(&lost_sink) = Some(format!("{reason:?}: {message}"));
        });
        let error = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!("GPU error: {e}");
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));
        tracing::info!(
            "GPU adapter: {} ({:?}, {:?}), cooperative matrices: {}, f16 weights: {}",
            info.name,
            info.device_type,
            info.backend,
            if coop { "used" } else { "no" },
            if f16 {
                "kept"
            } else if f16_off {
                "widened (SD_GPU_F16=0)"
            } else {
                "widened (no SHADER_F16)"
            }
        );
        let profiler = profile.then(|| Profiler::new(&queue));
        if let Some(p) = &profiler {
            tracing::info!(
                "SD_GPU_PROFILE: timing every kernel (timestamp period {} ns)",
                p.period_ns()
            );
        }
        Ok(GpuDevice(Arc::new(GpuContext {
            device,
            queue,
            info,
            limits,
            adapter_features: adapter.features(),
            coop,
            cooperative_matrices: adapter.cooperative_matrix_properties(),
            f16,
            pending: Mutex::new(Pending {
                encoder: None,
                passes: 0,
                timestamps: None,
            }),
            pipelines: Mutex::new(HashMap::new()),
            binds: Mutex::new(BindCache::default()),
            modules: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            error,
            lost,
            profiler,
            launches: Default::default(),
        })))
    }

    pub fn name(&self) -> String {
        self.0.info.name.clone()
    }

    pub fn is_software(&self) -> bool {
        is_software(&self.0.info)
    }

    /// What the adapter is and offers, for benchmarks and logs: name, backend, driver,
    /// device type, the features the kernels can use (SHADER_F16, SUBGROUP, cooperative
    /// matrices, timestamps), subgroup sizes, the cooperative-matrix shapes, and the limits
    /// that decide windowing and banding.
    pub fn describe(&self) -> serde_json::Value {
        let c = &self.0;
        let f = c.adapter_features;
        let coop: Vec<String> = c
            .cooperative_matrices
            .iter()
            .map(|m| {
                format!(
                    "{}x{}x{} {:?}->{:?}",
                    m.m_size, m.n_size, m.k_size, m.ab_type, m.cr_type
                )
            })
            .collect();
        serde_json::json!({
            "name": c.info.name,
            "backend": format!("{:?}", c.info.backend),
            "device_type": format!("{:?}", c.info.device_type),
            "vendor": format!("{:#06x}", c.info.vendor),
            "device": format!("{:#06x}", c.info.device),
            "driver": c.info.driver,
            "driver_info": c.info.driver_info,
            "features": {
                "shader_f16": f.contains(wgpu::Features::SHADER_F16),
                "subgroup": f.contains(wgpu::Features::SUBGROUP),
                "cooperative_matrix": f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
                "timestamp_query": f.contains(wgpu::Features::TIMESTAMP_QUERY),
            },
            "f16_weights_kept": c.f16,
            "cooperative_matrices_used": c.coop,
            "subgroup_size": [c.info.subgroup_min_size, c.info.subgroup_max_size],
            "cooperative_matrix_shapes": coop,
            "limits": {
                "max_buffer_size": c.limits.max_buffer_size,
                "max_storage_buffer_binding_size": c.limits.max_storage_buffer_binding_size,
                "max_compute_workgroup_storage_size": c.limits.max_compute_workgroup_storage_size,
                "max_compute_invocations_per_workgroup": c.limits.max_compute_invocations_per_workgroup,
                "max_compute_workgroups_per_dimension": c.limits.max_compute_workgroups_per_dimension,
                "max_storage_buffers_per_shader_stage": c.limits.max_storage_buffers_per_shader_stage,
            },
        })
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

/// The names of every adapter, for messages.
pub fn names() -> String {
    let names: Vec<String> = adapters().iter().map(|a| a.get_info().name).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GpuContext {
    /// The error wgpu reported since the last check, if any.
    /// After an error, the work recorded but not yet submitted belongs to the failed job
    /// (and may reference its invalid buffers): it is dropped so the next job starts clean.
    pub fn take_error(&self) -> Result<()> {
        if lock(&self.error).is_some() {
            // A lost device shows first as errors of the work on it; let wgpu run the
            // device-lost callback so that the job's error says so.
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
        if let Some(why) = lock(&self.lost).clone() {
            lock(&self.error).take();
            let mut pending = lock(&self.pending);
            pending.encoder = None;
            pending.passes = 0;
            pending.timestamps = None;
            return Err(Error::Gpu(format!(
                "the GPU device {} was lost ({why}); the model must be loaded again",
                self.info.name
            )));
        }
        let error = lock(&self.error).take();
        match error {
            Some(e) => {
                let mut pending = lock(&self.pending);
                pending.encoder = None;
                pending.passes = 0;
                // The dropped passes' timestamps were never written.
                pending.timestamps = None;
                Err(Error::Gpu(e))
            }
            None => Ok(()),
        }
    }

    /// Submits the pending encoder.
    pub fn flush(&self) {
        self.submit(&mut lock(&self.pending));
    }

    /// Submits `pending`'s encoder, if any, with the resolve of its passes' timestamps.
    fn submit(&self, pending: &mut Pending) {
        if let Some(mut encoder) = pending.encoder.take() {
            let timestamps = pending.timestamps.take();
            if let (Some(profiler), Some(batch)) = (&self.profiler, &timestamps) {
                profiler.resolve(&mut encoder, batch);
            }
            self.queue.submit([encoder.finish()]);
            if let (Some(profiler), Some(batch)) = (&self.profiler, timestamps) {
                profiler.submitted(batch);
            }
        }
        pending.passes = 0;
    }

    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        if let Some(p) = &self.profiler {
            let failed = lock(&self.error).is_some();
            p.collect(failed);
        }
        self.take_error()
    }

    /// Records work into the pending encoder, submitting when enough has piled up.
    pub fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        self.record_pass(None, |encoder, _| f(encoder));
    }

    /// Records work into the pending encoder like [`GpuContext::record`]; when profiling and
    /// `kernel` is given, `f` also gets the timestamp writes of the compute pass it records
    /// (exactly one) for that kernel.
    fn record_pass(
        &self,
        kernel: Option<&'static str>,
        f: impl FnOnce(&mut wgpu::CommandEncoder, Option<wgpu::ComputePassTimestampWrites<'_>>),
    ) {
        let mut guard = lock(&self.pending);
        let pending = &mut *guard;
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        let timestamp_writes = match (&self.profiler, kernel) {
            (Some(p), Some(kernel)) => p.next_pass(&self.device, &mut pending.timestamps, kernel),
            _ => None,
        };
        f(encoder, timestamp_writes);
        pending.passes += 1;
        if pending.passes >= PASSES_PER_SUBMIT {
            self.submit(pending);
        }
    }

    fn pipeline(&self, kernel: Kernel) -> (wgpu::ComputePipeline, wgpu::BindGroupLayout) {
        if let Some(p) = lock(&self.pipelines).get(&kernel) {
            return p.clone();
        }
        let module = {
            let mut modules = lock(&self.modules);
            modules
                .entry((kernel.file, kernel.f16_weights))
                .or_insert_with(|| {
                    debug_assert!(!kernel.f16_weights || self.f16, "an f16 kernel without f16");
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(kernel.file),
                        source: wgpu::ShaderSource::Wgsl(kernel.wgsl().into()),
                    };
                    // SAFETY: every kernel guards its own reads and writes against the sizes it
                    // is given (each shader file says how), so wgpu's inserted bounds checks
                    // would only cost time.
                    unsafe {
                        self.device.create_shader_module_trusted(
                            desc,
                            wgpu::ShaderRuntimeChecks::unchecked(),
                        )
                    }
                })
                .clone()
        };
        let constants: Vec<(&str, f64)> = kernel
            .constant
            .iter()
            .map(|&(name, value)| (name, value as f64))
            .collect();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry),
                layout: None,
                module: &module,
                entry_point: Some(kernel.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    ..Default::default()
                },
                cache: None,
            });
        let entry = (pipeline.clone(), pipeline.get_bind_group_layout(0));
        lock(&self.pipelines).insert(kernel, entry.clone());
        entry
    }

    /// A kernel-output buffer of `bytes` bytes, from the pool when one is free.
    pub fn alloc(&self, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(4);
        if let Some(b) = lock(&self.pool)
            .get_mut(&bytes)
            .and_then(std::collections::BTreeSet::pop_first)
        {
            return b;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Returns a buffer to the pool. Commands already recorded may still use it; anything
    /// that later writes it is recorded after them, and wgpu orders the two.
    pub fn recycle(&self, buffer: wgpu::Buffer) {
        if buffer.size() > self.limits.max_buffer_size {
            return; // Its creation failed (and was reported); never hand it out again.
        }
        lock(&self.pool)
            .entry(buffer.size())
            .or_default()
            .insert(buffer);
    }

    /// A buffer holding `data`, created mapped (not through the queue, whose staged writes
    /// would all land before any recorded pass that reads them).
    pub fn upload(&self, data: &[u8]) -> wgpu::Buffer {
        let padded;
        let contents = if data.is_empty() {
            padded = [0u8; 4];
            &padded[..]
        } else {
            data
        };
        let size = (contents.len() as u64).next_multiple_of(4);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        // wgpu's create_buffer_init panics where the buffer is invalid (a lost device, a
        // refused allocation); that is a job's error, reported at its read-back.
        match buffer.slice(..).get_mapped_range_mut() {
            Ok(mut view) => {
                view.slice(..contents.len()).copy_from_slice(contents);
                drop(view);
                buffer.unmap();
            }
            Err(e) => {
                lock(&self.error).get_or_insert(format!("uploading {size} bytes: {e}"));
            }
        }
        buffer
    }

    /// Records one compute pass: `kernel` with its parameter block at binding 0 and
    /// `buffers` at bindings 1, 2, ... (each a whole buffer or a window of one).
    pub fn dispatch(
        &self,
        kernel: Kernel,
        params: &[u8],
        buffers: &[wgpu::BindingResource<'_>],
        groups: [u32; 3],
    ) {
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (pipeline, layout) = self.pipeline(kernel);
        let bind_group = self.bind_group(kernel, &layout, params, buffers);
        self.record_pass(Some(kernel.entry), |encoder, timestamp_writes| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.entry),
                timestamp_writes,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        });
    }

    /// The bind group of `params` (binding 0) and `buffers` (1, 2, ...) for `kernel`: from
    /// the cache, or made and kept.
    fn bind_group(
        &self,
        kernel: Kernel,
        layout: &wgpu::BindGroupLayout,
        params: &[u8],
        buffers: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let mut cache = lock(&self.binds);
        if cache.params.len() >= MAX_CACHED || cache.groups.len() >= MAX_CACHED {
            cache.params.clear();
            cache.groups.clear();
        }
        let params_buffer = match cache.params.get(params) {
            Some(b) => b.clone(),
            None => {
                let b = self.upload(params);
                cache.params.insert(params.to_vec(), b.clone());
                b
            }
        };
        let mut bindings = Vec::with_capacity(buffers.len() + 1);
        bindings.push((params_buffer, 0, None));
        for resource in buffers {
            match resource {
                wgpu::BindingResource::Buffer(b) => {
                    bindings.push((b.buffer.clone(), b.offset, b.size.map(|s| s.get())))
                }
                _ => unreachable!("kernels bind only storage buffers"),
            }
        }
        let key = BindKey { kernel, bindings };
        if let Some(group) = cache.groups.get(&key) {
            let group = group.clone();
            cache.hits += 1;
            return group;
        }
        cache.misses += 1;
        let entries: Vec<wgpu::BindGroupEntry> = key
            .bindings
            .iter()
            .enumerate()
            .map(|(i, (buffer, offset, size))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: *offset,
                    size: size.and_then(std::num::NonZeroU64::new),
                }),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout,
            entries: &entries,
        });
        cache.groups.insert(key, group.clone());
        group
    }

    /// Workgroup counts covering `items` with `per_group` each, spread over x and y so no
    /// dimension exceeds the adapter's limit. Kernels recover the flat index as
    /// `(wid.y * num_workgroups.x + wid.x) * per_group + lid.x` and skip indices past the end.
    pub fn groups_1d(&self, items: usize, per_group: u32) -> [u32; 3] {
        let groups = items.div_ceil(per_group as usize).max(1) as u64;
        let max = self.limits.max_compute_workgroups_per_dimension.max(1) as u64;
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        [x as u32, y as u32, 1]
    }

    /// Reads a buffer's first `bytes` bytes back (submitting and waiting).
    pub fn read(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.record(|encoder| encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size));
        self.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("the read-back was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("reading a buffer back: {e}")))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("reading a buffer back: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(data[..bytes as usize].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use crate::tensor::testing::random;
    use crate::tensor::{Device, Tensor};

    /// The same work three times, as consecutive denoising steps do: once the buffer pool
    /// has settled (the first round allocates, the second reuses what the first freed), a
    /// round makes no bind group (every launch finds its own in the cache) and gives the
    /// same values.
    #[test]
    fn a_repeated_step_reuses_every_bind_group() {
        let Some(shared) = super::super::test_device() else {
            return;
        };
        // A device of its own, so other tests' launches do not count.
        let gpu = super::GpuDevice::new(Some(&shared.name())).unwrap();
        let device = Device::Gpu(gpu.clone());
        let up = |t: Tensor| t.to_device(&device).unwrap();
        let weight = up(random(&[8, 8, 3, 3], 1));
        let (gamma, beta) = (up(random(&[8], 2)), up(random(&[8], 3)));
        let step = |x: &Tensor| -> Vec<f32> {
            let h = x.conv2d(&weight, None, 1, 1).unwrap();
            let h = h.group_norm(4, &gamma, &beta, 1e-5, true).unwrap();
            let h = h.add(x).unwrap().reshape(&[2, 8, 36]).unwrap();
            let h = h.matmul_t(&h).unwrap().softmax().unwrap();
            h.to_vec().unwrap()
        };
        let x = up(random(&[2, 8, 6, 6], 4));
        let first = step(&x);
        step(&x);
        let (_, made) = gpu.bind_group_reuse();
        let second = step(&x);
        let (reused, made_after) = gpu.bind_group_reuse();
        assert_eq!(first, second);
        assert_eq!(made_after, made, "the third round made bind groups");
        assert!(reused >= made, "{reused} reused, {made} made");
    }

    /// Every shader file in every variant the host builds (f32 and f16 weights; the
    /// cooperative-matrix ones with their header) parses, validates with every capability
    /// and translates to SPIR-V: checked here, where no adapter may run them.
    #[test]
    fn every_kernel_variant_compiles_to_spirv() {
        use super::Kernel;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
            .collect();
        files.sort();
        assert!(files.len() >= 7, "{files:?}");
        for path in files {
            let source: &'static str =
                Box::leak(std::fs::read_to_string(&path).unwrap().into_boxed_str());
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let cooperative = source.contains("coop_mat");
            for f16 in [false, true] {
                let mut kernel = if cooperative {
                    Kernel::cooperative(("test", source), "")
                } else {
                    Kernel::new(("test", source), "")
                };
                if f16 {
                    kernel = kernel.with_f16_weights();
                }
                let what = format!("{name} (f16 weights: {f16})");
                let module = naga::front::wgsl::parse_str(&kernel.wgsl())
                    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(source)));
                let info = naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::all(),
                )
                .validate(&module)
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                let options = naga::back::spv::Options {
                    lang_version: (1, 6),
                    ..Default::default()
                };
                // Overrides at their defaults (the host sets them per variant).
                let (module, info) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    None,
                    &Default::default(),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                for entry in &module.entry_points {
                    let pipeline = naga::back::spv::PipelineOptions {
                        shader_stage: naga::ShaderStage::Compute,
                        entry_point: entry.name.clone(),
                    };
                    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
                        .unwrap_or_else(|e| panic!("{what}: {}: {e}", entry.name));
                }
            }
        }
    }
}
