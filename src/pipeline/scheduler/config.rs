//! `scheduler_config.json`, merged the way diffusers merges it.
//!
//! A scheduler swapped in with `Target.from_config(pipe.scheduler.config, **overrides)`
//! inherits the values the folder's file sets (diffusers remembers which values were
//! only the folder class's defaults, `_use_default_values`, and drops those), takes its own
//! defaults for the rest, and the overrides last. So SD 1.5's PNDM config, which does not
//! set `timestep_spacing`, gives an Euler scheduler Euler's own `"linspace"`, while its
//! `steps_offset: 1` carries over.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// A scheduler configuration: the union of the fields of every supported class, each with
/// diffusers' meaning. Values come from [`merge_config`], so every field the chosen
/// class reads is present.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    /// Length of the training noise schedule.
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas, replacing `beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// What the UNet predicts: `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: String,
    /// Added to `leading` timesteps (SD 1.x and 2.x ship 1).
    #[serde(default)]
    pub steps_offset: usize,
    /// Rescale betas so the last timestep has zero SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// The alpha product "before" step 0: 1, or `alphas_cumprod[0]`.
    #[serde(default)]
    pub set_alpha_to_one: bool,
    /// Clamp the predicted clean sample to ±`clip_sample_range` (DDIM, LCM).
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    /// PNDM: go straight to the linear multistep (PLMS) phase.
    #[serde(default)]
    pub skip_prk_steps: bool,
    /// Euler, LMS, DPM-Solver: sigmas on the Karras et al. (2022) schedule.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Euler: Karras bounds; `None` takes them from the schedule.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    /// Euler: how sigmas between training timesteps are found (`linear`).
    #[serde(default = "linear")]
    pub interpolation_type: String,
    /// Euler: `discrete`, or `continuous` (timesteps 0.25·ln σ, with v-prediction).
    #[serde(default = "discrete")]
    pub timestep_type: String,
    /// Euler, DPM-Solver: the sigma after the last step, `zero` or `sigma_min`.
    #[serde(default = "zero")]
    pub final_sigmas_type: String,
    /// DPM-Solver: 1, 2 or 3.
    #[serde(default = "two")]
    pub solver_order: usize,
    /// DPM-Solver: `dpmsolver++` or `dpmsolver`.
    #[serde(default = "dpmsolver_pp")]
    pub algorithm_type: String,
    /// DPM-Solver: `midpoint` or `heun` (second order only).
    #[serde(default = "midpoint")]
    pub solver_type: String,
    /// DPM-Solver: lower the order over the last steps when there are fewer than 15.
    #[serde(default)]
    pub lower_order_final: bool,
    #[serde(default)]
    pub euler_at_final: bool,
    /// DPM-Solver: clip timesteps whose log-SNR is below this (`None` = -inf, which
    /// Python writes as the non-JSON `-Infinity`).
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    /// LCM: the step count the model was distilled with.
    #[serde(default = "fifty")]
    pub original_inference_steps: usize,
    /// LCM: scale of the timestep in the consistency boundary condition.
    #[serde(default = "ten")]
    pub timestep_scaling: f64,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_lu_lambdas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default)]
    pub variance_type: Option<String>,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
}

fn one() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}
fn two() -> usize {
    2
}
fn fifty() -> usize {
    50
}
fn linear() -> String {
    "linear".into()
}
fn discrete() -> String {
    "discrete".into()
}
fn zero() -> String {
    "zero".into()
}
fn dpmsolver_pp() -> String {
    "dpmsolver++".into()
}
fn midpoint() -> String {
    "midpoint".into()
}

/// The scheduler classes this crate implements, by diffusers class name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerClass {
    Pndm,
    Ddim,
    EulerDiscrete,
    EulerAncestralDiscrete,
    DpmSolverMultistep,
    LmsDiscrete,
    Lcm,
}

