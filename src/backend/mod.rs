//! Compute backends. Each implements the op list of [`crate::tensor::Tensor`] for the
//! storage it owns; the tensor layer checks shapes and dispatches.

pub mod cpu;
pub mod gpu;

use crate::error::Result;
use crate::tensor::Device;

/// Which backend a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// A hardware GPU when one is usable, otherwise the CPU (a software adapter such as
    /// llvmpipe is slower than the CPU backend, so it is only used when asked for).
    Auto,
    Cpu,
    Gpu,
}

/// The device for `choice`; `adapter` picks a GPU adapter by (part of) its name.
pub fn select_device(choice: BackendChoice, adapter: Option<&str>) -> Result<Device> {
    match choice {
        BackendChoice::Cpu => Ok(Device::Cpu),
        BackendChoice::Gpu => Ok(Device::Gpu(gpu::GpuDevice::new(adapter)?)),
        BackendChoice::Auto => match gpu::GpuDevice::new(adapter) {
            Ok(g) if !g.is_software() || adapter.is_some() => Ok(Device::Gpu(g)),
            Ok(g) => {
                tracing::info!(
                    "only a software GPU adapter ({}) was found: using the CPU backend",
                    g.name()
                );
                Ok(Device::Cpu)
            }
            Err(e) => {
                tracing::info!("no usable GPU ({e}): using the CPU backend");
                Ok(Device::Cpu)
            }
        },
    }
}
