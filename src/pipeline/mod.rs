//! The text-to-image loop and what it needs besides the networks: noise and schedulers.

pub mod cost;
pub mod image;
pub mod noise;
pub mod params;
pub mod scheduler;
pub mod stable_diffusion;

pub use image::{MaskImage, RgbImage};
pub use params::{GenerateParams, InitImage, ModelDefaults, ParamsCheck, StepEvent};
pub use stable_diffusion::{Generated, StableDiffusion, StageTimings};