impl SchedulerClass {
    pub const ALL: [SchedulerClass; 7] = [
        SchedulerClass::Pndm,
        SchedulerClass::Ddim,
        SchedulerClass::EulerDiscrete,
        SchedulerClass::EulerAncestralDiscrete,
        SchedulerClass::DpmSolverMultistep,
        SchedulerClass::LmsDiscrete,
        SchedulerClass::Lcm,
    ];

    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerClass::Pndm => "PNDMScheduler",
            SchedulerClass::Ddim => "DDIMScheduler",
            SchedulerClass::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerClass::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerClass::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerClass::LmsDiscrete => "LMSDiscreteScheduler",
            SchedulerClass::Lcm => "LCMScheduler",
        }
    }

    /// The class's `__init__` defaults, as diffusers declares them.
    fn defaults(self) -> Value {
        let common = json!({
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "trained_betas": null,
            "prediction_type": "epsilon",
            "steps_offset": 0,
        });
        let own = match self {
            SchedulerClass::Pndm => json!({
                "skip_prk_steps": false,
                "set_alpha_to_one": false,
                "timestep_spacing": "leading",
            }),
            SchedulerClass::Ddim => json!({
                "clip_sample": true,
                "set_alpha_to_one": true,
                "thresholding": false,
                "dynamic_thresholding_ratio": 0.995,
                "clip_sample_range": 1.0,
                "sample_max_value": 1.0,
                "timestep_spacing": "leading",
                "rescale_betas_zero_snr": false,
            }),
            SchedulerClass::EulerDiscrete => json!({
                "interpolation_type": "linear",
                "use_karras_sigmas": false,
                "use_exponential_sigmas": false,
                "use_beta_sigmas": false,
                "sigma_min": null,
                "sigma_max": null,
                "timestep_spacing": "linspace",
                "timestep_type": "discrete",
                "rescale_betas_zero_snr": false,
                "final_sigmas_type": "zero",
            }),
            SchedulerClass::EulerAncestralDiscrete => json!({
                "timestep_spacing": "linspace",
                "rescale_betas_zero_snr": false,
            }),
            SchedulerClass::DpmSolverMultistep => json!({
                "solver_order": 2,
                "thresholding": false,
                "dynamic_thresholding_ratio": 0.995,
                "sample_max_value": 1.0,
                "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint",
                "lower_order_final": true,
                "euler_at_final": false,
                "use_karras_sigmas": false,
                "use_exponential_sigmas": false,
                "use_beta_sigmas": false,
                "use_lu_lambdas": false,
                "use_flow_sigmas": false,
                "flow_shift": 1.0,
                "final_sigmas_type": "zero",
                "lambda_min_clipped": null,
                "variance_type": null,
                "timestep_spacing": "linspace",
                "rescale_betas_zero_snr": false,
                "use_dynamic_shifting": false,
                "time_shift_type": "exponential",
            }),
            SchedulerClass::LmsDiscrete => json!({
                "use_karras_sigmas": false,
                "use_exponential_sigmas": false,
                "use_beta_sigmas": false,
                "timestep_spacing": "linspace",
            }),
            SchedulerClass::Lcm => json!({
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "original_inference_steps": 50,
                "clip_sample": false,
                "clip_sample_range": 1.0,
                "set_alpha_to_one": true,
                "thresholding": false,
                "dynamic_thresholding_ratio": 0.995,
                "sample_max_value": 1.0,
                "timestep_spacing": "leading",
                "timestep_scaling": 10.0,
                "rescale_betas_zero_snr": false,
            }),
        };
        let mut merged = common;
        overlay(&mut merged, &own);
        merged
    }
}

/// A scheduler choice as a user names it: a diffusers class name (any case) or one of the
/// short names people know from other front ends, some of which imply config values.
pub fn resolve_name(name: &str) -> Option<(SchedulerClass, Map<String, Value>)> {
    let lower = name.trim().to_ascii_lowercase();
    if let Some(class) = SchedulerClass::ALL.into_iter().find(|c| {
        c.class_name().eq_ignore_ascii_case(&lower)
            || c.class_name()
                .trim_end_matches("Scheduler")
                .eq_ignore_ascii_case(&lower)
    }) {
        return Some((class, Map::new()));
    }
    let karras = || {
        let mut m = Map::new();
        m.insert("use_karras_sigmas".into(), Value::Bool(true));
        m
    };
    let (class, overrides) = match lower.as_str() {
        "pndm" | "plms" => (SchedulerClass::Pndm, Map::new()),
        "ddim" => (SchedulerClass::Ddim, Map::new()),
        "euler" => (SchedulerClass::EulerDiscrete, Map::new()),
        "euler_karras" | "euler-karras" => (SchedulerClass::EulerDiscrete, karras()),
        "euler_a" | "euler-a" | "euler_ancestral" | "euler-ancestral" => {
            (SchedulerClass::EulerAncestralDiscrete, Map::new())
        }
        "dpm++2m" | "dpm++_2m" | "dpmpp_2m" | "dpm++ 2m" | "dpm" => {
            (SchedulerClass::DpmSolverMultistep, Map::new())
        }
        "dpm++2m_karras" | "dpm++_2m_karras" | "dpmpp_2m_karras" | "dpm++ 2m karras" => {
            (SchedulerClass::DpmSolverMultistep, karras())
        }
        "lms" => (SchedulerClass::LmsDiscrete, Map::new()),
        "lms_karras" | "lms-karras" => (SchedulerClass::LmsDiscrete, karras()),
        "lcm" => (SchedulerClass::Lcm, Map::new()),
        _ => return None,
    };
    Some((class, overrides))
}

