//! diffusers' `LCMScheduler` (Luo et al. 2023): consistency-model steps for latent
//! consistency models, each predicting the clean sample and re-noising it.

use crate::error::{Error, Result};
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{begin_index, x0_from_alpha, NoiseSchedule};
use super::{lincomb, timestep_at, Scheduler};

/// The data standard deviation of the consistency boundary condition.
const SIGMA_DATA: f64 = 0.5;

pub struct Lcm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f32>,
    /// Where in `timesteps` the run starts.
    begin: usize,
}

impl Lcm {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        let original = config.original_inference_steps;
        let train = config.num_train_timesteps;
        if original == 0 || original > train {
            return Err(Error::InvalidArgument(format!(
                "LCMScheduler: original_inference_steps {original} must be in 1..={train}"
            )));
        }
        super::check_steps(steps, train)?;
        if steps > original {
            return Err(Error::InvalidArgument(format!(
                "LCMScheduler: {steps} steps is more than the {original} original_inference_steps the model was distilled with"
            )));
        }
        let k = train / original;
        // The distillation schedule, largest first; the inference steps are spread over it.
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        // numpy's `floor(linspace(0, len, steps, endpoint=False))`, i.e. floor(i * (len / steps)).
        let stride = origin.len() as f64 / steps as f64;
        let timesteps: Vec<f32> = (0..steps)
            .map(|i| origin[(i as f64 * stride).floor() as usize] as f32)
            .collect();
        let begin = begin_index(&timesteps);
        Ok(Lcm {
            config,
            schedule,
            timesteps,
            begin,
        })
    }
}

impl Scheduler for Lcm {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = timestep_at(&self.timesteps, self.begin + step_index)?;
        self.schedule.add_noise(original, noise, t as i64)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let idx = self.begin + step_index;
        let t = timestep_at(&self.timesteps, idx)? as i64;
        let prev_t = self.timesteps.get(idx + 1).map_or(t, |&p| p as i64);
        let alpha_t = self.schedule.alpha_prod(t)?;
        let alpha_prev = self.schedule.alpha_prod(prev_t)?;
        let scaled = t as f64 * self.config.timestep_scaling;
        let c_skip = SIGMA_DATA * SIGMA_DATA / (scaled * scaled + SIGMA_DATA * SIGMA_DATA);
        let c_out = scaled / (scaled * scaled + SIGMA_DATA * SIGMA_DATA).sqrt();
        let c = &self.config;
        let mut x0 = x0_from_alpha(&c.prediction_type, model_output, sample, alpha_t)?;
        if c.clip_sample {
            x0 = x0.clamp(-c.clip_sample_range as f32, c.clip_sample_range as f32)?;
        }
        let denoised = lincomb(&[(c_out, &x0), (c_skip, sample)])?;
        if idx + 1 == self.timesteps.len() {
            return Ok(denoised);
        }
        let noise = rng.randn_tensor(model_output.shape(), &model_output.device())?;
        lincomb(&[
            (alpha_prev.sqrt(), &denoised),
            ((1.0 - alpha_prev).sqrt(), &noise),
        ])
    }
}
