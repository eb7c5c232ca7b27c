//! Helpers for testing GPU kernels against the CPU backend.

use half::f16;

use super::{DType, Device, Storage, Tensor};
use crate::backend::cpu::CpuStorage;
use crate::error::Result;
use crate::pipeline::noise::TorchRng;

/// A CPU tensor of standard normal values.
pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
    TorchRng::new(seed)
        .randn_tensor(shape, &Device::Cpu)
        .expect("a valid shape")
}

/// A CPU f32 tensor of standard normal values rounded to values f16 holds exactly: the
/// operands of matrix products and convolutions in their tests, so that kernels staging
/// operands in f16 (cooperative matrices) see exactly the CPU's inputs and both sides
/// differ only in the order of their f32 sums, as the SIMT kernels do.
pub(crate) fn random_f16_exact(shape: &[usize], seed: u64) -> Tensor {
    let values = random(shape, seed).to_vec().expect("cpu values");
    let rounded = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    Tensor::from_vec(rounded, shape, &Device::Cpu).expect("a valid shape")
}

/// A CPU tensor of standard normal values rounded to f16 and kept in f16 (as a weight from
/// an f16 file): on a GPU that keeps f16 it is uploaded as f16 (rank 2 and more).
pub(crate) fn random_f16(shape: &[usize], seed: u64) -> Tensor {
    let values = random(shape, seed).to_vec().expect("cpu values");
    Tensor::from_f16(
        values.iter().map(|&v| f16::from_f32(v)).collect(),
        shape,
        &Device::Cpu,
    )
    .expect("a valid shape")
}

/// The f16 values of a tensor made by [`random_f16`].
pub(crate) fn f16_values(t: &Tensor) -> Vec<f16> {
    match t.storage() {
        Storage::Cpu(CpuStorage::F16(v)) => v.clone(),
        _ => panic!("not an f16 CPU tensor"),
    }
}

/// Checks that `got` agrees with `expected` to 1e-4 of the latter's scale.
pub(crate) fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths differ");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let d = (g - e).abs();
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    assert!(
        worst <= 1e-4 * scale,
        "{what}: GPU and CPU differ by {worst:e} at {at} (GPU {}, CPU {}; scale {scale:e})",
        got[at],
        expected[at]
    );
}

/// Runs `op` on the CPU and on the test GPU with the same inputs and checks that the two
/// agree to 1e-4 of the result's scale (f32 sums in another order differ by about 1e-6).
/// The GPU runs it under both launch tunings (`test_devices`), the second time only where
/// that tuning launches other kernels (found by a dry run), so shapes both tune alike are
/// not computed twice. Without any GPU adapter the check is skipped, loudly.
pub(crate) fn assert_ops_agree(
    what: &str,
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    use crate::backend::gpu::context::dispatch_log::logged;
    let gpus = crate::backend::gpu::test_devices();
    if gpus.is_empty() {
        return;
    }
    let expected = op(inputs).unwrap_or_else(|e| panic!("{what} on the CPU: {e}"));
    let mut checked: Vec<Vec<_>> = Vec::new();
    for gpu in gpus {
        let what = &format!("{what} ({:?} launch shapes)", gpu.0.tuning);
        let device = Device::Gpu(gpu);
        let on_gpu: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(&device).expect("upload"))
            .collect();
        if !checked.is_empty() {
            let (_, kernels) = logged(true, || op(&on_gpu));
            if checked.contains(&kernels) {
                continue;
            }
        }
        for (cpu, gpu) in inputs.iter().zip(&on_gpu) {
            // f16 weights (rank >= 2) stay f16 on a GPU that keeps f16: the kernels' f16
            // paths are what runs.
            let keeps = matches!(&device, Device::Gpu(g) if g.keeps_f16());
            let want = if cpu.dtype() == DType::F16 && cpu.rank() >= 2 && keeps {
                DType::F16
            } else {
                DType::F32
            };
            assert_eq!(gpu.dtype(), want, "{what}: an input's type on the GPU");
        }
        let (got, kernels) = logged(false, || op(&on_gpu));
        checked.push(kernels);
        let got = got.unwrap_or_else(|e| panic!("{what} on the GPU: {e}"));
        assert_eq!(got.shape(), expected.shape(), "{what}: shapes differ");
        assert_eq!(got.device(), device, "{what}: the result left the GPU");
        assert_close(
            what,
            &got.to_vec().expect("read back"),
            &expected.to_vec().expect("cpu values"),
        );
    }
}
