//! The networks of a Stable Diffusion pipeline, their configs, weights and tokenizer.
//! Module and field names follow diffusers', so safetensors names map 1:1.

pub mod attention;
pub mod clip;
pub mod config;
pub mod download;
pub mod folder;
pub mod hub;
pub mod nn;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
