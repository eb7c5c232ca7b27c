//! Data movement: permute, narrow, cat, nearest upsampling, row gathers.

use rayon::prelude::*;

use super::CpuStorage;
use crate::tensor::params::nearest_source;

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub fn permute(x: &CpuStorage, shape: &[usize], axes: &[usize]) -> CpuStorage {
    let x = x.as_f32();
    let in_strides = strides(shape);
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    // Stride in the input of each output axis.
    let src_strides: Vec<usize> = axes.iter().map(|&a| in_strides[a]).collect();
    let rank = out_shape.len();
    let inner = out_shape.last().copied().unwrap_or(1).max(1);
    let inner_stride = src_strides.last().copied().unwrap_or(0);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(inner)
        .enumerate()
        .for_each(|(row, dst)| {
            let (mut off, mut rem) = (0, row);
            for d in (0..rank.saturating_sub(1)).rev() {
                off += (rem % out_shape[d]) * src_strides[d];
                rem /= out_shape[d];
            }
            for (j, o) in dst.iter_mut().enumerate() {
                *o = x[off + j * inner_stride];
            }
        });
    CpuStorage::F32(out)
}

pub fn narrow(x: &CpuStorage, shape: &[usize], dim: usize, start: usize, len: usize) -> CpuStorage {
    let x = x.as_f32();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * shape[dim] + start) * inner;
        out.extend_from_slice(&x[base..base + len * inner]);
    }
    CpuStorage::F32(out)
}

pub fn cat(parts: &[(&CpuStorage, &[usize])], dim: usize) -> CpuStorage {
    let first = parts[0].1;
    let outer: usize = first[..dim].iter().product();
    let inner: usize = first[dim + 1..].iter().product();
    let data: Vec<_> = parts
        .iter()
        .map(|(s, shape)| (s.as_f32(), shape[dim] * inner))
        .collect();
    let total: usize = data.iter().map(|(_, n)| n).sum();
    let mut out = Vec::with_capacity(outer * total);
    for o in 0..outer {
        for (d, n) in &data {
            out.extend_from_slice(&d[o * n..(o + 1) * n]);
        }
    }
    CpuStorage::F32(out)
}

pub fn upsample_nearest(
    x: &CpuStorage,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> CpuStorage {
    let x = x.as_f32();
    let cols: Vec<usize> = (0..ow).map(|j| nearest_source(j, w, ow)).collect();
    let mut out = vec![0f32; planes * oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(row, dst)| {
        let (plane, oy) = (row / oh, row % oh);
        let src = &x[(plane * h + nearest_source(oy, h, oh)) * w..][..w];
        for (o, &c) in dst.iter_mut().zip(&cols) {
            *o = src[c];
        }
    });
    CpuStorage::F32(out)
}

pub fn gather_rows(table: &CpuStorage, d: usize, ids: &[u32]) -> CpuStorage {
    // Widen only the rows we need (the token table may be f16).
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let range = id as usize * d..(id as usize + 1) * d;
        match table {
            CpuStorage::F32(v) => out.extend_from_slice(&v[range]),
            CpuStorage::F16(v) => out.extend(v[range].iter().map(|x| x.to_f32())),
            CpuStorage::BF16(v) => out.extend(v[range].iter().map(|x| x.to_f32())),
        }
    }
    CpuStorage::F32(out)
}
