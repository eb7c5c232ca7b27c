//! The shader features kernel variants use, what each needs from an adapter, and on which of
//! wgpu's backends a variant using it may be selected: one table, read both when a device
//! opens ([`ShaderFeature::usable`]) and by the test that translates every kernel variant
//! to each backend's shading language (SPIR-V, MSL, HLSL) with naga. A variant whose
//! features a backend cannot express is one the code never selects there, so it cannot
//! become a shader compile error on a user's machine.

use super::Kernel;

/// A feature a kernel variant's module uses beyond core WGSL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShaderFeature {
    /// `enable f16;`: f16 weights read natively (`alias W = f16`), f32 accumulation.
    F16,
    /// `enable wgpu_cooperative_matrix;`: 16x16x16 f16 x f16 -> f32 blocks in subgroups of
    /// 32 (gemm_coop.wgsl, attention_coop.wgsl).
    CooperativeMatrix,
}

/// One row of the table.
pub struct FeatureSupport {
    pub feature: ShaderFeature,
    /// What the device must enable for modules that use the feature.
    pub wgpu_features: wgpu::Features,
    /// The backends on which a variant using it may be selected.
    pub backends: wgpu::Backends,
    /// Why those and not others, for the README and the log.
    pub why: &'static str,
    /// The most workgroup memory a variant using the feature takes, in bytes: an adapter
    /// offering less does not get those variants (the translation test checks each
    /// variant against the largest of its features' values and WebGPU's default, 16 KiB).
    pub workgroup_bytes: u32,
}

/// The table. What the other backends cannot do (checked by the translation test, which
/// writes every variant for every backend listed here):
/// - Metal offers cooperative matrices only as 8x8 `simdgroup_matrix` tiles (wgpu-hal 30
///   reports no other shape), and these kernels are built on 16x16 blocks;
/// - naga 30's HLSL writer has no cooperative matrices at all (`unimplemented!`), and wgpu
///   offers none on DX12.
///
/// f16 works on all three: Vulkan with `shaderFloat16` and 16-bit storage, Metal natively,
/// DX12 from shader model 6.2 with native 16-bit ops (wgpu offers SHADER_F16 only then).
pub const SHADER_FEATURES: [FeatureSupport; 2] = [
    FeatureSupport {
        feature: ShaderFeature::F16,
        wgpu_features: wgpu::Features::SHADER_F16,
        backends: wgpu::Backends::VULKAN
            .union(wgpu::Backends::METAL)
            .union(wgpu::Backends::DX12),
        why: "Vulkan (shaderFloat16), Metal (half), DX12 (shader model 6.2)",
        workgroup_bytes: 16 << 10,
    },
    FeatureSupport {
        feature: ShaderFeature::CooperativeMatrix,
        wgpu_features: wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            .union(wgpu::Features::SHADER_F16)
            .union(wgpu::Features::SUBGROUP),
        backends: wgpu::Backends::VULKAN,
        why: "Vulkan only: Metal's simdgroup matrices are 8x8 (these kernels use 16x16 blocks), DX12 has none in wgpu",
        // attention_coop.wgsl's staged K/V slabs and probabilities: 39,936 bytes (NVIDIA
        // offers 48 KiB, AMD 64 KiB).
        workgroup_bytes: 40 << 10,
    },
];

impl ShaderFeature {
    pub const ALL: [ShaderFeature; 2] = [ShaderFeature::F16, ShaderFeature::CooperativeMatrix];

