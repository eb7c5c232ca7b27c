//! Every kernel variant the backend may build ([`super::kernels`]), translated by naga (the
//! version wgpu 30 uses) into the shading language of each backend that may select it
//! ([`SHADER_FEATURES`]): SPIR-V for Vulkan, MSL for Metal, HLSL for DX12. Here, where no
//! Mac or Windows machine runs them, so that a kernel one of those cannot compile is caught
//! before a user's first generation is.

use std::collections::BTreeSet;

use naga::valid::{ModuleInfo, ValidationFlags};
use naga::{Module, ShaderStage};

use super::context::{Kernel, ShaderFeature, SHADER_FEATURES};

/// The backends the design promises, and what wgpu translates WGSL into on each.
const BACKENDS: [wgpu::Backend; 3] = [
    wgpu::Backend::Vulkan,
    wgpu::Backend::Metal,
    wgpu::Backend::Dx12,
];

/// The kernel's module, validated with exactly the capabilities wgpu derives from the
/// features the variant declares (a kernel using more than it declares fails here), with
/// its override constants applied as the pipeline applies it.
fn compile(kernel: &Kernel) -> Result<(Module, ModuleInfo), String> {
    let source = kernel.wgsl();
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| e.emit_to_string(&source))?;
    let info = wgpu_naga_bridge::create_validator(
        kernel.wgpu_features(),
        wgpu::DownlevelFlags::empty(),
        ValidationFlags::all(),
    )
    .validate(&module)
    .map_err(|e| format!("{:?}", e.into_inner()))?;
    let constants = kernel
        .constants()
        .map(|(name, value)| (name.to_string(), f64::from(value)))
        .collect();
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((ShaderStage::Compute, kernel.entry)),
        &constants,
    )
    .map_err(|e| e.to_string())?;
    Ok((module.into_owned(), info.into_owned()))
}

/// Writes the kernel's entry point for `backend`, at the oldest language version wgpu
/// uses on a device that offers the variant's features.
fn translate(
    kernel: &Kernel,
    module: &Module,
    info: &ModuleInfo,
    backend: wgpu::Backend,
) -> Result<(), String> {
    let features = kernel.features();
    let entry = (ShaderStage::Compute, kernel.entry.to_string());
    match backend {
        wgpu::Backend::Vulkan => {
            // Vulkan 1.1 (SPIR-V 1.3): wgpu-hal's version for those devices; the
            // cooperative-matrix extension needs Vulkan 1.3 (SPIR-V 1.6) in practice.
            let lang_version = if features.contains(&ShaderFeature::CooperativeMatrix) {
                (1, 6)
            } else {
                (1, 3)
            };
            let options = naga::back::spv::Options {
                lang_version,
                ..Default::default()
            };
            let pipeline = naga::back::spv::PipelineOptions {
                shader_stage: entry.0,
                entry_point: entry.1,
            };
            naga::back::spv::write_vec(module, info, &options, Some(&pipeline))
                .map(drop)
                .map_err(|e| e.to_string())
        }
        wgpu::Backend::Metal => {
            // MSL 2.3: Apple silicon's first macOS (11); wgpu-hal asks for the device's own.
            let options = naga::back::msl::Options {
                lang_version: (2, 3),
                ..Default::default()
            };
            let pipeline = naga::back::msl::PipelineOptions {
                entry_point: Some(entry),
                ..Default::default()
            };
            naga::back::msl::write_string(module, info, &options, &pipeline)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        wgpu::Backend::Dx12 => {
            // Shader model 5.1: what FXC compiles, wgpu's fallback where no dxcompiler.dll
            // is found. f16 needs DXC and 6.2, the lowest at which wgpu offers SHADER_F16.
            let shader_model = if features.contains(&ShaderFeature::F16) {
                naga::back::hlsl::ShaderModel::V6_2
            } else {
                naga::back::hlsl::ShaderModel::V5_1
            };
            let options = naga::back::hlsl::Options {
                shader_model,
                ..Default::default()
            };
            let pipeline = naga::back::hlsl::PipelineOptions {
                entry_point: Some(entry),
            };
            let mut hlsl = String::new();
            naga::back::hlsl::Writer::new(&mut hlsl, &options, &pipeline)
                .write(module, info, None)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        other => Err(format!("no translation checked for {other:?}")),
    }
}

/// What the entry point needs of the device's limits, checked against wgpu's defaults
/// (WebGPU's, which every Vulkan, Metal and DX12 adapter wgpu offers meets): workgroup
/// memory, threads per workgroup and storage buffers. The host asks for the adapter's own
/// limits, but kernels that fit the defaults never fail to build for want of them; a
/// feature that allows more workgroup memory is only selected where the adapter has it
/// ([`ShaderFeature::usable`]).
fn check_limits(kernel: &Kernel, module: &Module, info: &ModuleInfo) -> Result<(), String> {
    let limits = wgpu::Limits {
        max_compute_workgroup_storage_size: kernel.workgroup_bytes(),
        ..wgpu::Limits::default()
    };
    let (index, entry) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, e)| e.name == kernel.entry)
        .ok_or("no such entry point")?;
    let usage = info.get_entry_point(index);
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| e.to_string())?;
    let mut workgroup_bytes = 0;
    let mut storage_buffers = 0;
    for (handle, global) in module.global_variables.iter() {
        if usage[handle].is_empty() {
            continue;
        }
        match global.space {
            naga::AddressSpace::WorkGroup => workgroup_bytes += layouter[global.ty].size,
            naga::AddressSpace::Storage { .. } => storage_buffers += 1,
            _ => {}
        }
    }
    let threads: u32 = entry.workgroup_size.iter().product();
    if workgroup_bytes > limits.max_compute_workgroup_storage_size {
        return Err(format!(
            "{workgroup_bytes} bytes of workgroup memory (its features allow {})",
            limits.max_compute_workgroup_storage_size
        ));
    }
    if threads > limits.max_compute_invocations_per_workgroup {
        return Err(format!("{threads} threads per workgroup"));
    }
    if storage_buffers > limits.max_storage_buffers_per_shader_stage {
        return Err(format!("{storage_buffers} storage buffers"));
    }
    Ok(())
}

