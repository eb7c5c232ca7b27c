//! Noise schedulers, one file per diffusers class, chosen by `_class_name` in
//! `scheduler/scheduler_config.json` (or replaced by name, as diffusers'
//! `Other.from_config(pipe.scheduler.config)` does).
//!
//! A scheduler owns the timestep schedule and the update rule. Its host-side numbers
//! (timesteps, sigmas, coefficients) are computed once per step in f64; the arithmetic on
//! latents runs as tensor ops, so on the GPU backend the latents never leave the device.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
mod lms;
mod pndm;
mod schedule;

use std::path::Path;

use serde_json::{Map, Value};

pub use config::{SchedulerClass, SchedulerConfig, KNOWN_NAMES, SHORT_NAMES};

use crate::error::{Error, Result};
use crate::pipeline::noise::TorchRng;
use crate::tensor::Tensor;

/// One diffusers scheduler, after `set_timesteps(num_inference_steps)`.
pub trait Scheduler: Send {
    /// Timesteps in the order the UNet sees them (float32, as torch holds them).
    /// Their count is the number of UNet evaluations (PNDM runs one more than the steps).
    fn timesteps(&self) -> &[f32];

    /// The sigmas of a scheduler that works in sigma space (Euler, Euler ancestral, LMS),
    /// which set its initial noise and input scaling.
    fn sigma_table(&self) -> Option<&schedule::SigmaTable> {
        None
    }

    /// Standard deviation of the initial noise (`init_noise_sigma`; 1 unless the
    /// scheduler works in sigma space).
    fn init_noise_sigma(&self) -> f32 {
        self.sigma_table()
            .map_or(1.0, schedule::SigmaTable::init_noise_sigma)
    }

    /// `scale_model_input` for the `step_index`-th timestep (the identity unless the
    /// scheduler works in sigma space).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        match self.sigma_table() {
            Some(table) => table.scale_model_input(sample, step_index),
            None => Ok(sample.clone()),
        }
    }

    /// diffusers' `set_begin_index`: the run enters the schedule at `timesteps()[begin]`
    /// (image-to-image and inpainting skip the noisiest steps), and `step_index` counts from
    /// there. Unset, a run starts where diffusers' `index_for_timestep` finds the first
    /// timestep (one further on for a schedule that repeats it).
    fn set_begin_index(&mut self, begin: usize);

    /// `add_noise(original, noise, t)` for the timestep of the `step_index`-th step of the
    /// run: `original` noised to that step's level, as image-to-image starts and as
    /// inpainting re-noises the known region after each step.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;

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

/// Reads a `scheduler_config.json` as a JSON object (Python's bare `-Infinity` included).
pub fn read_config(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&config::sanitize_python_json(&text))
        .map_err(|e| Error::config(path, e.to_string()))
}

/// The full config diffusers would run for a folder's scheduler config, or for the
/// scheduler `choice` (a class name or alias) built from it.
pub fn effective_config(
    file: &Map<String, Value>,
    choice: Option<&str>,
) -> Result<Map<String, Value>> {
    config::merge_config(file, choice).map(|(_, map)| map)
}

/// The scheduler for a folder's config (or `choice` built from it), with
/// `overrides` applied last (diffusers' `from_config(config, **overrides)`), set up for
/// `steps` inference steps.
pub fn from_config_with(
    file: &Map<String, Value>,
    choice: Option<&str>,
    overrides: &Map<String, Value>,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let (class, mut map) = config::merge_config(file, choice)?;
    map.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    let config = SchedulerConfig::from_map(class, &map)?;
    check_steps(steps, config.num_train_timesteps)?;
    Ok(match class {
        SchedulerClass::Pndm => Box::new(pndm::Pndm::new(config, steps)?),
        SchedulerClass::Ddim => Box::new(ddim::Ddim::new(config, steps)?),
        SchedulerClass::EulerDiscrete => Box::new(euler::EulerDiscrete::new(config, steps)?),
        SchedulerClass::EulerAncestralDiscrete => {
            Box::new(euler_ancestral::EulerAncestralDiscrete::new(config, steps)?)
        }
        SchedulerClass::DpmSolverMultistep => {
            Box::new(dpm_solver::DpmSolverMultistep::new(config, steps)?)
        }
        SchedulerClass::LmsDiscrete => Box::new(lms::LmsDiscrete::new(config, steps)?),
        SchedulerClass::Lcm => Box::new(lcm::Lcm::new(config, steps)?),
    })
}

/// [`from_config_with`] without overrides.
pub fn from_config(
    file: &Map<String, Value>,
    choice: Option<&str>,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    from_config_with(file, choice, &Map::new(), steps)
}

fn check_steps(steps: usize, train: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::InvalidArgument(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    if steps > train {
        return Err(Error::InvalidArgument(format!(
            "num_inference_steps {steps} is more than the scheduler's {train} training timesteps"
        )));
    }
    Ok(())
}

/// The `step_index`-th timestep, or an error past the end of the schedule.
fn timestep_at(timesteps: &[f32], step_index: usize) -> Result<f32> {
    timesteps.get(step_index).copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "step {step_index} is past the end of a {}-step schedule",
            timesteps.len()
        ))
    })
}

/// `Σ cᵢ·xᵢ` over tensors of one shape, coefficients rounded to f32 as torch's scalar
/// arithmetic on float32 tensors does.
fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let ((c0, x0), rest) = terms
        .split_first()
        .ok_or_else(|| Error::Other("lincomb of no terms".into()))?;
    let mut acc = x0.scale(*c0 as f32)?;
    for (c, x) in rest {
        acc = Tensor::axpby(1.0, &acc, *c as f32, x)?;
    }
    Ok(acc)
}
