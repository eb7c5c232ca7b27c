//! Elementwise ops: broadcasting binary ops, unary activations, GEGLU, axpby.

use rayon::prelude::*;

use super::exp::exp;
use super::gelu::gelu;
use super::simd::dispatch;
use super::CpuStorage;
use crate::tensor::params::broadcast_strides;
use crate::tensor::{BinaryOp, UnaryOp};

/// Below this many elements, threads cost more than they save.
const PAR_MIN: usize = 1 << 14;

fn apply(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
    }
}

pub fn binary(
    lhs: &CpuStorage,
    lhs_shape: &[usize],
    rhs: &CpuStorage,
    rhs_shape: &[usize],
    out_shape: &[usize],
    op: BinaryOp,
) -> CpuStorage {
    let (a, b) = (lhs.as_f32(), rhs.as_f32());
    let numel: usize = out_shape.iter().product();
    let mut out = vec![0f32; numel];
    if lhs_shape == rhs_shape {
        out.par_iter_mut()
            .with_min_len(PAR_MIN)
            .zip(a.par_iter().zip(b.par_iter()))
            .for_each(|(o, (x, y))| *o = apply(op, *x, *y));
        return CpuStorage::F32(out);
    }
    // General broadcast: walk the output one innermost row at a time.
    let inner = out_shape.last().copied().unwrap_or(1).max(1);
    let (sa, sb) = (
        broadcast_strides(lhs_shape, out_shape),
        broadcast_strides(rhs_shape, out_shape),
    );
    let (ia, ib) = (
        sa.last().copied().unwrap_or(0),
        sb.last().copied().unwrap_or(0),
    );
    out.par_chunks_mut(inner)
        .enumerate()
        .for_each(|(row, dst)| {
            let (oa, ob) = (
                row_offset(row, out_shape, &sa),
                row_offset(row, out_shape, &sb),
            );
            for (j, o) in dst.iter_mut().enumerate() {
                *o = apply(op, a[oa + j * ia], b[ob + j * ib]);
            }
        });
    CpuStorage::F32(out)
}

/// `lhs = lhs op rhs` with `rhs` broadcast to `lhs_shape`: [`binary`] for a left operand
/// nothing else reads (a residual sum), without a third buffer.
pub fn binary_assign(
    lhs: &mut [f32],
    lhs_shape: &[usize],
    rhs: &CpuStorage,
    rhs_shape: &[usize],
    op: BinaryOp,
) {
    let b = rhs.as_f32();
    if lhs_shape == rhs_shape {
        lhs.par_iter_mut()
            .with_min_len(PAR_MIN)
            .zip(b.par_iter())
            .for_each(|(x, y)| *x = apply(op, *x, *y));
        return;
    }
    let inner = lhs_shape.last().copied().unwrap_or(1).max(1);
    let sb = broadcast_strides(rhs_shape, lhs_shape);
    let ib = sb.last().copied().unwrap_or(0);
    lhs.par_chunks_mut(inner)
        .enumerate()
        .for_each(|(row, dst)| {
            let ob = row_offset(row, lhs_shape, &sb);
            for (j, x) in dst.iter_mut().enumerate() {
                *x = apply(op, *x, b[ob + j * ib]);
            }
        });
}

/// Where innermost row `row` of `shape` starts in an operand with `strides` (0 along its
/// broadcast dimensions).
fn row_offset(row: usize, shape: &[usize], strides: &[usize]) -> usize {
    let (mut offset, mut rem) = (0, row);
    for d in (0..shape.len().saturating_sub(1)).rev() {
        offset += rem % shape[d] * strides[d];
        rem /= shape[d];
    }
    offset
}

/// `dst = op(src)`, one loop per op so that each vectorises (see [`super::simd`]).
#[inline(always)]
fn unary_rows<const FMA: bool>(dst: &mut [f32], src: &[f32], op: UnaryOp) {
    let sigmoid = |x: f32| 1.0 / (1.0 + exp::<FMA>(-x));
    let pairs = dst.iter_mut().zip(src);
    match op {
        UnaryOp::Silu => pairs.for_each(|(d, &x)| *d = x * sigmoid(x)),
        UnaryOp::Gelu => pairs.for_each(|(d, &x)| *d = gelu::<FMA>(x)),
        UnaryOp::QuickGelu => pairs.for_each(|(d, &x)| *d = x * sigmoid(1.702 * x)),
        // Two roundings, as torch's `x * mul + add`.
        UnaryOp::Affine { mul, add } => pairs.for_each(|(d, &x)| *d = x * mul + add),
        UnaryOp::Clamp { min, max } => pairs.for_each(|(d, &x)| *d = x.max(min).min(max)),
        UnaryOp::Sqrt => pairs.for_each(|(d, &x)| *d = x.sqrt()),
        UnaryOp::Exp => pairs.for_each(|(d, &x)| *d = x.exp()),
    }
}

/// `o = h * gelu(gate)`.
#[inline(always)]
fn geglu_row<const FMA: bool>(o: &mut [f32], h: &[f32], gate: &[f32]) {
    for ((o, &h), &g) in o.iter_mut().zip(h).zip(gate) {
        *o = h * gelu::<FMA>(g);
    }
}

dispatch!(unary_rows_simd, unary_rows(dst: &mut [f32], src: &[f32], op: UnaryOp));
dispatch!(geglu_row_simd, geglu_row(o: &mut [f32], h: &[f32], gate: &[f32]));

pub fn unary(x: &CpuStorage, op: UnaryOp) -> CpuStorage {
    let x = x.as_f32();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(PAR_MIN)
        .zip(x.par_chunks(PAR_MIN))
        .for_each(|(dst, src)| unary_rows_simd(dst, src, op));
    CpuStorage::F32(out)
}

pub fn axpby(a: f32, x: &CpuStorage, b: f32, y: &CpuStorage) -> CpuStorage {
    let (x, y) = (x.as_f32(), y.as_f32());
    CpuStorage::F32(
        x.par_iter()
            .with_min_len(PAR_MIN)
            .zip(y.par_iter())
            .map(|(&u, &v)| a * u + b * v)
            .collect(),
    )
}

/// Rows of `2 * half` values `[h, gate]` become `h * gelu(gate)`.
pub fn geglu(x: &CpuStorage, half: usize) -> CpuStorage {
    let x = x.as_f32();
    let rows = x.len() / (2 * half).max(1);
    let mut out = vec![0f32; rows * half];
    out.par_chunks_mut(half)
        .zip(x.par_chunks(2 * half))
        .for_each(|(o, row)| {
            let (h, gate) = row.split_at(half);
            geglu_row_simd(o, h, gate);
        });
    CpuStorage::F32(out)
}
