//! Launch shapes by kind of adapter: the kernels' tile and workgroup sizes are override
//! constants, and each kernel family picks its values by the device's [`Tuning`].

/// Which launch shapes the kernels take.
///
/// A hardware GPU runs the shapes measured on the H200 (README): large workgroups, 4 x 4
/// values per thread. A software adapter (Mesa's llvmpipe, CI's) runs a workgroup on one
/// CPU core, 8 lanes at a time, and at every barrier switches each group of 8 lanes in and
/// out of a coroutine; every workgroup-memory read whose address differs between threads is
/// a lane-by-lane gather. There few threads per workgroup, each with a large register block,
/// pay far less: on llvmpipe (2 EPYC cores) a 3x3 convolution of 64 channels on the tests'
/// 4 x 4 latents took 5.7 ms with 32 threads of 8 x 8 values against 11.3 ms with 256 of
/// 4 x 4; one at 32 x 32 pixels 51 against 89 ms.
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
