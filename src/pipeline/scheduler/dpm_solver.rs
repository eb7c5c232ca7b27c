//! diffusers' `DPMSolverMultistepScheduler` (Lu et al. 2022): DPM-Solver++ (the default,
//! "DPM++ 2M" with order 2) or DPM-Solver, multistep of order 1 to 3, midpoint or Heun.

use crate::error::Result;
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{begin_index, interp, karras_sigmas, linspace, sigma_to_t, NoiseSchedule};
use super::{lincomb, Scheduler};

pub struct DpmSolverMultistep {
    config: SchedulerConfig,
    timesteps: Vec<f32>,
    /// One more than the timesteps; the last is where the final step lands.
    sigmas: Vec<f32>,
    /// Where in `sigmas` the run's first step is.
    begin: usize,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Tensor>,
    /// How many steps have run, capped at the solver order: the order ramps up.
    lower_order_nums: usize,
}

/// A sigma's `(alpha_t, sigma_t, lambda_t)`: the VP signal and noise scales and half the
/// log-SNR.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolverMultistep {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        let train = config.num_train_timesteps;
        super::check_steps(steps, train)?;
        // The first (in reversed, ascending-lambda order) timestep whose lambda reaches
        // lambda_min_clipped; -inf (null) clips nothing.
        let clipped = match config.lambda_min_clipped {
            Some(min) => {
                let mut lambdas: Vec<f32> = schedule
                    .alphas_cumprod
                    .iter()
                    .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
                    .collect();
                lambdas.reverse();
                lambdas
                    .iter()
                    .position(|&l| l as f64 >= min)
                    .unwrap_or(lambdas.len())
            }
            None => 0,
        };
        let last = train - clipped;
        let mut timesteps: Vec<f64> = match config.timestep_spacing.as_str() {
            "linspace" => {
                let mut ts: Vec<f64> = linspace(0.0, last as f64 - 1.0, steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                ts.reverse();
                ts.pop();
                ts
            }
            "leading" => {
                let ratio = last / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            _ => {
                let step = train as f64 / steps as f64;
                let len = (last as f64 / step).ceil() as usize;
                (0..len)
                    .map(|i| (last as f64 - i as f64 * step).round_ties_even() - 1.0)
                    .collect()
            }
        };
        let table = schedule.sigmas();
        let mut sigmas: Vec<f64> = if config.use_karras_sigmas {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let sigmas = karras_sigmas(table[0] as f64, table[table.len() - 1] as f64, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if config.beta_schedule == "squaredcos_cap_v2" {
                        t.trunc()
                    } else {
                        t.round_ties_even()
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp(t, &table)).collect()
        };
        sigmas.push(match config.final_sigmas_type.as_str() {
            "sigma_min" => table[0] as f64,
            _ => 0.0,
        });
        let timesteps: Vec<f32> = timesteps.into_iter().map(|t| t as f32).collect();
        let begin = begin_index(&timesteps);
        Ok(DpmSolverMultistep {
            config,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            begin,
            timesteps,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    fn sigma(&self, i: usize) -> Result<f64> {
        self.sigmas.get(i).map(|&s| s as f64).ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "step {i} is past the end of a {}-step schedule",
                self.timesteps.len()
            ))
        })
    }

    /// diffusers' `convert_model_output`: x₀ for DPM-Solver++, ε for DPM-Solver.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha, sigma_t, _) = alpha_sigma_lambda(sigma);
        let pp = self.config.algorithm_type == "dpmsolver++";
        match (self.config.prediction_type.as_str(), pp) {
            ("epsilon", true) => {
                lincomb(&[(1.0 / alpha, sample), (-sigma_t / alpha, model_output)])
            }
            ("v_prediction", true) => lincomb(&[(alpha, sample), (-sigma_t, model_output)]),
            ("epsilon", false) => Ok(model_output.clone()),
            ("v_prediction", false) => lincomb(&[(alpha, model_output), (sigma_t, sample)]),
            ("sample", false) => {
                lincomb(&[(1.0 / sigma_t, sample), (-alpha / sigma_t, model_output)])
            }
            _ => Ok(model_output.clone()),
        }
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
    }

    /// `alpha_t · original + sigma_t · noise` at the step's sigma.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma_t, _) = alpha_sigma_lambda(self.sigma(self.begin + step_index)?);
        lincomb(&[(alpha, original), (sigma_t, noise)])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let c = &self.config;
        let idx = self.begin + step_index;
        let n = self.timesteps.len();
        let lower_order_final = idx + 1 == n
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == "zero");
        let lower_order_second = idx + 2 == n && c.lower_order_final && n < 15;

        let converted = self.convert(model_output, sample, self.sigma(idx)?)?;
        self.model_outputs.push(converted);
        if self.model_outputs.len() > c.solver_order {
            self.model_outputs.remove(0);
        }
        let order = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };

        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigma(idx + 1)?);
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigma(idx)?);
        let h = lambda_t - lambda_s0;
        let pp = c.algorithm_type == "dpmsolver++";
        // x_t = c_sample·sample + c0·D0 + c1·D1 + c2·D2 in the paper's notation.
        let (c_sample, phi1) = if pp {
            (sigma_t / sigma_s0, -alpha_t * ((-h).exp() - 1.0))
        } else {
            (alpha_t / alpha_s0, -sigma_t * (h.exp() - 1.0))
        };
        let m = &self.model_outputs;
        let m0 = &m[m.len() - 1];
        let prev = match order {
            1 => lincomb(&[(c_sample, sample), (phi1, m0)])?,
            2 => {
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigma(idx - 1)?);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let c1 = match (pp, c.solver_type.as_str()) {
                    (_, "midpoint") => 0.5 * phi1,
                    (true, _) => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
                    (false, _) => -sigma_t * ((h.exp() - 1.0) / h - 1.0),
                };
                // D1 = (m0 - m1) / r0
                lincomb(&[
                    (c_sample, sample),
                    (phi1 + c1 / r0, m0),
                    (-c1 / r0, &m[m.len() - 2]),
                ])?
            }
            _ => {
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigma(idx - 1)?);
                let (_, _, lambda_s2) = alpha_sigma_lambda(self.sigma(idx - 2)?);
                let (r0, r1) = ((lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h);
                let (c1, c2) = if pp {
                    let e = (-h).exp() - 1.0;
                    (
                        alpha_t * (e / h + 1.0),
                        -alpha_t * ((e + h) / (h * h) - 0.5),
                    )
                } else {
                    let e = h.exp() - 1.0;
                    (
                        -sigma_t * (e / h - 1.0),
                        -sigma_t * ((e - h) / (h * h) - 0.5),
                    )
                };
                // D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, k = r0/(r0 + r1),
                // D1 = (1 + k)·D1_0 - k·D1_1, D2 = (D1_0 - D1_1)/(r0 + r1).
                let k = r0 / (r0 + r1);
                let p = c1 * (1.0 + k) + c2 / (r0 + r1);
                let q = c1 * k + c2 / (r0 + r1);
                lincomb(&[
                    (c_sample, sample),
                    (phi1 + p / r0, m0),
                    (-p / r0 - q / r1, &m[m.len() - 2]),
                    (q / r1, &m[m.len() - 3]),
                ])?
            }
        };
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
