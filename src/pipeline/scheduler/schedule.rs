//! The noise-schedule arithmetic the schedulers share: betas and their cumulative alpha
//! product, timestep spacing, sigma tables and the model-output conversions.
//!
//! Host-side numbers follow diffusers' own precision where it shows: torch builds the betas
//! and `alphas_cumprod` in float32 (cumprod accumulating in double), numpy interpolates in
//! float64, and the tables end up as float32 tensors.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::config::SchedulerConfig;

/// `torch.linspace(start, end, n, dtype=float32)`: both halves computed from their own end.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `numpy.linspace(start, stop, num)` in float64 (the last value exactly `stop`; one value
/// gives `start`).
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = out.last_mut() {
        *last = stop;
    }
    out
}

/// `numpy.arange(start, stop, step)` for a negative float step.
fn arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// The training noise schedule: `alphas_cumprod[t]` for every training timestep.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
    /// What `alpha_prod_t_prev` is before timestep 0 (`set_alpha_to_one`).
    pub final_alpha_cumprod: f32,
}

impl NoiseSchedule {
    pub fn new(c: &SchedulerConfig) -> Self {
        let n = c.num_train_timesteps;
        let mut betas: Vec<f32> = if let Some(b) = &c.trained_betas {
            b.iter().map(|&v| v as f32).collect()
        } else {
            match c.beta_schedule.as_str() {
                "scaled_linear" => torch_linspace_f32(c.beta_start.sqrt(), c.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => {
                    let alpha_bar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                // "linear"; the config check rejected anything else.
                _ => torch_linspace_f32(c.beta_start, c.beta_end, n),
            }
        };
        if c.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod(betas.iter().map(|b| 1.0 - b));
        if c.rescale_betas_zero_snr {
            // diffusers keeps the last sigma finite (Euler and DPM-Solver only read it
            // through sigmas, where this matters; DDIM and LCM never look at it).
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let final_alpha_cumprod = if c.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        NoiseSchedule {
            alphas_cumprod,
            final_alpha_cumprod,
        }
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `alphas_cumprod[t]`, or the final value for `t < 0`.
    pub fn alpha_prod(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod as f64);
        }
        self.alphas_cumprod
            .get(t as usize)
            .map(|&a| a as f64)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "timestep {t} is outside the {}-step schedule",
                    self.len()
                ))
            })
    }

    /// The DDPM forward process at training timestep `t`:
    /// `sqrt(ᾱ_t) · original + sqrt(1 - ᾱ_t) · noise`, the coefficients computed in float32
    /// as diffusers' `add_noise` does on the float32 `alphas_cumprod`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, t: i64) -> Result<Tensor> {
        let alpha = self.alpha_prod(t)? as f32;
        Tensor::axpby(alpha.sqrt(), original, (1.0 - alpha).sqrt(), noise)
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, the Karras-style sigma of every
    /// training timestep (float32, as torch computes it).
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `torch.cumprod` on float32: accumulated in double, each output rounded.
fn cumprod(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023), in float32 like torch.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt_bar: Vec<f32> = cumprod(betas.iter().map(|b| 1.0 - b))
        .iter()
        .map(|a| a.sqrt())
        .collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| ((s - last) * scale).powi(2))
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// The inference timesteps, largest first, for the spacings DDIM, PNDM, Euler and LMS
/// share. `round_linspace` is the integer-timestep classes' rounding of `linspace`
/// (Euler and LMS keep fractional timesteps there).
pub fn spaced_timesteps(
    c: &SchedulerConfig,
    steps: usize,
    round_linspace: bool,
) -> Result<Vec<f64>> {
    let train = c.num_train_timesteps;
    super::check_steps(steps, train)?;
    let mut ts = match c.timestep_spacing.as_str() {
        "linspace" => {
            let mut ts = linspace(0.0, (train - 1) as f64, steps);
            if round_linspace {
                ts.iter_mut().for_each(|t| *t = t.round_ties_even());
            } else {
                // numpy's dtype=float32 linspace.
                ts.iter_mut().for_each(|t| *t = *t as f32 as f64);
            }
            ts.reverse();
            ts
        }
        "leading" => {
            // steps_offset can push the last timestep past the schedule (PNDM's offset 1
            // at 1000 steps asks for timestep 1000, an IndexError in diffusers too).
            let last = |steps: usize| (steps - 1) * (train / steps) + c.steps_offset;
            if last(steps) >= train {
                let most = (1..steps).rev().find(|&s| last(s) < train).unwrap_or(0);
                return Err(Error::InvalidArgument(format!(
                    "num_inference_steps {steps} is too many for this scheduler: with \
                     \"leading\" spacing and steps_offset {} its last timestep would be {}, \
                     past its {train} training timesteps; at most {most}",
                    c.steps_offset,
                    last(steps)
                )));
            }
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + c.steps_offset) as f64)
                .collect()
        }
        // "trailing"; the config check rejected anything else.
        _ => arange_down(train as f64, 0.0, -(train as f64 / steps as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    };
    ts.truncate(steps);
    Ok(ts)
}

