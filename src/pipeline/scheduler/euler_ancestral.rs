//! diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, then
//! fresh noise of `sigma_up` drawn from the pipeline's generator.

use crate::error::Result;
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{interp, spaced_timesteps, x0_from_sigma, NoiseSchedule, SigmaTable};
use super::Scheduler;

pub struct EulerAncestralDiscrete {
    config: SchedulerConfig,
    table: SigmaTable,
}

impl EulerAncestralDiscrete {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        let timesteps: Vec<f32> = spaced_timesteps(&config, steps, false)?
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let table = schedule.sigmas();
        let sigmas = timesteps
            .iter()
            .map(|&t| interp(t as f64, &table) as f32)
            .chain([0.0])
            .collect();
        let table = SigmaTable::new(timesteps, sigmas, &config.timestep_spacing);
        Ok(EulerAncestralDiscrete { config, table })
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn timesteps(&self) -> &[f32] {
        &self.table.timesteps
    }

    fn sigma_table(&self) -> Option<&SigmaTable> {
        Some(&self.table)
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.table.set_begin_index(begin);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.table.add_noise(original, noise, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let (sigma, sigma_to) = self.table.sigma_pair(step_index)?;
        let x0 = x0_from_sigma(&self.config.prediction_type, model_output, sample, sigma)?;
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let r = (sigma_down - sigma) / sigma;
        let prev = Tensor::axpby((1.0 + r) as f32, sample, -r as f32, &x0)?;
        // Drawn on every step, the last included, as diffusers does: the generator's state
        // (and so any later draw) stays in step with it.
        let noise = rng.randn_tensor(model_output.shape(), &model_output.device())?;
        Tensor::axpby(1.0, &prev, sigma_up as f32, &noise)
    }
}
