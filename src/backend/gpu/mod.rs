//! The wgpu backend: hand-written WGSL compute kernels (`shaders/*.wgsl`, one kernel family
//! per file) on any Vulkan, Metal or DX12 adapter.
//!
//! Ops record compute passes into one command encoder and return at once; the encoder is
//! submitted every [`context::PASSES_PER_SUBMIT`] passes and whenever a tensor is read
//! back, so a whole denoising step runs without a host round trip. Kernel outputs come
//! from a pool of buffers keyed by size: a diffusion loop allocates the same shapes every
//! step and reuses them. Each kernel family is tested against the CPU backend.

pub mod attention;
pub mod context;
pub mod conv;
pub mod elementwise;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod profile;
mod storage;
#[cfg(test)]
mod translation;

pub use context::{adapters, GpuDevice, ShaderFeature};
pub use storage::GpuStorage;

use context::Kernel;

/// Every kernel variant this backend may build: each family's kernels, each in every
/// variant ([`Kernel::variants`]). Which of them a device selects depends on its features
/// and backend ([`context::SHADER_FEATURES`]); the translation test checks them all.
pub fn kernels() -> Vec<Kernel> {
    [
        attention::KERNELS,
        conv::KERNELS,
        elementwise::KERNELS,
        layout::KERNELS,
        matmul::KERNELS,
        norm::KERNELS,
    ]
    .concat()
    .iter()
    .flat_map(Kernel::variants)
    .collect()
}

/// The device kernel tests run on, or `None` (said loudly) where no adapter exists at all.
#[cfg(test)]
pub(crate) fn test_device() -> Option<GpuDevice> {
    test_devices().into_iter().next()
}

/// The test device, then the same adapter opened with the other [`context::Tuning`], so
/// kernel tests check both kinds of launch shapes wherever they run (empty without an
/// adapter).
#[cfg(test)]
pub(crate) fn test_devices() -> Vec<GpuDevice> {
    use std::sync::OnceLock;
    static DEVICES: OnceLock<Vec<GpuDevice>> = OnceLock::new();
    DEVICES
        .get_or_init(|| match GpuDevice::new(None) {
            Ok(d) => {
                let adapter = adapters()
                    .into_iter()
                    .next()
                    .expect("the adapter just opened");
                let other = d.0.tuning.other();
                let retuned = GpuDevice::open_tuned(adapter, false, other)
                    .unwrap_or_else(|e| panic!("reopening the test adapter: {e}"));
                vec![d, retuned]
            }
            // CI installs Mesa's llvmpipe: there, a missing adapter is a broken setup.
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI has no GPU adapter: {e}")
            }
            Err(e) => {
                eprintln!("\n*** NO GPU ADAPTER: GPU kernel tests are SKIPPED ({e}) ***\n");
                Vec::new()
            }
        })
        .clone()
}
