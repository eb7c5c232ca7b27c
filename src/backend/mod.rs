//! Compute backends. Each implements the op list of [`crate::tensor::Tensor`] for the
//! storage it owns; the tensor layer checks shapes and dispatches.

pub mod cpu;