    /// This feature's row of [`SHADER_FEATURES`].
    pub fn support(self) -> &'static FeatureSupport {
        SHADER_FEATURES
            .iter()
            .find(|row| row.feature == self)
            // The table has a row per variant of this enum (checked by a test).
            .expect("every shader feature has a row in SHADER_FEATURES")
    }

    /// Whether variants using this feature may be selected on `backend`.
    pub fn selectable_on(self, backend: wgpu::Backend) -> bool {
        self.support()
            .backends
            .contains(wgpu::Backends::from(backend))
    }

    /// Whether an adapter can run variants using this feature: its backend is in the
    /// table, it offers the wgpu features and the workgroup memory the table names.
    /// (Cooperative matrices also need the adapter's block shape and subgroup size: see
    /// `cooperative_matrices`.)
    pub fn usable(self, adapter: &wgpu::Adapter) -> bool {
        let row = self.support();
        self.selectable_on(adapter.get_info().backend)
            && adapter.features().contains(row.wgpu_features)
            && adapter.limits().max_compute_workgroup_storage_size >= row.workgroup_bytes
    }

    /// The name the log and /health use.
    pub fn name(self) -> &'static str {
        match self {
            ShaderFeature::F16 => "f16",
            ShaderFeature::CooperativeMatrix => "cooperative_matrix",
        }
    }
}

impl Kernel {
    /// The shader features this variant's module uses.
    pub fn features(&self) -> Vec<ShaderFeature> {
        let mut used = Vec::new();
        if self.f16_weights || self.cooperative {
            used.push(ShaderFeature::F16);
        }
        if self.cooperative {
            used.push(ShaderFeature::CooperativeMatrix);
        }
        used
    }

    /// Whether this variant may be selected on `backend` (every feature it uses may).
    pub fn selectable_on(&self, backend: wgpu::Backend) -> bool {
        self.features().iter().all(|f| f.selectable_on(backend))
    }

    /// The most workgroup memory this variant may take: WebGPU's default unless one of its
    /// features allows more (on the adapters that offer it).
    pub fn workgroup_bytes(&self) -> u32 {
        self.features()
            .iter()
            .map(|f| f.support().workgroup_bytes)
            .fold(
                wgpu::Limits::default().max_compute_workgroup_storage_size,
                u32::max,
            )
    }

    /// The wgpu features a device needs to build this variant.
    pub fn wgpu_features(&self) -> wgpu::Features {
        self.features()
            .iter()
            .fold(wgpu::Features::empty(), |all, f| {
                all | f.support().wgpu_features
            })
    }
}

/// What an opened device runs: its backend, the features it enabled, and which variant of
/// each kernel family it selects (and why not the other), for the log and /health.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Selection {
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// The wgpu features the device was opened with.
    pub features_enabled: Vec<String>,
    /// The shader features its kernels use ([`ShaderFeature::name`]).
    pub shader_features: Vec<&'static str>,
    /// f16 weights kept as f16, or widened to f32 (and why).
    pub weights: String,
    /// Linear layers and convolutions: cooperative matrices, or the SIMT kernels (and why).
    pub matrix_products: String,
    /// Attention's two products, likewise.
    pub attention: String,
}

impl Selection {
    /// From what `open` chose: the features asked for, and for f16 weights and cooperative
    /// matrices either yes or the reason not.
    pub fn new(
        info: &wgpu::AdapterInfo,
        enabled: wgpu::Features,
        f16: Result<(), &str>,
        coop: Result<(), &str>,
    ) -> Self {
        let mut shader_features = Vec::new();
        if f16.is_ok() {
            shader_features.push(ShaderFeature::F16.name());
        }
        if coop.is_ok() {
            shader_features.push(ShaderFeature::CooperativeMatrix.name());
        }
        let simt = |why: &str| format!("SIMT kernels, f32 ({why})");
        Selection {
            adapter: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            features_enabled: enabled.iter_names().map(|(n, _)| n.to_string()).collect(),
            shader_features,
            weights: match f16 {
                Ok(()) => "f16 where the file has f16, read natively".into(),
                Err(why) => format!("f32 ({why})"),
            },
            matrix_products: match coop {
                Ok(()) => "cooperative matrices, 16x16x16 f16 -> f32".into(),
                Err(why) => simt(why),
            },
            attention: match coop {
                Ok(()) => "cooperative matrices for heads up to 160 wide, SIMT beyond".into(),
                Err(why) => simt(why),
            },
        }
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "{} on {} ({}, {}); features: [{}]; weights: {}; matrix products: {}; attention: {}",
            self.adapter,
            self.backend,
            self.device_type,
            self.driver,
            self.features_enabled.join(", "),
            self.weights,
            self.matrix_products,
            self.attention
        )
    }
}