#[test]
fn every_kernel_variant_translates_for_every_backend_that_may_select_it() {
    let kernels = super::kernels();
    let mut failures = Vec::new();
    let mut translated = 0;
    for kernel in &kernels {
        let name = format!(
            "{}.wgsl:{} {:?}{}",
            kernel.file,
            kernel.entry,
            kernel.features(),
            kernel
                .constants()
                .map(|(k, v)| format!(" {k}={v}"))
                .collect::<String>()
        );
        let (module, info) = match compile(kernel) {
            Ok(compiled) => compiled,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if let Err(e) = check_limits(kernel, &module, &info) {
            failures.push(format!("{name}: {e}"));
        }
        for backend in BACKENDS {
            if !kernel.selectable_on(backend) {
                continue;
            }
            match translate(kernel, &module, &info, backend) {
                Ok(()) => translated += 1,
                Err(e) => failures.push(format!("{name} on {backend:?}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every variant runs somewhere, and the f32 ones everywhere.
    let everywhere = kernels.iter().filter(|k| k.features().is_empty()).count();
    assert!(translated >= kernels.len() + 2 * everywhere, "{translated}");
}

/// Every entry point of every shader file is some kernel of [`super::kernels`]: a kernel
/// the host builds is one the translation test sees.
#[test]
fn every_entry_point_of_every_shader_is_a_listed_kernel() {
    let listed: BTreeSet<(&str, &str)> =
        super::kernels().iter().map(|k| (k.file, k.entry)).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut found = BTreeSet::new();
    for file in std::fs::read_dir(&dir).expect("the shaders folder") {
        let path = file.expect("a shaders folder entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|e| e != "wgsl") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("a shader file");
        // Parsed with the header of a listed variant of this file (its `enable`s, `alias W`).
        let header = super::kernels()
            .into_iter()
            .find(|k| k.file == stem)
            .unwrap_or_else(|| panic!("{stem}.wgsl: no kernel is listed from it"))
            .header();
        let module = naga::front::wgsl::parse_str(&format!("{header}{source}"))
            .unwrap_or_else(|e| panic!("{stem}.wgsl: {}", e.emit_to_string(&source)));
        for entry in &module.entry_points {
            found.insert((stem.to_string(), entry.name.clone()));
        }
    }
    let listed: BTreeSet<(String, String)> = listed
        .iter()
        .map(|&(f, e)| (f.to_string(), e.to_string()))
        .collect();
    assert_eq!(found, listed, "entry points in shaders/ vs kernels()");
}

/// The table has one row per feature, and every feature a variant declares is one it
/// needs: validated with the other features' capabilities only, the variant fails. So a
/// device that lacks a feature is right to skip the variants that declare it.
#[test]
fn every_declared_feature_is_needed() {
    for feature in ShaderFeature::ALL {
        let rows = SHADER_FEATURES.iter().filter(|r| r.feature == feature);
        assert_eq!(rows.count(), 1, "{feature:?}");
    }
    let mut checked = 0;
    for kernel in super::kernels() {
        let features = kernel.features();
        for &dropped in &features {
            let others = features
                .iter()
                .filter(|&&f| f != dropped)
                .fold(wgpu::Features::empty(), |all, f| {
                    all | f.support().wgpu_features
                });
            if others.contains(dropped.support().wgpu_features) {
                continue; // implied by another (cooperative matrices need f16)
            }
            let source = kernel.wgsl();
            let module = naga::front::wgsl::parse_str(&source);
            let validated = module.map(|module| {
                wgpu_naga_bridge::create_validator(
                    others,
                    wgpu::DownlevelFlags::empty(),
                    ValidationFlags::all(),
                )
                .validate(&module)
                .is_ok()
            });
            assert!(
                !matches!(validated, Ok(true)),
                "{}:{} validates without {dropped:?}",
                kernel.file,
                kernel.entry
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}