/// The short names [`resolve_name`] accepts besides class names, one per choice people
/// make (for lists in front ends).
pub const SHORT_NAMES: [&str; 10] = [
    "pndm",
    "ddim",
    "euler",
    "euler_karras",
    "euler_a",
    "dpm++2m",
    "dpm++2m_karras",
    "lms",
    "lms_karras",
    "lcm",
];

/// Every name [`resolve_name`] accepts, for error messages and `--help`.
pub const KNOWN_NAMES: &str = "PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, \
    DPMSolverMultistepScheduler, LMSDiscreteScheduler, LCMScheduler, or pndm, ddim, euler, euler_karras, euler_a, \
    dpm++2m, dpm++2m_karras, lms, lms_karras, lcm";

/// `base` with every key of `top` set to `top`'s value.
fn overlay(base: &mut Value, top: &Value) {
    if let (Value::Object(base), Value::Object(top)) = (base, top) {
        for (k, v) in top {
            base.insert(k.clone(), v.clone());
        }
    }
}

fn class_of(config: &Map<String, Value>) -> Result<SchedulerClass> {
    let name = config
        .get("_class_name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidArgument("scheduler config has no `_class_name`".into()))?;
    SchedulerClass::ALL
        .into_iter()
        .find(|c| c.class_name() == name)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown scheduler class `{name}` in the scheduler config; supported: {KNOWN_NAMES}"
            ))
        })
}

/// The class and full config diffusers would run: the folder's class with its defaults,
/// or, when `choice` names another scheduler, `Choice.from_config(folder config, **overrides)`.
pub fn merge_config(
    file: &Map<String, Value>,
    choice: Option<&str>,
) -> Result<(SchedulerClass, Map<String, Value>)> {
    let folder_class = class_of(file)?;
    let (class, overrides) = match choice {
        None => (folder_class, Map::new()),
        Some(name) => resolve_name(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown scheduler `{name}`; supported: {KNOWN_NAMES}"
            ))
        })?,
    };
    let mut config = class.defaults();
    overlay(&mut config, &Value::Object(file.clone()));
    overlay(&mut config, &Value::Object(overrides));
    config
        .as_object_mut()
        .expect("defaults() builds an object")
        .insert(
            "_class_name".into(),
            Value::String(class.class_name().into()),
        );
    match config {
        Value::Object(map) => Ok((class, map)),
        _ => unreachable!("defaults() builds an object and overlay keeps it one"),
    }
}

impl SchedulerConfig {
    /// Parses a merged config (see [`merge_config`]) and rejects values that would give
    /// a broken schedule and the options this crate does not implement, naming them.
    pub fn from_map(class: SchedulerClass, map: &Map<String, Value>) -> Result<Self> {
        let config: SchedulerConfig = serde_json::from_value(Value::Object(map.clone()))
            .map_err(|e| Error::InvalidArgument(format!("{} config: {e}", class.class_name())))?;
        config.validate(class)?;
        Ok(config)
    }

    fn validate(&self, class: SchedulerClass) -> Result<()> {
        self.check_values()
            .map_err(|what| Error::InvalidArgument(format!("{}: {what}", class.class_name())))?;
        self.check_supported(class)
    }

