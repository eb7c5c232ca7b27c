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

/// A packed operand. Its memory goes back to the thread that made it when dropped, and the
/// next product there reuses it: operands are packed anew for every product, and fresh
/// buffers cost their zeroing and, on rayon's threads (whose malloc arenas map large blocks
/// afresh), page faults. Measured on 2 Xeon cores with AMX (2026-12-07): memset and the
/// kernel's page clearing were 7% and 10% of a bf16 UNet step's profile.
pub(super) struct Packed(Vec<u16>);

/// Buffers kept per thread, and the largest kept (larger ones are rare: the VAE's im2col).
const SPARE_BUFFERS: usize = 4;
const SPARE_MAX_BYTES: usize = 64 << 20;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Vec<u16>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Packed {
    /// `len` values whose contents are left from earlier use: every packing writes all of
    /// them, its padding zeros included.
    fn reuse(len: usize) -> Self {
        let mut v = SPARE
            .with_borrow_mut(|spare| {
                let fits = spare.iter().position(|b| b.capacity() >= len);
                fits.map(|i| spare.swap_remove(i)).or_else(|| spare.pop())
            })
            .unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        Packed(v)
    }
}

impl Drop for Packed {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() * 2 <= SPARE_MAX_BYTES {
            SPARE.with_borrow_mut(|spare| {
                if spare.len() < SPARE_BUFFERS {
                    spare.push(v);
                }
            });
        }
    }
}

impl std::ops::Deref for Packed {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.0
    }
}

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
pub(super) fn rows(m: usize, k: usize, kp: usize, lhs: MatRef, parallel: bool) -> Packed {
    let mut packed = Packed::reuse(m.next_multiple_of(BLOCK) * kp);
    each_chunk(&mut packed.0, kp, parallel, |r, row| {
        if r >= m {
            row.fill(0);
            return;
        }
        row[k..].fill(0);
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
pub(super) fn panels(n: usize, k: usize, kp: usize, rhs: MatRef, parallel: bool) -> Packed {
    let mut packed = Packed::reuse(n.next_multiple_of(BLOCK) * kp);
    each_chunk(&mut packed.0, PANEL * kp, parallel, |p, panel| {
        let cols = PANEL.min(n.saturating_sub(p * PANEL));
        let fast = cols == PANEL && (rhs.row_stride == 1 || rhs.col_stride == 1);
        if fast {
            // The paths below write every pair up to k's; the rest is padding.
            panel[k.div_ceil(2) * 2 * PANEL..].fill(0);
        } else {
            panel.fill(0);
        }
        let at = |kk: usize, j: usize| (p * PANEL + j) * rhs.col_stride + kk * rhs.row_stride;
        if cols > 0 && rhs.row_stride == 1 {
            // A transposed rhs (linear layers' weights, attention's keys): each column is
            // contiguous and its k pairs are already adjacent; round it, then place each
            // pair as one u32.
            let mut column = vec![0u16; kp];
            for j in 0..cols {
                round_into(&rhs.data[at(0, j)..at(0, j) + k], &mut column[..k]);
                for q in 0..k.div_ceil(2) {
                    panel[q * 2 * PANEL + 2 * j..][..2].copy_from_slice(&column[2 * q..2 * q + 2]);
                }
            }
        } else if rhs.col_stride == 1 && cols == PANEL {
            // Row-major: two rows' 16 values at a time, rounded and interleaved.
            interleave_rows(&rhs.data[at(0, 0)..], rhs.row_stride, k, panel);
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

/// One full panel from a row-major rhs: for each k pair, rows `2q` and `2q + 1`'s 16 values
/// (from the start of `data`, rows `row_stride` apart) rounded and interleaved.
fn interleave_rows(data: &[f32], row_stride: usize, k: usize, panel: &mut [u16]) {
    assert!(data.len() >= (k - 1) * row_stride + PANEL && panel.len() >= k.div_ceil(2) * 2 * PANEL);
    #[cfg(target_arch = "x86_64")]
    if super::avx512::usable() {
        // SAFETY: the CPU has AVX512_BF16 (just checked); the extents are asserted above.
        return unsafe { interleave_rows_avx512(data, row_stride, k, panel) };
    }
    for kk in 0..k {
        for j in 0..PANEL {
            panel[(kk / 2) * 2 * PANEL + 2 * j + kk % 2] =
                bf16::from_f32(data[kk * row_stride + j]).to_bits();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn interleave_rows_avx512(data: &[f32], row_stride: usize, k: usize, panel: &mut [u16]) {
    // Lane 2j takes row 0's value j (u16 lane j of the rounded pair), lane 2j + 1 row 1's
    // (lane 16 + j).
    let order: [u16; 32] = std::array::from_fn(|i| (i / 2 + (i % 2) * PANEL) as u16);
    // SAFETY (every access): the caller asserted that rows 0..k of 16 values and k's pairs
    // of the panel are inside the slices; a missing odd row reads as zeros.
    unsafe {
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        for q in 0..k.div_ceil(2) {
            let row0 = _mm512_loadu_ps(data.as_ptr().add(2 * q * row_stride));
            let row1 = if 2 * q + 1 < k {
                _mm512_loadu_ps(data.as_ptr().add((2 * q + 1) * row_stride))
            } else {
                _mm512_setzero_ps()
            };
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(row1, row0));
            let pairs = _mm512_permutexvar_epi16(order, both);
            _mm512_storeu_si512(panel.as_mut_ptr().add(q * 2 * PANEL).cast(), pairs);
        }
    }
}
