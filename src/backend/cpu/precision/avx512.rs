//! The AVX512_BF16 kernel: the 32 x 32 block in four bands of 8 rows, each band's 8 x 32
//! sums in 16 zmm registers; per k pair, two panel loads, and per row one broadcast pair
//! and two `vdpbf16ps`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Target, BLOCK, PANEL};

/// Rows of one band.
const BAND: usize = 8;

pub(super) fn usable() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// See [`super::BlockFn`]; the k pairs past `k` (zero padding) are skipped.
///
/// # Safety
/// The CPU must have AVX512_BF16; `a` and `b` as documented there, `out` 32 rows of 32
/// values that no other thread touches.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn block(a: &[u16], b: &[u16], k: usize, kp: usize, out: Target) {
    assert!(a.len() >= BLOCK * kp && b.len() >= 2 * PANEL * kp && k <= kp);
    let pairs = k.div_ceil(2);
    let (b0, b1) = (b.as_ptr(), b[PANEL * kp..].as_ptr());
    for band in 0..BLOCK / BAND {
        let rows = a[band * BAND * kp..].as_ptr();
        // Row r of the band in the target.
        // SAFETY: rows band * BAND + r < 32 of the target (the caller's guarantee).
        let row = |r: usize| unsafe { out.ptr.add((band * BAND + r) * out.row_stride) };
        let mut acc = [[_mm512_setzero_ps(); 2]; BAND];
        if out.accumulate {
            for (r, sums) in acc.iter_mut().enumerate() {
                // SAFETY: each target row holds 32 values, two zmm loads.
                unsafe {
                    *sums = [_mm512_loadu_ps(row(r)), _mm512_loadu_ps(row(r).add(PANEL))];
                }
            }
        }
        for q in 0..pairs {
            // SAFETY: pair q < kp / 2 of each panel is 16 pairs of u16 (64 bytes) inside b;
            // the row pairs read below lie inside a (rows of kp from the band's first).
            unsafe {
                let p0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b0.add(q * 2 * PANEL).cast()));
                let p1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b1.add(q * 2 * PANEL).cast()));
                for (r, sums) in acc.iter_mut().enumerate() {
                    let pair = rows.add(r * kp + 2 * q).cast::<i32>().read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    sums[0] = _mm512_dpbf16_ps(sums[0], x, p0);
                    sums[1] = _mm512_dpbf16_ps(sums[1], x, p1);
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            // SAFETY: each target row holds 32 values, two zmm stores.
            unsafe {
                _mm512_storeu_ps(row(r), sums[0]);
                _mm512_storeu_ps(row(r).add(PANEL), sums[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn block(_: &[u16], _: &[u16], _: usize, _: usize, _: Target) {
    unreachable!("usable() is false off x86-64")
}