/// `numpy.interp(x, arange(len(table)), table)`.
pub fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (table[j] as f64, table[j + 1] as f64);
    if x == j as f64 {
        return lo;
    }
    (hi - lo) * (x - j as f64) + lo
}

/// The Karras et al. (2022) schedule from `sigma_max` down to `sigma_min`, rho = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose (log-interpolated)
/// sigma is `sigma`. `log_sigmas` is ascending in t.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let at_or_below = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    // numpy's cumsum(dists >= 0).argmax(): the first index reaching the count.
    let low = if at_or_below == 0 {
        0
    } else {
        let mut seen = 0;
        log_sigmas
            .iter()
            .position(|&l| {
                seen += (log_sigma - l as f64 >= 0.0) as usize;
                seen == at_or_below
            })
            .unwrap_or(0)
    }
    .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// diffusers' `index_for_timestep` for the first timestep: the second match when the
/// schedule repeats it (so a restarted image-to-image schedule does not skip a sigma).
pub fn begin_index(timesteps: &[f32]) -> usize {
    let matches: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timesteps[0])
        .map(|(i, _)| i)
        .collect();
    if matches.len() > 1 {
        matches[1]
    } else {
        0
    }
}

/// The predicted clean sample x₀ of a sigma-parameterised (Karras) sampler.
pub fn x0_from_sigma(
    prediction_type: &str,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction_type {
        "epsilon" => Tensor::axpby(1.0, sample, -sigma as f32, model_output),
        "v_prediction" => {
            let s2 = sigma * sigma + 1.0;
            Tensor::axpby(
                (-sigma / s2.sqrt()) as f32,
                model_output,
                (1.0 / s2) as f32,
                sample,
            )
        }
        _ => Ok(model_output.clone()),
    }
}

/// The predicted clean sample x₀ of an alpha-parameterised (DDPM) sampler at a timestep
/// whose cumulative alpha is `alpha_prod`.
pub fn x0_from_alpha(
    prediction_type: &str,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod: f64,
) -> Result<Tensor> {
    let (a, b) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
    match prediction_type {
        "epsilon" => Tensor::axpby((1.0 / a) as f32, sample, (-b / a) as f32, model_output),
        "v_prediction" => Tensor::axpby(a as f32, sample, -b as f32, model_output),
        _ => Ok(model_output.clone()),
    }
}

/// A table of sigmas over the inference timesteps (Euler, Euler ancestral, LMS): the
/// inputs are scaled by `1 / sqrt(sigma² + 1)` and the latents start at the largest sigma.
#[derive(Clone, Debug)]
pub struct SigmaTable {
    pub timesteps: Vec<f32>,
    /// One more than the timesteps: the sigma after the last step comes last.
    pub sigmas: Vec<f32>,
    /// Where in `sigmas` the run's first step is: [`begin_index`] until
    /// [`SigmaTable::set_begin_index`] says otherwise.
    pub begin: usize,
    init_noise_sigma: f32,
}

impl SigmaTable {
    /// `timestep_spacing` decides the initial noise: linspace and trailing start at the
    /// largest sigma itself, leading at `sqrt(sigma² + 1)`.
    pub fn new(timesteps: Vec<f32>, sigmas: Vec<f32>, spacing: &str) -> Self {
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        };
        let begin = begin_index(&timesteps);
        SigmaTable {
            timesteps,
            sigmas,
            begin,
            init_noise_sigma,
        }
    }

    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// The sigma at the `step_index`-th step and the one after it.
    pub fn sigma_pair(&self, step_index: usize) -> Result<(f64, f64)> {
        let i = self.begin + step_index;
        match (self.sigmas.get(i), self.sigmas.get(i + 1)) {
            (Some(&a), Some(&b)) => Ok((a as f64, b as f64)),
            _ => Err(Error::InvalidArgument(format!(
                "step {step_index} is past the end of a {}-step schedule",
                self.timesteps.len()
            ))),
        }
    }

    pub fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
    }

    /// `original + noise * sigma` at the `step_index`-th step of the run.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        Tensor::axpby(1.0, original, sigma as f32, noise)
    }

    /// `sample / sqrt(sigma² + 1)`.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        let sigma = sigma as f32;
        sample.scale(1.0 / (sigma * sigma + 1.0).sqrt())
    }
}

/// The sigma table Euler and LMS build: sigmas interpolated at the spaced timesteps,
/// optionally respaced on the Karras schedule (timesteps then follow the sigmas).
pub fn interpolated_sigmas(
    c: &SchedulerConfig,
    schedule: &NoiseSchedule,
    steps: usize,
    karras_bounds: (Option<f64>, Option<f64>),
) -> Result<(Vec<f64>, Vec<f64>)> {
    let timesteps: Vec<f64> = spaced_timesteps(c, steps, false)?
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
    let table = schedule.sigmas();
    let sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
    if !c.use_karras_sigmas {
        return Ok((timesteps, sigmas));
    }
    let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
    let sigma_min = karras_bounds.0.unwrap_or(sigmas[sigmas.len() - 1]);
    let sigma_max = karras_bounds.1.unwrap_or(sigmas[0]);
    let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
    let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
    Ok((timesteps, sigmas))
}
