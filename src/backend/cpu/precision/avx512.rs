//! The AVX512_BF16 kernel: the 32 x 32 block in four bands of 8 rows, each band's 8 x 32
//! sums in 16 zmm registers; per k pair, two panel loads, and per row one broadcast pair
//! and two `vdpbf16ps`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Block, BLOCK, PANEL};

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
/// The CPU must have AVX512_BF16; `a` and `b` as documented there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn block(a: &[u16], b: &[u16], k: usize, kp: usize, out: &mut Block) {
    assert!(a.len() >= BLOCK * kp && b.len() >= 2 * PANEL * kp && k <= kp);
    let pairs = k.div_ceil(2);
    let (b0, b1) = (b.as_ptr(), b[PANEL * kp..].as_ptr());
    for band in 0..BLOCK / BAND {
        let rows = a[band * BAND * kp..].as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; BAND];
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
            let row = &mut out.0[band * BAND + r];
            // SAFETY: each row of out holds 32 f32, two zmm stores.
            unsafe {
                _mm512_storeu_ps(row.as_mut_ptr(), sums[0]);
                _mm512_storeu_ps(row.as_mut_ptr().add(PANEL), sums[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn block(_: &[u16], _: &[u16], _: usize, _: usize, _: &mut Block) {
    unreachable!("usable() is false off x86-64")
}
