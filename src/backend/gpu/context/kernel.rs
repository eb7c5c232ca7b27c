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
    /// Reads a weight operand that may be f16: has an f16-weight variant
    /// ([`Kernel::reading_weights`]).
    pub reads_weights: bool,
    /// Built with half-precision weights: see [`Kernel::with_f16_weights`].
    pub f16_weights: bool,
    /// Uses cooperative matrices (and f16): only for devices with `GpuContext::coop`.
    pub cooperative: bool,
    /// Pipeline-overridable constants (`override NAME: u32`) and their values, in the
    /// first slots: loop lengths and tile shapes fixed per variant when the pipeline is
    /// built, so the driver can unroll the loops.
    pub constants: Constants,
}

/// The most override constants one kernel variant sets.
pub const MAX_CONSTANTS: usize = 4;

/// A variant's override constants (names and values), in the first slots.
pub type Constants = [Option<(&'static str, u32)>; MAX_CONSTANTS];

impl Kernel {
    fn identity(&self) -> (&'static str, &'static str, bool, Constants) {
        (self.file, self.entry, self.f16_weights, self.constants)
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
            reads_weights: false,
            f16_weights: false,
            cooperative: false,
            constants: [None; MAX_CONSTANTS],
        }
    }

    /// This kernel with `override name: u32` set to `value` as well.
    pub const fn with_constant(self, name: &'static str, value: u32) -> Self {
        let mut constants = self.constants;
        let mut i = 0;
        while constants[i].is_some() {
            i += 1;
        }
        assert!(
            i < MAX_CONSTANTS,
            "more override constants than MAX_CONSTANTS"
        );
        constants[i] = Some((name, value));
        Kernel { constants, ..self }
    }

    /// The override constants this variant sets.
    pub fn constants(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.constants.iter().flatten().copied()
    }

    /// A kernel on cooperative matrices (f16 x f16 -> f32 blocks of 16 x 16): its module is
    /// built with `enable f16; enable wgpu_cooperative_matrix;`.
    pub const fn cooperative(file: (&'static str, &'static str), entry: &'static str) -> Self {
        Kernel {
            cooperative: true,
            ..Kernel::new(file, entry)
        }
    }

    /// This kernel, declared as one that reads a weight which may be f16: it has an
    /// f16-weight variant ([`Kernel::with_f16_weights`]), and [`Kernel::variants`] lists it.
    pub const fn reading_weights(self) -> Self {
        Kernel {
            reads_weights: true,
            ..self
        }
    }

    /// Every variant of this kernel the host may build: itself and, for a kernel that reads
    /// weights, its f16-weight variant.
    pub fn variants(&self) -> Vec<Kernel> {
        let mut all = vec![*self];
        if self.reads_weights {
            all.push(self.with_f16_weights());
        }
        all
    }

    /// The variant reading f16 weights: one WGSL source serves both element types. A
    /// shader that takes weights reads them as `f32(w[i])` (or `vec4<f32>(w4[i])`) through
    /// `alias W`, accumulating in f32; this variant's header enables f16 and declares
    /// `alias W = f16;`. Only for devices with f16 storage (`GpuContext::f16`), the only
    /// ones that hold f16 tensors.
    pub const fn with_f16_weights(self) -> Self {
        assert!(
            self.reads_weights,
            "an f16-weight variant of a kernel that reads no weights"
        );
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
