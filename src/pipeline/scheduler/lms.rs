//! diffusers' `LMSDiscreteScheduler`: a linear multistep method of order up to 4 over the
//! sigmas, its coefficients the integrals of the Lagrange basis between two sigmas.

use crate::error::Result;
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{interpolated_sigmas, x0_from_sigma, NoiseSchedule, SigmaTable};
use super::Scheduler;

/// diffusers' `order` argument of `step`, which the pipeline leaves at its default.
const ORDER: usize = 4;

pub struct LmsDiscrete {
    config: SchedulerConfig,
    table: SigmaTable,
    /// The last (at most [`ORDER`]) derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl LmsDiscrete {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(&config);
        let (timesteps, sigmas) = interpolated_sigmas(&config, &schedule, steps, (None, None))?;
        let sigmas = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        let timesteps = timesteps.into_iter().map(|t| t as f32).collect();
        let table = SigmaTable::new(timesteps, sigmas, &config.timestep_spacing);
        Ok(LmsDiscrete {
            config,
            table,
            derivatives: Vec::new(),
        })
    }

    /// ∫ from sigmas[t] to sigmas[t+1] of the Lagrange basis polynomial of node
    /// `current` over the nodes sigmas[t], sigmas[t-1], ... (`order` of them). The
    /// polynomial has degree < 4, so 4-point Gauss-Legendre is exact (diffusers asks
    /// scipy's adaptive quadrature for the same number).
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.table.sigmas[i] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product::<f64>()
        };
        const NODES: [f64; 4] = [
            -0.861_136_311_594_052_6,
            -0.339_981_043_584_856_3,
            0.339_981_043_584_856_3,
            0.861_136_311_594_052_6,
        ];
        const WEIGHTS: [f64; 4] = [
            0.347_854_845_137_453_9,
            0.652_145_154_862_546_1,
            0.652_145_154_862_546_1,
            0.347_854_845_137_453_9,
        ];
        let (a, b) = (s(t), s(t + 1));
        let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
        NODES
            .iter()
            .zip(WEIGHTS)
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Scheduler for LmsDiscrete {
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
        let (sigma, _) = self.table.sigma_pair(step_index)?;
        let x0 = x0_from_sigma(&self.config.prediction_type, model_output, sample, sigma)?;
        let derivative = Tensor::axpby((1.0 / sigma) as f32, sample, (-1.0 / sigma) as f32, &x0)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let t = self.table.begin + step_index;
        let order = (t + 1).min(ORDER);
        let mut prev = sample.clone();
        for (current, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            prev = Tensor::axpby(
                1.0,
                &prev,
                self.coefficient(order, t, current) as f32,
                derivative,
            )?;
        }
        Ok(prev)
    }
}
