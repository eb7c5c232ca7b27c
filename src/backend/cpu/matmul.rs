//! Matrix products through the `gemm` crate (SIMD microkernels, rayon threads).

use rayon::prelude::*;

use super::CpuStorage;
use crate::tensor::params::MatmulDims;

/// A strided view of a row-major matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst = lhs @ rhs` (or `dst += lhs @ rhs` with `accumulate`), lhs `m x k`, rhs `k x n`,
/// dst `m x n` with row stride `dst_row_stride` and unit column stride.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef,
    rhs: MatRef,
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let extent =
        |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    assert!(
        dst.len() >= extent(m, n, dst_row_stride, 1),
        "gemm dst out of bounds"
    );
    if k > 0 {
        assert!(
            lhs.data.len() >= extent(m, k, lhs.row_stride, lhs.col_stride),
            "gemm lhs out of bounds"
        );
        assert!(
            rhs.data.len() >= extent(k, n, rhs.row_stride, rhs.col_stride),
            "gemm rhs out of bounds"
        );
    }
    let threads = rayon::current_num_threads();
    let big = m * n * k >= 1 << 18;
    if parallel && big && m < SMALL_M && n >= threads * 64 {
        // Few rows (77 text tokens): gemm's own threading splits rows, so the threads
        // would share little; give each thread its own band of columns instead.
        let band = n.div_ceil(threads).next_multiple_of(16);
        let dst_ptr = super::SharedMut(dst.as_mut_ptr());
        (0..n.div_ceil(band)).into_par_iter().for_each(|i| {
            let (j0, cols) = (i * band, band.min(n - i * band));
            // SAFETY: as below; the bands' columns are disjoint, so no two tasks write
            // the same element of dst.
            unsafe {
                gemm_raw(
                    m,
                    cols,
                    k,
                    dst_ptr.ptr().add(j0),
                    dst_row_stride,
                    accumulate,
                    lhs,
                    rhs,
                    j0,
                    gemm::Parallelism::None,
                )
            };
        });
        return;
    }
    let parallelism = if parallel && big {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the three strided matrices inside
    // their slices, and dst is borrowed mutably so nothing else aliases it.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_row_stride,
            accumulate,
            lhs,
            rhs,
            0,
            parallelism,
        )
    };
}

/// Products with fewer rows than this split their columns across threads.
const SMALL_M: usize = 256;

/// `gemm::gemm` of `lhs` by columns `first_col..first_col + n` of `rhs` into `dst`.
///
/// # Safety
/// `lhs` and those columns of `rhs` must lie inside their slices, `dst` must point at an
/// `m x n` region (row stride `dst_row_stride`) that no other thread writes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    first_col: usize,
    parallelism: gemm::Parallelism,
) {
    let (lhs_ptr, rhs_ptr) = (
        lhs.data.as_ptr(),
        rhs.data[first_col * rhs.col_stride..].as_ptr(),
    );
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs_ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs_ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Batched `lhs @ rhs` (+ bias broadcast over rows).
pub fn matmul(
    lhs: &CpuStorage,
    rhs: &CpuStorage,
    bias: Option<&CpuStorage>,
    d: MatmulDims,
) -> CpuStorage {
    let lhs = lhs.as_f32();
    let rhs = rhs.as_f32();
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0f32; d.batch * m * n];
    if let Some(bias) = bias {
        let bias = bias.as_f32();
        out.par_chunks_mut(n)
            .for_each(|row| row.copy_from_slice(&bias));
    }
    let rhs_view = |b: usize| {
        let off = if d.rhs_batched { b * k * n } else { 0 };
        let data = &rhs[off..off + k * n];
        if d.transpose_rhs {
            MatRef {
                data,
                row_stride: 1,
                col_stride: k,
            }
        } else {
            MatRef {
                data,
                row_stride: n,
                col_stride: 1,
            }
        }
    };
    let lhs_view = |b: usize| MatRef {
        data: &lhs[b * m * k..(b + 1) * m * k],
        row_stride: k,
        col_stride: 1,
    };
    if d.batch == 1 {
        sgemm(
            m,
            n,
            k,
            lhs_view(0),
            rhs_view(0),
            &mut out,
            n,
            bias.is_some(),
            true,
        );
    } else {
        // Many small products (attention heads): one thread per product.
        let parallel_inside = d.batch < rayon::current_num_threads();
        out.par_chunks_mut(m * n).enumerate().for_each(|(b, dst)| {
            sgemm(
                m,
                n,
                k,
                lhs_view(b),
                rhs_view(b),
                dst,
                n,
                bias.is_some(),
                parallel_inside,
            );
        });
    }
    CpuStorage::F32(out)
}
