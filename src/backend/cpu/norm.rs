//! Group norm (with optional fused SiLU) and layer norm. Statistics are accumulated in f64.

use rayon::prelude::*;

use super::exp::exp;
use super::simd::{dispatch, madd};
use super::CpuStorage;

/// One channel of a group norm in vector registers: `dst = (src - mean) * scale + beta`,
/// then SiLU when `silu`. The f64 mean comes as `mean_hi + mean_lo` (its f32 rounding and
/// the rest), so subtracting it costs no precision under a large mean.
#[inline(always)]
fn normalise_row<const FMA: bool>(dst: &mut [f32], src: &[f32], m: RowAffine, silu: bool) {
    let y = |s: f32| madd::<FMA>(s - m.mean_hi - m.mean_lo, m.scale, m.beta);
    if silu {
        for (d, &s) in dst.iter_mut().zip(src) {
            let y = y(s);
            *d = y / (1.0 + exp::<FMA>(-y));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = y(s);
        }
    }
}

#[derive(Clone, Copy)]
struct RowAffine {
    mean_hi: f32,
    mean_lo: f32,
    scale: f32,
    beta: f32,
}

dispatch!(
    normalise_row_simd,
    normalise_row(dst: &mut [f32], src: &[f32], m: RowAffine, silu: bool)
);

fn mean_var(values: &[f32]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = lane_sum(values, |v| v as f64) / n;
    let var = lane_sum(values, |v| (v as f64 - mean).powi(2)) / n;
    (mean, var)
}

/// The sum of `f` over `values` in f64, in eight running sums so that it vectorises (a
/// single running sum is one long chain of dependent additions).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &CpuStorage,
    gamma: &CpuStorage,
    beta: &CpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> CpuStorage {
    let x = x.as_f32();
    let stats = group_stats(&x, c, spatial, groups);
    normalised_copy(&x, n, &stats, gamma, beta, c, spatial, groups, eps, silu)
}

/// `x` normalised with `stats` into a new buffer (see [`normalise`]).
#[allow(clippy::too_many_arguments)]
fn normalised_copy(
    x: &[f32],
    n: usize,
    stats: &[(f64, f64)],
    gamma: &CpuStorage,
    beta: &CpuStorage,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> CpuStorage {
    let mut out = vec![0f32; n * c * spatial];
    normalise(
        &mut out,
        Some(x),
        stats,
        gamma,
        beta,
        c,
        spatial,
        groups,
        eps,
        silu,
    );
    CpuStorage::F32(out)
}

/// [`group_norm`] written over its input, for an input nothing else reads: the VAE
/// decoder's full-size maps are 0.5-1 GiB each at 1024x1024, and a copy beside each is what
/// took its peak memory from 2 to 3 GiB.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_in_place(
    x: &mut [f32],
    gamma: &CpuStorage,
    beta: &CpuStorage,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) {
    let stats = group_stats(x, c, spatial, groups);
    normalise(x, None, &stats, gamma, beta, c, spatial, groups, eps, silu);
}

/// Mean and biased variance of each (sample, group) slab.
fn group_stats(x: &[f32], c: usize, spatial: usize, groups: usize) -> Vec<(f64, f64)> {
    x.par_chunks((c / groups * spatial).max(1))
        .map(mean_var)
        .collect()
}

/// Mean and biased variance of each (sample, group) of `[n, c, spatial]`: `[n, groups, 2]`.
pub fn group_moments(
    x: &CpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
) -> CpuStorage {
    let x = x.as_f32();
    let per_slab = (c / groups * spatial).max(1);
    let mut out = vec![0f32; n * groups * 2];
    out.par_chunks_mut(2)
        .zip(x.par_chunks(per_slab))
        .for_each(|(dst, src)| {
            let (mean, var) = mean_var(src);
            dst.copy_from_slice(&[mean as f32, var as f32]);
        });
    CpuStorage::F32(out)
}

/// [`group_norm`] with given `[n, groups, 2]` means and variances (see [`group_moments`]).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with_moments(
    x: &CpuStorage,
    moments: &CpuStorage,
    gamma: &CpuStorage,
    beta: &CpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> CpuStorage {
    let stats: Vec<(f64, f64)> = moments
        .as_f32()
        .chunks_exact(2)
        .map(|m| (m[0] as f64, m[1] as f64))
        .collect();
    normalised_copy(
        &x.as_f32(),
        n,
        &stats,
        gamma,
        beta,
        c,
        spatial,
        groups,
        eps,
        silu,
    )
}

/// Normalises each (sample, group) slab of `src` (of `dst` itself when `None`) into `dst`
/// with its `(mean, variance)`, then scales and shifts per channel (and applies SiLU).
#[allow(clippy::too_many_arguments)]
fn normalise(
    dst: &mut [f32],
    src: Option<&[f32]>,
    stats: &[(f64, f64)],
    gamma: &CpuStorage,
    beta: &CpuStorage,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) {
    /// In place, each row goes through a copy this long (on the stack, in L1) so that the
    /// vector kernel keeps distinct source and destination.
    const PIECE: usize = 2048;
    let (gamma, beta) = (gamma.as_f32(), beta.as_f32());
    let per_group = c / groups;
    let slab = (per_group * spatial).max(1);
    let rows = spatial.max(1);
    // A group's channels are consecutive, so each (batch, group) is one contiguous slab.
    dst.par_chunks_mut(slab)
        .zip(stats.par_iter())
        .enumerate()
        .for_each(|(index, (dst, &(mean, var)))| {
            let inv = 1.0 / (var + eps as f64).sqrt();
            let first_channel = (index % groups) * per_group;
            for (i, d) in dst.chunks_mut(rows).enumerate() {
                let ch = first_channel + i;
                let mean_hi = mean as f32;
                let m = RowAffine {
                    mean_hi,
                    mean_lo: (mean - mean_hi as f64) as f32,
                    scale: (gamma[ch] as f64 * inv) as f32,
                    beta: beta[ch],
                };
                match src {
                    Some(src) => {
                        let start = index * slab + i * rows;
                        normalise_row_simd(d, &src[start..start + d.len()], m, silu);
                    }
                    None => {
                        let mut copy = [0f32; PIECE];
                        for piece in d.chunks_mut(PIECE) {
                            let copy = &mut copy[..piece.len()];
                            copy.copy_from_slice(piece);
                            normalise_row_simd(piece, copy, m, silu);
                        }
                    }
                }
            }
        });
}

pub fn layer_norm(
    x: &CpuStorage,
    gamma: &CpuStorage,
    beta: &CpuStorage,
    d: usize,
    eps: f32,
) -> CpuStorage {
    let x = x.as_f32();
    let (gamma, beta) = (gamma.as_f32(), beta.as_f32());
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(dst, src)| {
            let (mean, var) = mean_var(src);
            let inv = 1.0 / (var + eps as f64).sqrt();
            for ((o, &v), (&g, &b)) in dst.iter_mut().zip(src).zip(gamma.iter().zip(beta.iter())) {
                *o = ((v as f64 - mean) * inv * g as f64 + b as f64) as f32;
            }
        });
    CpuStorage::F32(out)
}
