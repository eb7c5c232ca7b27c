//! diffusers' `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2) with the
//! pipeline's defaults (no churn): one Euler step of the probability-flow ODE per UNet call.

use crate::error::Result;
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{interpolated_sigmas, x0_from_sigma, NoiseSchedule, SigmaTable};
use super::Scheduler;

pub struct EulerDiscrete {
    config: SchedulerConfig,
    table: SigmaTable,
}

impl EulerDiscrete {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        let (timesteps, mut sigmas) = interpolated_sigmas(
            &config,
            &schedule,
            steps,
            (config.sigma_min, config.sigma_max),
        )?;
        sigmas.push(match config.final_sigmas_type.as_str() {
            "sigma_min" => schedule.sigmas()[0] as f64,
            _ => 0.0,
        });
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let timesteps =
            if config.timestep_type == "continuous" && config.prediction_type == "v_prediction" {
                sigmas[..sigmas.len() - 1]
                    .iter()
                    .map(|s| 0.25 * s.ln())
                    .collect()
            } else {
                timesteps.into_iter().map(|t| t as f32).collect()
            };
        let table = SigmaTable::new(timesteps, sigmas, &config.timestep_spacing);
        Ok(EulerDiscrete { config, table })
    }
}

impl Scheduler for EulerDiscrete {
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
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.table.sigma_pair(step_index)?;
        let x0 = x0_from_sigma(&self.config.prediction_type, model_output, sample, sigma)?;
        // sample + (sample - x0) / sigma * dt
        let r = (sigma_next - sigma) / sigma;
        Tensor::axpby((1.0 + r) as f32, sample, -r as f32, &x0)
    }
}
