//! diffusers' `PNDMScheduler` (Liu et al. 2022): Runge-Kutta warm-up steps (PRK) unless
//! `skip_prk_steps`, then the linear multistep method (PLMS). SD 1.5's default scheduler.
//!
//! With `skip_prk_steps` the schedule repeats its second timestep and runs one more UNet
//! evaluation than there are steps: the first PLMS step is a half step that the second
//! evaluation corrects.

use crate::error::{Error, Result};
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{spaced_timesteps, NoiseSchedule};
use super::{timestep_at, Scheduler};

/// Steps the PRK warm-up covers (diffusers' `pndm_order`).
const PNDM_ORDER: usize = 4;

pub struct Pndm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    /// The PRK timesteps (empty with `skip_prk_steps`), then the PLMS ones.
    timesteps: Vec<f32>,
    prk_len: usize,
    /// Where in `timesteps` the run starts (the steps taken are counted from there).
    begin: usize,
    /// `num_train_timesteps // num_inference_steps`.
    step_gap: i64,
    /// Steps taken so far.
    counter: usize,
    /// The last model outputs (at most four are used).
    ets: Vec<Tensor>,
    /// PRK: the sample the current Runge-Kutta step started from; PLMS: the sample before
    /// the half step.
    cur_sample: Option<Tensor>,
    /// PRK: the weighted sum of the current step's model outputs.
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        // diffusers keeps them ascending here.
        let mut ascending: Vec<i64> = spaced_timesteps(&config, steps, true)?
            .into_iter()
            .map(|t| t as i64)
            .collect();
        ascending.reverse();
        let step_gap = (config.num_train_timesteps / steps) as i64;
        let n = ascending.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps {
            let mut plms: Vec<i64> = ascending[..n - 1].to_vec();
            if n >= 2 {
                plms.push(ascending[n - 2]);
            }
            plms.push(ascending[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < PNDM_ORDER {
                return Err(Error::InvalidArgument(format!(
                    "PNDMScheduler without skip_prk_steps needs at least {PNDM_ORDER} steps, got {steps}"
                )));
            }
            let half = step_gap / 2;
            // Each of the last four timesteps and its midpoint, every point but the ends twice.
            let points: Vec<i64> = ascending[n - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let mut prk: Vec<i64> = points[..points.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            prk = prk[1..prk.len() - 1].to_vec();
            prk.reverse();
            let mut plms = ascending[..n - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let prk_len = prk.len();
        let timesteps = prk.into_iter().chain(plms).map(|t| t as f32).collect();
        Ok(Pndm {
            config,
            schedule,
            timesteps,
            prk_len,
            begin: 0,
            step_gap,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_t = self.schedule.alpha_prod(t)?;
        let alpha_prev = self.schedule.alpha_prod(prev_t)?;
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let eps = if self.config.prediction_type == "v_prediction" {
            Tensor::axpby(
                alpha_t.sqrt() as f32,
                model_output,
                beta_t.sqrt() as f32,
                sample,
            )?
        } else {
            model_output.clone()
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        Tensor::axpby(
            sample_coeff as f32,
            sample,
            (-(alpha_prev - alpha_t) / denom) as f32,
            &eps,
        )
    }

    fn accumulate(&mut self, weight: f32, model_output: &Tensor) -> Result<()> {
        self.cur_model_output = Some(match &self.cur_model_output {
            Some(acc) => Tensor::axpby(1.0, acc, weight, model_output)?,
            None => model_output.scale(weight)?,
        });
        Ok(())
    }

    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_gap / 2
        };
        let prev_t = t - diff_to_prev;
        let t = self.timesteps[self.counter / 4 * 4] as i64;
        let mut model_output = model_output.clone();
        match self.counter % 4 {
            0 => {
                self.accumulate(1.0 / 6.0, &model_output)?;
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => self.accumulate(1.0 / 3.0, &model_output)?,
            _ => {
                let acc = self
                    .cur_model_output
                    .take()
                    .unwrap_or_else(|| model_output.clone());
                model_output = Tensor::axpby(1.0, &acc, 1.0 / 6.0, &model_output)?;
            }
        }
        let start = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        self.prev_sample(&start, t, prev_t, &model_output)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let (mut t, mut prev_t) = (t, t - self.step_gap);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_gap;
        }
        let e = |k: usize| &self.ets[self.ets.len() - k];
        let mut sample = sample.clone();
        let combined = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            (1, 1) => {
                if let Some(s) = self.cur_sample.take() {
                    sample = s;
                }
                Tensor::axpby(0.5, model_output, 0.5, e(1))?
            }
            (2, _) => Tensor::axpby(1.5, e(1), -0.5, e(2))?,
            (3, _) => {
                let a = Tensor::axpby(23.0 / 12.0, e(1), -16.0 / 12.0, e(2))?;
                Tensor::axpby(1.0, &a, 5.0 / 12.0, e(3))?
            }
            _ => {
                let a = Tensor::axpby(55.0 / 24.0, e(1), -59.0 / 24.0, e(2))?;
                let b = Tensor::axpby(37.0 / 24.0, e(3), -9.0 / 24.0, e(4))?;
                a.add(&b)?
            }
        };
        self.prev_sample(&sample, t, prev_t, &combined)
    }
}

impl Scheduler for Pndm {
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
        let prev = if self.counter < self.prk_len {
            self.step_prk(model_output, t, sample)?
        } else {
            self.step_plms(model_output, t, sample)?
        };
        self.counter += 1;
        Ok(prev)
    }
}
