//! The text-to-image loop and what it needs besides the networks: noise and schedulers.

pub mod cost;
pub mod noise;
pub mod scheduler;
pub mod text_to_image;

pub use text_to_image::{
    GenerateParams, Generated, ParamsCheck, RgbImage, StableDiffusion, StageTimings, StepEvent,
};