    /// Values the schedule arithmetic needs: betas in (0, 1) (each alpha = 1 - beta is a
    /// probability, and a beta of 1 or more makes `alphas_cumprod` 0 or negative, hence
    /// NaN sigmas), finite bounds and scales.
    fn check_values(&self) -> std::result::Result<(), String> {
        let beta = |b: f64| b.is_finite() && 0.0 < b && b < 1.0;
        match &self.trained_betas {
            Some(betas) => {
                if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !beta(**b)) {
                    return Err(format!(
                        "`trained_betas`[{i}] is {b}; every beta must be in 0 < beta < 1"
                    ));
                }
            }
            // The cosine schedule computes its own betas.
            None if self.beta_schedule == "squaredcos_cap_v2" => {}
            None => {
                let (start, end) = (self.beta_start, self.beta_end);
                if !(beta(start) && beta(end) && start <= end) {
                    return Err(format!(
                        "`beta_start` {start} and `beta_end` {end} must satisfy 0 < beta_start <= beta_end < 1"
                    ));
                }
            }
        }
        if self.clip_sample && !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0)
        {
            return Err(format!(
                "`clip_sample_range` must be a finite number > 0, got {}",
                self.clip_sample_range
            ));
        }
        for (field, value) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(format!("`{field}` must be a finite number > 0, got {v}"));
            }
        }
        if let (Some(min), Some(max)) = (self.sigma_min, self.sigma_max) {
            if min >= max {
                return Err(format!(
                    "`sigma_min` {min} must be less than `sigma_max` {max}"
                ));
            }
        }
        if !self.timestep_scaling.is_finite() {
            return Err(format!(
                "`timestep_scaling` must be a finite number, got {}",
                self.timestep_scaling
            ));
        }
        Ok(())
    }

    fn check_supported(&self, class: SchedulerClass) -> Result<()> {
        let unsupported = |what: String| {
            Err(Error::InvalidArgument(format!(
                "{}: {what} is not supported",
                class.class_name()
            )))
        };
        if !matches!(
            self.beta_schedule.as_str(),
            "linear" | "scaled_linear" | "squaredcos_cap_v2"
        ) {
            return unsupported(format!("beta_schedule `{}`", self.beta_schedule));
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return unsupported(format!("timestep_spacing `{}`", self.timestep_spacing));
        }
        let predictions: &[&str] = match class {
            SchedulerClass::Pndm => &["epsilon", "v_prediction"],
            _ => &["epsilon", "v_prediction", "sample"],
        };
        if !predictions.contains(&self.prediction_type.as_str()) {
            return unsupported(format!("prediction_type `{}`", self.prediction_type));
        }
        if self.num_train_timesteps < 2 {
            return unsupported(format!("num_train_timesteps {}", self.num_train_timesteps));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return unsupported(format!(
                    "trained_betas with {} values for {} timesteps",
                    b.len(),
                    self.num_train_timesteps
                ));
            }
        }
        let flags = [
            ("thresholding", self.thresholding),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
            ("use_dynamic_shifting", self.use_dynamic_shifting),
        ];
        if let Some((name, _)) = flags.iter().find(|(_, on)| *on) {
            return unsupported(format!("`{name}: true`"));
        }
        if self.variance_type.is_some() {
            return unsupported("variance_type (learned variance)".into());
        }
        match class {
            SchedulerClass::EulerDiscrete => {
                if self.interpolation_type != "linear" {
                    return unsupported(format!(
                        "interpolation_type `{}`",
                        self.interpolation_type
                    ));
                }
                if !matches!(self.timestep_type.as_str(), "discrete" | "continuous") {
                    return unsupported(format!("timestep_type `{}`", self.timestep_type));
                }
                if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
                    return unsupported(format!("final_sigmas_type `{}`", self.final_sigmas_type));
                }
            }
            SchedulerClass::DpmSolverMultistep => {
                if !matches!(self.algorithm_type.as_str(), "dpmsolver++" | "dpmsolver") {
                    return unsupported(format!("algorithm_type `{}`", self.algorithm_type));
                }
                if !matches!(self.solver_type.as_str(), "midpoint" | "heun") {
                    return unsupported(format!("solver_type `{}`", self.solver_type));
                }
                if !(1..=3).contains(&self.solver_order) {
                    return unsupported(format!("solver_order {}", self.solver_order));
                }
                if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
                    return unsupported(format!("final_sigmas_type `{}`", self.final_sigmas_type));
                }
                if self.algorithm_type == "dpmsolver" && self.final_sigmas_type == "zero" {
                    return unsupported(
                        "algorithm_type `dpmsolver` with final_sigmas_type `zero`".into(),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Python's `json.dump` writes infinities and NaN as bare `Infinity`/`NaN`, which is not
/// JSON; diffusers' DPM-Solver configs carry `"lambda_min_clipped": -Infinity`. Those
/// tokens (outside strings) become `null`, which the fields that may hold them read as
/// "unbounded".
pub fn sanitize_python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(token) = token {
            out.push_str("null");
            rest = &rest[token.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_short_name_resolves_and_is_listed() {
        for name in SHORT_NAMES {
            assert!(resolve_name(name).is_some(), "{name}");
            assert!(
                KNOWN_NAMES.split([',', ' ']).any(|n| n == name),
                "{name} missing from KNOWN_NAMES"
            );
        }
    }
}
