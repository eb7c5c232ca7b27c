//! sd-wgpu: Stable Diffusion in Rust that reproduces Hugging Face diffusers.
//!
//! Layout: [`tensor`] is the op interface all model code is written against; [`backend`]
//! implements it; [`model`] holds the networks (CLIP, UNet, VAE), their configs, weights and
//! tokenizer; [`pipeline`] holds the text-to-image loop, noise and schedulers; [`engine`] runs
//! generations one at a time from a queue; [`server`] is the HTTP API in front of it.

pub mod backend;
pub mod engine;
pub mod error;
pub mod model;
pub mod pipeline;
pub mod server;
pub mod tensor;
pub(crate) mod user_dirs;

pub use error::{Error, Result};
