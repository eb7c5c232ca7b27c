//! Noise schedulers, one file per diffusers class, chosen by `_class_name` in
//! `scheduler/scheduler_config.json` (or overridden by name).
//!
//! A scheduler owns the timestep schedule and the update rule. Its arithmetic runs as
//! tensor ops, so on the GPU backend the latents never leave the device.

use crate::error::Result;
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

/// One diffusers scheduler, after `set_timesteps(num_inference_steps)`.
pub trait Scheduler: Send {
    /// Timesteps in the order the UNet sees them (float32, as torch holds them).
    /// Their count is the number of UNet evaluations (PNDM runs one more than the steps).
    fn timesteps(&self) -> &[f32];

    /// Standard deviation of the initial noise (`init_noise_sigma`).
    fn init_noise_sigma(&self) -> f32;

    /// `scale_model_input` for the `step_index`-th timestep.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;

    /// `step(...).prev_sample` for the `step_index`-th timestep. Stochastic schedulers draw
    /// their noise from `rng`, which is the generator the initial latents came from.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor>;
}
