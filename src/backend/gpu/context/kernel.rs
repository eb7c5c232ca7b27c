//! Kernels and their variants: a WGSL file's entry point, built with a generated header
//! (`enable` directives, `alias W`) and `override` constants.

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

#[cfg(test)]
mod tests {
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
