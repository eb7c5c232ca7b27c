//! The basic layers, named and shaped like their torch counterparts so weights load 1:1.

use crate::error::Result;
use crate::model::lora::LayerWeight;
use crate::model::weights::Weights;
use crate::tensor::params::Padding2d;
use crate::tensor::Tensor;

/// torch's `nn.Linear`. Its weight is one a LoRA may change (see [`LayerWeight`]).
pub struct Linear {
    weight: LayerWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(w: &Weights, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: w.layer_weight(&[out_features, in_features])?,
            bias: if bias {
                Some(w.get("bias", &[out_features])?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.linear(&self.weight.current(), self.bias.as_ref())
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
}

/// torch's `nn.Conv2d` with square kernel, stride and padding. Its weight is one a LoRA
/// (LoCon) may change.
pub struct Conv2d {
    weight: LayerWeight,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: w.layer_weight(&[out_channels, in_channels, kernel, kernel])?,
            bias: w.get("bias", &[out_channels])?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_padded(x, Padding2d::uniform(self.padding))
    }

    /// The layer with other zero padding than its own (a band of rows that carries its
    /// neighbours' rows, diffusers' `Downsample2D(padding=0)`).
    pub fn forward_padded(&self, x: &Tensor, padding: Padding2d) -> Result<Tensor> {
        x.conv2d_padded(
            &self.weight.current(),
            Some(&self.bias),
            self.stride,
            padding,
        )
    }

    /// Rows of zero padding above and below (and columns on each side).
    pub fn padding(&self) -> usize {
        self.padding
    }

    /// Whether the output has the input's height and width (stride 1, `padding` rows of
    /// the input on each side reach every output row).
    pub fn keeps_size(&self) -> bool {
        self.stride == 1 && self.weight.shape()[2] == 2 * self.padding + 1
    }
}

/// torch's `nn.GroupNorm` (affine).
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn new(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: w.get("weight", &[channels])?,
            bias: w.get("bias", &[channels])?,
            groups,
            eps: eps as f32,
        })
    }

    /// Takes `x` so that a map nothing else holds is normalised in its own memory (see
    /// [`Tensor::group_norm`]); pass a clone to keep it.
    pub fn forward(&self, x: Tensor) -> Result<Tensor> {
        x.group_norm(self.groups, &self.weight, &self.bias, self.eps, false)
    }

    /// `silu(group_norm(x))` in one pass.
    pub fn forward_silu(&self, x: Tensor) -> Result<Tensor> {
        x.group_norm(self.groups, &self.weight, &self.bias, self.eps, true)
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The norm (and optionally SiLU) with statistics given as `[N, groups, 2]` means and
    /// variances, gathered over more than `x` (see `model::bands`).
    pub fn forward_with_moments(&self, x: &Tensor, moments: &Tensor, silu: bool) -> Result<Tensor> {
        x.group_norm_with_moments(
            self.groups,
            moments,
            &self.weight,
            &self.bias,
            self.eps,
            silu,
        )
    }
}

/// torch's `nn.LayerNorm` over the last dimension (affine).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get("weight", &[dim])?,
            bias: w.get("bias", &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, self.eps)
    }
}
