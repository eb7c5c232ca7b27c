//! Rounding the operands into the packed bf16 layouts both kernels read (see the module
//! above), with AVX512_BF16's `vcvtne2ps2bf16`, 32 values per instruction: round to
//! nearest even, as `half::bf16::from_f32`, except that subnormal inputs (below 1.2e-38)
//! become zero. The layouts' padding stays zero.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::{BLOCK, PANEL};
use crate::backend::cpu::matmul::MatRef;

/// Runs `fill` on each `chunk`-long piece of `packed` with its index, in parallel or not.
fn each_chunk(
    packed: &mut [u16],
    chunk: usize,
    parallel: bool,
    fill: impl Fn(usize, &mut [u16]) + Sync + Send,
) {
    if parallel {
        packed
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    } else {
        packed
            .chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    }
}

/// `dst[i] = bf16(src[i])`.
fn round_into(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::usable() {
        // SAFETY: the CPU has AVX512_BF16 (just checked).
        return unsafe { round_into_avx512(src, dst) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
fn round_into_avx512(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n values of both slices.
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), v);
        }
        i += 32;
    }
    for j in i..n {
        dst[j] = bf16::from_f32(src[j]).to_bits();
    }
}

/// The lhs rows as bf16, `BLOCK`-padded rows of `kp` values (zeros past `k` and past `m`).
pub(super) fn rows(m: usize, k: usize, kp: usize, lhs: MatRef, parallel: bool) -> Vec<u16> {
    let mut packed = vec![0u16; m.next_multiple_of(BLOCK) * kp];
    each_chunk(&mut packed, kp, parallel, |r, row| {
        if r >= m {
            return;
        }
        let start = r * lhs.row_stride;
        if lhs.col_stride == 1 {
            round_into(&lhs.data[start..start + k], &mut row[..k]);
        } else {
            for (c, v) in row[..k].iter_mut().enumerate() {
                *v = bf16::from_f32(lhs.data[start + c * lhs.col_stride]).to_bits();
            }
        }
    });
    packed
}

/// The rhs (`k x n`) as bf16 panels of `PANEL` columns, `BLOCK`-padded: panel `p` holds, for
/// each k pair `q`, the pairs `(rhs[2q][j], rhs[2q + 1][j])` of its columns `j` in turn.
pub(super) fn panels(n: usize, k: usize, kp: usize, rhs: MatRef, parallel: bool) -> Vec<u16> {
    let mut packed = vec![0u16; n.next_multiple_of(BLOCK) * kp];
    each_chunk(&mut packed, PANEL * kp, parallel, |p, panel| {
        let cols = PANEL.min(n.saturating_sub(p * PANEL));
        if cols == 0 {
            return;
        }
        let at = |kk: usize, j: usize| (p * PANEL + j) * rhs.col_stride + kk * rhs.row_stride;
        if rhs.row_stride == 1 {
            // A transposed rhs (linear layers' weights, attention's keys): each column is
            // contiguous and its k pairs are already adjacent; round it, then place each
            // pair as one u32.
            let mut column = vec![0u16; kp];
            for j in 0..cols {
                round_into(&rhs.data[at(0, j)..at(0, j) + k], &mut column[..k]);
                for q in 0..kp / 2 {
                    panel[q * 2 * PANEL + 2 * j..][..2].copy_from_slice(&column[2 * q..2 * q + 2]);
                }
            }
        } else if rhs.col_stride == 1 && cols == PANEL {
            // Row-major: two rows' 16 values at a time, rounded and interleaved.
            let mut pair = [0u16; 2 * PANEL];
            let mut both = [0f32; 2 * PANEL];
            for q in 0..k.div_ceil(2) {
                let (k0, k1) = (2 * q, 2 * q + 1);
                both[..PANEL].copy_from_slice(&rhs.data[at(k0, 0)..at(k0, 0) + PANEL]);
                if k1 < k {
                    both[PANEL..].copy_from_slice(&rhs.data[at(k1, 0)..at(k1, 0) + PANEL]);
                } else {
                    both[PANEL..].fill(0.0);
                }
                round_into(&both, &mut pair);
                let out = &mut panel[q * 2 * PANEL..][..2 * PANEL];
                for j in 0..PANEL {
                    out[2 * j] = pair[j];
                    out[2 * j + 1] = pair[PANEL + j];
                }
            }
        } else {
            for kk in 0..k {
                for j in 0..cols {
                    panel[(kk / 2) * 2 * PANEL + 2 * j + kk % 2] =
                        bf16::from_f32(rhs.data[at(kk, j)]).to_bits();
                }
            }
        }
    });
    packed
}
