//! Helpers for testing GPU kernels against the CPU backend.

use super::{Device, Tensor};
use crate::error::Result;
use crate::pipeline::noise::TorchRng;

/// A CPU tensor of standard normal values.
pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
    TorchRng::new(seed)
        .randn_tensor(shape, &Device::Cpu)
        .expect("a valid shape")
}

/// Runs `op` on the CPU and on the test GPU with the same inputs and checks that the two
/// agree to 1e-4 of the result's scale (f32 sums in another order differ by about 1e-6).
/// Without any GPU adapter the check is skipped, loudly.
pub(crate) fn assert_ops_agree(
    what: &str,
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let Some(gpu) = crate::backend::gpu::test_device() else {
        return;
    };
    let expected = op(inputs).unwrap_or_else(|e| panic!("{what} on the CPU: {e}"));
    let device = Device::Gpu(gpu);
    let on_gpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(&device).expect("upload"))
        .collect();
    let got = op(&on_gpu).unwrap_or_else(|e| panic!("{what} on the GPU: {e}"));
    assert_eq!(got.shape(), expected.shape(), "{what}: shapes differ");
    assert_eq!(got.device(), device, "{what}: the result left the GPU");
    let (got, expected) = (
        got.to_vec().expect("read back"),
        expected.to_vec().expect("cpu values"),
    );
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
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
