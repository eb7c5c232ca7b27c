//! diffusers' `DDIMScheduler` (Song et al. 2020) with eta = 0, as the pipeline runs it.

use crate::error::Result;
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{spaced_timesteps, x0_from_alpha, NoiseSchedule};
use super::{timestep_at, Scheduler};

pub struct Ddim {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f32>,
    /// Where in `timesteps` the run starts.
    begin: usize,
    /// Training timesteps between two inference steps, as diffusers computes the
    /// previous timestep (`num_train_timesteps // num_inference_steps`, whatever the spacing).
    step_gap: i64,
}

impl Ddim {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        let timesteps = spaced_timesteps(&config, steps, true)?
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let step_gap = (config.num_train_timesteps / steps) as i64;
        Ok(Ddim {
            config,
            schedule,
            timesteps,
            begin: 0,
            step_gap,
        })
    }
}

impl Scheduler for Ddim {
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
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let t = timestep_at(&self.timesteps, self.begin + step_index)? as i64;
        let alpha_t = self.schedule.alpha_prod(t)?;
        let alpha_prev = self.schedule.alpha_prod(t - self.step_gap)?;
        let c = &self.config;
        let x0 = x0_from_alpha(&c.prediction_type, model_output, sample, alpha_t)?;
        // The noise the model saw, from the unclipped prediction as diffusers computes it.
        let (a, b) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
        let eps = match c.prediction_type.as_str() {
            "epsilon" => model_output.clone(),
            "v_prediction" => Tensor::axpby(a as f32, model_output, b as f32, sample)?,
            _ => Tensor::axpby((1.0 / b) as f32, sample, (-a / b) as f32, &x0)?,
        };
        let x0 = if c.clip_sample {
            x0.clamp(-c.clip_sample_range as f32, c.clip_sample_range as f32)?
        } else {
            x0
        };
        Tensor::axpby(
            alpha_prev.sqrt() as f32,
            &x0,
            (1.0 - alpha_prev).sqrt() as f32,
            &eps,
        )
    }
}
