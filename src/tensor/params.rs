//! The parameters of the ops both backends run (sizes of products, convolutions and
//! attention, broadcast strides, the nearest-neighbour index rule), worked out by the tensor
//! layer from the operands' shapes and read by `backend::cpu` and `backend::gpu` alike:
//! neither backend imports the other.

/// Shape of a (batched) product `lhs[b] @ rhs[b]` (or `rhs[b]^T`).
#[derive(Clone, Copy, Debug)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// rhs has one matrix per batch entry; otherwise one matrix shared by all.
    pub rhs_batched: bool,
    /// rhs is stored `[n, k]` and used transposed.
    pub transpose_rhs: bool,
}

/// Zero rows and columns around a convolution's input. torch's `padding=p` is
/// [`Padding2d::uniform`]; the other forms let a band of rows carrying its neighbours' rows
/// be convolved with no padding above or below (`model::bands`), and diffusers'
/// `Downsample2D(padding=0)` pad only after the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding2d {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding2d {
    pub fn uniform(p: usize) -> Self {
        Padding2d {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// Sizes of one convolution; `oh`/`ow` are the output's spatial size. The input has
/// `pad_top` zero rows above it and `pad_left` zero columns to its left; below and to its
/// right, as many as the output's size reaches (both backends read 0 outside the input).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dParams {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oc: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
}

/// Sizes of one multi-head attention: q `[batch, q_len, heads * head_dim]`, k and v
/// `[batch, kv_len, heads * head_dim]`; `causal` masks keys after each query.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub causal: bool,
}

/// Row-major strides of `shape` aligned to an output of shape `out`, with 0 for broadcast
/// dims (both backends take the same description).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    let mut strides = vec![0; out.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        strides[pad + i] = if shape[i] == 1 && out[pad + i] != 1 {
            0
        } else {
            acc
        };
        acc *= shape[i];
    }
    strides
}

/// Source index of output index `i` under torch's "nearest" rule (scale = in / out, in f32).
/// Both backends' upsampling use it, so they pick the same pixels.
pub fn nearest_source(i: usize, input: usize, output: usize) -> usize {
    if input == output {
        i
    } else if output == 2 * input {
        i / 2
    } else {
        let scale = input as f32 / output as f32;
        ((i as f32 * scale).floor() as usize).min(input - 1)
    }
}
