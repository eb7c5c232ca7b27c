//! The networks of a Stable Diffusion pipeline, their configs, weights and tokenizer.
//! Module and field names follow diffusers', so safetensors names map 1:1.

pub mod attention;
pub mod bands;
pub mod clip;
pub mod config;
pub mod download;
pub mod folder;
pub mod hub;
pub mod lora;
pub mod nn;
pub mod presets;
pub mod prompt_encoder;
pub mod prompt_syntax;
pub mod resnet;
pub mod single_file;
pub mod source;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_encoder;
pub mod weights;
