//! Adapters: which ones wgpu sees and in what order, what they offer (cooperative
//! matrices among it), and opening one as a [`GpuDevice`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::features::{Selection, ShaderFeature};
use super::launch::BindCache;
use super::submit::Pending;
use super::{lock, GpuContext, GpuDevice, Tuning};
use crate::backend::gpu::profile::{self, Profiler};
use crate::error::{Error, Result};

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

/// Whether the cooperative-matrix kernels (gemm_coop.wgsl, attention_coop.wgsl) can run on
/// `adapter` and are wanted, or why not: the backend may select them and the adapter offers
/// their features ([`ShaderFeature::usable`]), it has 16x16x16 f16 -> f32 blocks, and its
/// subgroups are always 32 wide (the kernels split a 256-thread workgroup into 8 subgroups);
/// `SD_GPU_COOP=0` turns them off (the SIMT kernels then run, all in f32).
pub fn cooperative_matrices(adapter: &wgpu::Adapter) -> std::result::Result<(), &'static str> {
    let info = adapter.get_info();
    let shape = adapter.cooperative_matrix_properties().iter().any(|m| {
        (m.m_size, m.n_size, m.k_size) == (16, 16, 16)
            && m.ab_type == wgpu::CooperativeScalarType::F16
            && m.cr_type == wgpu::CooperativeScalarType::F32
    });
    if std::env::var("SD_GPU_COOP").is_ok_and(|v| v.trim() == "0") {
        Err("SD_GPU_COOP=0")
    } else if !ShaderFeature::CooperativeMatrix.selectable_on(info.backend) {
        Err("not selected on this backend")
    } else if !ShaderFeature::CooperativeMatrix.usable(adapter) {
        Err("the adapter lacks cooperative matrices, SHADER_F16, SUBGROUP or 40 KiB of workgroup memory")
    } else if !shape {
        Err("no 16x16x16 f16 -> f32 cooperative matrices")
    } else if (info.subgroup_min_size, info.subgroup_max_size) != (32, 32) {
        Err("subgroups are not always 32 wide")
    } else {
        Ok(())
    }
}

/// Whether f16 weights stay f16 on `adapter`, or why not (see [`GpuDevice`]).
fn f16_weights(adapter: &wgpu::Adapter) -> std::result::Result<(), &'static str> {
    let info = adapter.get_info();
    if std::env::var("SD_GPU_F16").is_ok_and(|v| v.trim() == "0") {
        Err("SD_GPU_F16=0")
    } else if !ShaderFeature::F16.selectable_on(info.backend) {
        Err("not selected on this backend")
    } else if !ShaderFeature::F16.usable(adapter) {
        Err("no SHADER_F16")
    } else {
        Ok(())
    }
}

/// Whether an adapter is a software rasteriser (llvmpipe, SwiftShader, WARP).
pub fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
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
        let tuning = Tuning::for_adapter(&adapter.get_info());
        Self::open_tuned(adapter, profile, tuning)
    }

    /// [`GpuDevice::open`] with the launch shapes of `tuning`, whatever the adapter is.
    pub(crate) fn open_tuned(
        adapter: wgpu::Adapter,
        profile: bool,
        tuning: Tuning,
    ) -> Result<Self> {
        let info = adapter.get_info();
        // The adapter's own limits, not WebGPU's defaults (128 MiB bindings, small buffers).
        let limits = adapter.limits();
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        if profile && !timestamps {
            tracing::warn!(
                "SD_GPU_PROFILE: {} has no TIMESTAMP_QUERY, so there is no kernel profile",
                info.name
            );
        }
        let profile = profile && timestamps;
        let f16 = f16_weights(&adapter);
        let coop = cooperative_matrices(&adapter);
        let mut required_features = wgpu::Features::empty();
        if f16.is_ok() {
            required_features |= ShaderFeature::F16.support().wgpu_features;
        }
        if coop.is_ok() {
            required_features |= ShaderFeature::CooperativeMatrix.support().wgpu_features;
        }
        if profile {
            required_features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let selection = Selection::new(&info, required_features, f16, coop);
        let (f16, coop) = (f16.is_ok(), coop.is_ok());
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
        tracing::info!("GPU: {}; launch shapes: {tuning:?}", selection.summary());
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
            selection,
            tuning,
            pending: Mutex::new(Pending::default()),
            pipelines: Mutex::new(HashMap::new()),
            binds: Mutex::new(BindCache::default()),
            modules: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            memory: Mutex::default(),
            keep_freed: true.into(),
            dry_run: Default::default(),
            error,
            lost,
            profiler,
            launches: Default::default(),
        })))
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
            "selection": c.selection,
            "tuning": c.tuning,
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
}
