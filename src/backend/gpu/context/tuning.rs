//! Launch shapes by kind of adapter: the kernels' tile and workgroup sizes are override
//! constants, and each kernel family picks its values by the device's [`Tuning`]; the
//! tiled products (conv.wgsl, matmul.wgsl) share [`TileShape`].

use super::Kernel;

/// Which launch shapes the kernels take.
///
/// A hardware GPU runs the shapes measured on the H200 (README): large workgroups, 4 x 4
/// values per thread. A software adapter (Mesa's llvmpipe, CI's) runs a workgroup on one
/// CPU core, 8 lanes at a time, and at every barrier switches each group of 8 lanes in and
/// out of a coroutine (a probe of 64 workgroups of 256 threads took 0.16 ms with no
/// barrier, 7.6 ms with 64; with 32 threads 0.11 and 1.4 ms). There few threads per
/// workgroup, each with a large register block, pay far less: on llvmpipe (2 EPYC cores) a 3x3 convolution of 64 channels on the tests'
/// 4 x 4 latents took 3.5-3.7 ms with 32 threads of 8 x 8 values against 11.3 ms with 256
/// of 4 x 4, one at 32 x 32 pixels 53-57 against 89 ms; each family's module has its
/// numbers.
///
/// `SD_GPU_TUNING=hardware|software` overrides the choice (to time one kind's shapes on the
/// other); tests run every kernel family under both (`test_devices`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tuning {
    Hardware,
    Software,
}

impl Tuning {
    /// The tuning for an adapter: `SD_GPU_TUNING` when set, else by the device type.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Tuning {
        match std::env::var("SD_GPU_TUNING").as_deref().map(str::trim) {
            Ok("hardware") => Tuning::Hardware,
            Ok("software") => Tuning::Software,
            _ if super::is_software(info) => Tuning::Software,
            _ => Tuning::Hardware,
        }
    }

    /// The other tuning (tests run both).
    pub fn other(self) -> Tuning {
        match self {
            Tuning::Hardware => Tuning::Software,
            Tuning::Software => Tuning::Hardware,
        }
    }
}

/// The launch shape of a tiled product (conv.wgsl's `conv2d`, matmul.wgsl's SIMT kernels):
/// their override constants `TX`, `TY`, `RM` and `CN`. A workgroup of `tx * ty` threads
/// computes a `ty * rm` x `tx * cn * 4` tile of the output, each thread `rm` rows by `cn`
/// quads of 4 columns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileShape {
    pub tx: u32,
    pub ty: u32,
    pub rm: u32,
    pub cn: u32,
}

impl TileShape {
    /// 64 x 64 tiles of 16 x 16 threads with 4 x 4 values each: the shape measured on the
    /// H200 (README), for hardware GPUs.
    pub const WIDE: TileShape = TileShape {
        tx: 16,
        ty: 16,
        rm: 4,
        cn: 1,
    };

    /// 32 x 64 tiles of 8 x 4 threads with 8 x 8 values each, for software adapters
    /// (measured on llvmpipe in conv.rs and matmul.rs).
    pub const FEW_THREADS: TileShape = TileShape {
        tx: 8,
        ty: 4,
        rm: 8,
        cn: 2,
    };

    /// The shape for `tuning`.
    pub const fn of(tuning: Tuning) -> TileShape {
        match tuning {
            Tuning::Hardware => TileShape::WIDE,
            Tuning::Software => TileShape::FEW_THREADS,
        }
    }

    /// Output rows per tile.
    pub const fn rows(self) -> usize {
        (self.ty * self.rm) as usize
    }

    /// Output columns per tile.
    pub const fn cols(self) -> usize {
        (self.tx * self.cn * 4) as usize
    }

    pub const fn threads(self) -> u32 {
        self.tx * self.ty
    }

    /// `kernel` built with this shape.
    pub const fn apply(self, kernel: Kernel) -> Kernel {
        kernel
            .with_constant("TX", self.tx)
            .with_constant("TY", self.ty)
            .with_constant("RM", self.rm)
            .with_constant("CN", self.cn)
    }
}
