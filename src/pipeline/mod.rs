//! The text-to-image loop and what it needs besides the networks.

pub mod noise;
pub mod scheduler;
